"""The same computations on CUDA as on the CPU (skipped where no CUDA device is present).

The CPU results are the references: masks must be identical, diagnostics equal to float
tolerance, and a real `Trainer.fit` on the GPU must end with exactly the scheduled sparsity and
pruned weights that are exactly zero.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _models import DigitsDataModule, SmallCNN, digits_tensors, quiet_trainer_kwargs
from torch import nn

from lightning_fairprune import IterativePruning
from lightning_fairprune.diagnostics import group_gradient_norms, group_hessian_trace
from lightning_fairprune.pruning import MaskEnforcer, compute_scores, global_masks, layerwise_masks
from lightning_fairprune.pruning.select import radix_select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 changes float32 matmuls/convolutions at the 1e-3 level: off for comparisons."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _scores(device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randn(300, 70, generator=gen),
        "b": torch.randn(5000, generator=gen).round(decimals=1),  # many ties
    }
    return {k: v.to(device) for k, v in scores.items()}


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.93])
def test_global_masks_identical_on_cuda_and_cpu(sparsity):
    cpu = global_masks(compute_scores("magnitude", _scores("cpu")), sparsity)
    gpu = global_masks(compute_scores("magnitude", _scores("cuda")), sparsity)
    for name, mask in cpu.items():
        assert gpu[name].device.type == "cuda"
        assert torch.equal(gpu[name].cpu(), mask), name


def test_random_criterion_identical_on_cuda_and_cpu():
    params = {k: v.abs() for k, v in _scores("cpu").items()}
    cpu = compute_scores("random", params, seed=3)
    gpu = compute_scores("random", {k: v.cuda() for k, v in params.items()}, seed=3)
    for name, score in cpu.items():
        assert torch.equal(gpu[name].cpu(), score), name


def test_mask_enforcer_keeps_zeros_on_cuda_with_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    params = {"0.weight": model[0].weight}
    masks = global_masks(compute_scores("magnitude", params), 0.8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    enforcer = MaskEnforcer(opt, params, masks)
    enforcer.enforce()
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(8, 16, device="cuda")).pow(2).mean().backward()
        opt.step()
    assert torch.count_nonzero(model[0].weight.detach()[~masks["0.weight"]]) == 0
    assert int((~masks["0.weight"]).sum()) == round(0.8 * model[0].weight.numel())


def test_diagnostics_on_cuda_equal_the_cpu():
    x, y = digits_tensors(n=200)
    torch.manual_seed(0)
    model = SmallCNN().double()
    batches = [(x[i : i + 64].double(), y[i : i + 64]) for i in range(0, 200, 64)]
    cpu_norms = group_gradient_norms(model, batches, 10).norms
    cpu_trace = group_hessian_trace(model, batches, 10, num_probes=4, seed=1).trace
    model.cuda()
    gpu_batches = [(bx.cuda(), by.cuda()) for bx, by in batches]
    gpu_norms = group_gradient_norms(model, gpu_batches, 10).norms
    gpu_trace = group_hessian_trace(model, gpu_batches, 10, num_probes=4, seed=1).trace
    torch.testing.assert_close(gpu_norms, cpu_norms, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(gpu_trace, cpu_trace, rtol=1e-9, atol=1e-12, equal_nan=True)


class _DeviceRecorder(pl.Callback):
    """Records the device of the parameters and of the batches during training."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.devices.add(next(pl_module.parameters()).device.type)
        self.devices.add(batch[0].device.type)


