"""Pruning and diagnostics on FSDP2-sharded parameters (2 real CPU processes, gloo).

References: the same selection (`global_masks`, `layerwise_masks`) on one process on the full
tensors put together from the shards, numpy.packbits for the packing, and plain loops.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp import run_ddp

from lightning_fairprune.distributed import shard_spec
from lightning_fairprune.pruning import (
    global_masks,
    layerwise_masks,
    masks_from_state,
    shard_full_masks,
)
from lightning_fairprune.pruning.mask_io import pack_mask, unpack_mask
from lightning_fairprune.pruning.select import radix_select

HERE = Path(__file__).parent
NAMES = ["0.weight", "2.weight", "4.weight", "0.bias"]


def _assemble(ranks: list[dict], pick, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Full tensors from each rank's flat local values, placed at the ranks' offsets."""
    out = {}
    for name, shape in shapes.items():
        full = torch.full((math.prod(shape),), -1.0, dtype=torch.float64)
        for r in ranks:
            _, _, offset, local_numel, _ = r["specs"][name]
            values = torch.tensor(pick(r)[name], dtype=torch.float64)
            assert values.numel() == local_numel
            full[offset : offset + local_numel] = values
        assert bool((full != -1).all()), name  # the shards cover the tensor
        out[name] = full.view(shape)
    return out


@pytest.fixture(scope="module")
def core_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fsdp_core")
    return run_ddp(HERE / "fsdp_core_script.py", out, timeout=300), out


def _full_model_scores() -> dict[str, torch.Tensor]:
    from fsdp_core_script import build_model

    named = dict(build_model().named_parameters())
    return {n: named[n].detach().abs() for n in NAMES}


def test_sharded_selection_equals_unsharded(core_run: tuple[list[dict], Path]) -> None:
    ranks, _ = core_run
    shapes = {n: ranks[0]["specs"][n][0] for n in NAMES}
    # both ranks hold a real shard (not a replica) of every tensor
    assert [r["specs"]["0.weight"][2] for r in ranks] == [0, 17 * 12]
    scores = _full_model_scores()
    ties = sum(int(s.numel() - torch.unique(s).numel()) for s in scores.values())
    assert ties > 500  # the rounded weights make the tie-break matter
    ref_a = global_masks(scores, 0.5)
    ref_b = global_masks(scores, 0.7, current_masks=ref_a)
    with pytest.warns(UserWarning, match="already pruned"):
        ref_c = layerwise_masks(scores, 0.6, current_masks=ref_a)
    # "magnitude": ties pruned in the mask pass and fixed up from their stored positions;
    # "magnitude_counted": ties counted in a pass of their own first (very many ties)
    for form in ("magnitude", "magnitude_counted"):
        for key, ref in (("a", ref_a), ("b", ref_b), ("c", ref_c)):
            got = _assemble(ranks, lambda r, k=key, f=form: r[f][k], shapes)
            for n in NAMES:
                assert torch.equal(got[n].bool(), ref[n]), (form, key, n)
    total = sum(s.numel() for s in scores.values())
    for r in ranks:
        assert r["sparsity_b"] == math.floor(0.7 * total + 0.5) / total
    # the random criterion's full-shape scores, distributed like the parameters
    from lightning_fairprune.pruning.criteria import random_scores

    ref = global_masks(random_scores(scores, seed=5), 0.5)
    got = _assemble(ranks, lambda r: r["random"], shapes)
    for n in NAMES:
        assert torch.equal(got[n].bool(), ref[n]), n


def test_sharded_gradient_scores_select_like_unsharded(core_run: tuple[list[dict], Path]) -> None:
    ranks, _ = core_run
    shapes = {n: ranks[0]["specs"][n][0] for n in NAMES}
    scores = _assemble(ranks, lambda r: r["gradient"]["scores"], shapes)
    scores = {n: s.float() for n, s in scores.items()}  # the local scores were float32
    got = _assemble(ranks, lambda r: r["gradient"]["masks"], shapes)
    ref = global_masks(scores, 0.4)
    for n in NAMES:
        assert torch.equal(got[n].bool(), ref[n]), n
    # the gradients came from an FSDP backward: gradient of the mean loss over both ranks
    from fsdp_core_script import build_model, data

    model = build_model()
    x, y = data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    named = dict(model.named_parameters())
    for n in NAMES:
        expect = (named[n].detach() * named[n].grad).abs().double()
        torch.testing.assert_close(scores[n].double(), expect, rtol=1e-5, atol=1e-7)


