"""Pruning criteria as objects in one registry: each declares what it needs and makes masks.

A criterion is an object of the `Criterion` protocol. It declares what a round must supply
(``needs_gradients``, ``needs_weight_decay``, ``needs_group_statistics``, its curvatures,
``supports_sharding``, the dataclass of its typed options) and turns a `CriterionContext` into
masks: score criteria produce per-weight scores (``scores(ctx)``) and let the structure
select (``ctx.select``); others (the fairness-aware ones) choose the units themselves
(``masks(ctx)``). The context supplies the expensive inputs lazily: gradients, weight decays
and per-group statistics are computed the first time the criterion asks for them. Callers
(`IterativePruning`) look criteria up in `CRITERIA` and never test their names, so a new
criterion is one file: a class and a `register` call.

=============  ============================  ==================================
name           score                         needs
=============  ============================  ==================================
magnitude      ``abs(θ)``                    weights
gradient       ``abs(θ · g)``                weights, task-loss gradient ``g``
undecayed      ``abs(-θ · g + ε · θ²)``      weights, ``g``, weight decay ``ε``
random         ``U(0, 1)``, seeded           a seed
=============  ============================  ==================================

``g`` is the gradient of the task loss only (no weight-decay term); with ``ε = 0`` the
undecayed criterion equals the gradient criterion. The fairness-aware criteria (fairgrape,
fairprune, worst_group) are registered by :mod:`lightning_fairprune.pruning.fair_criteria`.
A user callable ``fn(params, grads) -> scores`` is wrapped by `resolve_criterion`.

Example:
    >>> params = {"w": torch.tensor([0.5, -2.0, 0.1, 1.0])}
    >>> ctx = CriterionContext(params, 0.5)
    >>> CRITERIA["magnitude"].masks(ctx)["w"].tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fairprune.distributed import is_sharded
from lightning_fairprune.pruning.structured import Structure
from lightning_fairprune.pruning.units import UNITS, Units, WeightUnits

__all__ = [
    "CRITERIA",
    "Criterion",
    "CriterionContext",
    "CriterionFn",
    "ScoreCriterion",
    "check_curvature",
    "check_support",
    "compute_scores",
    "gradient_scores",
    "magnitude_scores",
    "make_options",
    "optimizer_weight_decays",
    "random_scores",
    "register",
    "resolve_criterion",
    "undecayed_scores",
]

CriterionFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor] | None], dict[str, Tensor]]
"""A user criterion: ``fn(params, grads) -> scores`` (``grads`` may be ``None``)."""


# ----------------------------------------------------------------------------- the context


class CriterionContext:
    """What one pruning round offers a criterion; the expensive inputs come lazily, once.

    Args:
        params: FQN -> parameter to mask (plain tensors or FSDP2 DTensors).
        target: cumulative target sparsity of the round, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"``.
        current_masks: masks of earlier rounds (``True`` = kept), or ``None``.
        seed: seed of this round (the random criterion).
        options: the criterion's typed options (``None`` for criteria without options).
        curvature: per-group curvature the statistics carry (``"fisher"``, ``"hutchinson"``,
            ``"none"``).
        units: the structure's units (default: single weights, `WeightUnits`).
        gradients: ``() -> {FQN: task-loss gradient}``.
        weight_decays: ``() -> ε`` (a float, or per FQN).
        group_statistics: ``() -> GroupStatistics`` of the per-group data.
        distribute: ``scores -> scores`` laid out like the parameters (sharded runs).
        owner: how messages name the caller.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        target: float,
        *,
        scope: str = "global",
        current_masks: Mapping[str, Tensor] | None = None,
        seed: int = 0,
        options: Any = None,
        curvature: str = "none",
        units: Units | None = None,
        gradients: Callable[[], Mapping[str, Tensor]] | None = None,
        weight_decays: Callable[[], float | Mapping[str, float]] | None = None,
        group_statistics: Callable[[], Any] | None = None,
        distribute: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
        owner: str = "the criterion",
    ) -> None:
        self.params = params
        self.target = target
        self.scope = scope
        self.current_masks = current_masks or None
        self.seed = seed
        self.options = options
        self.curvature = curvature
        self.units: Units = units if units is not None else WeightUnits()
        self.owner = owner
        self._suppliers = {
            "gradients": gradients,
            "weight_decays": weight_decays if weight_decays is not None else (lambda: 0.0),
            "group_statistics": group_statistics,
        }
        self._distribute = distribute
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, what: str) -> Any:
        if key not in self._cache:
            supplier = self._suppliers[key]
            if supplier is None:
                raise ValueError(f"Expected {what} for {self.owner}, but got None")
            self._cache[key] = supplier()
        return self._cache[key]

    def gradients(self) -> Mapping[str, Tensor]:
        """FQN -> task-loss gradient (computed on first use)."""
        return self._get("gradients", "`grads` (the task-loss gradients)")

    def weight_decays(self) -> float | Mapping[str, float]:
        """The weight decay ε, one float or per FQN (0.0 unless supplied)."""
        return self._get("weight_decays", "weight decays")

    def group_statistics(self) -> Any:
        """Per-group statistics of the fairness data (`GroupStatistics`, on first use)."""
        return self._get("group_statistics", "per-group statistics (`group_data`)")

    def select(self, scores: Mapping[str, Tensor], reduction: str = "l1") -> dict[str, Tensor]:
        """Masks of the round from per-parameter scores, through the structure's units.

        Args:
            scores: FQN -> score of the parameter's shape (``abs(score)`` ranks weights).
            reduction: how a channel's entries make its score (``"l2"``, ``"l1"``, ``"sum"``).

        Returns:
            FQN -> bool mask (``True`` = kept) of every masked parameter.
        """
        if self._distribute is not None:
            scores = self._distribute(scores)
        units = self.units
        keep = units.select(
            units.reduce(scores, reduction),
            self.target,
            self.scope,
            units.current(self.current_masks),
        )
        return units.expand(keep)


