"""The factor structures' per-side algebra (grng/curvature/factors.py): a diagonal factor kept
as a vector gives what the same factor gives as a dense diag(m) matrix; the dense forms give
the matrix algebra; one sandwich X_G V X_A for every combination of sides."""
from __future__ import annotations

import pytest
import torch

from grng.curvature.factors import (BlockDiagonalFactor, DenseFactor, DiagonalFactor,
                                    FactorStructure, Rows, sandwich)
from grng.testing import spd_matrix

F64 = torch.float64
SIZES = [1, 17]


def _vector(d: int, seed: int) -> torch.Tensor:
    return torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1


def _factor(structure: FactorStructure, seed: int) -> torch.Tensor:
    """A random factor in the structure's storage: an SPD matrix or a positive vector."""
    if structure.diagonal:
        return _vector(structure.dim, seed)
    return spd_matrix(structure.dim, generator=torch.Generator().manual_seed(seed))


def _as_matrix(structure: FactorStructure, M: torch.Tensor) -> torch.Tensor:
    return torch.diag(M) if structure.diagonal else M


@pytest.mark.parametrize("d", SIZES)
def test_a_diagonal_factor_is_its_own_eigenbasis(d: int) -> None:
    m = _vector(d, 0)
    l, Q = DiagonalFactor(d).eig(m, "reference")
    assert Q is None and torch.equal(l, m) and l.data_ptr() != m.data_ptr()
    l_dense, Q_dense = DenseFactor(d).eig(torch.diag(m), "reference")
    torch.testing.assert_close(Q_dense @ torch.diag(l_dense) @ Q_dense.T, torch.diag(m))
    torch.testing.assert_close(l_dense.sort().values, m.sort().values)


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("extra", [0.3, torch.tensor(0.3, dtype=F64)])
def test_damped_and_its_inverse(d: int, extra: float | torch.Tensor) -> None:
    """M + extra I (float or device-scalar extra); elementwise inverse for a diagonal factor,
    None (a strategy factorizes) for a dense one; the input is never written."""
    m = _vector(d, 1)
    M = spd_matrix(d, generator=torch.Generator().manual_seed(2))
    m0, M0 = m.clone(), M.clone()
    dense, diag = DenseFactor(d), DiagonalFactor(d)
    torch.testing.assert_close(dense.damped(M, extra), M + 0.3 * torch.eye(d, dtype=F64))
    assert dense.damped_inverse(M, extra) is None
    X = diag.damped_inverse(m, extra)
    assert X is not None
    exact = torch.linalg.inv(torch.diag(m) + 0.3 * torch.eye(d, dtype=F64))
    torch.testing.assert_close(torch.diag(X), exact)
    assert torch.equal(m, m0) and torch.equal(M, M0)


def test_a_rounding_negative_diagonal_entry_counts_as_zero() -> None:
    m = torch.tensor([-1e-18, 2.0], dtype=F64)
    torch.testing.assert_close(DiagonalFactor(2).damped_inverse(m, 0.5),
                               torch.tensor([2.0, 0.4], dtype=F64))


@pytest.mark.parametrize("d", SIZES)
def test_trace_mean_on_host_and_device(d: int) -> None:
    m = _vector(d, 3)
    for structure, M in ((DiagonalFactor(d), m), (DenseFactor(d), torch.diag(m) + 0.0)):
        assert structure.trace_mean(M) == pytest.approx(float(m.sum()) / d, rel=1e-14)
        on_device = structure.trace_mean_on_device(M.float())
        assert on_device.dtype == F64 and on_device.dim() == 0
        assert float(on_device) == pytest.approx(float(m.sum()) / d, rel=1e-6)


@pytest.mark.parametrize("dg,da", [(1, 1), (17, 3), (4, 17)])
@pytest.mark.parametrize("g_diag", [False, True])
@pytest.mark.parametrize("a_diag", [False, True])
def test_sandwich_is_the_kronecker_product_applied(dg: int, da: int, g_diag: bool,
                                                   a_diag: bool) -> None:
    """X_G V X_A = unvec((X_A (x) X_G) vec(V)) for dense and diagonal sides, a strided V, and
    stacked (batched) dense sides."""
    g = (DiagonalFactor if g_diag else DenseFactor)(dg)
    a = (DiagonalFactor if a_diag else DenseFactor)(da)
    XG, XA = _factor(g, 4), _factor(a, 5)
    V = torch.randn(da, dg, generator=torch.Generator().manual_seed(6), dtype=F64).T  # strided
    DG, DA = _as_matrix(g, XG), _as_matrix(a, XA)
    # column-major vec: vec(G V A) = (A^T (x) G) vec(V)
    vec = torch.kron(DA.T.contiguous(), DG) @ V.T.reshape(-1)
    expected = vec.reshape(da, dg).T
    torch.testing.assert_close(sandwich(g, XG, V, XA, a), expected)
    torch.testing.assert_close(g.left(XG, V), DG @ V)
    torch.testing.assert_close(a.right(V, XA), V @ DA)
    stacked = sandwich(g, torch.stack([XG, 2 * XG]), torch.stack([V, V]), torch.stack([XA, XA]), a)
    torch.testing.assert_close(stacked[1], 2 * expected)