def test_selection_allocates_nothing_of_full_size(core_run: tuple[list[dict], Path]) -> None:
    ranks, _ = core_run
    for r in ranks:
        mem = r["memory"]
        # every tensor created during the selection (histograms, masks, scratch, collectives)
        # is at most a local shard; the full weight is twice that
        assert mem["full_numel"] == 2 * mem["local_numel"]
        assert mem["max_numel"] <= mem["local_numel"]
        assert mem["sparsity"] == 0.5


def test_enforcement_on_local_shards(core_run: tuple[list[dict], Path]) -> None:
    ranks, _ = core_run
    for r in ranks:
        assert r["enforce"]["touched"] == 4  # one momentum buffer per masked parameter
        assert r["enforce"]["momentum_pruned_nonzero"] == 0
        assert r["enforce"]["pruned_nonzero"] == 0
        assert r["enforce"]["kept_nonzero"] > 0


def test_checkpoint_forms_restore_on_one_process(core_run: tuple[list[dict], Path]) -> None:
    ranks, out = core_run
    shapes = {n: ranks[0]["specs"][n][0] for n in NAMES}
    expected = _assemble(ranks, lambda r: r["magnitude"]["b"], shapes)
    expected = {n: t.bool() for n, t in expected.items()}
    # full form (rank 0 wrote it; every rank gathered the same)
    full = torch.load(out / "full.pt", weights_only=True)
    for n in NAMES:
        assert torch.equal(full[n], expected[n])
        assert ranks[1]["full_hash"][n] == expected[n].reshape(-1).int().tolist()
    # the checkpoint form: packed 1 bit per weight, the same on every rank; written by 2
    # processes, restored on one
    for r in ranks:
        for n in NAMES:
            assert r["packed_bytes"][n] == math.ceil(math.prod(shapes[n]) / 8)
    restored = masks_from_state(torch.load(out / "state.pt", weights_only=True))
    for n in NAMES:
        assert torch.equal(restored[n], expected[n]), n


# ------------------------------------------------------------------ one-process units


def test_pack_mask_matches_numpy_packbits() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (9,), (3, 13), (2, 3, 16)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = pack_mask(mask)
        ref = np.packbits(mask.numpy(), axis=-1)
        assert np.array_equal(packed.numpy(), ref), shape
        assert torch.equal(unpack_mask(packed, shape[-1]), mask)


def test_pack_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="Expected `mask` to be a bool tensor"):
        pack_mask(torch.zeros(3))
    with pytest.raises(ValueError, match="Expected `n` to be an int in"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), 17)


