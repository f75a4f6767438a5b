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


def choice(name: str, value: str, options: tuple[str, ...]) -> str:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def optional_positive(name: str, value: float | None) -> float | None:
    """None or a finite number > 0."""
    return None if value is None else positive(name, value)
