"""``opt.coverage()`` and the construction warnings (docs/algorithms.md "Coverage"): every
parameter is reported as a Kronecker block (with its sizes), the diagonal fallback (with the
reason) or frozen, and nothing falls to the diagonal silently."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from grng import KFAC
from grng.curvature.coverage import DIAGONAL, FROZEN, KRONECKER
from grng.optim.cases import CASES, make_optimizer

CURVATURE = [name for name, case in CASES.items() if case.curvature]


class _Net(nn.Module):
    """A Linear, a LayerNorm, a bare matrix and a bare vector parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.mix = nn.Parameter(torch.randn(3, 3))
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) @ self.mix + self.shift


@pytest.mark.parametrize("name", CURVATURE)
def test_every_curvature_optimizer_reports_every_parameter(name: str) -> None:
    model = _Net()
    with pytest.warns(UserWarning):
        opt = make_optimizer(name, model)
    cov = getattr(opt, "base_optimizer", opt).coverage()
    assert [e.name for e in cov] == [n for n, _ in model.named_parameters()]
    assert {e.name: e.treatment for e in cov} == {
        "lin.weight": KRONECKER, "lin.bias": KRONECKER, "norm.weight": DIAGONAL,
        "norm.bias": DIAGONAL, "mix": DIAGONAL, "shift": DIAGONAL}
    lin = cov["lin.weight"]
    assert (lin.block, lin.d_g, lin.d_a, lin.g_diagonal, lin.a_diagonal) == ("lin", 3, 5, False, False)
    assert cov["norm.weight"].note == "no Kronecker helper for LayerNorm"
    assert cov.fraction(KRONECKER) == pytest.approx(15 / (15 + 6 + 9 + 3))
    text = str(cov)
    assert text.splitlines()[0] == cov.summary()
    assert "lin: G 3 x A 5" in text and "no Kronecker helper for _Net" in text


def test_one_warning_names_every_matrix_on_the_diagonal_and_only_those() -> None:
    model = _Net()
    model.table = nn.Parameter(torch.randn(2, 2, 2))
    with pytest.warns(UserWarning) as record:
        KFAC(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 parameter(s) of ndim >= 2" in message
    assert "mix (3, 3)" in message and "table (2, 2, 2)" in message
    assert "norm.weight" not in message and "shift" not in message


def test_frozen_and_ungrouped_parameters_are_reported_as_frozen() -> None:
    model = _Net()
    model.norm.weight.requires_grad_(False)
    groups = [{"params": [model.lin.weight, model.lin.bias, model.norm.bias]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # mix is not optimized: no warning
        opt = KFAC(model, param_groups=groups)
    cov = opt.coverage()
    assert cov["norm.weight"].treatment == FROZEN and cov["norm.weight"].note == "requires_grad=False"
    assert cov["mix"].treatment == FROZEN and cov["mix"].note == "not in param_groups"
    opt.add_param_group({"params": [model.mix]})
    assert cov["mix"].treatment == FROZEN                  # a report is a snapshot
    assert opt.coverage()["mix"].treatment == DIAGONAL


def test_a_layer_added_after_construction_says_why_it_has_no_block() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = KFAC(model, param_groups=[{"params": list(model[0].parameters())}])
    opt.add_param_group({"params": list(model[2].parameters())})
    entry = opt.coverage()["2.weight"]
    assert entry.treatment == DIAGONAL and "fixed at construction" in entry.note


def test_max_factor_dim_warns_once_and_the_report_marks_the_sides() -> None:
    model = nn.Sequential(nn.Linear(10, 3), nn.Tanh(), nn.Linear(3, 12), nn.Linear(12, 2))
    with pytest.warns(UserWarning) as record:
        opt = KFAC(model, max_factor_dim=8)
    assert len(record) == 1
    message = str(record[0].message)
    assert "max_factor_dim=8" in message
    assert "0 A (11)" in message and "2 G (12)" in message and "3 A (13)" in message
    cov = opt.coverage()
    assert cov["0.weight"].a_diagonal and cov["0.weight"].limited == ("A",)
    assert cov["2.weight"].limited == ("G",) and not cov["2.weight"].a_diagonal
    assert cov.limited() == {"0": (("A", 11),), "2": (("G", 12),), "3": (("A", 13),)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not KFAC(model, max_factor_dim=None).coverage().limited()


def test_embedding_a_is_diagonal_by_structure_not_by_the_limit() -> None:
    emb = nn.Embedding(50, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = KFAC(emb, max_factor_dim=8).coverage()["weight"]
    assert entry.a_diagonal and entry.limited == ()


def test_a_block_split_across_param_groups_keeps_its_block() -> None:
    """Weight and bias in different groups (decay / no-decay) still share one Kronecker block
    (tests/test_param_groups.py checks the update)."""
    model = nn.Sequential(nn.MultiheadAttention(4, 2))
    mha = model[0]
    groups = [{"params": [mha.in_proj_weight, mha.out_proj.weight], "weight_decay": 0.1},
              {"params": [mha.in_proj_bias, mha.out_proj.bias], "weight_decay": 0.0}]
    cov = KFAC(model, param_groups=groups).coverage()
    assert cov["0.in_proj_bias"].treatment == KRONECKER
    assert cov["0.in_proj_bias"].block == cov["0.in_proj_weight"].block == "0.in_proj"


def test_a_model_without_kronecker_layers_warns_at_construction() -> None:
    """0% coverage is said at construction, also when no parameter has ndim >= 2."""
    model = nn.Sequential(nn.LayerNorm(6), nn.Tanh())
    with pytest.warns(UserWarning, match="no Kronecker-capable layer") as record:
        opt = KFAC(model)
    assert opt.coverage().fraction(KRONECKER) == 0.0
    assert len([w for w in record if "Kronecker-capable" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))  # a block: no such warning


def test_transformer_encoder_is_covered_by_kronecker_blocks() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                enable_nested_tensor=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(enc)
    cov = opt.coverage()
    assert not cov.degraded()
    assert cov.blocks() == [f"layers.{i}.{n}" for i in range(2)
                            for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")]
    assert cov["layers.0.self_attn.in_proj_weight"].d_g == 48
    assert {e.name.split(".")[-2] for e in cov.treatment(DIAGONAL)} == {"norm1", "norm2"}


def test_gpt2_is_covered_by_kronecker_blocks() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt = KFAC(model)
    cov = opt.coverage()
    assert not cov.degraded()
    assert cov["transformer.h.0.attn.c_attn.weight"].block == "transformer.h.0.attn.c_attn"
    assert (cov["transformer.h.0.attn.c_attn.weight"].d_g,
            cov["transformer.h.0.attn.c_attn.weight"].d_a) == (96, 33)
    assert "tied: also lm_head.weight" in cov["transformer.wte.weight"].note
    assert {e.name.split(".")[-2] for e in cov.treatment(DIAGONAL)} <= {"ln_1", "ln_2", "ln_f"}
    assert cov.fraction(KRONECKER) > 0.98
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(opt.layer_state(layer)["A"] is not None for layer in opt.layers)