# ----------------------------------------------------------------------------- the protocol


@runtime_checkable
class Criterion(Protocol):
    """A pruning criterion: what it needs, and how it makes a round's masks.

    Attributes:
        name: registry key.
        needs_gradients: asks ``ctx.gradients()`` (task-loss gradients of training batches).
        needs_weight_decay: asks ``ctx.weight_decays()``.
        needs_group_statistics: asks ``ctx.group_statistics()`` (per-group data needed).
        default_curvature: the curvature of the statistics unless the user picks one.
        curvatures: the curvatures it accepts.
        supports_sharding: works on FSDP2-sharded parameters.
        structures: the structures it works with (``"weight"``, ``"channel"``, ``"nm"``).
        options_type: dataclass of its typed options (``None``: it takes none).
    """

    name: str
    needs_gradients: bool
    needs_weight_decay: bool
    needs_group_statistics: bool
    default_curvature: str
    curvatures: tuple[str, ...]
    supports_sharding: bool
    structures: tuple[str, ...]
    options_type: type | None

    def make_options(self, options: Mapping[str, Any] | None) -> Any:
        """Typed options from keyword options (unknown names and bad values refused)."""
        ...

    def check_options(self, options: Any, num_groups: int) -> None:
        """Check the options against the data (e.g. group ids), at fit start."""
        ...

    def masks(self, ctx: CriterionContext) -> dict[str, Tensor]:
        """The round's masks (``True`` = kept) of every parameter of ``ctx.params``."""
        ...


