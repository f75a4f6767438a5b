"""Unknown keyword arguments of grng's optimizers: a TypeError that names the keyword, suggests
the close spelling, and says when it is an option of another grng optimizer."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

# what a user coming from one optimizer may pass to another, and what to use instead
HINTS: Mapping[tuple[str, str], str] = {
    ("RKalman", "damping"): "R-Kalman has no damping; prior_precision plays that role "
                            "(P starts at I / prior_precision; larger = more damped)",
    ("RKalman", "inverse"): "R-Kalman keeps covariances directly and inverts no factor",
    ("RKalman", "inverse_every"): "R-Kalman updates its covariances every factor_every steps and "
                                  "has no inverse refresh",
    ("RKalman", "factor_dtype"): "R-Kalman's covariances have no low-precision storage option",
    ("RKalman", "inverse_dtype"): "R-Kalman keeps covariances directly and inverts no factor",
    ("KFAC", "rho"): "K-FAC is the rho = 0 member: use grng.RING (d = P(g) + rho g) or grng.RENG "
                     "(d = P(g + rho H g))",
    ("KFAC", "gr"): "use grng.RENG(gr=...) or grng.GradReg(grng.KFAC(...), mode=...)",
    ("RING", "gr"): "RING folds rho into the direction; use grng.RENG(gr=...) for an explicit "
                    "gradient penalty",
    ("RING", "epsilon"): "RING needs no finite-difference step; use grng.RENG(gr='forward', "
                         "epsilon=...)",
}


def _accepted(cls: type) -> set[str]:
    """The keyword names ``cls.__init__`` (and the classes it passes **kwargs to) accept."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                     and p.name != "self" and not p.name.startswith("_"))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def reject_unknown(cls: type, kwargs: Mapping[str, Any], others: Iterable[type] = ()) -> None:
    """Raise TypeError for the first keyword of ``kwargs`` (``cls`` accepts none of them)."""
    if not kwargs:
        return
    name = cls.__name__
    key = next(iter(kwargs))
    accepted = _accepted(cls)
    parts = [f"{name} got an unexpected keyword argument {key!r}"]
    hint = HINTS.get((name, key))
    if hint is not None:
        parts.append(hint)
    else:
        close = (difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.75)
                 or sorted(a for a in accepted if a.startswith(key) or key.startswith(a))[:1])
        if close:
            parts.append(f"did you mean {close[0]!r}?")
        owners = [o.__name__ for o in others if o is not cls and key in _accepted(o)]
        if owners:
            parts.append(f"{key!r} is an option of {', '.join(owners)}")
    raise TypeError("; ".join(parts))


def optimizer_classes() -> list[type]:
    """grng's public optimizer classes: the torch.optim.Optimizer subclasses defined in grng."""
    import torch

    out, todo = [], list(torch.optim.Optimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("grng.") and not cls.__name__.startswith("_"):
            out.append(cls)
    return sorted(set(out), key=lambda c: c.__name__)
