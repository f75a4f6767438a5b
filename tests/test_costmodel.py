"""The cost model (grng/benchmark/costmodel.py): the counts it is built from, checked against
the formulas of docs/performance.md on hand-sized blocks and against a model's real shapes."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grng.benchmark import costmodel as cm

FLAT = cm.Device("flat", {"fp32": 1.0, "tf32": 2.0, "bf16": 4.0, "fp64": 0.5}, 1e9, 0.0, 0.0, 1.0)


def _shape(*blocks: cm.BlockShape, params: int = 100, diagonal: int = 10) -> cm.StepShape:
    return cm.StepShape(tuple(blocks), params, diagonal, 4, 1e6, 10)


def test_component_counts_follow_the_formulas() -> None:
    b = cm.BlockShape("fc", d_a=7, d_g=5, a_dense=True, g_dense=True, rows=11)
    pred = cm.predict(_shape(b), cm.StepConfig(factor_every=2, inverse_every=3, fold_kernel=True),
                      FLAT)
    c = pred.components
    assert c["fold"].flops == pytest.approx(11 * (7 * 8 + 5 * 6) / 2)  # one triangle, m d (d + 1)
    assert "fold passes" not in c
    ref = cm.predict(_shape(b), cm.StepConfig(factor_every=2, inverse_every=3), FLAT).components
    assert ref["fold"].flops == pytest.approx(2 * 11 * (7 ** 2 + 5 ** 2) / 2)  # the full GEMM
    assert ref["fold passes"].bytes == pytest.approx(48 * (7 ** 2 + 5 ** 2) / 2)
    assert c["refresh"].flops == pytest.approx(9 * (7 ** 3 + 5 ** 3) / 3)
    assert c["apply"].flops == pytest.approx(4 * 5 * 7 * (5 + 7) + 2 * 5 * 7)
    assert c["update"].flops == pytest.approx(10 * 100)
    newton = cm.predict(_shape(b), cm.StepConfig(inverse="newton", iterations=4, inverse_every=3),
                        FLAT).components
    assert newton["refresh"].flops == pytest.approx(4 * 4 * (7 ** 3 + 5 ** 3) / 3)
    assert newton["apply"].flops == pytest.approx(2 * 5 * 7 * (5 + 7) + 2 * 5 * 7)


def test_diagonal_side_has_no_factor_work() -> None:
    b = cm.BlockShape("emb", d_a=1000, d_g=8, a_dense=False, g_dense=True, rows=3)
    c = cm.predict(_shape(b), cm.StepConfig(factor_every=1, inverse_every=1, fold_kernel=True),
                   FLAT).components
    assert c["fold"].flops == pytest.approx(3 * 8 * 9)
    assert c["refresh"].flops == pytest.approx(9 * 8 ** 3)


def test_device_gate_copies_no_dense_factor_under_the_masked_fold() -> None:
    """Sync-free: the gate's copies are the diagonal statistics per fold and the inverses of
    the blocks due (over T), never the dense factors (folded where ok by the communicator); the
    reference's masked fold pays its own clone and select in its passes, the kernel nothing."""
    small, wide = (cm.BlockShape("fc", d, 5, True, True, 11) for d in (7, 70))
    for b in (small, wide):
        cfg = cm.StepConfig(inverse="cholesky", factor_every=2, inverse_every=4, sync_free=True,
                            fold_kernel=True)
        gate = cm.predict(_shape(b), cfg, FLAT).components["gate"]
        assert gate.flops == pytest.approx(10 / 2 + (b.d_a ** 2 + 5 ** 2) / 4)
    ref = cm.predict(_shape(small), cm.StepConfig(sync_free=True), FLAT).components
    plain = cm.predict(_shape(small), cm.StepConfig(), FLAT).components
    assert ref["fold passes"].bytes == pytest.approx(plain["fold passes"].bytes * (48 + 28) / 48)


