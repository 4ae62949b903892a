"""ConstrainedGapLoss (Balancing Act, ICLR 2024) against naive re-computations."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ddp import run_ddp
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessData, IterativePruning
from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import ConstrainedGap, ConstrainedGapLoss, GroupLoss, ReplayBuffer


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def naive_value_and_grad(z, y, g, lam, ref_w, ref_loss):
    """J + Σ_{a present} λ_a [(J_a − L_a*) − (J − L*)] and its gradient, by loops (numpy)."""
    n, c = z.shape
    p = _softmax(z)
    ell = -np.log(p[np.arange(n), y])
    dell = p - np.eye(c)[y]
    big_j, d_big_j = ell.mean(), dell / n
    w = ref_w / ref_w.sum()
    dense_overall = sum(w[a] * ref_loss[a] for a in range(len(w)))
    value, grad = big_j, d_big_j.copy()
    for a in range(len(w)):
        members = g == a
        if not members.any():
            continue
        ja = ell[members].mean()
        d_ja = np.where(members[:, None], dell / members.sum(), 0.0)
        value += lam[a] * ((ja - ref_loss[a]) - (big_j - dense_overall))
        grad += lam[a] * (d_ja - d_big_j)
    return value, grad


def naive_dual_step(lam, buffers, size, ref_w, ref_acc, lr, eps):
    """λ_a ← max(0, λ_a + lr (ψ_a − ε)) for the groups whose deque is full."""
    est = [a for a in range(len(lam)) if len(buffers[a]) == size and ref_w[a] > 0]
    lam = lam.copy()
    if not est:
        return lam, {}
    w = {a: ref_w[a] / ref_w.sum() for a in est}
    acc = {a: float(np.mean(buffers[a])) for a in est}
    overall = sum(w[a] * acc[a] for a in est) / sum(w.values())
    dense = sum(w[a] * ref_acc[a] for a in est) / sum(w.values())
    psi = {a: (ref_acc[a] - acc[a]) - (dense - overall) for a in est}
    for a in est:
        lam[a] = max(0.0, lam[a] + lr * (psi[a] - eps))
    return lam, psi


def test_value_gradient_and_dual_step_match_naive_loops():
    gen = torch.Generator().manual_seed(5)
    ref_acc, ref_loss, ref_w = [0.9, 0.8, 0.85], [0.3, 0.5, 0.4], np.array([2.0, 1.0, 1.0])
    loss_fn = ConstrainedGapLoss(3, tolerance=0.02, buffer_size=3).double()
    loss_fn.set_reference(ref_acc, ref_loss, ref_w)
    lam = np.array([0.5, 1.2, 0.0])
    loss_fn.multipliers.copy_(torch.tensor(lam))
    buffers = [deque(maxlen=3) for _ in range(3)]
    group_batches = [[0, 0, 1, 0], [1, 0, 0, 1, 0], [0, 1, 1, 2, 2, 2, 2], [2, 0, 1, 1, 0]]
    for step, ids in enumerate(group_batches):
        g = torch.tensor(ids)
        z = torch.randn(len(ids), 4, generator=gen, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 4, (len(ids),), generator=gen)
        value = loss_fn(z, y, g)
        (grad,) = torch.autograd.grad(value, z)
        ref_value, ref_grad = naive_value_and_grad(
            z.detach().numpy(), y.numpy(), g.numpy(), lam, ref_w, ref_loss
        )
        assert value.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)
        right = (z.detach().argmax(1) == y).double().tolist()
        for a, r in zip(ids, right, strict=True):
            buffers[a].append(r)
        if step % 2 == 1:  # a dual step after every second batch; the buffers persist
            violations = loss_fn.dual_step(0.7)
            lam, psi = naive_dual_step(lam, buffers, 3, ref_w, ref_acc, 0.7, 0.02)
            np.testing.assert_allclose(loss_fn.multipliers.numpy(), lam, rtol=0, atol=1e-12)
            for a in range(3):
                if a in psi:
                    assert violations[a].item() == pytest.approx(psi[a] - 0.02, abs=1e-12)
                else:
                    assert np.isnan(violations[a].item())  # no full buffer: no update
            assert loss_fn.accumulated[1].sum().item() == 0.0
    assert loss_fn.multipliers.max().item() > 0  # something moved


def test_replay_buffer_equals_deques_for_hundreds_of_groups():
    # 20 × 15 intersectional groups (mixed-radix ids), batches larger than a ring
    gen = torch.Generator().manual_seed(0)
    sizes, size = (20, 15), 4
    buffer = ReplayBuffer(sizes[0] * sizes[1], size)
    deques = [deque(maxlen=size) for _ in range(sizes[0] * sizes[1])]
    for n in (300, 1000, 7, 2500):
        a, b = torch.randint(0, sizes[0], (n,), generator=gen), torch.randint(0, 15, (n,))
        ids = a * sizes[1] + b
        ids[:9] = 17  # one group gets more values in one batch than its ring holds
        values = torch.rand(n, generator=gen)
        buffer.add(ids, values)
        for i, v in zip(ids.tolist(), values.double().tolist(), strict=True):
            deques[i].append(v)
        sums, seen = buffer.sums()
        for i, d in enumerate(deques):
            full = len(d) == size
            assert seen[i].item() == (size if full else 0)
            assert sums[i].item() == pytest.approx(sum(d) if full else 0.0, rel=1e-12)
    state = buffer.state_dict()
    copy = ReplayBuffer(300, size)
    copy.load_state_dict(state)
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in state.items())


def test_bad_inputs():
    with pytest.raises(ValueError, match="Expected `buffer_size` to be an int >= 1"):
        ConstrainedGapLoss(3, buffer_size=0)
    with pytest.raises(ValueError, match="Expected `tolerance` to be a finite float >= 0"):
        ConstrainedGapLoss(3, tolerance=-0.1)
    with pytest.raises(ValueError, match="Expected `base_loss` to be 'cross_entropy' or a"):
        ConstrainedGapLoss(3, base_loss=None)
    strategy = ConstrainedGap()
    GroupLoss(3, strategy)
    with pytest.raises(ValueError, match="Expected a fresh ConstrainedGap per loss"):
        GroupLoss(3, strategy)  # two losses would share one replay buffer
    loss_fn = ConstrainedGapLoss(3)
    with pytest.raises(ValueError, match=r"Expected `accuracy` to be a 1-D tensor .*shape \(3,\)"):
        loss_fn.set_reference([0.5, 0.5])
    with pytest.raises(ValueError, match=r"Expected `accuracy` in \[0, 1\]"):
        loss_fn.set_reference([0.5, 0.5, 1.5])
    with pytest.raises(ValueError, match="Expected a dense reference"):
        loss_fn.dual_step(
            0.1, statistics={k: torch.ones(3) for k in ("loss", "count", "correct", "seen")}
        )
    with pytest.raises(ValueError, match=r"Expected `statistics` with the keys"):
        loss_fn.dual_step(0.1, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    # no reference yet: not applied (the plain mean), so validation steps work before round 0
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))


# ----------------------------------------------------------------------------- Trainer runs
class GapCNN(SmallCNN):
    """SmallCNN on digits with intersectional groups class × thick strokes (20 groups)."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.criterion = ConstrainedGapLoss(20, tolerance=0.0, buffer_size=6)

    def training_step(self, batch, batch_idx):
        x, y, ink = batch
        return self.criterion(self(x), y, y * 2 + ink)


