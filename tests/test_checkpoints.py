"""Checkpoints (docs/numerics.md): bit-for-bit resume, storage dtypes, dtype/device moves, mismatched models."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from grng import KFAC, RKalman
from optimizer_helpers import (ALL, F64, FACTORIES, _assert_same,
                               _closure, _data, _mlp, _train)

def _resume_case(name: str, **kw) -> None:
    torch.manual_seed(21)
    model = _mlp(torch.float32)
    opt = FACTORIES[name](model, **kw)
    data = _data(9, dtype=torch.float32)
    _train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, data[4:])

    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    torch.manual_seed(999)                                  # the global RNG must not matter
    model2 = _mlp(torch.float32)
    model2.load_state_dict(ckpt["model"])
    opt2 = FACTORIES[name](model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, data[4:])
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    _assert_same(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("name", ALL)
def test_resumed_run_continues_bit_for_bit(name: str) -> None:
    _resume_case(name)


def test_resumed_run_with_bfloat16_storage_continues_bit_for_bit() -> None:
    _resume_case("kfac-eigen", factor_dtype=torch.bfloat16, inverse_dtype=torch.bfloat16)


def test_state_dict_holds_factors_inverses_counters_and_rng() -> None:
    model = _mlp()
    opt = RKalman(model, kalman_rank=3)
    _train(model, opt, _data(2))
    sd = opt.state_dict()
    assert sd["grng"]["steps"] == 2 and "rng" in sd["grng"] and sd["grng"]["rng"]
    assert {"PA", "PG"} <= set(sd["state"][0])
    kf = KFAC(_mlp(), inverse="newton", momentum=0.9)
    _train(kf.model, kf, _data(1))
    assert {"A", "G", "XA", "XG", "momentum_buffer"} <= set(kf.state_dict()["state"][0])


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_load_into_another_dtype_with_map_location(name: str) -> None:
    """A float64 run's checkpoint, loaded with map_location into a float32 model: every state
    tensor in float32 on the model's device; training continues and stays close to float64."""
    torch.manual_seed(2)
    model = _mlp()
    opt = FACTORIES[name](model)
    data = _data(6)
    _train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location=torch.device("cpu"))
    model32 = _mlp(torch.float32)
    model32.load_state_dict(ckpt["model"])
    opt32 = FACTORIES[name](model32)
    opt32.load_state_dict(ckpt["opt"])
    for st in opt32.state.values():
        for v in st.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32 and v.device == torch.device("cpu")
    _train(model, opt, data[3:])
    _train(model32, opt32, [(x.float(), y) for x, y in data[3:]])
    tol = 1e-4 if name == "kfac-eigen" else 1e-2  # R-Kalman's sketch draws differ per dtype
    for p, q in zip(model.parameters(), model32.parameters()):
        torch.testing.assert_close(q.double(), p, rtol=1e-3, atol=tol)


def test_bfloat16_model_keeps_float32_factors_through_a_checkpoint() -> None:
    model = _mlp(torch.bfloat16)
    opt = KFAC(model, lr=0.05)
    _train(model, opt, _data(2, dtype=torch.bfloat16))
    st = opt.layer_state(opt.layers[0])
    assert st["A"].dtype == torch.float32
    opt2 = KFAC(model, lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st2 = opt2.layer_state(opt2.layers[0])
    assert st2["A"].dtype == torch.float32 and torch.equal(st2["A"], st["A"])


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman", "gradreg-kfac"])
def test_checkpoint_of_a_different_model_raises(name: str) -> None:
    src = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    o_src = FACTORIES[name](src)
    x, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    o_src.step(_closure(src, x, y))
    opt = FACTORIES[name](_mlp())
    with pytest.raises(ValueError, match="does not match the model"):
        opt.load_state_dict(o_src.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without CUDA")
def test_rkalman_checkpoint_from_a_cuda_machine_loads_without_cuda() -> None:
    """The saved sketch RNG of a CUDA run (a CUDA generator state) must not break loading on a
    CPU-only machine; the CPU generator's own saved state is still restored."""
    model = _mlp()
    opt = RKalman(model, kalman_rank=3)
    _train(model, opt, _data(2))
    sd = copy.deepcopy(opt.state_dict())
    cpu_state = sd["grng"]["rng"]["cpu"]
    sd["grng"]["rng"]["cuda:0"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    fresh = RKalman(model, kalman_rank=3)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.block.generator(torch.device("cpu")).get_state(), cpu_state)
    _train(model, fresh, _data(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_checkpoint_moves_between_cpu_and_cuda(name: str) -> None:  # pragma: no cover - GPU only
    """CPU checkpoint -> CUDA model and CUDA checkpoint -> (map_location) CPU model: every state
    tensor lands on its parameter's device and training continues like the source run."""
    torch.manual_seed(23)
    cpu_model = _mlp()
    opt = FACTORIES[name](cpu_model)
    data = _data(4)
    _train(cpu_model, opt, data[:2])
    gpu_model = copy.deepcopy(cpu_model).cuda()
    o_gpu = FACTORIES[name](gpu_model)
    o_gpu.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(v.is_cuda for st in o_gpu.state.values() for v in st.values()
               if isinstance(v, Tensor) and v.is_floating_point())
    _train(gpu_model, o_gpu, [(x.cuda(), y.cuda()) for x, y in data[2:]])
    buf = io.BytesIO()
    torch.save({"model": gpu_model.state_dict(), "opt": o_gpu.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    back = _mlp()
    back.load_state_dict(ckpt["model"])
    o_back = FACTORIES[name](back)
    o_back.load_state_dict(ckpt["opt"])
    _train(back, o_back, data[:1])
    assert all(bool(torch.isfinite(p).all()) for p in back.parameters())
    if name == "rkalman":  # CPU and CUDA sketch generators draw different streams
        return
    _train(cpu_model, opt, data[2:])
    _train(cpu_model, opt, data[:1])
    for p, q in zip(cpu_model.parameters(), back.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)
