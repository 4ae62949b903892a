"""`IterativePruning(structure=...)`: channels and N:M blocks in real fits (issue 20).

References: channel groups rebuilt independently from the model (`channel_groups`), the masks
they imply for the dead channels found in the weights, the masked model's outputs for the
compact one, `model_cost` of the compact copy, naive loops over channel entries for the
per-group statistics of a fairness-aware criterion, brute-force block checks for 2:4, and the
uninterrupted fit for a resumed one.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _ddp import run_ddp
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from _resnet import TinyResNet, WithEmbedding
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_fairprune import FairnessMonitor, IterativePruning, compact, load_compact, model_cost
from lightning_fairprune.diagnostics import GroupStatistics
from lightning_fairprune.pruning import CRITERIA, CriterionContext
from lightning_fairprune.pruning.criteria import check_support
from lightning_fairprune.pruning.structured import (
    channel_groups,
    channel_masks,
    dead_channels,
    parse_structure,
    select_channels,
)
from lightning_fairprune.pruning.units import ChannelUnits

HERE = Path(__file__).parent
X = DigitsDataModule(n=64)
X.setup()
EXAMPLE = X.train_set.tensors[0][:4]


class Scalars(Logger):
    """Keeps every logged scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        return "scalars"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _fit(tmp_path, model, callbacks, ckpt_path=None, shuffle=True, **kwargs) -> pl.Trainer:
    kwargs = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 1, **kwargs}
    settings = quiet_trainer_kwargs(tmp_path)
    settings.update({k: kwargs.pop(k) for k in list(kwargs) if k in settings})
    trainer = pl.Trainer(callbacks=callbacks, **settings, **kwargs)
    datamodule = DigitsDataModule(n=200, batch_size=40, shuffle=shuffle)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def _consistent(model: nn.Module, masks: dict) -> list[torch.Tensor]:
    """The masks are exactly those of their dead channels, over every coupled parameter."""
    groups = channel_groups(model, EXAMPLE)
    params = dict(model.named_parameters())
    keep = [~d for d in dead_channels(groups, masks)]
    expected = channel_masks(groups, params, keep)
    assert set(expected) == set(masks)
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
        assert bool((params[name][~mask] == 0).all()), name  # pruned entries are zeros
    return keep


def test_channel_pruning_in_a_fit_is_consistent_compacts_and_reports_its_cost(tmp_path):
    pl.seed_everything(0)
    model = TinyResNet()
    path = tmp_path / "compact.pt"
    pruning = IterativePruning(
        0.5, structure="channel", num_rounds=2, start=1, compact_path=path, example_input=EXAMPLE
    )
    monitor = FairnessMonitor(num_probes=0)
    logger = Scalars()
    _fit(tmp_path, model, [pruning, monitor], logger=logger)
    keep = _consistent(model, pruning.masks)
    # the target is a fraction of the prunable channels, exact (one channel kept per group)
    total = sum(len(k) for k in keep)
    pruned = sum(int((~k).sum()) for k in keep)
    assert pruned == min(math.floor(0.5 * total + 0.5), total - len(keep))
    assert pruning.current_sparsity == pruned / total
    assert pruning.history[-1]["realized_sparsity"] == pruned / total
    # the compact model equals the masked one and is smaller; so is the written file
    model.eval()
    small = compact(model, EXAMPLE, masks=pruning.masks).eval()
    with torch.no_grad():
        assert float((small(EXAMPLE) - model(EXAMPLE)).abs().max()) <= 1e-4
        loaded = load_compact(TinyResNet(), torch.load(path, weights_only=True)).eval()
        assert float((loaded(EXAMPLE) - model(EXAMPLE)).abs().max()) <= 1e-4
    cost = model_cost(small, EXAMPLE)
    assert cost["params"] < model_cost(model, EXAMPLE)["params"]
    # the cost of every round: the compact model's, announced, logged and in the records
    last = pruning.history[-1]
    assert last["cost"] == cost
    assert pruning.history[0]["previous_cost"] == model_cost(model, EXAMPLE)
    assert last["previous_cost"] == pruning.history[0]["cost"]
    assert last["cost"]["flops"] < last["previous_cost"]["flops"]
    logged = [r for r in logger.rows if "fairprune/pruned_flops" in r]  # the pruner's rows
    assert [r["fairprune/pruned_flops"] for r in logged] == [
        h["cost"]["flops"] for h in pruning.history
    ]
    after = [r for r in monitor.history if r["moment"] == "after_round"]
    assert [(r["params"], r["flops"]) for r in after] == [
        (h["cost"]["params"], h["cost"]["flops"]) for h in pruning.history
    ]
    # every monitor record carries the cost of the model it measured, logged in the same row as
    # its fairness numbers (W&B can plot worst-group accuracy against FLOPs)
    for record in monitor.history:
        assert record["flops"] is not None, record["moment"]
    rows = [r for r in logger.rows if "fairprune/worst_group_accuracy" in r]
    assert rows
    assert all("fairprune/flops" in r for r in rows)