class ScoreCriterion:
    """Base of the criteria that score weights and let the structure select.

    Subclasses set the class attributes they need and implement :meth:`scores`.
    """

    name = ""
    needs_gradients = False
    needs_weight_decay = False
    needs_group_statistics = False
    default_curvature = "none"
    curvatures: tuple[str, ...] = ("none",)
    supports_sharding = True
    structures: tuple[str, ...] = ("weight", "channel", "nm")
    options_type: type | None = None
    reduction = "l1"
    """How a channel's entries make its score (``"l2"`` norm, ``"l1"`` sum of abs)."""

    def make_options(self, options: Mapping[str, Any] | None) -> Any:
        """Typed options (`make_options` with `options_type`)."""
        return make_options(self.name, self.options_type, options)

    def check_options(self, options: Any, num_groups: int) -> None:
        """Nothing to check against the data by default."""
        return None

    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        """FQN -> score of every parameter of ``ctx.params`` (``abs(score)`` ranks)."""
        raise NotImplementedError

    def masks(self, ctx: CriterionContext) -> dict[str, Tensor]:
        """The scores, selected by the structure (``ctx.select``)."""
        return ctx.select(self.scores(ctx), self.reduction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_curvature(criterion: Criterion, curvature: str | None, group_data: object = None) -> str:
    """The curvature of ``criterion``'s statistics: given, else its default; checked.

    ``curvature`` and ``group_data`` are only for criteria that need per-group statistics.

    Example:
        >>> check_curvature(CRITERIA["magnitude"], None)
        'none'
        >>> check_curvature(CRITERIA["magnitude"], "fisher")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `group_data` and `curvature` only with a fairness-aware criterion ...
    """
    if not criterion.needs_group_statistics and (curvature, group_data) != (None, None):
        fair = [n for n, c in CRITERIA.items() if c.needs_group_statistics]
        raise ValueError(
            "Expected `group_data` and `curvature` only with a fairness-aware criterion (one "
            f"that needs per-group statistics: {fair}), but got criterion={criterion.name!r}"
        )
    value = criterion.default_curvature if curvature is None else curvature
    if value not in criterion.curvatures:
        allowed = " or ".join(repr(c) for c in criterion.curvatures)
        raise ValueError(
            f"Expected `curvature` {allowed} with criterion={criterion.name!r}, but got {value!r}"
        )
    return value


def check_support(
    criterion: Criterion, structure: Structure, params: Mapping[str, Tensor] | None = None
) -> None:
    """Refuse a criterion on a structure it does not work with, or on sharded ``params``.

    Example:
        >>> from lightning_fairprune.pruning.structured import parse_structure
        >>> check_support(CRITERIA["worst_group"], parse_structure("2:4"))
        Traceback (most recent call last):
        ...
        ValueError: Expected criterion='worst_group' with a structure among ('weight', 'channel'), but got structure='2:4'
    """  # noqa: E501
    if structure.kind not in criterion.structures:
        raise ValueError(
            f"Expected criterion={criterion.name!r} with a structure among "
            f"{criterion.structures}, but got structure={str(structure)!r}"
        )
    refused = [] if criterion.supports_sharding else [f"criterion={criterion.name!r}"]
    if not UNITS[structure.kind].supports_sharding:
        refused.append(f"structure={str(structure)!r}")
    if refused and params is not None and is_sharded(params):
        raise ValueError(
            f"Expected {' with '.join(refused)} on unsharded parameters: it does not support "
            "FSDP2-sharded models; use structure='weight' with e.g. 'magnitude', 'gradient', "
            "'undecayed' or 'random'"
        )


def make_options(name: str, options_type: type | None, options: Mapping[str, Any] | None) -> Any:
    """Typed options of a criterion from keyword options, names checked first.

    Example:
        >>> make_options("magnitude", None, {"beta": 1})
        Traceback (most recent call last):
        ...
        ValueError: Expected options of 'magnitude' among [], but got ['beta']
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"Expected `criterion_options` to be a mapping, but got {options!r}")
    options = dict(options or {})
    allowed = [] if options_type is None else [f.name for f in dataclasses.fields(options_type)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Expected options of {name!r} among {sorted(allowed)}, but got {unknown}")
    return None if options_type is None else options_type(**options)


# ----------------------------------------------------------------------------- score functions


def _check_grads(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor] | None
) -> Mapping[str, Tensor]:
    if grads is None:
        raise ValueError(
            "Expected `grads` to map every parameter name to its gradient, but got None"
        )
    for name, param in params.items():
        grad = grads.get(name)
        if grad is None:
            raise ValueError(
                f"Expected `grads` to hold a gradient for parameter {name!r}, but it is missing "
                "(did the loss depend on it, and did the backward pass run?)"
            )
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(
                f"Expected the gradient of {name!r} to have shape {tuple(param.shape)}, "
                f"but got {tuple(grad.shape)}"
            )
    return grads


def magnitude_scores(params: Mapping[str, Tensor], copy: bool = True) -> dict[str, Tensor]:
    """Magnitude criterion: ``abs(θ)``.

    Args:
        params: FQN -> weight.
        copy: if ``False``, return the detached weights themselves instead of ``abs(θ)``
            (no extra memory; valid because the selection ranks ``abs(score)``).

    Returns:
        FQN -> score tensor.

    Example:
        >>> magnitude_scores({"w": torch.tensor([-2.0, 0.5])})["w"]
        tensor([2.0000, 0.5000])
    """
    if copy:
        return {name: p.detach().abs() for name, p in params.items()}
    return {name: p.detach() for name, p in params.items()}


def gradient_scores(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Gradient (first-order Taylor) criterion: ``abs(θ · g)``.

    Args:
        params: FQN -> weight.
        grads: FQN -> task-loss gradient (same shapes).

    Returns:
        FQN -> score tensor.

    Example:
        >>> gradient_scores({"w": torch.tensor([2.0, -3.0])}, {"w": torch.tensor([0.5, 1.0])})["w"]
        tensor([1., 3.])
    """
    grads = _check_grads(params, grads)
    return {name: (p.detach() * grads[name].detach()).abs_() for name, p in params.items()}


def _decay_for(weight_decay: float | Mapping[str, float], name: str) -> float:
    if isinstance(weight_decay, Mapping):
        if name not in weight_decay:
            raise ValueError(
                f"Expected `weight_decay` to hold a value for parameter {name!r}, but it is missing"
            )
        value = weight_decay[name]
        label = f"weight_decay[{name!r}]"
    else:
        value = weight_decay
        label = "weight_decay"
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"Expected `{label}` to be a finite float >= 0, but got {value!r}")
    return float(value)


