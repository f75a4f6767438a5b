"""grng in the Hugging Face transformers Trainer (real ``transformers.Trainer`` on CPU) on a
small GPT-2 built from its config (no downloads), trained on the bytes of a standard-library
source file: K-FAC, RING, R-Kalman and EKFAC in the plain Trainer, RENG and GradReg through
:class:`grng.integrations.transformers.GRNGTrainer`, and checkpoint resume."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import grng
from grng.optim.cases import optimizer_factory

transformers = pytest.importorskip("transformers")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from grng.integrations.transformers import GRNGTrainer

BLOCK = 32
STEPS = 12
BATCH = 8


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    """The Trainer builds an accelerate Accelerator, whose state is process-wide; reset it
    after each test (as transformers' and accelerate's own tests do)."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _chunks() -> Tensor:
    """textwrap.py's bytes (mod the vocabulary) in blocks of BLOCK tokens."""
    data = torch.tensor(list(Path(textwrap.__file__).read_bytes()), dtype=torch.long) % 128
    return data[: len(data) // BLOCK * BLOCK].view(-1, BLOCK)


class _Text(torch.utils.data.Dataset):
    """Causal-LM examples: input_ids and labels, the same tokens."""

    def __init__(self, chunks: Tensor) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def _gpt2(attn: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(config)


def _eval_loss(model: nn.Module, chunks: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=chunks[:64], labels=chunks[:64]).loss)


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = {"output_dir": str(out), "max_steps": STEPS,
                          "per_device_train_batch_size": BATCH, "report_to": "none",
                          "save_strategy": "no", "logging_strategy": "no", "use_cpu": True,
                          "disable_tqdm": True, "seed": 0}
    return TrainingArguments(**{**kw, **overrides})


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


ONE_PASS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "kfac": optimizer_factory("kfac-eigen", lr=0.05, damping=0.05, inverse_every=5),
    "ring": optimizer_factory("ring", lr=0.05, damping=0.05, rho=0.05, inverse_every=5),
    "rkalman": optimizer_factory("rkalman", lr=0.2, rho=0.05, kalman_rank=4),
    "ekfac": optimizer_factory("ekfac", lr=0.02, inverse_every=5),
}


@pytest.mark.parametrize("name", list(ONE_PASS))
def test_one_pass_optimizers_in_the_plain_trainer(name: str, tmp_path: Path) -> None:
    """Trainer(optimizers=(opt, sched)): every step taken, the scheduler drives the lr, the
    eval loss falls, the parameters stay finite."""
    chunks = _chunks()
    model = _gpt2()
    opt = ONE_PASS[name](model)
    sched = get_linear_schedule_with_warmup(opt, 0, 2 * STEPS)
    before = _eval_loss(model, chunks)
    Trainer(model=model, args=_args(tmp_path), train_dataset=_Text(chunks),
            optimizers=(opt, sched)).train()
    assert opt.steps == STEPS and opt.skipped_steps == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] / 2)
    assert _finite(model)
    after = _eval_loss(model, chunks)
    assert after < 0.85 * before, (before, after)


class _Recording(GRNGTrainer):
    """GRNGTrainer that also records the micro-batches it trained on and the Trainer's loss
    normalizer (the label count of the step's micro-batches), to replay them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[dict[str, Tensor], Any]] = []

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        self.seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


TWO_PASS: dict[str, tuple[str, Callable[[nn.Module], torch.optim.Optimizer]]] = {
    "reng-forward": ("sdpa", optimizer_factory("reng-forward", lr=0.05, damping=0.05, rho=0.05,
                                               epsilon=0.01, inverse_every=5)),
    # double backprop needs a double backward: CPU flash attention (sdpa) has none
    "reng-exact": ("eager", optimizer_factory("reng-exact", lr=0.05, damping=0.05, rho=0.05,
                                              inverse_every=5)),
    "gradreg-sam-adamw": ("sdpa", optimizer_factory("sam-adamw", lr=1e-2, gamma=0.0,
                                                    epsilon=0.05)),
}


def _window_closure(model: nn.Module, opt: torch.optim.Optimizer,
                    window: list[tuple[dict[str, Tensor], Any]]) -> Callable[[], Tensor]:
    """torch.optim's closure over recorded micro-batches, normalized as the Trainer does."""
    def closure() -> Tensor:
        opt.zero_grad()
        total = torch.zeros(())
        for inputs, num_items in window:
            loss = model(**inputs, num_items_in_batch=num_items).loss
            loss.backward()
            total += loss.detach()
        return total
    return closure


