"""Pruning criteria: per-weight scores; the weights with the lowest scores are pruned.

Every criterion maps ``params: dict[str, Tensor]`` (FQN -> weight) to a dict of score
tensors of the same shapes. Scores are non-negative; the mask builders in
:mod:`lightning_fairprune.pruning.masks` threshold on ``abs(score)`` in any case.

=============  ============================  ==================================
name           score                         needs
=============  ============================  ==================================
magnitude      ``abs(θ)``                    weights
gradient       ``abs(θ · g)``                weights, task-loss gradient ``g``
undecayed      ``abs(-θ · g + ε · θ²)``      weights, ``g``, weight decay ``ε``
random         ``U(0, 1)``, seeded           a seed
=============  ============================  ==================================

``g`` is the gradient of the task loss only (no weight-decay term); with ``ε = 0`` the
undecayed criterion equals the gradient criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "CRITERIA",
    "NEEDS_GRADIENTS",
    "CriterionFn",
    "compute_scores",
    "gradient_scores",
    "magnitude_scores",
    "random_scores",
    "undecayed_scores",
]

CriterionFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor] | None], dict[str, Tensor]]
"""A user criterion: ``fn(params, grads) -> scores`` (``grads`` may be ``None``)."""

NEEDS_GRADIENTS: frozenset[str] = frozenset({"gradient", "undecayed"})
"""Names of the built-in criteria that need the task-loss gradient."""


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
            (no extra memory; valid because the mask builders threshold on ``abs(score)``).

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
    scores are identical on every process and every device for the same seed.

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


CRITERIA: dict[str, Callable[..., dict[str, Tensor]]] = {
    "magnitude": magnitude_scores,
    "gradient": gradient_scores,
    "undecayed": undecayed_scores,
    "random": random_scores,
}
"""Built-in criteria by name."""


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


def compute_scores(
    criterion: str | CriterionFn,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None = None,
    weight_decay: float | Mapping[str, float] = 0.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Scores of a named criterion or a user callable.

    Args:
        criterion: ``"magnitude"``, ``"gradient"``, ``"undecayed"``, ``"random"`` or a
            callable ``fn(params, grads) -> dict[str, Tensor]``.
        params: FQN -> weight.
        grads: FQN -> task-loss gradient; required for ``"gradient"`` and ``"undecayed"``.
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
    if isinstance(criterion, str):
        key = criterion.strip().lower()
        if key not in CRITERIA:
            raise ValueError(
                f"Expected `criterion` to be one of {sorted(CRITERIA)} or a callable, "
                f"but got {criterion!r}"
            )
        if key in NEEDS_GRADIENTS and grads is None:
            raise ValueError(
                f"Expected `grads` for criterion {key!r} (it needs the task-loss gradient), "
                "but got None"
            )
        if key == "magnitude":
            return magnitude_scores(params)
        if key == "gradient":
            return gradient_scores(params, grads)
        if key == "undecayed":
            return undecayed_scores(params, grads, weight_decay)
        return random_scores(params, seed)
    if callable(criterion):
        name = getattr(criterion, "__name__", repr(criterion))
        return _check_scores(criterion(params, grads), params, name)
    raise TypeError(
        f"Expected `criterion` to be a string in {sorted(CRITERIA)} or a callable, "
        f"but got {criterion!r}"
    )