def test_fit_on_gpu_prunes_exactly_and_keeps_zeros(tmp_path):
    pl.seed_everything(0)
    model = SmallCNN()
    pruning = IterativePruning(0.75, schedule="linear", num_rounds=2, start=1)
    recorder = _DeviceRecorder()
    kwargs = quiet_trainer_kwargs(tmp_path)
    # deterministic=True would need CUBLAS_WORKSPACE_CONFIG and has no deterministic max-pool
    kwargs.update(accelerator="cuda", devices=1, max_epochs=4, deterministic=False)
    pl.Trainer(callbacks=[pruning, recorder], **kwargs).fit(model, DigitsDataModule(batch_size=32))
    # Lightning moves the module back to the CPU at teardown: check where training ran
    assert recorder.devices == {"cuda"}
    report = pruning.sparsity_report()
    assert report["sparsity"] == pytest.approx(0.75, abs=1e-3)
    for name, mask in pruning.masks.items():
        weight = model.get_parameter(name).detach()
        assert torch.count_nonzero(weight[~mask.to(weight.device)]) == 0, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sync_free_selection_on_cuda_equals_cpu_with_current_masks(dtype):
    scores = {k: v.to(dtype) for k, v in _scores("cpu").items()}
    scores["b"][::50] = float("inf")
    first = global_masks(scores, 0.5)
    cpu = global_masks(scores, 0.8, first)
    gpu_scores = {k: v.cuda() for k, v in scores.items()}
    gpu_first = global_masks(gpu_scores, 0.5)  # sync-free path (auto on CUDA)
    gpu = global_masks(gpu_scores, 0.8, gpu_first)
    for name in cpu:
        assert torch.equal(gpu_first[name].cpu(), first[name]), name
        assert torch.equal(gpu[name].cpu(), cpu[name]), name
    lw_cpu = layerwise_masks(scores, 0.6, first)
    lw_gpu = layerwise_masks(gpu_scores, 0.6, gpu_first)
    for name in cpu:
        assert torch.equal(lw_gpu[name].cpu(), lw_cpu[name]), name


def test_radix_select_on_cuda_equals_sorted_key():
    keys = torch.randint(0, 2**31 - 1, (100_000,), dtype=torch.int64).to(torch.int32)
    expected = int(torch.sort(keys).values[12_345])
    sel = radix_select(lambda: [(keys.cuda(), None)], 12_346, 32)
    assert sel.threshold == expected


def test_mask_enforcer_foreach_on_cuda_equals_uint8_on_cpu():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(128), torch.randn(8, 4, 3, 3)]
    masks = {f"w{i}": torch.rand(w.shape) > 0.7 for i, w in enumerate(weights)}
    out = {}
    for device in ("cpu", "cuda"):
        params = {f"w{i}": nn.Parameter(w.clone().to(device)) for i, w in enumerate(weights)}
        opt = torch.optim.SGD(params.values(), lr=0.1)
        enforcer = MaskEnforcer(opt, params, masks)
        assert enforcer._groups if device == "cuda" else enforcer._pairs  # foreach vs uint8
        enforcer.enforce()
        out[device] = {n: p.detach().cpu() for n, p in params.items()}
    for name in masks:
        assert torch.equal(out["cuda"][name], out["cpu"][name]), name


def test_batched_diagnostics_on_cuda_equal_the_cpu_loop():
    x, y = digits_tensors(n=200)
    torch.manual_seed(0)
    model = SmallCNN().double()
    batches = [(x[i : i + 64].double(), y[i : i + 64]) for i in range(0, 200, 64)]
    cpu_norms = group_gradient_norms(model, batches, 10, strategy="loop").norms
    cpu_trace = group_hessian_trace(model, batches, 10, num_probes=4, seed=1, strategy="loop")
    model.cuda()
    gpu_batches = [(bx.cuda(), by.cuda()) for bx, by in batches]
    size = sum(p.numel() for p in model.parameters())
    for kwargs in ({}, {"max_memory": 3 * 8 * size}):  # all groups; blocks of 3 groups
        gpu_norms = group_gradient_norms(model, gpu_batches, 10, **kwargs).norms  # vmap (auto)
        torch.testing.assert_close(gpu_norms, cpu_norms, rtol=1e-9, atol=1e-12, equal_nan=True)
    gpu_trace = group_hessian_trace(
        model, gpu_batches, 10, num_probes=4, seed=1, max_memory=3 * 8 * size * 2
    )  # batched probes, 2 per double backward; probes built on the GPU
    torch.testing.assert_close(
        gpu_trace.probe_values, cpu_trace.probe_values, rtol=1e-9, atol=1e-12, equal_nan=True
    )
