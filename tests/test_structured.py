"""Structured pruning cores: channel groups, channel selection and masks, N:M, compact, cost.

References: hand-written masks of a known architecture, brute force over every feasible
channel subset and every n-of-m choice, naive Python loops for the scores, hand FLOP counts,
and the masked model itself for `compact` (its outputs are the reference).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import _resnet
import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_fairprune import compact, load_compact, model_cost
from lightning_fairprune.pruning.nm import nm_masks
from lightning_fairprune.pruning.select import num_to_prune
from lightning_fairprune.pruning.structured import (
    ChannelGroup,
    channel_groups,
    channel_masks,
    dead_channels,
    group_parameter_names,
    group_scores,
    parse_structure,
    select_channels,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ models
class Block(_resnet.Block):
    """The example's basic block with a sigmoid after the first BN (sigmoid(0) = 0.5: a channel
    is not killed by BN, so every coupled entry matters to the output)."""

    def forward(self, x):
        out = torch.sigmoid(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNetTiny(nn.Module):
    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 2)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        x = F.adaptive_avg_pool2d(self.mix(x), 2)
        return self.fc(x.flatten(1))


class DepthwiseNet(nn.Module):
    """MobileNet-style: pointwise -> BN -> depthwise -> BN -> pointwise, and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.pw1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = F.relu(self.pw2(F.relu(self.grouped(x))))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _masked(model: nn.Module, masks: dict) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return out.eval()


def _prune(model, x, target, scope="layerwise"):
    groups = channel_groups(model, x)
    params = dict(model.named_parameters())
    scores = group_scores(groups, {n: params[n].detach().abs() for n in params})
    keep = select_channels(scores, target, scope)
    return groups, keep, channel_masks(groups, params, keep)


# ------------------------------------------------------------------ structure strings
def test_parse_structure_accepts_the_three_forms_and_names_the_bad_one():
    assert parse_structure("weight").kind == "weight"
    assert parse_structure("channel").kind == "channel"
    s = parse_structure("1:8")
    assert (s.kind, s.n, s.m, str(s)) == ("nm", 1, 8, "1:8")
    for bad in ("channels", "2:4:8", "2/4", " 2:4", 24, None):
        with pytest.raises(
            ValueError,
            match=r"Expected `structure` to be 'weight', 'channel' or 'n:m' \(e\.g\. '2:4'\), "
            rf"but got {bad!r}",
        ):
            parse_structure(bad)
    for bad in ("4:2", "0:4", "4:4"):
        with pytest.raises(ValueError, match=r"0 < n < m"):
            parse_structure(bad)


# ------------------------------------------------------------------ channel groups
def test_residual_groups_couple_bn_skip_and_next_layers():
    model, x = ResNetTiny(), torch.randn(2, 3, 8, 8)
    groups = {g.root: g for g in channel_groups(model, x)}
    # the residual stream of layer1: stem, layer1.conv2 and everything reading it
    stream = groups["stem"]
    assert set(stream.modules) == {
        "stem", "bn", "layer1.conv1", "layer1.conv2", "layer1.bn2", "layer2.conv1",
        "layer2.skip.0",
    }  # fmt: skip
    consumers = {s.name for s in stream.slices if s.consumer}
    assert consumers == {"layer1.conv1.weight", "layer2.conv1.weight", "layer2.skip.0.weight"}
    # the residual stream of layer2 reaches the classifier's inputs, never its outputs
    stream2 = groups["layer2.skip.0"]  # the root is whichever producer the graph meets first
    assert {"layer2.conv2", "layer2.bn2", "layer2.skip.0", "layer2.skip.1", "fc"} <= set(
        stream2.modules
    )
    assert [s.dim for s in stream2.slices if s.name == "fc.weight"] == [1]
    assert "fc" not in groups
    assert set(groups) == {"stem", "layer1.conv1", "layer2.conv1", "layer2.skip.0"}
    assert all(g.exact for g in groups.values())