def _intersectional_data(dm: DigitsDataModule) -> FairnessData:
    """The training split as (x, y, [class, ink]) batches: FairnessData combines the ids."""
    x, y, ink = dm.train_set.tensors
    loader = DataLoader(TensorDataset(x, y, torch.stack([y, ink], 1)), batch_size=100)
    return FairnessData(loader, num_groups=[10, 2], group_key=None)


class DenseRecorder(Callback):
    """Naive per-group accuracy, loss and frequency of the model at round 0 (before pruning)."""

    def __init__(self, dm: DigitsDataModule) -> None:
        self.dm = dm
        self.reference: torch.Tensor | None = None

    def on_before_pruning_round(self, trainer, pl_module, event) -> None:
        if event.round_index != 0:
            return
        x, y, ink = self.dm.train_set.tensors
        with torch.no_grad():
            logits = pl_module(x)
        per, right, g = (
            F.cross_entropy(logits, y, reduction="none"),
            logits.argmax(1) == y,
            y * 2 + ink,
        )
        rows = [
            [(g == a).sum() / len(g), right[g == a].double().mean(), per[g == a].mean()]
            for a in range(20)
        ]
        self.reference = torch.tensor(rows, dtype=torch.float64).T


def _fit_gap(tmp_path, callbacks, dm, model, **overrides):
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(max_epochs=4, limit_val_batches=0, num_sanity_val_steps=0)
    kwargs.update(overrides)
    pl.Trainer(callbacks=callbacks, **kwargs).fit(model, dm, ckpt_path=overrides.pop("ckpt", None))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_reference_at_round_zero_and_bitwise_resume(tmp_path):
    def make():
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, n=400, with_groups=True, shuffle=False)
        dm.setup()
        pruning = IterativePruning(final_sparsity=0.5, start=1, criterion="magnitude")
        eq = GroupEqualizer(dual_lr=0.5, every_n_steps=2, data=_intersectional_data(dm), log=False)
        return GapCNN(), dm, pruning, eq

    model_a, dm_a, pruning_a, eq_a = make()
    recorder = DenseRecorder(dm_a)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    kwargs = quiet_trainer_kwargs(tmp_path / "a")
    kwargs.update(
        max_epochs=4, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=True
    )
    pl.Trainer(callbacks=[recorder, pruning_a, eq_a, ckpt], **kwargs).fit(model_a, dm_a)
    # the reference was measured on the dense model, round 0, all 20 intersectional groups
    torch.testing.assert_close(
        model_a.criterion.reference.double(), recorder.reference, rtol=1e-6, atol=1e-6
    )
    assert eq_a.num_dual_steps == 7  # active from the round at step 5: steps 7, 9, ..., 19
    lam_a = model_a.criterion.multipliers
    assert (lam_a > 0).sum() >= 2

    path = next((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))  # step 10: one step pending
    saved = torch.load(path, weights_only=True)["callbacks"][eq_a.state_key]
    assert saved["steps_since_dual"] == 1
    assert saved["history"]["values"].shape == (1, 20, 6)
    model_b, dm_b, pruning_b, eq_b = make()
    kwargs = quiet_trainer_kwargs(tmp_path / "b")
    kwargs.update(max_epochs=4, limit_val_batches=0, num_sanity_val_steps=0)
    pl.Trainer(callbacks=[pruning_b, eq_b], **kwargs).fit(model_b, dm_b, ckpt_path=str(path))
    assert eq_b.num_dual_steps == eq_a.num_dual_steps
    assert torch.equal(model_b.criterion.multipliers, lam_a)
    assert torch.equal(model_b.criterion.reference, model_a.criterion.reference)
    history_a, history_b = model_a.criterion.local_state(), model_b.criterion.local_state()
    assert all(torch.equal(history_a[k], history_b[k]) for k in history_a)
    for (name, p_a), p_b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p_a, p_b), name


