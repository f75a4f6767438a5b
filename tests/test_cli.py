"""``grng verify`` and ``grng bench`` (in-process, on the CPU; Triton under its interpreter).

A deliberately broken backend registered here (a wrong sign, an unwritten output element, a
transposed result) must fail verify with exactly the right rows; the bench must write rows of
the one CSV schema, a plot and a comparison.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from grng import cli, verify
from grng.benchmark import ceilings, contention, kernels, schema, timing
from grng.ops import dispatch, masked, reference, registry

# ----------------------------------------------------------------------------- verify


def test_verify_quick_passes(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["verify", "--quick", "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0, [c for c in out["checks"] if c["verdict"] == "FAIL"]
    checks = out["checks"]
    ran = {(c["op"], c["backend"]) for c in checks if c["verdict"] == "pass"}
    live = verify.live_backends("cpu")[0]
    assert {"reference", "ext"} <= set(live)  # CI builds the extension; conftest interprets Triton
    for op in registry.SPECS:
        assert (op, "reference") in ran
    for backend in live:
        for op in registry.SPECS:
            if dispatch.implementation(op, backend) is not None:
                assert (op, backend) in ran, (op, backend)
        for step in verify.STEP_CHECKS:
            assert (step, backend) in ran
    assert out["summary"].get("FAIL", 0) == 0
    for c in checks:
        assert set(c) >= {"op", "backend", "dtype", "shape", "error", "ref_error", "ratio", "verdict", "note"}


def test_verify_table_and_not_live_lines(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch._LOADED, "ext", "unavailable: ImportError: test says no")
    status = cli.main(["verify", "--ops", "factor_update,kfac_step", "--sizes", "1,7",
                       "--dtypes", "float32", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "ext: not checked: unavailable: ImportError: test says no" in out
    header = next(line for line in out.splitlines() if line.startswith("op ")).split()
    assert header[:4] == ["op", "backend", "dtype", "shape"] and header[-1] == "verdict"
    assert "kfac_step" in out and " ext " not in out
    assert "checks on cpu" in out.splitlines()[-1]


def test_verify_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["verify", "--ops", "no_such_op"])
    assert "no_such_op" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["verify", "--backend", "cuda"])
    assert "backend" in capsys.readouterr().err


def test_verify_deadline_marks_the_rest_skipped() -> None:
    rows = verify.check_ops("cpu", ["reference"], ["float32"], [1, 7], ["eigh"], deadline=0.0)
    assert rows and all(r.passed is None and "deadline" in r.note for r in rows)


def _wrong_sign_factor_update(M, X, alpha, beta):
    return reference.factor_update(M, X, -alpha, beta)


def _unwritten_eigen_apply(V, QG, lG, QA, lA, damping):
    full = reference.eigen_apply(V, QG, lG, QA, lA, damping)
    out = registry.new_output(tuple(full.shape), full.dtype, full.device)
    out.view(-1)[:-1] = full.reshape(-1)[:-1]  # the last element is never written
    return out


def _transposed_newton_step(M, X):
    X_next, res = reference.newton_schulz_step(M, X)
    return X_next.transpose(0, 1).contiguous(), res


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> str:
    """A live backend "broken" with three wrong ops and one right one (private registry copies)."""
    monkeypatch.setattr(dispatch, "_IMPLS", {op: dict(b) for op, b in dispatch._IMPLS.items()})
    monkeypatch.setattr(dispatch, "BACKENDS", (*dispatch.BACKENDS, "broken"))
    monkeypatch.setitem(dispatch._LOADED, "broken", "live")
    registry.implement("factor_update", "broken", _wrong_sign_factor_update)
    registry.implement("eigen_apply", "broken", _unwritten_eigen_apply)
    registry.implement("newton_schulz_step", "broken", _transposed_newton_step)
    registry.implement("kalman_update", "broken", reference.kalman_update)
    return "broken"


def test_verify_catches_a_broken_backend(broken: str) -> None:
    rows = verify.check_ops("cpu", [broken], ["float32"], [1, 7], variants=["contiguous"])
    verdicts = {(r.op, r.shape): r for r in rows}
    implemented = [op for op in registry.SPECS if dispatch.implementation(op, broken)]
    assert set(verdicts) == {(op, f"n={n}") for op in implemented for n in (1, 7)}
    failed = {key for key, r in verdicts.items() if r.passed is False}
    # a 1 x 1 transpose is right; everything else that is broken must fail
    assert failed == {("factor_update", "n=1"), ("factor_update", "n=7"), ("eigen_apply", "n=1"),
                      ("eigen_apply", "n=7"), ("newton_schulz_step", "n=7")}
    unwritten = verdicts[("eigen_apply", "n=7")]
    assert math.isinf(unwritten.error) and "non-finite (unwritten?) at [6, 6]" in unwritten.note
    assert "X_next off" in verdicts[("newton_schulz_step", "n=7")].note
    assert verdicts[("factor_update", "n=7")].ratio > 100
    assert verdicts[("kalman_update", "n=7")].passed and verdicts[("newton_schulz_step", "n=1")].passed


def test_verify_cli_exits_1_on_the_broken_rows(broken: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["verify", "--backend", broken, "--ops", "newton_schulz_step,kalman_update",
                       "--sizes", "5", "--dtypes", "float32", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert fails and all(line.startswith("FAIL newton_schulz_step broken float32") for line in fails)
    assert any("kalman_update" in line and line.rstrip().endswith("pass") for line in out.splitlines())


def test_verify_catches_a_broken_whole_step(broken: str) -> None:
    rows = verify.check_steps("cpu", [broken], steps=("kfac_step", "rkalman_step"))
    by_op = {r.op: r for r in rows}
    assert by_op["kfac_step"].passed is False  # the factor update's sign is wrong
    assert by_op["rkalman_step"].passed is True  # its Kalman update is right


def _rotated_eigh(M):
    """Eigenvalues right, the first two eigenvectors mixed (a basis that is not M's)."""
    evals, Q = reference.eigh(M)
    Q = Q.clone()
    if Q.shape[-1] >= 2:
        a, b = Q[..., 0].clone(), Q[..., 1].clone()
        Q[..., 0], Q[..., 1] = 0.8 * a + 0.6 * b, 0.8 * b - 0.6 * a
    return evals, Q


def test_verify_whole_step_catches_a_wrong_eigenbasis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_IMPLS", {op: dict(b) for op, b in dispatch._IMPLS.items()})
    monkeypatch.setattr(dispatch, "BACKENDS", (*dispatch.BACKENDS, "rotated"))
    monkeypatch.setitem(dispatch._LOADED, "rotated", "live")
    registry.implement("eigh", "rotated", _rotated_eigh)
    rows = {r.op: r for r in verify.check_steps("cpu", ["rotated", "reference"],
                                                steps=("ekfac_step", "rkalman_step"))
            if r.backend == "rotated"}
    assert rows["ekfac_step"].passed is False and rows["ekfac_step"].ratio > 10
    assert rows["rkalman_step"].passed is True  # R-Kalman takes no eigendecomposition


MASKED_OPS = tuple(op for op in registry.SPECS if op.endswith("_masked"))


def _flag_ignoring_update(params, grads, directions, momentum_buffers, lr, momentum, weight_decay,
                          rho, kl_clip, ok):
    return masked.fused_update_masked(params, grads, directions, momentum_buffers, lr, momentum,
                                      weight_decay, rho, kl_clip, torch.ones_like(ok))


def _flag_ignoring_fold(M, X, alpha, beta, ok):
    return masked.factor_update_masked(M, X, alpha, beta, torch.ones_like(ok))


def _flag_ignoring_moments(Vb, m, v, beta1, beta2, bias1, bias2, eps, ok):
    return masked.adam_moments_masked(Vb, m, v, beta1, beta2, bias1, bias2, eps, torch.ones_like(ok))


def _one_element_unwritten_kalman(P, H, r, beta, q):
    updated = P.clone()
    ok = masked.kalman_update_masked(updated, H, r, beta, q)
    kept = P[-1, -1].clone()
    P.copy_(updated)
    P[-1, -1] = kept  # the last diagonal element is never written
    return ok


@pytest.fixture
def broken_masked(monkeypatch: pytest.MonkeyPatch) -> str:
    """A live backend whose masked update, masked fold and masked moment step ignore the flag and whose masked Kalman
    update leaves one element unwritten; its Newton-Schulz and Cholesky are right (private registry copies)."""
    monkeypatch.setattr(dispatch, "_IMPLS", {op: dict(b) for op, b in dispatch._IMPLS.items()})
    monkeypatch.setattr(dispatch, "BACKENDS", (*dispatch.BACKENDS, "broken"))
    monkeypatch.setitem(dispatch._LOADED, "broken", "live")
    registry.implement("fused_update_masked", "broken", _flag_ignoring_update)
    registry.implement("kalman_update_masked", "broken", _one_element_unwritten_kalman)
    registry.implement("factor_update_masked", "broken", _flag_ignoring_fold)
    registry.implement("adam_moments_masked", "broken", _flag_ignoring_moments)
    registry.implement("newton_schulz_masked", "broken", masked.newton_schulz_fixed)
    registry.implement("cholesky_inverse_masked", "broken", masked.cholesky_inverse_masked)
    return "broken"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_catches_a_wrong_masked_op(broken_masked: str, dtype: str) -> None:
    """Exactly the wrong rows fail: the flag-ignoring update on its flag-False case only (the
    non-finite case skips anyway), the flag-ignoring fold and moment step on both flag-False
    cases, the Kalman
    update wherever it writes P; in float64 too (the
    truth must not run on the backend's in-place output)."""
    rows = verify.check_ops("cpu", [broken_masked], [dtype], [1, 7], ops=MASKED_OPS)
    assert {r.op for r in rows} == set(MASKED_OPS)
    failed = {(r.op, r.shape) for r in rows if r.passed is False}
    assert failed == {("fused_update_masked", f"n={n} skip") for n in (1, 7)} | {
        ("kalman_update_masked", f"n={n}{v}") for n in (1, 7) for v in ("", " strided", " steady")} | {
        (op, f"n={n} {v}") for op in ("factor_update_masked", "adam_moments_masked")
        for n in (1, 7) for v in ("skip", "skip_nonfinite")}
    assert all(r.passed for r in rows if (r.op, r.shape) not in failed)
    assert all("params off" in r.note for r in rows if r.passed is False and r.op == "fused_update_masked")


def test_verify_cli_fails_on_exactly_the_wrong_masked_op(broken_masked: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["verify", "--backend", broken_masked, "--ops", ",".join(MASKED_OPS[:3]),
                       "--sizes", "5", "--dtypes", "float32", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert {line.split()[1] for line in fails} == {"fused_update_masked", "factor_update_masked"}
    assert all(line.split()[2:4] == ["broken", "float32"] for line in fails)


# ----------------------------------------------------------------------------- bench


def test_measure_rotates_inputs_and_orders_percentiles() -> None:
    made, seen = [], []

    def make() -> tuple[torch.Tensor]:
        made.append(torch.randn(4) + 10.0)
        return (made[-1],)

    stats = timing.measure(lambda t: seen.append(id(t)), make, device="cpu", warmup=2, reps=5, rotate=3)
    assert len(made) == 3 and len(set(seen)) == 3  # every set was used
    assert stats.n == 5 and 0 < stats.p20 <= stats.p50 <= stats.p80
    with pytest.raises(ValueError, match="rotate"):
        timing.measure(lambda: None, tuple, device="cpu", rotate=0)


def test_ceilings_are_rows() -> None:
    copy = ceilings.copy_bandwidth("cpu", nbytes=1 << 20, reps=3)
    gemm = ceilings.gemm_rate("cpu", "float32", 32, reps=3)
    for row, unit in ((copy, "GB/s"), (gemm, "TFLOP/s")):
        assert row.unit == unit and row.p20 <= row.p50 <= row.p80 and row.p50 > 0
        assert set(row.as_dict()) == set(schema.COLUMNS)
    with pytest.raises(ValueError, match="dtype"):
        ceilings.gemm_rate("cpu", "int3", 8)


def test_verify_with_only_the_reference_says_nothing_was_verified(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No fast backend live: the reference against itself is no verification; exit status 2."""
    monkeypatch.setitem(dispatch._LOADED, "ext", "unavailable: ImportError: not built (test)")
    monkeypatch.setitem(dispatch._LOADED, "triton", "unavailable: ImportError: no triton (test)")
    args = ["verify", "--ops", "factor_update", "--sizes", "7", "--dtypes", "float32", "--no-progress"]
    assert cli.main(args) == cli.NOTHING_VERIFIED == 2
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("NOTHING VERIFIED on cpu") and "ext: unavailable: ImportError: not built" in last
    assert " 0 FAIL" in out  # the reference's own rows ran and passed, and that is not enough
    assert cli.main(args + ["--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["verified_backends"] == [] and report["nothing_verified"].startswith("NOTHING")
    monkeypatch.setitem(dispatch._LOADED, "ext", "live")  # one fast backend checked: a verification
    assert cli.main(args) == 0
    assert "NOTHING VERIFIED" not in capsys.readouterr().out


def test_bench_flags_an_oversubscribed_cpu() -> None:
    """More threads than cores, a busy machine, or a probe slowed down by threads: flagged."""
    assert contention.warnings_for(1, 2, 0.3, None) == []
    assert contention.warnings_for(2, 2, 0.2, 1.1) == []
    many = contention.warnings_for(1000, 2, None, None)
    assert many[0] == "OVERSUBSCRIBED: 1000 threads on 2 usable cores: threads wait for each other"
    assert "rerun with --threads 1" in many[-1]
    busy = contention.warnings_for(2, 2, 3.5, None)
    assert "load average is 3.5 on 2 cores" in busy[0]
    slow = contention.warnings_for(2, 4, 0.0, 1000.0)
    assert "took 1000x as long at 2 threads as at 1" in slow[0]
    ratio = contention.probe_ratio(1)
    assert 0 < ratio < 1e6 and torch.get_num_threads() >= 1


def test_bench_prints_the_oversubscription_flag(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(contention, "usable_cores", lambda: 1)
    monkeypatch.setattr(contention, "probe_ratio", lambda threads: 1.0)
    before = torch.get_num_threads()
    try:
        assert cli.main(["bench", "--ops", "factor_update", "--providers", "reference", "--sizes",
                         "8", "--dtypes", "float32", "--reps", "2", "--threads", "3",
                         "--csv", str(tmp_path / "b.csv")]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert out.count("OVERSUBSCRIBED: 3 threads on 1 usable cores") == 2  # before and after


def test_bench_writes_rows_a_plot_and_a_comparison(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bench.csv"
    args = ["bench", "--ops", "factor_update,fused_update", "--providers", "reference,ext,triton",
            "--sizes", "16,33", "--dtypes", "float32", "--reps", "3", "--csv", str(csv)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skip factor_update/triton" in out  # the interpreter is never timed
    rows = schema.read_rows(csv)
    assert [r.suite for r in rows].count("ceilings") == 3  # copy + GEMM at 16 and 33
    timed = [r for r in rows if r.suite == "kernels"]
    keys = {(r.name, r.provider, r.x_value, r.metric) for r in timed}
    for op in ("factor_update", "fused_update"):
        for provider in ("reference", "ext"):
            for n in ("16", "33"):
                for metric in ("time", "throughput", "bandwidth", "gemm_fraction", "copy_fraction",
                               "speedup"):
                    assert (op, provider, n, metric) in keys
    for r in timed:
        assert r.p50 is not None and math.isfinite(r.p50) and r.p50 > 0
        assert r.device and r.torch and r.grng and r.timestamp and "FLOP" in r.config
        if r.metric == "time":
            assert r.unit == "ms" and r.n == 3 and r.p20 <= r.p50 <= r.p80
    assert {r.provider for r in timed} == {"reference", "ext"}
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "--plot", str(csv), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["bench", "--compare", str(csv), str(csv)]) == 0
    table = capsys.readouterr().out
    assert "new/old" in table and "1.000" in table


def test_bench_run_deadline_and_validation() -> None:
    rows = kernels.run("cpu", ["reference"], [8], ["float32"], ["eigh"], deadline=0.0, reps=2)
    assert {r.suite for r in rows} == {"ceilings"}
    with pytest.raises(KeyError, match="no op spec"):
        kernels.run("cpu", ["reference"], [8], ["float32"], ["nope"])
    given = kernels.run("cpu", ["reference"], [8], ["float32"], ["eigh"], reps=2,
                        gemm_rates={("float32", 8): 1.0})
    assert not [r for r in given if r.name == "gemm"]
    frac = next(r for r in given if r.metric == "gemm_fraction")
    tput = next(r for r in given if r.metric == "throughput")
    assert frac.p50 == pytest.approx(tput.p50 / 1.0)