def test_eigenbasis_member_counts_its_per_step_and_refresh_work() -> None:
    """EKFAC: four GEMMs per block and step (V to the basis, the direction back; the moments
    live in the basis), a GEMM + QR refresh (or GEMM + CholeskyQR3) and both moments' carry
    (over T); under the device gate a copy of the refreshed state over T and none of the
    moments every step (adam_moments_masked writes them where ok); the moment step's kernel
    moves fewer bytes in fewer launches than the reference's ops."""
    b = cm.BlockShape("fc", 7, 5, True, True, 11)
    c = cm.predict(_shape(b), cm.StepConfig(family="ekfac", iterations=1, inverse_every=3,
                                            sync_free=True), FLAT).components
    assert c["apply"].flops == pytest.approx(2 * 5 * 7 * 12 + 2 * 5 * 7)
    assert c["moments"].flops == pytest.approx(2 * 5 * 7 * 12 + 12 * 5 * 7)
    assert c["refresh"].flops == pytest.approx((2 + 8 / 3) * (7 ** 3 + 5 ** 3) / 3)
    assert c["reproject"].flops == pytest.approx((2 * (7 ** 3 + 5 ** 3) + 4 * 5 * 7 * 12) / 3)
    assert c["gate"].flops == pytest.approx((7 ** 2 + 5 ** 2 + 2 * 5 * 7) / 3)
    chol = cm.predict(_shape(b), cm.StepConfig(family="ekfac", iterations=1, inverse_every=3,
                                               qr="cholesky"), FLAT).components
    assert chol["refresh"].flops == pytest.approx((2 + 10) * (7 ** 3 + 5 ** 3) / 3)
    kernel = cm.predict(_shape(b), cm.StepConfig(family="ekfac", iterations=1,
                                                 moments_kernel=True), FLAT).components
    assert kernel["moments"].flops == c["moments"].flops
    assert kernel["moments"].bytes < c["moments"].bytes
    assert kernel["moments"].launches < c["moments"].launches


def test_time_is_the_roofline_plus_launches() -> None:
    dev = cm.Device("d", {"fp32": 1e-12, "tf32": 1e-12, "bf16": 1e-12, "fp64": 1e-12}, 1e-9,
                    launch_us=1e6, eigh_latency_ms=0.0, eigh_tflops=1.0)
    cost = cm._time(dev, cm.Cost(flops=3.0, bytes=5.0, launches=2.0), "fp32")
    assert cost.seconds == pytest.approx(2.0 + max(3.0, 5.0))


def test_precision_changes_only_the_gemm_rate() -> None:
    b = cm.BlockShape("fc", 64, 32, True, True, 128)
    fp32 = cm.predict(_shape(b), cm.StepConfig(inverse="newton"), FLAT).components
    bf16 = cm.predict(_shape(b), cm.StepConfig(inverse="newton", precision="bf16"), FLAT).components
    assert bf16["refresh"].seconds == pytest.approx(fp32["refresh"].seconds / 4)
    assert bf16["update"].seconds == pytest.approx(fp32["update"].seconds)


def test_adamw_is_the_common_part_plus_its_update() -> None:
    b = cm.BlockShape("fc", 9, 4, True, True, 6)
    pred = cm.predict(_shape(b), cm.StepConfig(family="adamw"), FLAT)
    assert pred.ratio == pytest.approx(1.0)
    kfac = cm.predict(_shape(b), cm.StepConfig(), FLAT)
    assert kfac.adamw_seconds == pytest.approx(pred.adamw_seconds)
    assert kfac.ratio > 1.0


def test_step_shape_reads_blocks_rows_and_flops_on_meta() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.LayerNorm(10), nn.Linear(10, 3))

    shape = cm.step_shape(build, lambda d: (torch.randn(17, 6, device=d),
                                            torch.zeros(17, dtype=torch.long, device=d)),
                          lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert [(b.d_a, b.d_g, b.rows) for b in shape.blocks] == [(7, 10, 17), (11, 3, 17)]
    assert shape.params == sum(p.numel() for p in build().parameters())
    assert shape.diagonal_params == 20  # the LayerNorm
    # forward and weight gradient of both GEMMs (2 m d_in d_out each), the input gradient of the
    # second only (the data needs none)
    assert shape.fwd_bwd_flops == 2 * 2 * 17 * (6 * 10 + 10 * 3) + 2 * 17 * 10 * 3
    assert shape.fwd_bwd_ops > 0


def test_gpt2_small_prediction_lists_every_component() -> None:
    blocks = tuple(cm.BlockShape(f"b{i}", d_a, d_g, True, True, 8192)
                   for i in range(12) for d_a, d_g in ((769, 2304), (769, 768), (769, 3072), (3073, 768)))
    shape = cm.StepShape(blocks, 124_000_000, 40_000, 150, 7e12, 1900, "bf16")
    pred = cm.predict(shape, cm.StepConfig(), cm.DEVICES["h100"])
    assert {"forward+backward", "fold", "refresh", "apply", "update"} <= set(pred.components)
    assert all(math.isfinite(c.seconds) and c.seconds >= 0 for c in pred.components.values())
    assert "x AdamW" in cm.table(pred)


def test_gpt_shape_matches_the_meta_run_of_the_bench_model() -> None:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import models

    cfg = models.GPTConfig(vocab=97, context=16, width=24, heads=4, layers=2)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        out = m(b[0])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), b[0].reshape(-1))

    real = cm.step_shape(lambda: models.GPT(cfg),
                         lambda d: (torch.randint(0, cfg.vocab, (3, cfg.context), device=d),), loss)
    model = cm.gpt_shape(cfg.layers, cfg.width, cfg.vocab, cfg.context, 3, "fp32")
    assert sorted((b.d_a, b.d_g, b.a_dense, b.g_dense, b.rows) for b in model.blocks) == sorted(
        (b.d_a, b.d_g, b.a_dense, b.g_dense, b.rows) for b in real.blocks)
    assert (model.params, model.diagonal_params, model.tensors) == (
        real.params, real.diagonal_params, real.tensors)
    assert model.fwd_bwd_flops == pytest.approx(real.fwd_bwd_flops, rel=0.02)
    assert model.fwd_bwd_ops == pytest.approx(real.fwd_bwd_ops, rel=0.25)