def test_ddp_two_processes_agree_with_the_union_reference(tmp_path):
    script = Path(__file__).parent / "ddp_equalizer_script.py"
    rank0, rank1 = run_ddp(script, tmp_path, "gap")
    assert rank0["multipliers"] == rank1["multipliers"]  # bitwise identical
    assert rank0["reference"] == rank1["reference"]
    # the reference: the union of both ranks' held-out shards, measured at fit start
    counts = {
        k: np.add(rank0["reference_counts"][k], rank1["reference_counts"][k])
        for k in ("seen", "correct", "loss")
    }
    expected_ref = np.stack(
        [
            counts["seen"] / counts["seen"].sum(),
            counts["correct"] / counts["seen"],
            counts["loss"] / counts["seen"],
        ]
    )
    np.testing.assert_allclose(rank0["reference"], expected_ref, rtol=1e-6, atol=1e-6)
    assert rank0["batches"][0]["groups"] != rank1["batches"][0]["groups"]  # different data
    # replay: one deque per group and process; a dual step every 2 optimizer steps on the
    # union of the full deques
    ref_w, ref_acc = np.asarray(rank0["reference"][0]), np.asarray(rank0["reference"][1])
    buffers = [[deque(maxlen=4) for _ in range(10)] for _ in range(2)]
    lam, steps = np.zeros(10), 0
    for i, pair in enumerate(zip(rank0["batches"], rank1["batches"], strict=True)):
        for r, batch in enumerate(pair):
            for a, c in zip(batch["groups"], batch["correct"], strict=True):
                buffers[r][a].append(c)
        if (i + 1) % 2:
            continue
        steps += 1
        union = [
            [x for r in range(2) if len(buffers[r][a]) == 4 for x in buffers[r][a]]
            for a in range(10)
        ]
        est = [a for a in range(10) if union[a] and ref_w[a] > 0]
        acc = {a: np.mean(union[a]) for a in est}
        w = sum(ref_w[a] for a in est)
        overall = sum(ref_w[a] * acc[a] for a in est) / w
        dense = sum(ref_w[a] * ref_acc[a] for a in est) / w
        for a in est:
            lam[a] = max(0.0, lam[a] + 0.5 * ((ref_acc[a] - acc[a]) - (dense - overall)))
    assert rank0["num_dual_steps"] == steps == 5
    np.testing.assert_allclose(rank0["multipliers"], lam, rtol=1e-5, atol=1e-6)
    assert (lam > 0).sum() >= 2
    # the checkpoint holds every process's replay buffers (each resumes its own)
    history = torch.load(tmp_path / "gap.ckpt", weights_only=True)["callbacks"][rank0["state_key"]][
        "history"
    ]
    for r in range(2):
        assert history["filled"][r].tolist() == [len(d) for d in buffers[r]]
        sums = history["values"][r].sum(1).tolist()
        assert sums == pytest.approx([sum(d) for d in buffers[r]])
    # the second fit: GroupEqualizedLoss with heldout=True; the held-out statistics are summed
    # over both ranks' shards before every dual step (λ ← max(0, λ + 0.1 (J_a − J)))
    lam = np.zeros(10)
    for s0, s1 in zip(rank0["heldout_steps"], rank1["heldout_steps"], strict=True):
        sums, seen = np.add(s0["loss"], s1["loss"]), np.add(s0["seen"], s1["seen"])
        lam = np.maximum(0.0, lam + 0.1 * (sums / seen - sums.sum() / seen.sum()))
    assert len(rank0["heldout_steps"]) == 2
    assert rank0["heldout_multipliers"] == rank1["heldout_multipliers"]
    np.testing.assert_allclose(rank0["heldout_multipliers"], lam, rtol=1e-5, atol=1e-7)
    assert (lam > 0).any()
