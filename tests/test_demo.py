"""The demo (grng.demo): tasks (digits, stdlib text), training, peers, the defaults sweep and
bench/defaults.py, outputs, and that learning rates are chosen without test data."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from grng.demo import cli, sweep  # noqa: E402
from grng.demo.data import load_digits_splits  # noqa: E402
from grng.demo.models import make_model  # noqa: E402
from grng.demo.optimizers import OPTIMIZERS, SPECS, lr_sweep, unavailable_reason  # noqa: E402
from grng.demo.tasks import TASKS  # noqa: E402
from grng.demo.text import VOCAB_SIZE, encode, load_text_splits, split_of, windows  # noqa: E402
from grng.demo.train import train_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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

    fake = types.ModuleType("sophia_opt")
    fake.SophiaG = _FakeSophiaG
    monkeypatch.setitem(sys.modules, "sophia_opt", fake)
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
    table = {"meta": {}, "models": {"mlp": {"sgd": {"chosen": {"lr": 1e12, "momentum": 0.9}}}}}
    hp_path = tmp_path / "hp.json"
    sweep.save_hparams(table, hp_path)
    cli.main(["--epochs", "1", "--seeds", "2", "--models", "mlp", "--optimizers",
              "sgd,ring,sam,sophia", "--out", str(out), "--no-progress", "--hparams", str(hp_path)])
    printed = capsys.readouterr().out
    assert "mlp (digits, test accuracy)" in printed and "| RING" in printed
    sgd_row = next(line for line in printed.splitlines() if line.startswith("| SGD"))
    assert "diverged 2/2" in sgd_row and "| 1e+12" in sgd_row
    ring_row = next(line for line in printed.splitlines() if line.startswith("| RING"))
    assert ring_row.split("|")[-2].strip() == "ok"
    assert "Claims of the GRNG paper" in printed and "mlp / RING" in printed
    assert f"results folder: {out}" in printed
    report = (out / "report.md").read_text()
    assert "## mlp (digits; test accuracy)" in report and "validation" in report
    assert "## The paper's claims, measured" in report
    assert "## Machine" in report and "cpu:" in report and "load average at end" in report
    assert "### Problems" in report and "diverged" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "results.json").read_text())
    assert {r["optimizer"] for r in raw["runs"]} == {"sgd", "ring", "sam", "sophia"}
    assert all(r["model"] == "mlp" for r in raw["runs"])
    # the README's demo block renders a run's results.json (tools/readme_numbers.py --demo)
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
    readme_numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_numbers)
    block = readme_numbers.demo_block(out / "results.json")
    assert ring_row in block and "diverged 2/2" in block and "mlp / RING" in block


def test_lr_sweep_is_a_third_the_default_and_three_times_on_the_1_3_10_grid():
    assert lr_sweep(0.01) == (0.003, 0.01, 0.03)
    assert lr_sweep(3e-3) == (1e-3, 3e-3, 1e-2)
    assert lr_sweep(0.1) == (0.03, 0.1, 0.3)
    for spec in SPECS.values():
        assert spec.defaults()["lr"] == spec.lrs[1]
        assert [c["lr"] for c in spec.candidates()] == list(spec.lrs)


def test_grng_specs_sweep_around_the_library_default_lr():
    import inspect

    from grng.optim.cases import CASES

    for key, case in (("kfac", "kfac-eigen"), ("ring", "ring"), ("reng", "reng-forward"),
                      ("rkalman", "rkalman")):
        cls = CASES[case].build  # the optimizer's class
        assert SPECS[key].lrs[1] == inspect.signature(cls.__init__).parameters["lr"].default
        assert "lr" not in SPECS[key].fixed and "damping" not in SPECS[key].fixed


def test_sweep_sees_train_and_val_only_and_interleaves(digits, monkeypatch):
    test_ids = _ids(digits.test)
    order, evals = [], []
    real = sweep.train_run

    def spy(model, key, hp, train, eval_split, **kwargs):
        order.append((kwargs["seed"], hp["lr"], key))
        evals.append((train, eval_split))
        return real(model, key, hp, train, eval_split, **{**kwargs, "progress": False})

    monkeypatch.setattr(sweep, "train_run", spy)
    cells = sweep.run_sweep(["mlp"], ["sgd", "kfac"], {"mlp": [100, 101]}, max_steps=2)
    assert len(cells) == 6 and all(len(c.runs) == 2 for c in cells)
    for train, ev in evals:
        assert _ids(ev) == _ids(digits.val) and not (_ids(train) & test_ids)
    # seed outermost, optimizer innermost: a load change spreads over every optimizer
    assert [k for _, _, k in order[:4]] == ["sgd", "kfac", "sgd", "kfac"]
    assert [s for s, _, _ in order] == [100] * 6 + [101] * 6
    table = sweep.hparams_table(cells, {"selected_on": "validation"})
    for key in ("sgd", "kfac"):
        entry = table["models"]["mlp"][key]
        mine = sweep.cells_of(cells, "mlp", key)
        best = sweep.best_for_final(mine)
        assert entry["chosen"]["lr"] == best.lr in SPECS[key].lrs
        assert all(best.median_final() >= c.median_final() for c in mine if not c.failed)


def test_best_choices_skip_failed_and_unreached_cells(digits):
    from grng.demo.train import RunResult

    def run(metric, status="ok", reached=None):
        r = RunResult("mlp", "sgd", 0, {"lr": 0.1}, status=status, steps=10)
        r.final_metric, r.wall_s = metric, 1.0
        r.reached = {"0.95": reached, "0.97": None}
        return r

    fast_but_failed = sweep.Cell("mlp", "sgd", 0.3, [run(0.99, reached=[4, 0.1]),
                                                     run(float("nan"), "diverged")])
    slow = sweep.Cell("mlp", "sgd", 0.03, [run(0.96, reached=[40, 1.0]), run(0.97, reached=[44, 1.2])])
    fast = sweep.Cell("mlp", "sgd", 0.1, [run(0.955, reached=[8, 0.2]), run(0.95, reached=[12, 0.3])])
    assert sweep.best_for_speed([fast_but_failed, slow, fast]) is fast
    assert sweep.best_for_final([fast_but_failed, slow, fast]) is slow
    never = sweep.Cell("mlp", "sgd", 0.01, [run(0.9), run(0.91)])
    assert sweep.best_for_speed([never]) is None


def test_committed_hparams_come_from_the_validation_sweep():
    table = sweep.load_hparams(sweep.HPARAMS_PATH)
    assert table is not None, "grng/demo/hparams.json is missing: run python bench/defaults.py"
    assert table["meta"]["selected_on"] == "validation"
    assert set(table["models"]) == set(TASKS)
    for model, entries in table["models"].items():
        task = TASKS[model]
        assert set(entries) == set(OPTIMIZERS)
        for key, entry in entries.items():
            if entry["chosen"] is None:
                assert entry["status"] != "chosen"
                continue
            assert entry["chosen"] == {**SPECS[key].fixed, "lr": entry["chosen"]["lr"]}
            sweep_vals = {float(lr): v for lr, v in entry["sweep"].items()}
            assert set(sweep_vals) == set(SPECS[key].lrs)
            ok = [v["val_metric"] for v in sweep_vals.values() if not v["failed"]]
            best = max(ok) if task.higher_is_better else min(ok)
            assert entry["val_metric"] == best
            assert sweep_vals[entry["chosen"]["lr"]]["val_metric"] == best


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit, match="CUDA"):
        cli.main(["--device", "cuda", "--epochs", "1", "--seeds", "1", "--no-progress"])


# ------------------------------------------------------------------------- the text task
def _fake_stdlib(root, n_files: int = 40, size: int = 3000):
    root.mkdir()
    for i in range(n_files):
        body = f"# module {i}\n" + "".join(f"def f{j}(x):\n    return x + {j}  # é\n"
                                           for j in range(size // 30))
        (root / f"mod{i:02d}.py").write_text(body)
    return root


def test_text_splits_are_whole_files_windows_shifted_by_one(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    data = load_text_splits(root, sizes=(4000, 1000, 1000), seq_len=8)
    files = data.files
    assert not (set(files["train"]) & set(files["val"]))
    assert not (set(files["val"]) & set(files["test"]))
    for name in files["val"]:
        assert split_of(name) == "val"
    assert data.train.x.shape == (4000 // 8, 8) and data.val.x.shape == (1000 // 8, 8)
    # the target is the next character: y[i, t] == x[i, t + 1], and windows follow each other
    assert torch.equal(data.train.y[:, :-1], data.train.x[:, 1:])
    assert torch.equal(data.train.y[:-1, -1], data.train.x[1:, 0])
    assert int(data.train.x.max()) < VOCAB_SIZE
    assert int(encode("é")[0]) == VOCAB_SIZE - 1 and encode("\tA\n").tolist() == [0, 35, 1]
    again = load_text_splits(root, sizes=(4000, 1000, 1000), seq_len=8)
    assert torch.equal(again.test.x, data.test.x)


def test_text_loader_refuses_too_little_text(tmp_path):
    root = _fake_stdlib(tmp_path / "lib", n_files=3, size=300)
    with pytest.raises(ValueError, match="not enough source text"):
        load_text_splits(root, sizes=(100_000, 1000, 1000))
    with pytest.raises(ValueError, match="need more than"):
        windows(torch.arange(5), seq_len=8)


def test_stdlib_text_loads_without_download():
    data = load_text_splits()
    assert data.train.x.shape == (4800, 32) and data.val.x.shape == (512, 32)
    assert all(len(data.files[k]) >= 3 for k in ("train", "val", "test"))  # many modules each


def test_transformer_is_causal_and_covered_by_kronecker_blocks():
    import grng

    torch.manual_seed(0)
    model = make_model("transformer")
    x = torch.randint(0, VOCAB_SIZE, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, VOCAB_SIZE)
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % VOCAB_SIZE  # a later character cannot change earlier logits
    torch.testing.assert_close(model(x2)[:, :20], logits[:, :20])
    assert not torch.allclose(model(x2)[:, 20], logits[:, 20])
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    opt = grng.KFAC(model)
    report = str(opt.coverage())
    assert "blocks.0.attn.qkv: G 192 x A 65" in report and "tok: G 64 x A 98" in report


def test_transformer_task_trains_and_reports_bits_per_character():
    data = load_text_splits()
    r = train_run("transformer", "ring", SPECS["ring"].defaults(), data.train, data.val,
                  max_steps=3, eval_every=2, batch_size=8, progress=False)
    assert r.status == "ok", r.message
    assert r.final_metric == pytest.approx(r.final_loss / math.log(2))
    assert set(r.reached) == {"3.70", "3.60"}
    assert r.curve_step == [0, 2, 3] and math.isfinite(r.grad_norm)
    assert TASKS["transformer"].reached(3.5, 3.6) and not TASKS["transformer"].reached(3.65, 3.6)
    assert TASKS["transformer"].better(3.5, 3.6) and TASKS["mlp"].better(0.97, 0.96)


def test_sophia_counts_characters_as_its_batch(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("sophia_opt")
    fake.SophiaG = _FakeSophiaG
    monkeypatch.setitem(sys.modules, "sophia_opt", fake)
    data = load_text_splits()
    r = train_run("transformer", "sophia", SPECS["sophia"].defaults(), data.train, data.val,
                  max_steps=2, batch_size=4, progress=False)
    assert r.status == "ok", r.message
    assert _FakeSophiaG.instances[-1].bs_seen == 4 * 32


def test_muon_takes_gpt2s_conv1d_matrices_and_adamw_the_rest():
    """A Hugging Face GPT-2 (Conv1D layers, head tied to the embedding): Muon gets exactly the
    hidden layers' 2-D weights; AdamW the embeddings (and so the tied head), norms and biases."""
    transformers = pytest.importorskip("transformers")
    from grng.demo.optimizers import make_stepper

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB_SIZE,
                                     n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    stepper = make_stepper("muon", model, {"lr": 1e-2})
    muon = {id(p) for g in stepper.optimizer.param_groups for p in g["params"]}
    adamw = {id(p) for o in stepper.others for g in o.param_groups for p in g["params"]}
    hidden = {"c_attn", "c_proj", "c_fc"}
    want = {id(p) for n, p in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in hidden}
    assert muon == want and len(want) == 4
    assert adamw == {id(p) for p in model.parameters()} - want
    assert id(model.lm_head.weight) in adamw