@pytest.mark.parametrize("name", list(TWO_PASS))
def test_two_pass_optimizers_through_grng_trainer(name: str, tmp_path: Path) -> None:
    """GRNGTrainer with gradient accumulation 2 and the Trainer's default max_grad_norm=1:
    the parameters equal a plain loop that steps with a closure over the same two
    micro-batches (each loss summed over tokens and divided by the Trainer's label count of
    the step, as the Trainer does) and max_grad_norm=1; two forward passes per micro-batch and step (theta
    and probe) for the finite differences and SAM; the eval loss falls."""
    attn, make = TWO_PASS[name]
    chunks = _chunks()
    model = _gpt2(attn)
    reference = copy.deepcopy(model)
    opt = make(model)
    before = _eval_loss(model, chunks)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    trainer = _Recording(model=model, args=_args(tmp_path, gradient_accumulation_steps=2,
                                                 per_device_train_batch_size=BATCH // 2),
                         train_dataset=_Text(chunks),
                         optimizers=(opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0)))
    trainer.train()
    assert opt.max_grad_norm is None, "train() must restore the optimizer's max_grad_norm"
    assert len(trainer.seen) == 2 * STEPS
    # each micro-batch: the Trainer's pass and one more (at the probe; "exact": at theta)
    assert len(forwards) == STEPS * 2 * 2
    assert _finite(model)
    after = _eval_loss(model, chunks)
    assert after < 0.85 * before, (before, after)

    ref_opt = make(reference)
    ref_opt.max_grad_norm = 1.0
    reference.train()
    for i in range(STEPS):
        ref_opt.step(_window_closure(reference, ref_opt, trainer.seen[2 * i: 2 * i + 2]))
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-4, atol=2e-5)


def _dropout_gpt2() -> GPT2LMHeadModel:
    """The small GPT-2 with its default dropout (0.1 on embeddings, residuals, attention)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("name", ["reng-forward", "gradreg-sam-adamw"])
def test_the_probe_pass_replays_the_trainer_pass_dropout(name: str, tmp_path: Path) -> None:
    """GRNGTrainer with dropout 0.1 and 2 micro-batches per step: each micro-batch's probe
    pass draws the dropout masks of its pass in the Trainer (every nn.Dropout of the model),
    the masks change from micro-batch to micro-batch, and the eval loss falls."""
    chunks = _chunks()
    model = _dropout_gpt2()
    opt = TWO_PASS[name][1](model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropouts
    masks: dict[nn.Module, list[Tensor]] = {m: [] for m in dropouts}
    for m in dropouts:
        m.register_forward_hook(lambda mod, inp, out: masks[mod].append((out == 0) & (inp[0] != 0)))
    before = _eval_loss(model, chunks)
    for m in dropouts:
        masks[m].clear()
    GRNGTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2,
                                        per_device_train_batch_size=BATCH // 2),
                train_dataset=_Text(chunks), optimizers=(opt, None)).train()
    called = [m for m in dropouts if masks[m]]  # (attention dropout runs inside SDPA)
    assert len(called) >= 3
    for m in called:
        calls = masks[m]
        assert len(calls) == STEPS * 4  # per step: 2 micro-batches x (Trainer pass, probe pass)
        for step in range(STEPS):
            first, second, probe_first, probe_second = calls[4 * step: 4 * step + 4]
            assert first.any() and torch.equal(first, probe_first)
            assert torch.equal(second, probe_second)
            assert not torch.equal(first, second)
    assert _finite(model)
    after = _eval_loss(model, chunks)
    assert after < 0.85 * before, (before, after)


def test_reng_at_its_defaults_trains_a_tiny_llama_in_grng_trainer(tmp_path: Path) -> None:
    """RENG() (gr="exact") on a Llama with SDPA attention: GRNGTrainer's first step falls back
    to the forward finite difference with one warning, and training proceeds."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    chunks = _chunks()
    opt = grng.RENG(model, lr=0.05, damping=0.05)
    before = _eval_loss(model, chunks)
    with pytest.warns(UserWarning, match="no double backward") as record:
        GRNGTrainer(model=model, args=_args(tmp_path), train_dataset=_Text(chunks),
                    optimizers=(opt, None)).train()
    assert len([w for w in record if "no double backward" in str(w.message)]) == 1
    assert opt.gr == "forward" and opt.steps == STEPS
    assert _finite(model)
    after = _eval_loss(model, chunks)
    assert after < 0.97 * before, (before, after)