def undecayed_scores(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None,
    weight_decay: float | Mapping[str, float],
) -> dict[str, Tensor]:
    """Undecayed criterion of Good et al. (2022): ``abs(-θ · g + ε · θ²)``.

    ``g`` is the task-loss gradient (weight decay not included), ``ε`` the weight decay the
    model was trained with (a float, or a per-FQN mapping for per-group decay). It is the
    first-order change of the undecayed loss ``L(θ) - ε/2·‖θ‖²`` when a weight is zeroed.
    With ``ε = 0`` it equals :func:`gradient_scores`.

    Args:
        params: FQN -> weight.
        grads: FQN -> task-loss gradient.
        weight_decay: ``ε >= 0``, one for all parameters or per FQN.

    Returns:
        FQN -> score tensor.

    Example:
        >>> w, g = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
        >>> undecayed_scores({"w": w}, {"w": g}, weight_decay=0.5)["w"]
        tensor([0.0000, 1.5000])
    """
    grads = _check_grads(params, grads)
    scores: dict[str, Tensor] = {}
    for name, p in params.items():
        eps = _decay_for(weight_decay, name)
        w = p.detach()
        score = w * grads[name].detach()
        score.neg_()
        if eps != 0.0:
            score.add_(w * w, alpha=eps)
        scores[name] = score.abs_()
    return scores


def random_scores(params: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Random criterion: uniform scores from a seeded CPU generator.

    The generator runs on the CPU and walks the parameters in the mapping's order, so the
    scores are identical on every process and every device for the same seed (full-shape
    scores, also for sharded parameters).

    Args:
        params: FQN -> weight.
        seed: random seed.

    Returns:
        FQN -> float32 score tensor on each parameter's device.

    Example:
        >>> a = random_scores({"w": torch.zeros(3)}, seed=1)["w"]
        >>> torch.equal(a, random_scores({"w": torch.zeros(3)}, seed=1)["w"])
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"Expected `seed` to be an int, but got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=generator, dtype=torch.float32).to(p.device)
        for name, p in params.items()
    }


