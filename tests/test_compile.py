"""torch.compile (docs/numerics.md): a compiled model trains with every optimizer and captures the same factors; tested with ``backend="aot_eager"`` (inductor works too, checked by hand, but compiles for over a minute on a 2-core machine)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from grng import make_closure
from optimizer_helpers import (ALL, FACTORIES, _closure, _curv, _data, _mlp)

@pytest.mark.parametrize("name", ALL)
def test_compiled_model_trains_and_captures_the_same_factors(name: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(18)
    eager = _mlp(torch.float32)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    o_eager, o_comp = FACTORIES[name](eager), FACTORIES[name](model)
    if name in ("reng-exact", "gradreg-sgd"):   # double backprop: not through a compiled graph
        x, y = _data(1, dtype=torch.float32)[0]
        with pytest.raises(RuntimeError, match="finite differences"):
            o_comp.step(make_closure(o_comp, lambda: F.cross_entropy(compiled(x), y)))
        return
    for x, y in _data(2, dtype=torch.float32):
        o_eager.step(_closure(eager, x, y))
        o_comp.step(make_closure(o_comp, lambda: F.cross_entropy(compiled(x), y)))
    for p, q in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    ce, cc = _curv(o_eager), _curv(o_comp)
    if hasattr(ce, "layers"):
        for le, lc in zip(ce.layers, cc.layers):
            for key, v in ce.layer_state(le).items():
                if key in ("A", "G", "PA", "PG"):
                    torch.testing.assert_close(cc.layer_state(lc)[key], v, rtol=1e-4, atol=1e-6)