def test_the_plain_trainer_with_a_two_pass_optimizer_points_to_grng_trainer(tmp_path: Path
                                                                            ) -> None:
    """The plain Trainer calls step() without a closure (through accelerate's wrapper): the
    error names GRNGTrainer."""
    model = _gpt2()
    opt = grng.RENG(model, lr=0.05, damping=0.05, gr="forward")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1),
                      train_dataset=_Text(_chunks()), optimizers=(opt, None))
    with pytest.raises(ValueError, match="needs a closure.*GRNGTrainer"):
        trainer.train()


def test_max_grad_norm_disagreement_is_refused(tmp_path: Path) -> None:
    model = _gpt2()
    opt = grng.RENG(model, lr=0.05, damping=0.05, gr="forward", max_grad_norm=0.5)
    trainer = GRNGTrainer(model=model, args=_args(tmp_path), train_dataset=_Text(_chunks()),
                          optimizers=(opt, None))
    with pytest.raises(ValueError, match="max_grad_norm"):
        trainer.train()


@pytest.mark.parametrize("name", ["kfac", "ekfac", "reng-forward"])
def test_checkpoint_resume_continues_the_run(name: str, tmp_path: Path) -> None:
    """train(resume_from_checkpoint=...) restores the optimizer's state (factors, step count)
    with the Trainer's: the resumed run ends where the continuous run ends."""
    make = ONE_PASS[name] if name in ONE_PASS else TWO_PASS[name][1]
    trainer_cls = Trainer if name in ONE_PASS else GRNGTrainer
    chunks = _chunks()
    half = STEPS // 2

    def run(out: Path, max_steps: int, resume: str | None = None
            ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _gpt2()
        opt = make(model)
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=half)
        trainer_cls(model=model, args=args, train_dataset=_Text(chunks),
                    optimizers=(opt, get_linear_schedule_with_warmup(opt, 0, STEPS))
                    ).train(resume_from_checkpoint=resume)
        return model, opt

    whole, whole_opt = run(tmp_path / "whole", STEPS)
    run(tmp_path / "first", half)
    resumed, resumed_opt = run(tmp_path / "first", STEPS, str(tmp_path / "first" / f"checkpoint-{half}"))
    assert resumed_opt.steps == whole_opt.steps == STEPS
    for layer, ref_layer in zip(resumed_opt.layers, whole_opt.layers):
        for key in ("A", "G"):
            torch.testing.assert_close(resumed_opt.layer_state(layer)[key],
                                       whole_opt.layer_state(ref_layer)[key],
                                       rtol=1e-5, atol=1e-6)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert _finite(resumed)


def test_import_grng_imports_no_framework() -> None:
    """The integrations are opt-in: ``import grng`` (and ``grng.integrations``) load no framework."""
    code = ("import sys, grng, grng.integrations; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