@pytest.mark.filterwarnings("ignore:.*already pruned")
def test_replicas_over_a_process_group_select_like_one_process(tmp_path: Path) -> None:
    # with `group`, plain tensors are replicas and the selection runs its collective path
    # (all-reduced histograms, stored ties fixed up by the tie table, or counted first)
    import torch.distributed as dist

    import lightning_fairprune.pruning.select as select_module

    g = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.randint(0, 5, (7, 9), generator=g).float(),
        "b": torch.randint(0, 5, (11,), generator=g).float(),
    }
    current = global_masks(scores, 0.3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        for limit in (select_module._MAX_STORED_TIES, 0):
            select_module._MAX_STORED_TIES = limit
            for s in (0.0, 0.31, 0.5, 0.9):
                ref = global_masks(scores, s, current_masks=current)
                got = global_masks(scores, s, current_masks=current, group=group)
                assert all(torch.equal(got[n], ref[n]) for n in scores)
                ref = layerwise_masks(scores, s)
                got = layerwise_masks(scores, s, group=group)
                assert all(torch.equal(got[n], ref[n]) for n in scores)
    finally:
        select_module._MAX_STORED_TIES = 1 << 22
        dist.destroy_process_group()


def test_radix_select_joins_reduction_without_local_candidates() -> None:
    # a process whose keys all lie outside the threshold's bucket still contributes a
    # (zero) histogram to the reduction instead of failing
    other = torch.tensor([5, 70000, 70001])  # the "other process": same bucket for 70000/1
    mine = torch.tensor([3])  # nothing in the second pass's bucket

    calls: list[torch.Tensor] = []

    def reduce_fn(hist: torch.Tensor) -> torch.Tensor:
        calls.append(hist.clone())
        # add the other process's histogram of the same pass
        shift = 16 if len(calls) == 1 else 0
        if shift:
            part = torch.bincount(other >> 16, minlength=1 << 16)
        else:
            part = torch.bincount(other[(other >> 16) == 1] & 0xFFFF, minlength=1 << 16)
        return hist + part

    sel = radix_select(lambda: [(mine, None)], 4, 32, reduce_fn=reduce_fn)
    assert sel.threshold == int(torch.sort(torch.cat([mine, other])).values[3]) == 70001
    assert len(calls) == 2
    assert int(calls[1].sum()) == 0  # the empty local histogram of the second pass


def test_empty_and_whole_shards_join_every_collective(tmp_path: Path) -> None:
    # a one-row layer: process 0 holds all of it, process 1 an empty shard; before the fix
    # process 0 skipped the gather of its masks and the other process waited (state_dict,
    # export_masks and checkpoints hung; the file written first held wrong masks)
    from fsdp_small_shards_script import build_model, data, make_pruning, squared_error

    from lightning_fairprune.diagnostics import group_gradient_norms

    ranks = run_ddp(HERE / "fsdp_small_shards_script.py", tmp_path, timeout=300)
    assert [r["local_rows"]["4.weight"] for r in ranks] == [1, 0]
    assert [r["local_rows"]["2.weight"] for r in ranks] == [2, 1]
    # the same steps unsharded
    model = build_model()
    pruning = make_pruning()
    pruning.prune_now(None, model)
    ref_50 = {k: v.clone() for k, v in pruning.masks.items()}
    sparsities = [pruning.current_sparsity]
    pruning.prune_now(None, model, sparsity=0.75)
    ref_75 = pruning.masks
    sparsities.append(pruning.current_sparsity)
    params = dict(model.named_parameters())
    scores = {n: p.detach().abs() for n, p in params.items()}
    ref_layer = layerwise_masks(scores, 0.6, current_masks=layerwise_masks(scores, 0.5))

    def flat(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        return {k: v.reshape(-1).int().tolist() for k, v in masks.items()}

    for name, ref in (("masks.pt", ref_50), ("masks_75.pt", ref_75)):
        exported = torch.load(tmp_path / name, weights_only=True)
        assert flat(exported) == flat(ref), name
    for r in ranks:
        assert r["state_masks"] == flat(ref_50)
        assert r["imported_local"] == r["own_local"] == r["loaded_local"]
        assert [r["sparsity"], r["imported_sparsity"]] == [sparsities[0]] * 2
        assert r["sparsity_75"] == sparsities[1]
        assert r["layerwise"] == flat(ref_layer)
        assert r["counts"] == {n: [int((~m).sum()), m.numel()] for n, m in ref_layer.items()}
        assert r["state_equal"]
        assert r["bad_import"] == (
            "IterativePruning: the imported masks do not fit the model: Expected the mask of "
            "'0.weight' to have shape (4, 6), but got (2, 6)"
        )
        assert r["weights"] == {n: p.detach().reshape(-1).tolist() for n, p in params.items()}
    ref_norms = group_gradient_norms(model, [data()], 2, loss_fn=squared_error).norms
    for r in ranks:
        assert torch.allclose(torch.tensor(r["grad_norms"], dtype=torch.float64), ref_norms)
    for n in ref_50:  # each process's shard: its rows of the reference, in rank order
        assert ranks[0]["own_local"][n] + ranks[1]["own_local"][n] == flat(ref_50)[n]


def test_shard_spec_and_full_masks_validation() -> None:
    assert shard_spec(torch.zeros(4, 2)).offset == 0
    with pytest.raises(ValueError, match="Expected the full mask of 'w'"):
        shard_full_masks({"w": torch.ones(3, dtype=torch.bool)}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="Expected `current_masks` to cover exactly"):
        global_masks({"w": torch.ones(2)}, 0.5, current_masks={})


# ------------------------------------------------------------------ the callback


def test_iterative_pruning_under_model_parallel_strategy(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    ranks = run_ddp(HERE / "fsdp_callback_script.py", tmp_path, "fsdp", timeout=300)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "fsdp_callback_script.py"), str(tmp_path), "single"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp_path / "single.json").read_text())
    first, second = ranks[0]["rounds"], ranks[1]["rounds"]
    # round 1 prunes the initial weights: bitwise the single-process masks
    assert first[0]["masks"] == second[0]["masks"] == single["rounds"][0]["masks"]
    assert first[0]["layers"] == single["rounds"][0]["layers"]
    # round 2 (after sharded training): the unsharded selection on the gathered weights
    weights = {n: torch.tensor(w).abs() for n, w in first[1]["weights"].items()}
    current = {n: torch.tensor(m).bool() for n, m in first[0]["masks"].items()}
    ref = global_masks(weights, first[1]["target"], current_masks=current)
    for n in ref:
        assert first[1]["masks"][n] == ref[n].int().tolist() == second[1]["masks"][n]
    total = sum(w.numel() for w in weights.values())
    for r in ranks:
        assert r["sparsity"] == single["sparsity"] == math.floor(0.8 * total + 0.5) / total
        assert r["pruned_nonzero"] == 0
        # checkpoint state: the one form, packed full masks (1 bit per weight), restored bitwise
        assert r["state_keys"] == ["masks"]
        assert r["packed_bytes"] == sum(math.ceil(w.numel() / 8) for w in weights.values())
        assert r["restored_equal"]
        assert r["restored_sparsity"] == r["sparsity"]
        # rewind weights: local shards in memory, the full form in the checkpoint state
        # (the initial weights, bitwise those of the single-process run), restored bitwise
        assert r["rewind_state"] == single["rewind_state"]
        assert r["restored_rewind_equal"]
        for n, shape in r["rewind_local_shapes"].items():
            full_rows = len(r["rewind_state"][n]) // math.prod(shape[1:])
            assert shape[0] == -(-full_rows // 2) or shape[0] == full_rows - -(-full_rows // 2)
    # each round rewound the survivors to the initial weights on every shard
    init = {n: torch.tensor(w) for n, w in single["rewind_state"].items()}
    for rounds in (first, second, single["rounds"]):
        for rnd in rounds:
            for n, after in rnd["after"].items():
                keep = torch.tensor(rnd["masks"][n]).bool()
                assert torch.equal(torch.tensor(after), torch.where(keep, init[n], 0.0)), n
    # fairness-aware criteria: refused with a clear error at fit start, before any step
    # (they used to fail at the first round, here after a whole epoch)
    for r in ranks:
        assert r["refused"]["global_step"] == 0
        assert "criterion='fairprune' on unsharded parameters" in r["refused"]["message"]
    # export_masks writes the full form, loadable by the unsharded callback
    exported = torch.load(tmp_path / "export_fsdp.pt", weights_only=True)
    exported_single = torch.load(tmp_path / "export_single.pt", weights_only=True)
    assert set(exported) == set(ref)
    for n in ref:
        assert exported[n].reshape(-1).int().tolist() == ranks[0]["rounds"][1]["masks"][n]
        assert exported[n].shape == exported_single[n].shape


def test_selection_rejects_nan_scores_on_both_paths(tmp_path: Path) -> None:
    import torch.distributed as dist

    scores = {"w": torch.tensor([0.5, float("nan"), 0.1, 0.2])}
    with pytest.raises(ValueError, match="Expected scores without NaN, but the score of 'w'"):
        global_masks(scores, 0.5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="Expected scores without NaN"):
            global_masks(scores, 0.5, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_checkpoint_and_resume_under_model_parallel_strategy(tmp_path: Path) -> None:
    # real Lightning checkpoints (ModelCheckpoint) in both of ModelParallelStrategy's forms,
    # then a fresh fit resumed after epoch 0 with `ckpt_path`: it must end where the
    # uninterrupted fit ended, bit for bit
    ranks = run_ddp(HERE / "fsdp_resume_script.py", tmp_path, timeout=300)
    for form, kind in (("dcp", "dir"), ("full", "file")):
        for r in ranks:
            a, b = r[form]["a"], r[form]["b"]
            assert r[form]["kind"] == kind
            assert a["rounds_done"] == b["rounds_done"] == 2
            assert a["epochs"] == b["epochs"] == [0, 2]  # no round ran twice
            assert a["masks"] == b["masks"]
            assert a["rewind"] == b["rewind"]
            assert a["weights"] == b["weights"]
            total = sum(len(m) for m in a["masks"].values())
            assert b["sparsity"] == math.floor(0.75 * total + 0.5) / total
            for name, mask in b["masks"].items():
                pruned = [w for w, m in zip(b["weights"][name], mask, strict=True) if not m]
                assert all(w == 0.0 for w in pruned), name
        assert ranks[0][form] == ranks[1][form]  # every process holds the same full state
