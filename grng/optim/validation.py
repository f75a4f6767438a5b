"""Argument checks shared by the optimizers: each raises ValueError naming the argument."""
from __future__ import annotations

import math


def finite(name: str, value: float) -> float:
    """A finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    """A finite number >= 0."""
    if finite(name, value) < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def positive(name: str, value: float) -> float:
    """A finite number > 0."""
    if finite(name, value) <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def in_unit_interval(name: str, value: float, *, closed_right: bool = False) -> float:
    """A number in [0, 1) (or [0, 1] when ``closed_right``)."""
    v = finite(name, value)
    if v < 0.0 or v > 1.0 or (v == 1.0 and not closed_right):
        bound = "]" if closed_right else ")"
        raise ValueError(f"{name} must be in [0, 1{bound}, got {value!r}")
    return v


def positive_int(name: str, value: int) -> int:
    """An integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def non_negative_int(name: str, value: int) -> int:
    """An integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def choice(name: str, value: str, options: tuple[str, ...]) -> str:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def optional_positive(name: str, value: float | None) -> float | None:
    """None or a finite number > 0."""
    return None if value is None else positive(name, value)



def storage_dtype(name: str, value: object) -> object:
    """None or a storage dtype for factors/inverses: torch.bfloat16, torch.float32, torch.float64.

    float16 is refused: its range (65504) is too small for second moments of activations.
    """
    import torch

    allowed = (torch.bfloat16, torch.float32, torch.float64)
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed}, got {value!r}")
    return value


def grad_scaler(name: str, value: object) -> object:
    """None or an object with GradScaler's interface (scale, unscale_, get_scale, is_enabled)."""
    if value is not None and not all(callable(getattr(value, m, None))
                                     for m in ("scale", "unscale_", "get_scale", "is_enabled")):
        raise ValueError(f"{name} must be None or a torch.amp.GradScaler, got {type(value).__name__}")
    return value


def integer(name: str, value: int) -> int:
    """Any integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    """True or False (not a truthy stand-in)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def model_first(owner: str, value: object) -> str:
    """The TypeError message for a curvature optimizer given something other than a model:
    what to pass instead (a list or dict here is usually parameters or param groups)."""
    got = type(value).__name__
    message = f"{owner}: model must be a torch.nn.Module, got {got}"
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "__next__"):
        message += (f". {owner} takes the model first (it finds the layers to precondition in it) "
                    f"and param groups as a keyword: {owner}(model, lr=..., "
                    "param_groups=["
                    "{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, "
                    "'weight_decay': 0.0}]) (each group a subset of model.parameters())")
    return message


def momentum_not_cycled(owner: str, groups: list[dict], built: list[float]) -> None:
    """ValueError if a cyclic LR scheduler (OneCycleLR, CyclicLR with ``cycle_momentum=True``:
    they write ``max_momentum`` into every group) turned on momentum in a group built with
    ``momentum=0`` (``built``: the momentum of each group at construction)."""
    for i, (group, momentum) in enumerate(zip(groups, built)):
        if momentum == 0.0 and group.get("momentum", 0.0) != 0.0 and "max_momentum" in group:
            raise ValueError(
                f"{owner}: param group {i} was built with momentum=0, and a scheduler with "
                f"cycle_momentum=True (OneCycleLR, CyclicLR; True is their default) set its "
                f"momentum to {group['momentum']} (cycled {group.get('base_momentum')}-"
                f"{group['max_momentum']}): heavy-ball momentum on top of a curvature step is "
                "not what the optimizer was built for and can diverge. Pass "
                "cycle_momentum=False to the scheduler, or build the optimizer with momentum > 0 "
                "if you mean the momentum to be cycled")