@pytest.mark.parametrize(
    ("precision", "accumulate", "optimizer"), [("bf16-mixed", 2, "sgd"), ("32-true", 2, "adam")]
)
def test_channel_masks_hold_under_amp_accumulation_and_adam(
    tmp_path, precision, accumulate, optimizer
):
    pl.seed_everything(1)
    model = TinyResNet(optimizer=optimizer)
    pruning = IterativePruning(0.4, structure="channel", interval="step")
    _fit(
        tmp_path, model, [pruning], precision=precision, accumulate_grad_batches=accumulate,
        max_epochs=2, limit_train_batches=4,
    )  # fmt: skip
    assert pruning.rounds_done == 1
    assert pruning.history[0]["global_step"] == 2  # one epoch of optimizer steps
    _consistent(model, pruning.masks)  # the example came from the first training sample
    assert pruning.target.example.shape == (1, 1, 8, 8)


def test_channel_pruning_resumes_bitwise_from_a_checkpoint(tmp_path):
    def run(root, ckpt_path=None):
        pl.seed_everything(2)
        model = TinyResNet(optimizer="sgd")
        pruning = IterativePruning(
            0.6, structure="channel", num_rounds=3, start=1, example_input=EXAMPLE
        )
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        _fit(root, model, [pruning, ckpt], max_epochs=4, enable_checkpointing=True,
             ckpt_path=ckpt_path, shuffle=False)  # fmt: skip
        return model, pruning

    model_a, pruning_a = run(tmp_path / "a")
    path = sorted((tmp_path / "a" / "ckpt").glob("epoch=1-*.ckpt"))[0]
    model_b, pruning_b = run(tmp_path / "b", ckpt_path=str(path))
    assert pruning_b.rounds_done == pruning_a.rounds_done == 3
    assert [h["epoch"] for h in pruning_b.history] == [1, 2, 3]
    for name, mask in pruning_a.masks.items():
        assert torch.equal(mask, pruning_b.masks[name]), name
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_channel_pruning_under_ddp_gives_identical_masks(tmp_path):
    r0, r1 = run_ddp(HERE / "ddp_structured_script.py", tmp_path)
    assert r0["rounds"] == r1["rounds"] == 2
    assert r0["masks"] == r1["masks"]
    assert r0["weights"] == r1["weights"]
    assert r0["pruned_nonzero"] == r1["pruned_nonzero"] == 0
    assert r0["sparsity"] == r1["sparsity"] > 0.4


def test_two_four_pattern_is_exact_after_a_fit(tmp_path):
    pl.seed_everything(3)
    model = SmallCNN()
    pruning = IterativePruning(structure="2:4", num_rounds=2, start=1, include_names=["fc.*"])
    _fit(tmp_path, model, [pruning])
    assert pruning.plan.targets[-1] == 0.5
    weight = model.fc.weight.detach()
    blocks = weight.reshape(weight.shape[0], -1, 4)
    assert bool(((blocks != 0).sum(-1) <= 2).all())
    mask_blocks = pruning.masks["fc.weight"].reshape(weight.shape[0], -1, 4)
    assert bool((mask_blocks.sum(-1) == 2).all())  # the last round: exactly 2 of 4 kept
    first = pruning.history[0]  # round 1 of 2: 1 of every 4 pruned (target 1 - sqrt(0.5))
    assert first["target_sparsity"] == pytest.approx(1 - math.sqrt(0.5))
    assert first["realized_sparsity"] == 0.25