def test_channel_groups_leave_the_model_as_it_was():
    model, x = ResNetTiny().train(), torch.randn(2, 3, 8, 8)
    model.layer1.bn1.eval()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, x)
    assert model.training
    assert not model.layer1.bn1.training
    assert not model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_channel_masks_equal_a_hand_written_reference():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.Sigmoid(),  # 2
        nn.Conv2d(4, 3, 3),  # 3
        nn.Flatten(),  # 4
        nn.Linear(3 * 2 * 2, 5),  # 5
        nn.ReLU(),
        nn.Linear(5, 2),  # 7
    )
    x = torch.randn(2, 2, 6, 6)
    groups = channel_groups(net, x)
    assert [(g.root, g.num_channels) for g in groups] == [("0", 4), ("3", 3), ("5", 5)]
    keep = [
        torch.tensor([True, False, True, False]),
        torch.tensor([False, True, True]),
        torch.tensor([True, True, False, True, True]),
    ]
    params = dict(net.named_parameters())
    masks = channel_masks(groups, params, keep)
    expected = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    for k in (1, 3):  # group "0": conv 0 out, BN, conv 3 in
        expected["0.weight"][k] = False
        expected["0.bias"][k] = False
        expected["1.weight"][k] = False
        expected["1.bias"][k] = False
        expected["3.weight"][:, k] = False
    expected["3.weight"][0] = False  # group "3": conv 3 out 0, its 4 pixels of the Linear input
    expected["3.bias"][0] = False
    expected["5.weight"][:, 0:4] = False
    expected["5.weight"][2] = False  # group "5": Linear 5 out 2, classifier input 2
    expected["5.bias"][2] = False
    expected["7.weight"][:, 2] = False
    assert list(masks) == group_parameter_names(groups)
    assert set(masks) == set(expected) - {"7.bias"}
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    assert [d.tolist() for d in dead_channels(groups, masks)] == [(~k).tolist() for k in keep]


@pytest.mark.parametrize("model_cls", [ResNetTiny, ConcatNet, DepthwiseNet])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_compact_equals_the_masked_model_and_leaves_the_input_untouched(model_cls, target):
    torch.manual_seed(0)
    model, x = model_cls().train(), torch.randn(4, 3, 8, 8)
    _randomize_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups, keep, masks = _prune(model, x, target)
    small = compact(model, x, masks=masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert small.training
    with torch.no_grad():
        expected = _masked(model, masks)(x)
        got = small.eval()(x)
    assert (expected - got).abs().max() <= 1e-4
    kept = sum(int(k.sum()) for k in keep)
    total = sum(g.num_channels for g in groups)
    assert kept < total
    assert model_cost(small, x)["params"] < model_cost(model, x)["params"]
    small.train()(x).sum().backward()  # no layer left inconsistent: trains too


def test_compact_removes_exactly_the_pruned_channels_of_a_residual_net():
    model, x = ResNetTiny(width=8), torch.randn(2, 3, 8, 8)
    groups, keep, masks = _prune(model, x, 0.5)
    kept = {g.root: int(k.sum()) for g, k in zip(groups, keep, strict=True)}
    assert kept == {"stem": 4, "layer1.conv1": 4, "layer2.conv1": 8, "layer2.skip.0": 8}
    small = compact(model, x, masks=masks)
    assert small.stem.out_channels == small.layer1.conv2.out_channels == 4
    assert small.layer1.conv1.out_channels == small.layer1.bn1.num_features == 4
    assert small.layer2.skip[0].in_channels == small.layer2.conv1.in_channels == 4
    assert small.layer2.skip[1].running_mean.shape == (8,)
    assert small.fc.in_features == 8
    assert small.fc.out_features == 3


def test_grouped_conv_ties_channels_across_groups():
    model, x = DepthwiseNet(), torch.randn(2, 3, 8, 8)
    groups = {g.root: g for g in channel_groups(model, x)}
    # pw1 -> bn1 -> dw -> bn2 -> grouped (groups=2): the depthwise conv passes channels through,
    # the grouped conv ties channel j to channel j of each of its 2 groups (8 = 2 x 4)
    first = groups["dw"]
    assert set(first.modules) == {"pw1", "bn1", "dw", "bn2", "grouped"}
    assert first.num_channels == 4
    assert first.root_channel.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    grouped_in = next(s for s in first.slices if s.name == "grouped.weight")
    assert grouped_in.consumer
    assert grouped_in.dim == 1
    assert grouped_in.index.tolist() == [0, 1, 2, 3] == grouped_in.channel.tolist()
    dw = next(s for s in first.slices if s.name == "dw.weight")
    assert not dw.consumer
    assert sorted(zip(dw.channel.tolist(), dw.index.tolist(), strict=True)) == [
        (j, j + 4 * g) for j in range(4) for g in range(2)
    ]
    assert groups["grouped"].num_channels == 4  # its own outputs: tied the same way


def test_concatenation_maps_each_producer_to_its_slice_of_the_consumer():
    model, x = ConcatNet(), torch.randn(2, 3, 8, 8)
    groups = {g.root: g for g in channel_groups(model, x)}
    for root, offset, size in (("a", 0, 4), ("b", 4, 6)):
        mix = [s for s in groups[root].slices if s.name == "mix.weight"]
        bn = [s for s in groups[root].slices if s.name == "bn.weight"]
        assert mix[0].index.tolist() == list(range(offset, offset + size))
        assert bn[0].index.tolist() == list(range(offset, offset + size))
        assert mix[0].channel.tolist() == list(range(size))


def test_compact_without_masks_finds_zero_channels_and_works_on_a_lightning_module():
    class Wrapped(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ResNetTiny()

        def forward(self, x):
            return self.net(x)

    module, x = Wrapped(), torch.randn(2, 3, 8, 8)
    _groups, _, masks = _prune(module, x, 0.5)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    small = compact(module, x)
    assert isinstance(small, Wrapped)
    assert small is not module
    assert small.net.stem.out_channels == 3
    torch.testing.assert_close(small.eval()(x), module.eval()(x), atol=1e-4, rtol=0)
    sub = compact(module.net, x)  # a submodule
    assert sub.layer1.conv1.out_channels == 3


def test_compact_raises_when_an_unsupported_channel_mix_changes_outputs():
    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h = self.b(h + h.mean(1, keepdim=True))  # mixes channels outside any layer
            return self.fc(h.mean((2, 3)))

    model, x = ChannelMean(), torch.randn(2, 3, 4, 4)
    groups = channel_groups(model, x)
    keep = [torch.arange(g.num_channels) > 0 for g in groups]
    masks = channel_masks(groups, dict(model.named_parameters()), keep)
    with torch.no_grad():
        model.a.bias.fill_(1.0)  # channel 0 of `a` still shifts the mean after masking
    masks["a.bias"] = torch.ones(4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="compact changed output 0: max abs difference"):
        compact(model, x, masks=masks)


def test_load_compact_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, x = DepthwiseNet().eval(), torch.randn(2, 3, 8, 8)
    _randomize_bn(model)
    _, _, masks = _prune(model, x, 0.5)
    small = compact(model, x, masks=masks).eval()
    torch.save(small.state_dict(), tmp_path / "small.pt")
    torch.manual_seed(1)
    loaded = load_compact(DepthwiseNet(), torch.load(tmp_path / "small.pt", weights_only=True))
    assert loaded.dw.groups == loaded.dw.out_channels == small.dw.out_channels < 8
    assert torch.equal(loaded.eval()(x), small(x))
    with pytest.raises(ValueError, match=r"module '0' of type Embedding has tensors of other"):
        load_compact(nn.Sequential(nn.Embedding(10, 4)), {"0.weight": torch.zeros(10, 3)})


def test_norm_coupled_groups_are_left_out_unless_asked():
    mlp = nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"rooted at \['0'\] are coupled to LayerNorm"):
        groups = channel_groups(mlp, x)
    assert [g.root for g in groups] == ["3"]
    groups = channel_groups(mlp, x, prune_norm_coupled=True)
    assert [(g.root, g.exact) for g in groups] == [("0", False), ("3", True)]
    assert {s.name for s in groups[0].slices} == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                  "3.weight"}  # fmt: skip