# ------------------------------------------------------------------- bench/defaults.py
def test_defaults_bench_writes_schema_rows_summary_and_targets(tmp_path):
    import importlib.util
    from pathlib import Path

    from grng.benchmark.schema import COLUMNS, read_rows

    path = Path(__file__).resolve().parents[1] / "bench" / "defaults.py"
    spec = importlib.util.spec_from_file_location("bench_defaults", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tasks", "mlp", "--optimizers", "adamw,ring,rkalman", "--seeds", "1",
                       "--max-steps", "2", "--out", str(tmp_path), "--no-hparams"]) == 0
    rows = read_rows(tmp_path / "defaults.csv")
    assert rows and all(r.suite == "defaults" for r in rows)
    assert {r.name for r in rows} == {"mlp/adamw", "mlp/ring", "mlp/rkalman"}
    assert {r.x_value for r in rows if r.name == "mlp/ring"} == {"0.003", "0.01", "0.03"}
    metrics = {r.metric for r in rows}
    assert {"final_val_acc", "failed_runs", "steps_to_target", "seconds_to_target", "step_time",
            "final_grad_norm"} <= metrics
    assert all("load average" in r.config for r in rows)
    md = (tmp_path / "defaults.md").read_text()
    assert "### Target 1" in md and "### Target 2" in md and "| mlp | RING |" in md
    # two runs append nothing: the file holds one benchmark run
    bench.main(["--tasks", "mlp", "--optimizers", "adamw", "--seeds", "1", "--max-steps", "1",
                "--out", str(tmp_path), "--no-hparams"])
    assert {r.name for r in read_rows(tmp_path / "defaults.csv")} == {"mlp/adamw"}
    assert tuple((tmp_path / "defaults.csv").read_text().splitlines()[0].split(",")) == COLUMNS


