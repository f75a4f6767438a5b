"""Checkpoints of the curvature optimizers: torch.optim's format, plus the curvature state.

``state_dict()`` is torch.optim's dict whose per-parameter entries also hold each unit's
curvature tensors under the names of docs/algorithms.md (a Kronecker block's on its weight:
``A``, ``G``, ``QG``/``lG``/``QA``/``lA`` or ``XG``/``XA``, R-Kalman's ``PA``/``PG``, EKFAC's
``A``, ``G``, ``QG``/``QA``, ``exp_avg_basis``, ``exp_avg_sq``, ``step``; a diagonal unit's ``D`` or
``PD`` on its parameter, or EKFAC's Adam moments), and a ``"grng"`` entry with the step
counters -- the format grng has always written, so older checkpoints load. Loading checks
every saved tensor against the shape its unit's preconditioner expects, and every saved
curvature tensor against the kind of state its parameter now has (a Kronecker block's, a
diagonal unit's, or none: a bias inside a block), before anything is changed, and restores each tensor on the parameter's device in the dtype the optimizer keeps
it in (a float64 checkpoint loads into a float32 model as float32; a bfloat16 model's float32
factors are not rounded through bfloat16).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from grng.optim.skip_report import DeviceSkipReport
from grng.precondition.base import Preconditioner, Unit, compute_dtype


class CurvatureOptimizer(Protocol):
    """What checkpointing needs of a curvature optimizer (grng.optim.base.CurvatureOptimizer)."""

    _steps: int
    _skipped: int
    _skipped_on_device: Tensor | None
    counters: Any  # grng.optim.base.StepCounters
    state: Any
    layers: list
    capture: Any
    model: Any
    diagonal: Preconditioner

    def _all_params(self) -> Iterator[Tensor]: ...

    def _curvature_units(self) -> list[tuple[Unit, Preconditioner]]: ...

    def _extra_state(self) -> dict[str, Any]: ...

    def _load_extra_state(self, extra: dict[str, Any]) -> None: ...


def save(opt: CurvatureOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Merge the curvature tensors into torch.optim's state dict ``sd``; add the counters."""
    index = {id(p): i for i, p in enumerate(opt._all_params())}
    for unit, _ in opt._curvature_units():
        tensors = dict(unit.state.tensors())
        if tensors:
            sd["state"].setdefault(index[id(unit.like)], {}).update(tensors)
    on_device = 0 if opt._skipped_on_device is None else int(opt._skipped_on_device)
    # "steps" is the schedule counter (with sync_free it also counts the skipped steps, whose
    # number is "skipped_on_device"); "skipped" is the host-counted skips
    sd["grng"] = {"steps": opt._steps, "skipped": opt._skipped, "skipped_on_device": on_device,
                  **opt._extra_state()}
    return sd


def load(opt: CurvatureOptimizer, state_dict: dict[str, Any],
         load_torch: Callable[[dict[str, Any]], None]) -> None:
    """Inverse of :func:`save` (``load_torch``: torch.optim's own ``load_state_dict``)."""
    sd = dict(state_dict)
    extra = sd.pop("grng", None)
    if extra is None:
        raise ValueError("state_dict lacks grng's 'grng' entry: not a grng optimizer checkpoint")
    params = list(opt._all_params())
    saved = [i for g in sd.get("param_groups", []) for i in g["params"]]
    units = {id(u.like): (u, pre) for u, pre in opt._curvature_units()}
    if len(saved) == len(params):  # otherwise torch.optim's own check raises on group sizes
        _check_shapes(opt, sd, saved, params, units)
    # split each parameter's entry: curvature tensors to their unit, the rest to torch.optim
    torch_state: dict[Any, dict[str, Any]] = {}
    curvature: dict[int, dict[str, Tensor]] = {}
    for i, p in zip(saved, params):
        entry = dict(sd.get("state", {}).get(i, {}))
        if id(p) in units:
            names = set(units[id(p)][1].expected_shapes(units[id(p)][0]))
            curvature[id(p)] = {k: entry.pop(k) for k in list(entry) if k in names}
        if entry:
            torch_state[i] = entry
    load_torch({**sd, "state": torch_state})
    for p in params:  # momentum (and any other torch-side buffer) in compute_dtype(p)
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point() and p.is_floating_point():
                opt.state[p][key] = value.to(device=p.device, dtype=compute_dtype(p))
    for p in params:
        if id(p) not in units:
            continue
        unit, pre = units[id(p)]
        pre.load(unit, {k: v.to(device=p.device, dtype=pre.storage_dtype(unit, k), copy=True)
                        for k, v in curvature.get(id(p), {}).items()})
    opt._steps = int(extra["steps"])
    opt._skipped = int(extra["skipped"])
    on_device = int(extra.get("skipped_on_device", 0))  # absent before grng 0.3
    opt._skipped_on_device = torch.tensor(on_device) if on_device else None
    opt.counters.report = DeviceSkipReport(reported=on_device)  # those were warned about
    opt._load_extra_state(extra)


