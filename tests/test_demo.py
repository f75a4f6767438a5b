"""The demo (grng.demo): training function, outputs, and that hyperparameters see no test data."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from grng.demo import cli, search  # noqa: E402
from grng.demo.data import Split, load_digits_splits  # noqa: E402
from grng.demo.optimizers import OPTIMIZERS, SPECS, unavailable_reason  # noqa: E402
from grng.demo.train import train_run  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def _ids(split) -> set[int]:
    return set(split.index.tolist())


def test_splits_are_disjoint_and_standardized_on_train(digits):
    tr, va, te = _ids(digits.train), _ids(digits.val), _ids(digits.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va | te) == 1797
    assert (len(tr), len(va), len(te)) == (1078, 359, 360)
    assert digits.train.x.mean(0).abs().max() < 1e-4
    # the split is fixed: loading twice gives the same test rows
    assert _ids(load_digits_splits().test) == te


@pytest.mark.parametrize("key", OPTIMIZERS)
def test_train_run_few_steps_every_optimizer(digits, key):
    hp = SPECS[key].defaults()
    r = train_run("mlp", key, hp, digits.train, digits.test, seed=0, epochs=1, max_steps=3,
                  batch_size=32, eval_every=2, progress=False)
    if unavailable_reason(key):
        assert r.status == "unavailable" and "not installed" in r.message
        return
    assert r.status == "ok", r.message
    assert r.steps == 3 and len(r.train_loss) == 3
    assert r.curve_step == [0, 2, 3]
    assert 0.0 <= r.final_acc <= 1.0 and math.isfinite(r.grad_norm) and r.grad_norm > 0
    assert math.isfinite(r.train_loss_full)


@pytest.mark.parametrize("key", ["kfac", "reng", "rkalman"])
def test_train_run_cnn_curvature(digits, key):
    r = train_run("cnn", key, SPECS[key].defaults(), digits.train, digits.test, seed=1,
                  max_steps=2, batch_size=16, eval_every=1, progress=False)
    assert r.status == "ok", r.message
    assert r.steps == 2


class _FakeSophiaG(torch.optim.Optimizer):
    """Stands in for sophia-opt's SophiaG (same calling convention: step(bs=), update_hessian)."""

    instances: list = []

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))
        self.hessian_updates, self.bs_seen = 0, None
        _FakeSophiaG.instances.append(self)

    @torch.no_grad()
    def update_hessian(self):
        self.hessian_updates += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    h = self.state[p].setdefault("h", torch.zeros_like(p))
                    h.mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)

    @torch.no_grad()
    def step(self, closure=None, bs=5120):
        self.bs_seen = bs
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    h = self.state[p].get("h", torch.zeros_like(p))
                    ratio = (p.grad / (group["rho"] * bs * h + 1e-15)).clamp(-1, 1)
                    p.add_(ratio, alpha=-group["lr"])


def test_sophia_runs_when_importable(digits, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("sophia")
    fake.SophiaG = _FakeSophiaG
    monkeypatch.setitem(sys.modules, "sophia", fake)
    assert unavailable_reason("sophia") is None
    r = train_run("mlp", "sophia", SPECS["sophia"].defaults(), digits.train, digits.test,
                  max_steps=12, batch_size=32, progress=False)
    assert r.status == "ok", r.message
    opt = _FakeSophiaG.instances[-1]
    assert opt.hessian_updates == 1 and opt.bs_seen == 32  # refreshed every 10 steps


def test_divergence_and_errors_are_rows_not_crashes(digits, monkeypatch):
    hp = {**SPECS["sgd"].defaults(), "lr": 1e12}
    r = train_run("mlp", "sgd", hp, digits.train, digits.test, max_steps=20, batch_size=32,
                  progress=False)
    assert r.status == "diverged" and "non-finite" in r.message

    import grng.demo.train as train_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "make_stepper", broken)
    r = train_run("mlp", "kfac", SPECS["kfac"].defaults(), digits.train, digits.test,
                  max_steps=2, progress=False)
    assert r.status == "error" and "boom" in r.message