def optimizer_weight_decays(optimizers: Any, params: Mapping[str, Tensor]) -> dict[str, float]:
    """ε per parameter: the ``weight_decay`` of the optimizer param group holding it (else 0).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> optimizer_weight_decays([torch.optim.SGD([w], lr=0.1, weight_decay=0.01)], {"w": w})
        {'w': 0.01}
    """
    by_id = {id(p): name for name, p in params.items()}
    decays = dict.fromkeys(params, 0.0)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            value = float(group.get("weight_decay", 0.0) or 0.0)
            for p in group["params"]:
                name = by_id.get(id(p))
                if name is not None:
                    decays[name] = value
    return decays


# ----------------------------------------------------------------------------- the criteria


class Magnitude(ScoreCriterion):
    """``abs(θ)``; a channel's score is the L2 norm of its coupled entries."""

    name = "magnitude"
    reduction = "l2"

    @override
    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        return magnitude_scores(ctx.params)

    @override
    def masks(self, ctx: CriterionContext) -> dict[str, Tensor]:
        with torch.no_grad():  # the weights themselves rank: no copy of the scores
            return ctx.select(magnitude_scores(ctx.params, copy=False), self.reduction)


class Gradient(ScoreCriterion):
    """``abs(θ · g)``."""

    name = "gradient"
    needs_gradients = True

    @override
    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        return gradient_scores(ctx.params, ctx.gradients())


class Undecayed(ScoreCriterion):
    """``abs(-θ · g + ε · θ²)`` (Good et al., 2022)."""

    name = "undecayed"
    needs_gradients = True
    needs_weight_decay = True

    @override
    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        return undecayed_scores(ctx.params, ctx.gradients(), ctx.weight_decays())


class Random(ScoreCriterion):
    """Seeded uniform scores (the same on every process)."""

    name = "random"

    @override
    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        return random_scores(ctx.params, ctx.seed)


class CallableCriterion(ScoreCriterion):
    """A user callable ``fn(params, grads) -> scores`` as a criterion.

    Args:
        fn: the callable (``grads`` is ``None`` unless it needs gradients).
        needs_gradients: whether it needs the task-loss gradients (default: ``fn``'s
            attribute ``needs_gradients`` if present, else ``False``).
    """

    def __init__(
        self, fn: Callable[..., Mapping[str, Tensor]], needs_gradients: bool | None
    ) -> None:
        self.fn = fn
        self.name = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "criterion"))
        flag = getattr(fn, "needs_gradients", False) if needs_gradients is None else needs_gradients
        self.needs_gradients = bool(flag)

    @override
    def scores(self, ctx: CriterionContext) -> dict[str, Tensor]:
        grads = ctx.gradients() if self.needs_gradients else None
        return _check_scores(self.fn(dict(ctx.params), grads), ctx.params, self.name)


def _check_scores(scores: object, params: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"Expected criterion {name!r} to return a dict of score tensors, "
            f"but got {type(scores).__name__}"
        )
    missing = [n for n in params if n not in scores]
    unexpected = [n for n in scores if n not in params]
    if missing or unexpected:
        raise ValueError(
            f"Expected criterion {name!r} to return scores for exactly the pruned parameters, "
            f"but got missing={missing}, unexpected={unexpected}"
        )
    out: dict[str, Tensor] = {}
    for fqn, param in params.items():
        score = scores[fqn]
        if not isinstance(score, Tensor) or not score.is_floating_point():
            raise TypeError(
                f"Expected the score of {fqn!r} from criterion {name!r} to be a floating-point "
                f"tensor, but got {score!r:.80}"
            )
        if tuple(score.shape) != tuple(param.shape):
            raise ValueError(
                f"Expected the score of {fqn!r} from criterion {name!r} to have shape "
                f"{tuple(param.shape)}, but got {tuple(score.shape)}"
            )
        out[fqn] = score.detach()
    return out


# ----------------------------------------------------------------------------- the registry

CRITERIA: dict[str, Criterion] = {}
"""Registered criteria by name (built-ins, the fairness-aware ones, and `register`\\ ed ones)."""