def _kind(opt: CurvatureOptimizer, p: Tensor, units: dict[int, tuple[Any, Any]]) -> str:
    """What curvature state ``p`` has in ``opt``, in words."""
    if id(p) in units:
        unit, _ = units[id(p)]
        return "a diagonal unit" if unit.layer is None else "a Kronecker block"
    block = next((name for layer, name in zip(opt.layers, opt.block_set.names)
                  if any(q is p for q in layer.params)), None)
    return "none of its own" if block is None else f"none of its own (it is in block {block!r})"


def _check_kinds(opt: CurvatureOptimizer, sd: dict[str, Any], saved: list[int],
                 params: list[Tensor], units: dict[int, tuple[Any, Any]]) -> None:
    """ValueError naming the parameter when a saved curvature tensor is of another kind than
    the parameter's state now (a diagonal ``D`` saved for a weight that now has a Kronecker
    block, ``A``/``G`` for one that is now diagonal, anything on a bias now inside a block):
    the checkpoint's optimizer assigned its blocks differently (e.g. ``add_param_group``)."""
    block_names = {k for u, pre in units.values() if u.layer is not None
                   for k in pre.expected_shapes(u)}
    param_names = {id(p): name for name, p in opt.model.named_parameters()}
    for i, p in zip(saved, params):
        own = set(units[id(p)][1].expected_shapes(units[id(p)][0])) if id(p) in units else set()
        diagonal = set(opt.diagonal.expected_shapes(Unit(-1, None, [p], None)))
        foreign = sorted(k for k in sd.get("state", {}).get(i, {})
                         if k in (block_names | diagonal) - own)
        if foreign:
            saved_kind = "diagonal" if set(foreign) <= diagonal else "Kronecker block"
            raise ValueError(
                f"checkpoint does not match the optimizer: parameter "
                f"{param_names.get(id(p), '?')!r} has saved {saved_kind} curvature state "
                f"{foreign} but here has {_kind(opt, p, units)}; the checkpoint's optimizer "
                "assigned its Kronecker blocks differently (parameters added with "
                "add_param_group get the diagonal fallback): build the optimizer as the saved "
                "one was built (the same param_groups, then the same add_param_group calls) "
                "before load_state_dict")


def _check_shapes(opt: CurvatureOptimizer, sd: dict[str, Any], saved: list[int],
                  params: list[Tensor], units: dict[int, tuple[Any, Any]]) -> None:
    """ValueError, before anything is loaded, when a saved tensor does not fit: a curvature
    tensor of another kind (:func:`_check_kinds`), a curvature tensor against the shape its
    preconditioner expects, any other against p.shape."""
    _check_kinds(opt, sd, saved, params, units)
    names = {id(layer.weight): name for layer, name in zip(opt.layers, opt.block_set.names)}
    for i, p in zip(saved, params):
        expected = {}
        if id(p) in units:
            unit, pre = units[id(p)]
            expected = pre.expected_shapes(unit)
        for key, value in sd.get("state", {}).get(i, {}).items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if key in expected:
                if tuple(value.shape) != tuple(expected[key]):
                    where = f"layer {names[id(p)]!r} " if id(p) in names else ""
                    raise ValueError(f"checkpoint does not match the model: {where}state {key!r} "
                                     f"has shape {tuple(value.shape)}, expected "
                                     f"{tuple(expected[key])}")
            elif value.shape != p.shape:
                raise ValueError(f"checkpoint does not match the model: state {key!r} has "
                                 f"shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