def test_selection_arguments_restrict_the_prunable_groups():
    model, x = ResNetTiny(), torch.randn(2, 3, 8, 8)
    roots = [g.root for g in channel_groups(model, x, exclude_names=["layer2.*"])]
    assert roots == ["stem", "layer1.conv1"]  # layer2.conv2's group holds excluded producers
    roots = [g.root for g in channel_groups(model, x, include_names=["layer1.conv1.*"])]
    assert roots == ["layer1.conv1"]


def test_model_outputs_are_never_pruned():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.feat = nn.Linear(6, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            f = self.feat(torch.relu(self.body(x)))
            return f, self.head(f).squeeze()

    groups = channel_groups(TwoHeads(), torch.randn(3, 4))
    assert [g.root for g in groups] == ["body"]


# ------------------------------------------------------------------ errors
def test_unsupported_layer_coupled_to_pruned_channels_is_named():
    with pytest.raises(TypeError, match=r"module 'emb' of type Embedding is coupled"):
        channel_groups(_resnet.WithEmbedding(), torch.randint(0, 10, (2, 5)))

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.gamma = nn.Parameter(torch.ones(6))
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.a(x) * self.gamma))

    with pytest.raises(TypeError, match=r"bare parameter 'gamma'"):
        channel_groups(LayerScale(), torch.randn(2, 4))
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with pytest.raises(TypeError, match=r"selects '1' of type BatchNorm2d"):
        channel_groups(net, torch.randn(1, 1, 5, 5), include_types=["BatchNorm2d"])