def register(criterion: Criterion, *, replace: bool = False) -> Criterion:
    """Add a criterion to `CRITERIA` under its ``name`` (then usable by name everywhere).

    Args:
        criterion: an object of the `Criterion` protocol.
        replace: allow replacing a registered criterion of the same name.

    Returns:
        The criterion.

    Example:
        >>> class Squares(ScoreCriterion):
        ...     name = "squares_example"
        ...     def scores(self, ctx):
        ...         return {n: p.detach() ** 2 for n, p in ctx.params.items()}
        >>> _ = register(Squares())
        >>> "squares_example" in CRITERIA
        True
    """
    if not isinstance(criterion, Criterion):
        raise TypeError(
            "Expected `criterion` to implement the Criterion protocol (name, needs_*, "
            f"make_options, check_options, masks), but got {type(criterion).__name__}"
        )
    name = criterion.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected the criterion's `name` to be a non-empty str, but got {name!r}")
    if name in CRITERIA and not replace and CRITERIA[name] is not criterion:
        raise ValueError(
            f"Expected a new criterion name, but {name!r} is registered already "
            "(pass replace=True to replace it)"
        )
    CRITERIA[name] = criterion
    return criterion


for _builtin in (Magnitude(), Gradient(), Undecayed(), Random()):
    register(_builtin)


def resolve_criterion(
    criterion: str | Criterion | Callable[..., Mapping[str, Tensor]],
    needs_gradients: bool | None = None,
) -> Criterion:
    """The criterion object of a name, a `Criterion`, or a user callable (wrapped).

    Args:
        criterion: a name in `CRITERIA`, a `Criterion` object, or ``fn(params, grads)``.
        needs_gradients: only with a callable: whether it needs the gradients.

    Raises:
        ValueError: an unknown name, or ``needs_gradients`` with anything but a callable.
        TypeError: anything else.

    Example:
        >>> resolve_criterion("magnitude").name
        'magnitude'
        >>> resolve_criterion(lambda p, g: p, needs_gradients=True).needs_gradients
        True
    """
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ValueError(
                f"Expected `criterion` to be one of {tuple(CRITERIA)} or a callable, but got "
                f"{criterion!r}"
            )
        found: Criterion = CRITERIA[criterion]
    elif isinstance(criterion, Criterion):
        found = criterion
    elif callable(criterion):
        return CallableCriterion(criterion, needs_gradients)
    else:
        raise TypeError(
            f"Expected `criterion` to be one of {tuple(CRITERIA)} or a callable, but got "
            f"{criterion!r} of type {type(criterion).__name__}"
        )
    if needs_gradients is not None:
        raise ValueError(
            "Expected `needs_gradients` only with a callable `criterion`, but got "
            f"needs_gradients={needs_gradients!r} with criterion={found.name!r}"
        )
    return found


def compute_scores(
    criterion: str | CriterionFn,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None = None,
    weight_decay: float | Mapping[str, float] = 0.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Scores of a registered score criterion or a user callable.

    Args:
        criterion: a name of a score criterion (``"magnitude"``, ``"gradient"``,
            ``"undecayed"``, ``"random"``, ...) or a callable ``fn(params, grads) -> scores``.
        params: FQN -> weight.
        grads: FQN -> task-loss gradient; required by the criteria that need gradients.
        weight_decay: ``ε`` for ``"undecayed"``.
        seed: seed for ``"random"``.

    Returns:
        FQN -> score tensor (same shapes as the parameters).

    Raises:
        ValueError: unknown criterion name, missing gradients, or a user criterion returning
            scores that do not fit the parameters.

    Example:
        >>> params = {"w": torch.tensor([1.0, -4.0])}
        >>> compute_scores("magnitude", params)["w"]
        tensor([1., 4.])
        >>> compute_scores(lambda p, g: {"w": p["w"] ** 2}, params)["w"]
        tensor([ 1., 16.])
    """
    found = resolve_criterion(
        criterion.strip().lower() if isinstance(criterion, str) else criterion
    )
    scores = getattr(found, "scores", None)
    if scores is None:
        raise ValueError(
            f"Expected a score criterion, but {found.name!r} makes masks itself (use its masks)"
        )
    ctx = CriterionContext(
        params,
        0.0,
        seed=seed,
        gradients=None if grads is None else (lambda: grads),
        weight_decays=lambda: weight_decay,
        owner=f"criterion {found.name!r}",
    )
    return scores(ctx)
