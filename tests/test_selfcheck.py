"""The first-use self-check of backend="auto" (grng.verify.selfcheck): a backend AUTO_ORDER lists
is run once against the reference when an optimizer is built; a wrong one is rejected with one
warning and training falls back, a right one stays picked; nothing of it runs inside step()."""
from __future__ import annotations

import warnings

import pytest
import torch

import grng
from grng.ops import dispatch, masked, reference, registry
from grng.testing import classification_batches, compare_optimizers, small_mlp
from grng.verify import selfcheck

CALLS: list[str] = []


def _wrong_fold(M, X, alpha, beta):
    """M <- beta M + alpha X^T X without X's first row: plausible, wrong."""
    return reference.factor_update(M, X[..., 1:, :], alpha, beta)


def _counted_fold(M, X, alpha, beta):
    CALLS.append("good")
    return reference.factor_update(M, X, alpha, beta)


def _flag_ignoring_fold(M, X, alpha, beta, ok):
    """The masked fold written everywhere, whatever the device gate's flag says."""
    return masked.factor_update_masked(M, X, alpha, beta, torch.ones_like(ok))


def _raising_fold(M, X, alpha, beta):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private copies of the registry, the AUTO_ORDER table and the self-check's caches; three
    test backends: ``broken`` (wrong fold), ``good`` (the reference's, counted), ``raising``."""
    monkeypatch.delenv(selfcheck.SKIP_ENV, raising=False)
    for name in ("ext", "triton"):  # registered into the real registry, not the private copy
        dispatch._load(name)
    monkeypatch.setattr(dispatch, "_IMPLS", {op: dict(b) for op, b in dispatch._IMPLS.items()})
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {k: dict(v) for k, v in dispatch.AUTO_ORDER.items()})
    monkeypatch.setattr(dispatch, "_REJECTED", {})
    monkeypatch.setattr(selfcheck, "_CHECKED", {})
    monkeypatch.setattr(dispatch, "BACKENDS", (*dispatch.BACKENDS, "broken", "good", "raising"))
    for name, fn in (("broken", _wrong_fold), ("good", _counted_fold), ("raising", _raising_fold)):
        monkeypatch.setitem(dispatch._LOADED, name, "live")
        registry.implement("factor_update", name, fn)
    CALLS.clear()


def _kfac(model: torch.nn.Module, backend: str = "auto") -> torch.optim.Optimizer:
    return grng.KFAC(model, lr=0.1, damping=1e-2, factor_every=1, inverse_every=1, backend=backend)


def _selfcheck_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "first-use check" in str(w.message)]