def _summary(model: str, key: str, metric: float, steps: float | None, seconds: float = 1.0) -> dict:
    """A summary as grng.demo.train.summarize makes it, of 2 seeds, with the target reached
    in ``steps`` by both (None: by neither)."""
    from grng.demo.train import level_key

    task = TASKS[model]
    hit = None if steps is None else {"count": 2, "steps": steps, "seconds": seconds}
    return {"model": model, "optimizer": key, "label": SPECS[key].label, "metric": (metric, 0.0),
            "reached": {level_key(task.target): hit}, "seeds": 2, "statuses": ["ok", "ok"]}


def test_claims_name_the_baselines_they_do_not_hold_against_and_judge_the_peers():
    """RING beats SGD, AdamW and Sophia but not K-FAC: the line says both; SOAP and PSGD-Kron
    are judged on their own, outside the paper's comparison."""
    from grng.demo import report

    rows = [_summary("mlp", "sgd", 0.960, 40), _summary("mlp", "adamw", 0.950, None),
            _summary("mlp", "kfac", 0.975, 18), _summary("mlp", "sophia", 0.955, 50),
            _summary("mlp", "ring", 0.970, 20, seconds=2.0), _summary("mlp", "soap", 0.980, 10),
            _summary("mlp", "psgd", 0.965, 30)]
    lines = report.claims(rows, ["mlp"])
    assert "the peers SOAP, PSGD-Kron are outside its comparison" in lines[0]
    (ring,) = [line for line in lines if "mlp / RING" in line]
    paper, peers = ring.split(" Against the peers outside the paper: ")
    assert ("faster optimization in steps: holds against SGD, AdamW, Sophia; does not hold "
            "against K-FAC (in seconds slower than SGD, Sophia)") in paper
    assert "better generalization: holds against SGD, AdamW, Sophia; does not hold against K-FAC" in paper
    assert "in steps: holds against PSGD-Kron; does not hold against SOAP" in peers
    assert "better generalization: holds against PSGD-Kron; does not hold against SOAP" in peers
    # a method behind every baseline says so, naming them all
    lines = report.claims([_summary("mlp", "kfac", 0.99, 5), _summary("mlp", "reng", 0.9, None)], ["mlp"])
    (reng,) = [line for line in lines if "mlp / RENG" in line]
    assert "in steps: does not hold against K-FAC;" in reng and "Against the peers" not in reng


def test_every_optimizer_has_its_own_colour_in_the_plot():
    from grng.demo import report

    colors = report.optimizer_colors()
    assert set(colors) == set(OPTIMIZERS) and len(set(colors.values())) == len(OPTIMIZERS)
    assert colors["kfac"] != colors["ring"] and colors["reng"] != colors["rkalman"]