def test_fairness_aware_criteria_sum_group_statistics_over_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    groups = channel_groups(net, x)
    named = dict(net.named_parameters())
    params = {n: named[n] for n in {s.name for g in groups for s in g.slices}}
    gen = torch.Generator().manual_seed(1)
    stats = GroupStatistics(
        {n: torch.randn(2, *p.shape, generator=gen) for n, p in params.items()},
        torch.tensor([0.3, 0.9]),
        torch.tensor([4.0, 2.0]),
        curvature_sums={n: torch.rand(2, *p.shape, generator=gen) for n, p in params.items()},
    )
    units = ChannelUnits(groups, params)
    ctx = CriterionContext(params, 0.5, units=units, group_statistics=lambda: stats)
    ctx.options = CRITERIA["fairprune"].make_options({"beta": 0.7})
    masks = CRITERIA["fairprune"].masks(ctx)
    # reference: each channel's per-group OBD saliency, summed by a loop over its entries;
    # worst group 1 (highest mean loss), rest = group 0
    saliency = {n: 0.5 * (stats.curvature_sums[n] / stats.counts.view(-1, *[1] * p.dim()))
                * p.detach() ** 2 for n, p in params.items()}  # fmt: skip
    priorities = []
    for g in groups:
        per = torch.zeros(2, g.num_channels, dtype=torch.float64)
        for s in g.slices:
            for i, c in zip(s.index.tolist(), s.channel.tolist(), strict=True):
                per[:, c] += saliency[s.name].select(s.dim + 1, i).reshape(2, -1).sum(1).double()
        priorities.append(per[0] - 0.7 * per[1])
    flat = torch.cat(priorities)
    ranks = torch.empty_like(flat)
    ranks[torch.sort(-flat, stable=True).indices] = torch.arange(1, len(flat) + 1).double()
    sizes = [g.num_channels for g in groups]
    keep = select_channels(list(ranks.split(sizes)), 0.5)
    expected = channel_masks(groups, params, keep)
    for n in params:
        assert torch.equal(masks[n], expected[n]), n


def test_structure_arguments_are_checked_at_construction_and_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"`structure` to be 'weight', 'channel' or 'n:m'"):
        IterativePruning(0.5, structure="channels")
    with pytest.raises(ValueError, match=r"`structure` 'n:m' to have 0 < n < m"):
        IterativePruning(structure="4:2")
    with pytest.raises(ValueError, match=r"`final_sparsity` None or 0.5 \(the 2:4 pattern\)"):
        IterativePruning(0.7, structure="2:4")
    with pytest.raises(ValueError, match="`final_sparsity` with structure='channel', but got"):
        IterativePruning(compression_ratio=2.0, structure="channel")
    with pytest.raises(ValueError, match="`prune_bias` False with structure='channel'"):
        IterativePruning(0.5, structure="channel", prune_bias=True)
    with pytest.raises(ValueError, match="criterion='worst_group' with a structure among"):
        IterativePruning(structure="2:4", criterion="worst_group")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:  # FSDP2-sharded parameters (DTensors on a 1-D mesh)
        sharded = {
            "w": distribute_tensor(torch.zeros(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        }
        with pytest.raises(ValueError, match=r"structure='channel' on unsharded parameters"):
            check_support(CRITERIA["magnitude"], parse_structure("channel"), sharded)
        check_support(CRITERIA["magnitude"], parse_structure("2:4"), sharded)  # N:M: whole rows
    finally:
        dist.destroy_process_group()
    check_support(CRITERIA["magnitude"], parse_structure("channel"), {"w": torch.zeros(2)})

    pruning = IterativePruning(0.5, structure="channel", example_input=torch.zeros(1, 3).long())
    with pytest.raises(TypeError, match=r"module 'emb' of type Embedding is coupled"):
        pruning.prune_now(None, WithEmbedding())
    # no example input and no training data to take one from
    with pytest.raises(ValueError, match="Expected an example input with structure='channel'"):
        IterativePruning(0.5, structure="channel").prune_now(None, SmallCNN())

    # an example input taken from dict batches: refused at fit start, before any step
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.zeros(1, 8, 8), "y": 0}

    pruning = IterativePruning(0.5, structure="channel", start=1)
    trainer = pl.Trainer(callbacks=[pruning], max_epochs=1, **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="Expected the training batches to be tensors or"):
        trainer.fit(TinyResNet(), torch.utils.data.DataLoader(Dicts(), batch_size=4))
    assert trainer.global_step == 0