def test_sandwich_computes_in_the_inverse_dtype() -> None:
    g, a = DenseFactor(3), DiagonalFactor(2)
    out = sandwich(g, torch.eye(3, dtype=F64), torch.ones(3, 2, dtype=torch.float32),
                   torch.ones(2, dtype=F64), a)
    assert out.dtype == F64


# ------------------------------------------------------------------- block-diagonal factors


def _stack(groups: int, b: int, seed: int) -> torch.Tensor:
    return torch.stack([spd_matrix(b, generator=torch.Generator().manual_seed(seed + j))
                        for j in range(groups)])


@pytest.mark.parametrize("groups,b", [(1, 1), (3, 17), (5, 2)])
def test_block_diagonal_factor_is_the_dense_block_diagonal_matrix(groups: int, b: int) -> None:
    """fold, batch_sum, eig, damped, trace, identity, left/right and the sandwich of a
    BlockDiagonalFactor equal the dense ops on torch.block_diag of its blocks."""
    s = BlockDiagonalFactor(groups, b)
    assert s.shape == (groups, b, b) and s.dim == groups * b and s.batched
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(groups, 9, b, generator=gen, dtype=F64)[:, ::2]   # non-contiguous rows
    rows = Rows(X, n=5, scale=2.0)
    M = s.fold(None, rows, 0.9, X, F64, None, "reference")
    for j in range(groups):
        torch.testing.assert_close(M[j], 4.0 * X[j].T @ X[j] / 5)
    M2 = s.fold(M.clone(), rows, 0.9, X, F64, None, "reference")
    torch.testing.assert_close(M2, M)                                 # same rows: a fixed point
    torch.testing.assert_close(s.batch_sum(rows, F64, X.device, "reference"), 5 * M)
    A = _stack(groups, b, 3)
    dense = torch.block_diag(*A)
    l, Q = s.eig(A, "reference")
    torch.testing.assert_close(torch.block_diag(*(Q @ torch.diag_embed(l) @ Q.mT)), dense)
    torch.testing.assert_close(torch.block_diag(*s.damped(A, 0.3)),
                               dense + 0.3 * torch.eye(groups * b, dtype=F64))
    assert s.damped_inverse(A, 0.3) is None
    torch.testing.assert_close(s.trace(A), dense.trace())
    assert s.trace_mean(A) == pytest.approx(float(dense.trace()) / (groups * b))
    torch.testing.assert_close(torch.block_diag(*s.identity(2.0, F64, A.device)),
                               2.0 * torch.eye(groups * b, dtype=F64))
    G = _stack(groups, 4, 7)
    V = torch.randn(groups, 4, b, generator=gen, dtype=F64)
    out = sandwich(BlockDiagonalFactor(groups, 4), G, V, A, s)
    torch.testing.assert_close(torch.block_diag(*out),
                               torch.block_diag(*G) @ torch.block_diag(*V) @ dense)
    assert [t.data_ptr() for t in s.blocks(A)] == [A[j].data_ptr() for j in range(groups)]
    assert isinstance(s.block_structure(), DenseFactor) and s.block_structure().dim == b


def test_block_diagonal_pieces_round_trip_a_packed_buffer() -> None:
    from grng.distributed.comm import pack, unpack
    s = BlockDiagonalFactor(3, 4)
    A = _stack(3, 4, 0)
    for piece, value in ((s.piece(), A), (s.inverse_piece(), A), (s.eigenvectors_piece(), A),
                         (s.eigenvalues_piece(), A.diagonal(dim1=-2, dim2=-1).contiguous())):
        seg = pack(piece, value, 5.0, F64, A.device)
        assert seg.numel() == piece.numel
        back, count = unpack(piece, seg)
        assert torch.equal(back, value) and count == (5.0 if piece.counted else 0.0)