def test_demo_writes_table_report_and_png(tmp_path, capsys):
    out = tmp_path / "res"
    # SGD gets a diverging learning rate: its row must say so, and the demo must go on.
    table = search.load_hparams(search.HPARAMS_PATH) or {"models": {}}
    table["models"].setdefault("mlp", {})["sgd"] = {"chosen": {"lr": 1e12, "momentum": 0.9}}
    hp_path = tmp_path / "hp.json"
    search.save_hparams(table, hp_path)
    cli.main(["--epochs", "1", "--seeds", "2", "--models", "mlp", "--optimizers",
              "sgd,ring,sam,sophia", "--out", str(out), "--no-progress", "--eval-every", "8",
              "--hparams", str(hp_path)])
    printed = capsys.readouterr().out
    assert "| Model" in printed and "| mlp" in printed and "RING" in printed
    sgd_row = next(line for line in printed.splitlines() if line.startswith("| mlp   | SGD"))
    assert "diverged 2/2" in sgd_row
    ring_row = next(line for line in printed.splitlines() if "| RING" in line)
    assert ring_row.rstrip().endswith("ok |") or "| ok " in ring_row
    assert f"results folder: {out}" in printed
    report = (out / "report.md").read_text()
    assert "| mlp" in report and "validation" in report and "torch" in report
    assert "## Machine" in report and "cpu:" in report
    assert "### Problems" in report and "diverged" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "results.json").read_text())
    assert {r["optimizer"] for r in raw["runs"]} == {"sgd", "ring", "sam", "sophia"}
    assert all(r["model"] == "mlp" for r in raw["runs"])


def test_search_is_given_train_and_val_only(digits, tmp_path, monkeypatch):
    """--search hands the search train/val tensors; every candidate is scored on val."""
    test_ids = _ids(digits.test)
    seen_splits, seen_eval = [], []
    real_search, real_train_run = search.search_hparams, search.train_run

    def spy_search(*args, **kwargs):
        splits = [a for a in args if isinstance(a, Split)]
        splits += [v for v in kwargs.values() if isinstance(v, Split)]
        seen_splits.extend(splits)
        return real_search(*args, **{**kwargs, "max_steps": 2})

    def spy_train_run(model, key, hp, train, eval_split, **kwargs):
        seen_eval.append((train, eval_split))
        return real_train_run(model, key, hp, train, eval_split, **kwargs)

    monkeypatch.setattr(cli, "search_hparams", spy_search)
    monkeypatch.setattr(search, "train_run", spy_train_run)
    path = tmp_path / "hp.json"
    cli.main(["--search", "--hparams", str(path), "--models", "mlp", "--optimizers",
              "kfac,ring", "--no-progress"])
    assert len(seen_splits) == 2
    assert _ids(seen_splits[0]) == _ids(digits.train) and _ids(seen_splits[1]) == _ids(digits.val)
    assert all(not (_ids(s) & test_ids) for s in seen_splits)
    assert len(seen_eval) == 6 + 6  # K-FAC: 3 lr x 2 damping; RING: 3 lr x 2 rho (damping inherited)
    for train, ev in seen_eval:
        assert _ids(ev) == _ids(digits.val) and not (_ids(train) & test_ids)
    table = json.loads(path.read_text())
    assert table["meta"]["selected_on"] == "validation"
    ring = table["models"]["mlp"]["ring"]
    # RING inherits K-FAC's chosen damping
    assert ring["chosen"]["damping"] == table["models"]["mlp"]["kfac"]["chosen"]["damping"]


def test_committed_hparams_were_chosen_on_validation(digits):
    table = search.load_hparams(search.HPARAMS_PATH)
    assert table is not None, "grng/demo/hparams.json is missing: run python -m grng.demo --search"
    meta = table["meta"]
    assert meta["selected_on"] == "validation"
    assert (meta["train_size"], meta["val_size"]) == (len(digits.train), len(digits.val))
    assert "test_size" not in meta
    for model, entries in table["models"].items():
        assert model in ("cnn", "mlp")
        for key, entry in entries.items():
            spec = SPECS[key]
            if entry["chosen"] is None:
                assert entry["status"] != "searched"
                continue
            cands = entry["candidates"]
            assert len(cands) == len(spec.candidates())
            for name, values in spec.grid.items():
                assert {c["hparams"][name] for c in cands} == set(values)
            ok = [c for c in cands if c["status"] == "ok" and c["val_acc"] is not None]
            best = max(c["val_acc"] for c in ok)
            assert entry["chosen"] in [c["hparams"] for c in ok]
            assert entry["val_acc"] == best
            assert set(entry["candidates"][0]) == {"hparams", "val_acc", "val_loss", "status",
                                                   "message"}


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit, match="CUDA"):
        cli.main(["--device", "cuda", "--epochs", "1", "--seeds", "1", "--no-progress"])