def test_missing_torch_pruning_gives_the_install_hint(monkeypatch):
    import importlib.util

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` now fails
    fresh = {}
    for name in ("pruning/structured", "compact", "cost"):  # the modules import without it
        path = ROOT / "lightning_fairprune" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_fresh_{path.stem}", path)
        fresh[path.stem] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, fresh[path.stem])
        spec.loader.exec_module(fresh[path.stem])
    assert fresh["cost"].model_cost(nn.Linear(2, 2), torch.randn(1, 2))["flops"] == 8
    with pytest.raises(ImportError, match=r"pip install lightning_fairprune\[structured\]"):
        fresh["compact"].compact(nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(ImportError, match=r"pip install lightning_fairprune\[structured\]"):
        fresh["structured"].channel_groups(nn.Linear(2, 2), torch.randn(1, 2))


# ------------------------------------------------------------------ scores and selection
def test_group_scores_equal_a_naive_loop():
    model, x = ConcatNet(), torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    weights = {n: p for n, p in params.items() if n.endswith("weight")}
    for reduce in ("l2", "l1", "sum"):
        got = group_scores(groups, weights, reduce)
        for group, scores in zip(groups, got, strict=True):
            for j in range(group.num_channels):
                total = 0.0
                for s in group.slices:
                    if s.name not in weights:
                        continue
                    for idx, ch in zip(s.index.tolist(), s.channel.tolist(), strict=True):
                        if ch == j:
                            entry = weights[s.name].select(s.dim, idx).double()
                            total += float(
                                {"l2": entry.square(), "l1": entry.abs(), "sum": entry}[
                                    reduce
                                ].sum()
                            )
                expected = math.sqrt(total) if reduce == "l2" else total
                assert scores[j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="holds none"):
        group_scores(groups, {"nothing": torch.zeros(1)})


def _brute_force_global(scores, count):
    """The feasible pruned set (>= 1 kept per group) of `count` channels with the least sum."""
    flat = [(float(v), gi, j) for gi, s in enumerate(scores) for j, v in enumerate(s.tolist())]
    best, best_set = math.inf, None
    for subset in itertools.combinations(range(len(flat)), count):
        per_group = [0] * len(scores)
        for i in subset:
            per_group[flat[i][1]] += 1
        if any(n >= len(s) for n, s in zip(per_group, scores, strict=True)):
            continue
        total = sum(flat[i][0] for i in subset)
        if total < best:
            best, best_set = total, {(flat[i][1], flat[i][2]) for i in subset}
    return best_set


@pytest.mark.parametrize("seed", range(4))
def test_select_channels_global_is_the_brute_force_optimum_with_exact_counts(seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) for n in (3, 1, 4, 2)]
    total = 10
    for target in (0.2, 0.5, 0.8, 0.95):
        keep = select_channels(scores, target)
        count = min(num_to_prune(target, total), total - len(scores))
        assert sum(int((~k).sum()) for k in keep) == count
        assert all(bool(k.any()) for k in keep)
        pruned = {(gi, j) for gi, k in enumerate(keep) for j in (~k).nonzero().flatten().tolist()}
        assert pruned == _brute_force_global(scores, count)


def test_select_channels_layerwise_counts_ties_and_already_pruned():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 2.0])]
    keep = select_channels(scores, 0.4, scope="layerwise")
    assert keep[0].tolist() == [False, False, True, True, True]  # ties: lowest index first
    assert keep[1].tolist() == [True, False, True]  # round(1.2) = 1
    current = [torch.tensor([True, True, True, True, False]), torch.tensor([True, True, False])]
    keep = select_channels(scores, 0.4, scope="layerwise", current_keep=current)
    assert keep[0].tolist() == [False, True, True, True, False]  # 4 stays pruned, +1 tie
    assert keep[1].tolist() == [True, True, False]  # already at the count: nothing comes back
    keep = select_channels([torch.tensor([5.0, 1.0])], 0.99, scope="layerwise")
    assert keep[0].tolist() == [True, False]  # one channel always stays
    with pytest.raises(ValueError, match="NaN"):
        select_channels([torch.tensor([float("nan"), 1.0])], 0.5)
    with pytest.raises(ValueError, match=r"`target` to be a float in \[0, 1\)"):
        select_channels(scores, 1.0)
    with pytest.raises(ValueError, match=r"`current_keep`\[1\] to be a bool tensor of shape"):
        select_channels(scores, 0.5, current_keep=[current[0], torch.ones(2, dtype=torch.bool)])


def test_channel_groups_state_round_trips():
    groups = channel_groups(ConcatNet(), torch.randn(1, 3, 8, 8))
    back = [ChannelGroup.from_state(g.to_state()) for g in groups]
    for a, b in zip(groups, back, strict=True):
        assert (a.root, a.num_channels, a.modules, a.exact) == (
            b.root, b.num_channels, b.modules, b.exact
        )  # fmt: skip
        for sa, sb in zip(a.slices, b.slices, strict=True):
            assert (sa.name, sa.dim, sa.consumer) == (sb.name, sb.dim, sb.consumer)
            assert torch.equal(sa.index, sb.index)
            assert torch.equal(sa.channel, sb.channel)


# ------------------------------------------------------------------ N:M
def _brute_force_nm(block: list[float], n: int) -> set[int]:
    best = max(itertools.combinations(range(len(block)), n), key=lambda c: sum(block[i] for i in c))
    return set(best)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_masks_are_the_brute_force_best_n_of_every_m(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    linear = torch.randn(3, 2 * m, generator=g)
    conv = torch.randn(2, m, 3, 3, generator=g)
    masks = nm_masks({"fc.weight": linear, "conv.weight": conv}, n, m)
    for row in range(3):
        for b in range(2):
            block = linear[row, b * m : (b + 1) * m].abs().tolist()
            kept = set(masks["fc.weight"][row, b * m : (b + 1) * m].nonzero().flatten().tolist())
            assert kept == _brute_force_nm(block, n)
    for o, i, j in itertools.product(range(2), range(3), range(3)):  # blocks along in-channels
        block = conv[o, :, i, j].abs().tolist()
        kept = set(masks["conv.weight"][o, :, i, j].nonzero().flatten().tolist())
        assert kept == _brute_force_nm(block, n)


def test_nm_masks_ties_current_masks_and_dense_layers():
    masks = nm_masks({"w": torch.ones(1, 4)}, 2, 4)
    assert masks["w"].tolist() == [[False, False, True, True]]  # ties: lower index pruned
    current = {"w": torch.tensor([[True, True, False, True]])}
    masks = nm_masks({"w": torch.tensor([[1.0, 2.0, 9.0, 3.0]])}, 2, 4, current)
    assert masks["w"].tolist() == [[False, True, False, True]]
    with pytest.warns(UserWarning, match=r"leaves \['first.weight'\] dense"):
        masks = nm_masks({"first.weight": torch.randn(4, 3, 3, 3)}, 2, 4)
    assert bool(masks["first.weight"].all())
    with pytest.raises(ValueError, match=r"'b' has shape \(4,\)"):
        nm_masks({"b": torch.ones(4)}, 2, 4)


def test_compact_keeps_two_four_linear_weights_dense_on_the_cpu_and_says_so():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    masks = nm_masks({"0.weight": net[0].weight.detach()}, 2, 4)
    masks_all = {n: masks.get(n, torch.ones_like(p, dtype=torch.bool))
                 for n, p in net.named_parameters()}  # fmt: skip
    with pytest.warns(UserWarning, match=r"\['0'\] stay dense .*compute capability >= 8\.0"):
        small = compact(net, torch.randn(3, 8), masks=masks_all)
    assert small[0].weight.layout == torch.strided
    assert torch.equal(small[0].weight != 0, masks["0.weight"])


# ------------------------------------------------------------------ cost
def test_model_cost_matches_hand_counts():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8x8 -> 4x4
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # 4x4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).train()
    x = torch.randn(2, 3, 8, 8)
    cost = model_cost(net, x)
    params = (8 * 3 * 9 + 8) + (8 * 2 * 9 + 8) + (128 * 5 + 5)
    flops = 2 * 2 * (8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 2 * 9 + 128 * 5)
    assert cost == {"params": params, "flops": flops}
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def test_compact_reduces_the_counted_cost_as_the_channel_counts_say():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    groups = channel_groups(net, x)
    keep = [torch.tensor([True, False] * 4)]
    small = compact(net, x, masks=channel_masks(groups, dict(net.named_parameters()), keep))
    assert model_cost(small, x) == {
        "params": 6 * 4 + 4 + 4 * 2 + 2,
        "flops": 2 * 4 * (6 * 4 + 4 * 2),
    }


# ------------------------------------------------------------------ benchmark
def test_bench_structured_quick_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_structured
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "bench.json"
    bench_structured.main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)
    for row in rows:
        assert row["params"] == row["params_tp"]  # the same channel counts as Torch-Pruning
        assert 0 < row["params_ratio"] < 0.3
        assert row["channels_kept"] == row["channels_total"] // 2
        assert row["latency_ratio_b64"] > 0
        assert row["tp_latency_ratio_b64"] > 0
