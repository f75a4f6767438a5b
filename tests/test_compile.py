"""torch.compile (docs/numerics.md): a compiled model trains with every optimizer and captures the same factors (double backprop falls back to the forward finite difference); tested with ``backend="aot_eager"`` (inductor works too, checked by hand, but compiles for over a minute on a 2-core machine)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from grng import make_closure
from grng.optim.cases import optimizer_factory
from optimizer_helpers import ALL, FACTORIES, _assert_same_blocks, _closure, _data, _mlp

@pytest.mark.parametrize("name", ALL)
def test_compiled_model_trains_and_captures_the_same_factors(name: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(18)
    eager = _mlp(torch.float32)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    o_comp = FACTORIES[name](model)
    # double backprop does not go through a compiled graph: the compiled run falls back to the
    # forward finite difference (one warning) and equals the eager F-GR run
    fallback = {"reng-exact": {"gr": "forward"}, "gradreg-sgd": {"mode": "forward"}}.get(name)
    o_eager = FACTORIES[name](eager, **(fallback or {}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in _data(2, dtype=torch.float32):
            o_eager.step(_closure(eager, x, y))
            o_comp.step(make_closure(o_comp, lambda: F.cross_entropy(compiled(x), y)))
    warned = [w for w in record if "no double backward" in str(w.message)]
    assert len(warned) == (1 if fallback else 0)
    if fallback:
        assert getattr(o_comp, "gr", getattr(o_comp, "mode", None)) == "forward"
    for p, q in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    _assert_same_blocks(o_eager, o_comp, rtol=1e-4, atol=1e-6,
                        keys=lambda key: key in ("A", "G", "PA", "PG"))


COMPILED_STEPS = {  # cases of grng.optim.cases, sync-free
    "kfac-newton-momentum": optimizer_factory("kfac-newton", lr=0.05, momentum=0.9,
                                              inverse_every=2, sync_free=True),
    "ring-cholesky": optimizer_factory("ring", lr=0.05, inverse="cholesky", inverse_every=2,
                                       sync_free=True),
    "rkalman": optimizer_factory("rkalman", lr=0.05, kalman_rank=4, sync_free=True),
    "ekfac": optimizer_factory("ekfac", lr=0.01, weight_decay=0.01, inverse_every=2,
                               sync_free=True),
}


@pytest.mark.parametrize("name", sorted(COMPILED_STEPS))
def test_compiled_sync_free_step_equals_eager(name: str) -> None:
    """torch.compile(opt.step) of the sync-free step takes the eager step bit for bit, its
    schedule (fold, refresh) and counters included; K-FAC/RING's fold step is one graph with no
    break."""
    torch._dynamo.reset()
    out = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9),
                                    torch.nn.Tanh(), torch.nn.Linear(9, 3))
        opt = COMPILED_STEPS[name](model)
        step = torch.compile(opt.step, backend="aot_eager") if mode == "compiled" else opt.step
        g = torch.Generator().manual_seed(3)
        for i in range(5):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if mode == "compiled" and i == 2:  # this step, traced and explained
                explained = torch._dynamo.explain(opt.step)()
                if name != "rkalman":  # R-Kalman's sketch draws from a torch.Generator
                    assert explained.graph_break_count == 0, explained.break_reasons
            else:  # the first step creates the factors (host path)
                (opt.step if i == 0 else step)()
        assert opt.steps == 5 and opt.skipped_steps == 0
        out[mode] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(out["eager"], out["compiled"]):
        assert torch.equal(p, q)
