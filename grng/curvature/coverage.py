"""What a curvature optimizer gives each parameter of a model (docs/algorithms.md "Coverage").

Every parameter gets one treatment: a **Kronecker** block (named by its layer, with d_G x d_A
and which sides are diagonal), the **diagonal** fallback D = EMA(g * g) (with the reason it got
no block), or **frozen** (``requires_grad=False`` or not in the optimizer's param groups).
``opt.coverage()`` returns a :class:`CoverageReport`; ``print`` it for a table. At construction
the optimizer warns once when no parameter gets a block (0% coverage), once about parameters of
ndim >= 2 on the diagonal and once about factor sides kept diagonal by ``max_factor_dim``
(:func:`construction_warnings`): nothing degrades silently.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from grng.curvature.blocks import BlockSet
from grng.curvature.factors import DenseFactor
from grng.curvature.layers import KroneckerLayer, helper_for, make_layers
from grng.curvature.options import BlockOptions

__all__ = ["DIAGONAL", "FROZEN", "KRONECKER", "CoverageReport", "ParameterCoverage",
           "construction_warnings", "coverage_report", "warn_at_construction"]

KRONECKER, DIAGONAL, FROZEN = "kronecker", "diagonal", "frozen"


@dataclass(frozen=True)
class ParameterCoverage:
    """One parameter's treatment. For a Kronecker block: its ``block`` name, sizes ``d_g`` x
    ``d_a``, which sides are diagonal and which of those only because they exceed
    ``max_factor_dim`` (``limited``: "G" and/or "A"). ``note``: why a parameter is on the
    diagonal or frozen, tied names, limits."""

    name: str
    shape: tuple[int, ...]
    treatment: str
    block: str | None = None
    d_g: int | None = None
    d_a: int | None = None
    g_diagonal: bool = False
    a_diagonal: bool = False
    limited: tuple[str, ...] = ()
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """The block and its sizes (Kronecker), followed by the note."""
        if self.treatment != KRONECKER:
            return self.note
        diag = [s for s, d in (("G", self.g_diagonal), ("A", self.a_diagonal)) if d]
        text = f"{self.block}: G {self.d_g} x A {self.d_a}"
        if diag:
            text += f" ({' and '.join(diag)} diagonal)"
        return f"{text}; {self.note}" if self.note else text


@dataclass
class CoverageReport:
    """Every parameter of a model (tied tensors once) and its :class:`ParameterCoverage`."""

    entries: list[ParameterCoverage]
    max_factor_dim: int | None

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> ParameterCoverage:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def treatment(self, kind: str) -> list[ParameterCoverage]:
        """The entries with treatment ``kind`` (KRONECKER, DIAGONAL or FROZEN)."""
        return [e for e in self.entries if e.treatment == kind]

    def fraction(self, kind: str) -> float:
        """The share of the trainable (optimized) parameter count that gets ``kind``."""
        total = sum(e.numel for e in self.entries if e.treatment != FROZEN)
        return sum(e.numel for e in self.treatment(kind)) / total if total else 0.0

    def blocks(self) -> list[str]:
        """The Kronecker blocks' names, in model order."""
        return list(dict.fromkeys(e.block for e in self.treatment(KRONECKER)))

    def degraded(self) -> list[ParameterCoverage]:
        """Parameters of ndim >= 2 on the diagonal fallback."""
        return [e for e in self.treatment(DIAGONAL) if len(e.shape) >= 2]

    def limited(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Block -> the (side, size) pairs kept diagonal because they exceed max_factor_dim."""
        out = {}
        for e in self.treatment(KRONECKER):
            if e.limited:
                out[e.block] = tuple((s, e.d_g if s == "G" else e.d_a) for s in e.limited)
        return out

    def summary(self) -> str:
        """One line: the shares of the trainable parameters by treatment."""
        total = sum(e.numel for e in self.entries if e.treatment != FROZEN)
        frozen = self.treatment(FROZEN)
        return (f"Kronecker {100 * self.fraction(KRONECKER):.2f}% of {total:,} trainable "
                f"parameters ({len(self.blocks())} blocks), diagonal "
                f"{100 * self.fraction(DIAGONAL):.2f}% ({len(self.treatment(DIAGONAL))} tensors, "
                f"{len(self.degraded())} of ndim >= 2), frozen {sum(e.numel for e in frozen):,} "
                f"({len(frozen)} tensors); max_factor_dim={self.max_factor_dim}")

    def __str__(self) -> str:
        rows = [("parameter", "shape", "treatment", "block / reason")]
        rows += [(e.name, "x".join(map(str, e.shape)) or "scalar", e.treatment, e.describe())
                 for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [self.summary()]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def _owner(model: nn.Module, names: dict[int, str], p_id: int) -> tuple[str, nn.Module]:
    """(name, module) of the module that owns a parameter (a parametrization's original
    belongs to the parametrized module)."""
    name = names[p_id].rpartition(".")[0]
    if ".parametrizations." in f".{name}.":
        name = f".{name}".split(".parametrizations.")[0][1:]
    return name, model.get_submodule(name)


def _diagonal_reason(module_name: str, module: nn.Module, p_id: int,
                     skipped: dict[str, str]) -> str:
    """Why a parameter in the optimizer got no Kronecker block."""
    if module_name in skipped:
        return skipped[module_name]
    helper = helper_for(module)
    kind = type(module).__name__
    if helper is None:
        return f"no Kronecker helper for {kind}"
    blocks, _ = make_layers(module)
    if any(id(p) == p_id for block in blocks for p in block.params):
        return ("its block was not built: Kronecker blocks are fixed at construction, when all "
                "of a block's parameters must be in param_groups")
    return f"not in a Kronecker block of {kind}"


def _limited_sides(layer: KroneckerLayer) -> tuple[str, ...]:
    """The sides kept diagonal only because they exceed max_factor_dim."""
    sides = ("G",) if layer.g_factor.diagonal else ()
    if layer.a_factor.diagonal and layer.a_structure is DenseFactor:
        sides += ("A",)
    return sides


def coverage_report(model: nn.Module, blocks: BlockSet, optimized: set[int],
                    options: BlockOptions) -> CoverageReport:
    """The coverage of ``model`` by ``blocks`` (built as ``options`` say) for the parameters
    whose ids are in ``optimized`` (the optimizer's param groups)."""
    max_factor_dim = options.max_factor_dim
    block_of = {id(p): (layer, name) for layer, name in zip(blocks.layers, blocks.names)
                for p in layer.params}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    first = {i: names[0] for i, names in aliases.items()}
    entries = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        tied = []
        for alias in aliases[id(p)][1:]:
            module_name = alias.rpartition(".")[0]
            why = blocks.skipped.get(module_name)
            tied.append(f"tied: also {alias}" + (f" ({module_name}: {why})" if why else ""))
        if not p.requires_grad or id(p) not in optimized:
            why = "requires_grad=False" if not p.requires_grad else "not in param_groups"
            entries.append(ParameterCoverage(name, shape, FROZEN, note="; ".join([why] + tied)))
        elif id(p) in block_of:
            layer, block = block_of[id(p)]
            d_g, d_a = layer.dims()
            limited = _limited_sides(layer)
            notes = [f"{s} above max_factor_dim={max_factor_dim}" for s in limited] + tied
            entries.append(ParameterCoverage(
                name, shape, KRONECKER, block, d_g, d_a, layer.g_factor.diagonal,
                layer.a_factor.diagonal, limited, "; ".join(notes)))
        else:
            module_name, module = _owner(model, first, id(p))
            why = _diagonal_reason(module_name, module, id(p), blocks.skipped)
            entries.append(ParameterCoverage(name, shape, DIAGONAL, note="; ".join([why] + tied)))
    return CoverageReport(entries, max_factor_dim)


def warn_at_construction(report: CoverageReport, owner: str) -> None:
    """Issue :func:`construction_warnings` (UserWarning), attributed to the first caller
    outside grng (the line that built the optimizer)."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    for message in construction_warnings(report, owner):
        warnings.warn(message, UserWarning, stacklevel=level)


def construction_warnings(report: CoverageReport, owner: str) -> list[str]:
    """The construction warnings (at most three): no Kronecker block at all (0% coverage),
    parameters of ndim >= 2 on the diagonal fallback, and factor sides kept diagonal by
    max_factor_dim."""
    out = []
    if not report.blocks() and report.fraction(DIAGONAL) > 0:
        out.append(f"{owner}: the model has no Kronecker-capable layer (0% of the trainable "
                   "parameters get a Kronecker block; supported: Linear, Conv1d/2d/3d, Embedding, "
                   "transformers' Conv1D, nn.MultiheadAttention's projections, nn.LSTM / "
                   "GRU / RNN), so every parameter gets only the diagonal fallback and the "
                   "optimizer is a diagonal method. See opt.coverage() and docs/algorithms.md "
                   "'Layer helpers' (grng.register_layer adds a helper).")
    degraded = report.degraded()
    if degraded:
        listed = "; ".join(f"{e.name} {tuple(e.shape)}: {e.note}" for e in degraded)
        out.append(f"{owner}: {len(degraded)} parameter(s) of ndim >= 2 get only the diagonal "
                   f"fallback, no Kronecker block: {listed}. See opt.coverage() and "
                   "docs/algorithms.md 'Layer helpers' (grng.register_layer adds a helper).")
    limited = report.limited()
    if limited:
        listed = ", ".join(f"{block} {side} ({dim})" for block, sides in limited.items()
                           for side, dim in sides)
        out.append(f"{owner}: factor sides above max_factor_dim={report.max_factor_dim} are "
                   f"kept diagonal (a dense factor would hold dim^2 entries): {listed}. "
                   "Raise max_factor_dim to keep them dense.")
    return out