def test_cli_predict_prints_the_component_table(capsys: pytest.CaptureFixture[str]) -> None:
    from grng.cli import main

    assert main(["bench", "--predict", "h100", "--config", "inverse=newton,iterations=3"]) == 0
    out = capsys.readouterr().out
    assert "refresh (3 Newton-Schulz steps)" in out and "x AdamW" in out
    with pytest.raises(SystemExit):
        main(["bench", "--predict", "h100", "--config", "inverse_every=ten"])


def test_docs_block_is_what_the_script_writes() -> None:
    """docs/performance.md's prediction block is bench/costmodel.py's output (no hand edits)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_costmodel", root / "bench" / "costmodel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    text = (root / "docs" / "performance.md").read_text()
    block = text.split(bench.BEGIN)[1].split(bench.END)[0]
    assert block == "\n" + bench.gpu_section()


def test_as_dispatched_follows_the_auto_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "as dispatched" rows read AUTO_ORDER: a kernel flag is on exactly where the table
    lists a backend for its op (the masked op under the device gate), and the prediction moves
    with it."""
    from grng.ops import dispatch

    shape = cm.gpt_shape(*cm.PRESETS["gpt2-small"])
    base = cm.StepConfig(inverse="cholesky", precision="tf32", inverse_every=20, factor_every=4,
                         sync_free=True)
    kernels = replace(base, fold_kernel=True, fused_update=True, moments_kernel=True)
    assert cm.dispatched(base, "cuda") == kernels  # today's table: every kernel row
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cuda", {})
    assert cm.dispatched(base, "cuda") == base
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cuda", {"factor_update_masked": ("triton",)})
    only_fold = cm.dispatched(base, "cuda")
    assert only_fold == replace(base, fold_kernel=True)
    assert cm.dispatched(replace(base, sync_free=False), "cuda").fold_kernel is False
    h100 = cm.DEVICES["h100"]
    assert (cm.predict(shape, kernels, h100).seconds < cm.predict(shape, only_fold, h100).seconds
            < cm.predict(shape, base, h100).seconds)


def test_fold_launches_follow_the_devices_batching_bound() -> None:
    """Two equal blocks with 512 x 65 rows: one batched fold per side where the device batches
    rows of that size (the general bound, 2^16 elements), one call per factor on a device whose
    bound is below them (the CPU's, 2^14), as grng.distributed.plan folds them."""
    from grng.distributed import plan

    blocks = [cm.BlockShape(f"b{i}", 64, 48, True, True, 512) for i in range(2)]
    cpu = replace(FLAT, fold_batch_max_elements=plan.FOLD_BATCH_MAX_ELEMENTS_CPU)
    cfg = cm.StepConfig(factor_every=1)
    general = cm.predict(_shape(*blocks), cfg, FLAT).components["fold"].launches
    on_cpu = cm.predict(_shape(*blocks), cfg, cpu).components["fold"].launches
    assert 512 * 64 > plan.FOLD_BATCH_MAX_ELEMENTS_CPU and 512 * 64 <= plan.FOLD_BATCH_MAX_ELEMENTS
    assert on_cpu == 4 and general < on_cpu