@pytest.mark.parametrize("wrong", ["broken", "raising"])
def test_a_wrong_backend_is_rejected_with_one_warning_and_training_falls_back(
        fresh: None, monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", (wrong,))
    M, X = torch.eye(5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert dispatch.resolve("factor_update", "auto", M, X, 1.0, 0.5) is dispatch._IMPLS[
        "factor_update"][wrong].fn  # picked before the check
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _kfac(small_mlp())
        _kfac(small_mlp())  # checked once per process: no second warning
    messages = _selfcheck_warnings(record)
    assert len(messages) == 1, messages
    assert "factor_update" in messages[0] and repr(wrong) in messages[0]
    assert "grng verify" in messages[0]
    assert ("raised RuntimeError: no kernel image" if wrong == "raising" else "off at") in messages[0]
    assert dispatch.rejected("factor_update", wrong, "cpu")
    assert dispatch.resolve("factor_update", "auto", M, X, 1.0, 0.5) is reference.factor_update
    # the auto optimizer now trains as the reference one does (the other ops: ext, to rounding)
    batches = classification_batches(4)
    result = compare_optimizers(_kfac, lambda m: _kfac(m, "reference"), small_mlp(), batches)
    assert max(result.param_diff) < 1e-12
    assert result.loss_a[-1] < result.loss_a[0]
    if wrong == "broken":  # and the wrong fold would have trained otherwise
        forced = compare_optimizers(_kfac, lambda m: _kfac(m, "broken"), small_mlp(), batches)
        assert max(forced.param_diff) > 1e-6


def test_the_next_backend_of_the_order_takes_over(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("broken", "good"))
    with pytest.warns(RuntimeWarning, match="'broken' failed its first-use check of factor_update"):
        _kfac(small_mlp())
    CALLS.clear()
    compare_optimizers(_kfac, lambda m: _kfac(m, "reference"), small_mlp(), classification_batches(2))
    assert CALLS  # the good backend runs the fold


def test_a_correct_backend_stays_picked_and_the_check_stays_out_of_step(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("good",))
    checked: list[tuple] = []
    real = selfcheck.check_case
    monkeypatch.setattr(selfcheck, "check_case", lambda *a, **k: checked.append(a) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = small_mlp()
        opt = _kfac(model)
    assert {a[0].name for a in checked} >= {"factor_update"}
    assert not dispatch.rejected("factor_update", "good", "cpu")
    n_checked = len(checked)
    CALLS.clear()
    for x, y in classification_batches(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert CALLS  # picked by auto
    assert len(checked) == n_checked  # no check inside step()


def test_a_flag_ignoring_masked_fold_is_rejected_and_sync_free_training_falls_back(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right on every finite case, wrong only where the flag is False: the spec's "skip"
    variants catch it, and the sync-free optimizer folds through the reference instead."""
    registry.implement("factor_update_masked", "broken", _flag_ignoring_fold)
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update_masked", ("broken",))
    with pytest.warns(RuntimeWarning, match=r"'broken' failed its first-use check of "
                                            r"factor_update_masked .*skip"):
        grng.KFAC(small_mlp(), sync_free=True)
    assert dispatch.rejected("factor_update_masked", "broken", "cpu")
    result = compare_optimizers(lambda m: grng.KFAC(m, lr=0.1, sync_free=True),
                                lambda m: grng.KFAC(m, lr=0.1, sync_free=True, backend="reference"),
                                small_mlp(), classification_batches(3))
    assert max(result.param_diff) < 1e-12


def test_a_forced_backend_is_not_checked(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("broken",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _kfac(small_mlp(), backend="reference")
    assert not dispatch.rejected("factor_update", "broken", "cpu")


def test_the_environment_skips_it(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("broken",))
    monkeypatch.setenv(selfcheck.SKIP_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _kfac(small_mlp())
    assert not dispatch.rejected("factor_update", "broken", "cpu")


def test_a_re_registered_implementation_is_checked_again(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rejection holds the implementation it judged: the backend registered anew (here with
    a right fold) is checked again and picked."""
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("broken",))
    with pytest.warns(RuntimeWarning):
        _kfac(small_mlp())
    registry.implement("factor_update", "broken", _counted_fold)
    assert not dispatch.rejected("factor_update", "broken", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _kfac(small_mlp())
    M, X = torch.eye(5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert dispatch.resolve("factor_update", "auto", M, X, 1.0, 0.5) is _counted_fold


def test_the_cuda_order_names_registered_ops_and_backends() -> None:
    """AUTO_ORDER['cuda'] (predicted by the cost model) lists only registered ops, known
    backends, and, for each live backend, one that implements the op itself."""
    assert dispatch.AUTO_ORDER["cuda"]
    for op, order in dispatch.AUTO_ORDER["cuda"].items():
        registry.spec(op)
        for backend in order:
            assert backend in dispatch.BACKENDS[2:], (op, backend)
            if dispatch._load(backend) == "live":
                assert dispatch.implementation(op, backend) is not None, (op, backend)


def test_a_backend_whose_supports_raises_is_rejected(fresh: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception outside the op itself (its ``supports`` on the check's inputs) rejects it too."""
    def supports(*args) -> bool:
        raise TypeError("supports() cannot read these inputs")

    registry.implement("factor_update", "raising", _counted_fold, supports)
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("raising",))
    with pytest.warns(RuntimeWarning, match="raised TypeError: supports"):
        _kfac(small_mlp())
    assert dispatch.rejected("factor_update", "raising", "cpu")
    CALLS.clear()  # a rejected backend is not even asked whether it supports the inputs
    result = compare_optimizers(_kfac, lambda m: _kfac(m, "reference"), small_mlp(),
                                classification_batches(2))
    assert max(result.param_diff) < 1e-12 and not CALLS
