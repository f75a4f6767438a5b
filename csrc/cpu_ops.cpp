// CPU kernels of grng_ext (OpenMP), plus factor_update / kalman_update, which are device-generic
// (ATen GEMMs + a mirror kernel per device). The math is docs/algorithms.md sections 1, 2, 4, 5, 6;
// grng/ops/reference.py is the truth these are tested against.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "sym_update.h"

namespace grng {
namespace {

using at::Tensor;

// Work below this many elements runs on one thread (the fork/join costs more than it saves).
constexpr int64_t kParallelMin = 1 << 16;
// The fused update goes parallel from this many elements (a parallel region costs more than
// a pass over fewer, and far more when the cores are shared with other processes).
constexpr int64_t kFusedParallelMin = 1 << 20;
// Elements per work item of the multi-tensor update.
constexpr int64_t kChunk = 1 << 15;

// ---------------------------------------------------------------------------------------------
// Exact symmetry: mirror the upper triangle onto the lower one, diagonal += shift (32x32 tiles:
// a tile's 32 strided rows stay in L1 even where the row stride is a power of two, which with
// 64x64 tiles made d = 256 twice as slow as d = 257).

template <typename T>
void mirror_upper_tile(T* m, int64_t d, int64_t s0, int64_t s1, T shift) {
  constexpr int64_t B = 32;
  const int64_t nb = (d + B - 1) / B;
#pragma omp parallel for schedule(dynamic) if (d * d >= kParallelMin)
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t i0 = bi * B, i1 = std::min(d, i0 + B);
    for (int64_t bj = bi; bj < nb; ++bj) {
      const int64_t j0 = bj * B, j1 = std::min(d, j0 + B);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j) m[j * s0 + i * s1] = m[i * s0 + j * s1];
    }
    if (shift != T(0))
      for (int64_t i = i0; i < i1; ++i) m[i * s0 + i * s1] += shift;
  }
}

}  // namespace

void mirror_upper_cpu(Tensor& M, double shift) {
  if (M.scalar_type() == at::kDouble)
    mirror_upper_tile<double>(M.data_ptr<double>(), M.size(0), M.stride(0), M.stride(1), shift);
  else
    mirror_upper_tile<float>(M.data_ptr<float>(), M.size(0), M.stride(0), M.stride(1), static_cast<float>(shift));
}

namespace {

// M (d x d) <- beta M + alpha X^T X + shift I, exactly symmetric.
void sym_rank_update(Tensor M, const Tensor& X, double alpha, double beta, double shift) {
  upper_rank_update(M, X, alpha, beta);
  mirror_upper(M, shift);
}

void check_factor_dtype(const Tensor& M, const char* name) {
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble, "grng_ext: ", name,
              " must be float32 or float64, got ", M.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// factor_update: M <- beta M + alpha X^T X.

void factor_update_impl(const Tensor& M, const Tensor& X, double alpha, double beta) {
  check_factor_dtype(M, "M");
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "grng_ext::factor_update: M must be (..., d, d)");
  TORCH_CHECK(X.dim() == M.dim() && X.size(-1) == M.size(-1) &&
                  X.sizes().slice(0, X.dim() - 2).equals(M.sizes().slice(0, M.dim() - 2)),
              "grng_ext::factor_update: X must be (..., m, d) matching M (..., d, d)");
  TORCH_CHECK(X.is_floating_point() && X.device() == M.device(),
              "grng_ext::factor_update: X must be floating point, on M's device");
  const Tensor Xc = X.to(M.scalar_type());
  if (M.dim() == 2) {
    sym_rank_update(M, Xc, alpha, beta, 0.0);
    return;
  }
  const int64_t d = M.size(-1);
  const Tensor M3 = M.is_contiguous() ? M.view({-1, d, d}) : M.contiguous().view({-1, d, d});
  const Tensor X3 = Xc.reshape({-1, Xc.size(-2), d});
  for (int64_t b = 0; b < M3.size(0); ++b) sym_rank_update(M3[b], X3[b], alpha, beta, 0.0);
  if (!M.is_contiguous()) M.copy_(M3.view(M.sizes()));
}

// factor_update_masked: factor_update where ok. On the CPU the flag is read (no sync to avoid)
// and the update is factor_update's, bit for bit; on CUDA the upper block rows of alpha X^T X go
// to a scratch matrix and one kernel blends and mirrors them into M where the flag says so.

void factor_update_masked_impl(const Tensor& M, const Tensor& X, double alpha, double beta, const Tensor& ok) {
  TORCH_CHECK(ok.scalar_type() == at::kBool && ok.numel() == 1 && ok.device() == M.device(),
              "grng_ext::factor_update_masked: ok must be a one-element bool tensor on M's device");
  if (M.is_cpu()) {
    if (ok.item<bool>()) factor_update_impl(M, X, alpha, beta);
    return;
  }
#ifdef GRNG_WITH_CUDA
  check_factor_dtype(M, "M");
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "grng_ext::factor_update_masked: M must be (..., d, d)");
  TORCH_CHECK(X.dim() == M.dim() && X.size(-1) == M.size(-1) &&
                  X.sizes().slice(0, X.dim() - 2).equals(M.sizes().slice(0, M.dim() - 2)) &&
                  X.is_floating_point() && X.device() == M.device(),
              "grng_ext::factor_update_masked: X must be floating (..., m, d) matching M, on M's device");
  const int64_t d = M.size(-1);
  const Tensor Xc = X.to(M.scalar_type()).reshape({-1, X.size(-2), d});
  const Tensor M3 = M.reshape({-1, d, d});  // a view where M's batch dims flatten, else a copy
  Tensor U = at::empty({d, d}, M.options());
  for (int64_t b = 0; b < M3.size(0); ++b) {
    upper_rank_update(U, Xc[b], alpha, 0.0);
    Tensor Mb = M3[b];
    masked_blend_mirror_cuda(Mb, U, beta, ok);
  }
  if (!M3.is_same(M) && M3.data_ptr() != M.data_ptr()) M.copy_(M3.view(M.sizes()));
#else
  TORCH_CHECK(false, "grng_ext::factor_update_masked: no kernel for device ", M.device());
#endif
}

// ---------------------------------------------------------------------------------------------
// kalman_update: P <- P/beta + qI - W W^T, S = rI + H U = L L^T (float64), W = U L^-T.

namespace {

// (W, info) of the Kalman update: U = P H^T / beta + q H^T, S = rI + H U = L L^T (float64,
// info from its Cholesky: 0 = success), W = U L^-T in P's dtype (unusable where info != 0).
std::tuple<Tensor, Tensor> kalman_gain(const Tensor& P, const Tensor& H, double r, double beta, double q,
                                       const char* op) {
  check_factor_dtype(P, "P");
  TORCH_CHECK(P.dim() == 2 && P.size(0) == P.size(1), "grng_ext::", op, ": P must be (d, d)");
  TORCH_CHECK(H.dim() == 2 && H.size(1) == P.size(0) && H.device() == P.device(),
              "grng_ext::", op, ": H must be (k, d), on P's device");
  TORCH_CHECK(beta != 0.0, "grng_ext::", op, ": beta must be nonzero");
  const Tensor Hc = H.to(P.scalar_type());
  const Tensor Ht = Hc.t();
  // U = q H^T + P H^T / beta in one GEMM (q == 0 never reads H^T there).
  const Tensor U64 = at::addmm(Ht, P, Ht, q, 1.0 / beta).to(at::kDouble);
  const Tensor SH = at::mm(Hc.to(at::kDouble), U64);
  Tensor S = SH.add(SH.t()).mul_(0.5);
  S.diagonal().add_(r);
  auto [L, info] = at::linalg_cholesky_ex(S, /*upper=*/false, /*check_errors=*/false);
  Tensor W = at::linalg_solve_triangular(L, U64.t(), /*upper=*/false).to(P.scalar_type());
  return {W, info};
}

}  // namespace

// adam_moments_masked: m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2 where ok,
// N = (m / bias1[e / per]) / (sqrt(v) / bias2[e / per] + eps), in the op math type. The CPU reads
// the flag (no sync to avoid); CUDA passes it to the kernel (adam_moments_cuda). Dense copies of
// strided tensors; m and v copied back.

namespace {

template <typename T>
void adam_moments_cpu(const T* g, T* m, T* v, T* n, const at::opmath_type<T>* b1,
                      const at::opmath_type<T>* b2, int64_t numel, int64_t per, double beta1,
                      double beta2, double eps, bool ok) {
  using A = at::opmath_type<T>;
  const A c1 = static_cast<A>(beta1), c2 = static_cast<A>(beta2), e = static_cast<A>(eps);
  const A d1 = static_cast<A>(1.0 - beta1), d2 = static_cast<A>(1.0 - beta2);
#pragma omp parallel for schedule(static) if (numel >= kFusedParallelMin)
  for (int64_t i = 0; i < numel; ++i) {
    A mi = static_cast<A>(m[i]), vi = static_cast<A>(v[i]);
    if (ok) {
      const A gi = static_cast<A>(g[i]);
      mi = c1 * mi + d1 * gi;
      vi = c2 * vi + d2 * (gi * gi);
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
    }
    const int64_t r = i / per;
    n[i] = static_cast<T>((mi / b1[r]) / (std::sqrt(vi) / b2[r] + e));
  }
}

}  // namespace

Tensor adam_moments_masked_impl(const Tensor& Vb, const Tensor& m, const Tensor& v, double beta1,
                                double beta2, const Tensor& bias1, const Tensor& bias2, double eps,
                                const Tensor& ok) {
  const char* op = "grng_ext::adam_moments_masked";
  TORCH_CHECK(ok.scalar_type() == at::kBool && ok.numel() == 1 && ok.device() == Vb.device(), op,
              ": ok must be a one-element bool tensor on Vb's device");
  const auto st = Vb.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": Vb must be float32, bfloat16 or float64, got ", st);
  TORCH_CHECK(m.scalar_type() == st && v.scalar_type() == st && m.sizes() == Vb.sizes() &&
                  v.sizes() == Vb.sizes() && m.device() == Vb.device() && v.device() == Vb.device(),
              op, ": m and v must have Vb's shape, dtype and device");
  TORCH_CHECK(bias1.sizes() == bias2.sizes() && bias1.dim() <= Vb.dim() &&
                  bias1.sizes() == Vb.sizes().slice(0, bias1.dim()) && bias1.device() == Vb.device() &&
                  bias2.device() == Vb.device(),
              op, ": bias1 and bias2 must be shaped as a leading part of Vb's shape, on its device");
  const auto wide = st == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor g = Vb.contiguous(), mc = m.contiguous(), vc = v.contiguous();
  const Tensor b1 = bias1.to(wide).contiguous(), b2 = bias2.to(wide).contiguous();
  Tensor N = at::empty(Vb.sizes(), Vb.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = g.numel();
  if (numel > 0) {
    const int64_t per = numel / b1.numel();
    if (Vb.is_cpu()) {
      const bool flag = ok.item<bool>();
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "grng_adam_moments", [&] {
        using A = at::opmath_type<scalar_t>;
        adam_moments_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(),
                                   vc.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(),
                                   b1.const_data_ptr<A>(), b2.const_data_ptr<A>(), numel, per, beta1,
                                   beta2, eps, flag);
      });
    } else {
#ifdef GRNG_WITH_CUDA
      adam_moments_cuda(g, mc, vc, N, b1, b2, per, beta1, beta2, eps, ok);
#else
      TORCH_CHECK(false, op, ": no kernel for device ", Vb.device());
#endif
    }
  }
  if (!mc.is_same(m)) m.copy_(mc);
  if (!vc.is_same(v)) v.copy_(vc);
  return N;
}

void kalman_update_impl(const Tensor& P, const Tensor& H, double r, double beta, double q) {
  auto [W, info] = kalman_gain(P, H, r, beta, q, "kalman_update");
  const int64_t bad = info.item<int64_t>();
  TORCH_CHECK(bad == 0, "grng_ext::kalman_update: innovation Cholesky failed: leading minor ", bad);
  sym_rank_update(P, W, -1.0, 1.0 / beta, q);
}

// kalman_update_masked: P+ = P/beta + qI - W W^T computed aside, written where the innovation
// Cholesky succeeded and P+ is finite; every decision is a device tensor (no host read).
Tensor kalman_update_masked_impl(const Tensor& P, const Tensor& H, double r, double beta, double q) {
  auto [W, info] = kalman_gain(P, H, r, beta, q, "kalman_update_masked");
  Tensor Pn = P.clone(at::MemoryFormat::Contiguous);
  sym_rank_update(Pn, W, -1.0, 1.0 / beta, q);
  Tensor ok = info.eq(0).logical_and_(Pn.isfinite().all());
  if (P.is_cpu()) {  // reading a CPU flag costs no sync: copy instead of a select
    if (ok.item<bool>()) P.copy_(Pn);
  } else {
    P.copy_(at::where(ok, Pn, P));
  }
  return ok;
}

namespace {

// ---------------------------------------------------------------------------------------------
// fused_update: one call for all parameters of a group, two passes over the chunks.

struct Chunk {
  int64_t t, begin, end;
};

template <typename T>
using acc_t = at::opmath_type<T>;

// Element storage: bfloat16 is handled as its raw bits (uint16_t), which keeps the loops below
// plain integer/float code that vectorizes (c10::BFloat16's conversion has a NaN branch).
template <typename T>
using storage_t = std::conditional_t<std::is_same_v<T, c10::BFloat16>, uint16_t, T>;

// Widening load and round-to-nearest-even store.
template <typename T>
inline acc_t<T> ld(storage_t<T> x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return x;
  }
}

// No NaN branch for bfloat16: every value stored is the result of float arithmetic, whose NaNs
// are quiet (mantissa bit 22 set), so rounding keeps them NaN.
template <typename T>
inline storage_t<T> st(acc_t<T> x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  } else {
    return x;
  }
}

// d + rho g in the accumulation type (float for bfloat16: intermediates are not rounded to
// bfloat16, only the stored results are). rho == 0 gives d itself, even where g is Inf/NaN.
template <typename T>
inline acc_t<T> combined(const storage_t<T>* d, const storage_t<T>* g, int64_t i, acc_t<T> rho, bool use_rho) {
  const acc_t<T> dv = ld<T>(d[i]);
  const acc_t<T> sum = dv + rho * ld<T>(g[i]);
  return use_rho ? sum : dv;  // a select on values, not on loads: the loops stay branch-free
}

// Adds sum (d + rho g) g over [b, e) to dot (when want_dot) and clears finite if any d + rho g is
// NaN/Inf. x - x is 0 for finite x and NaN otherwise, so one vectorizable sum checks finiteness.
template <typename T>
void check_range(const void* dp, const void* gp, int64_t b, int64_t e, double rho, bool use_rho, bool want_dot,
                 int& finite, double& dot) {
  using A = acc_t<T>;
  using S = storage_t<T>;
  const S* d = static_cast<const S*>(dp);
  const S* g = static_cast<const S*>(gp);
  const A r = static_cast<A>(rho);
  A nonfinite = 0;
  double s = 0.0;
  if (want_dot) {
#pragma omp simd reduction(+ : nonfinite, s)
    for (int64_t i = b; i < e; ++i) {
      const A c = combined<T>(d, g, i, r, use_rho);
      nonfinite += c - c;
      s += static_cast<double>(c) * static_cast<double>(ld<T>(g[i]));
    }
  } else {
#pragma omp simd reduction(+ : nonfinite)
    for (int64_t i = b; i < e; ++i) {
      const A c = combined<T>(d, g, i, r, use_rho);
      nonfinite += c - c;
    }
  }
  finite = finite && nonfinite == A(0);
  dot += s;
}

struct UpdateScalars {
  double rho, nu, momentum, decay, lr;
  bool use_rho;
};

// The update of [b, e); the momentum buffer is a template flag so the loop has no conditional
// store and vectorizes.
template <typename T, bool kMom>
void update_range(void* pp, const void* gp, const void* dp, void* bp, int64_t b, int64_t e, const UpdateScalars& k) {
  using A = acc_t<T>;
  using S = storage_t<T>;
  S* p = static_cast<S*>(pp);
  S* buf = static_cast<S*>(bp);
  const S* g = static_cast<const S*>(gp);
  const S* d = static_cast<const S*>(dp);
  const A rho = static_cast<A>(k.rho), nu = static_cast<A>(k.nu), m = static_cast<A>(k.momentum);
  const A decay = static_cast<A>(k.decay), neg_lr = static_cast<A>(-k.lr);
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const A c = combined<T>(d, g, i, rho, k.use_rho);
    A step;
    if constexpr (kMom) {
      const S nb = st<T>(m * ld<T>(buf[i]) + nu * c);
      buf[i] = nb;
      step = ld<T>(nb);
    } else {
      step = c * nu;
    }
    p[i] = st<T>(ld<T>(p[i]) * decay + neg_lr * step);
  }
}

template <bool kMom>
void update_chunk(at::ScalarType dtype, void* pp, const void* gp, const void* dp, void* bp, int64_t b, int64_t e,
                  const UpdateScalars& k) {
  switch (dtype) {
    case at::kFloat: update_range<float, kMom>(pp, gp, dp, bp, b, e, k); break;
    case at::kDouble: update_range<double, kMom>(pp, gp, dp, bp, b, e, k); break;
    case at::kBFloat16: update_range<c10::BFloat16, kMom>(pp, gp, dp, bp, b, e, k); break;
    default: break;
  }
}

void check_chunk(at::ScalarType dtype, const void* dp, const void* gp, int64_t b, int64_t e, double rho, bool use_rho,
                 bool want_dot, int& finite, double& dot) {
  switch (dtype) {
    case at::kFloat: check_range<float>(dp, gp, b, e, rho, use_rho, want_dot, finite, dot); break;
    case at::kDouble: check_range<double>(dp, gp, b, e, rho, use_rho, want_dot, finite, dot); break;
    case at::kBFloat16: check_range<c10::BFloat16>(dp, gp, b, e, rho, use_rho, want_dot, finite, dot); break;
    default: break;
  }
}

// The update of fused_update / fused_update_masked: validates the lists, then (when ``flag``)
// checks every d + rho g and, where all are finite, applies; returns whether it applied.
bool fused_update_run(at::TensorList params, at::TensorList grads, at::TensorList directions,
                      at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                      double rho, std::optional<double> kl_clip, bool flag) {
  const size_t n = params.size();
  const bool use_mom = momentum != 0.0;
  TORCH_CHECK(grads.size() == n && directions.size() == n, "grng_ext::fused_update: list lengths differ");
  TORCH_CHECK(!use_mom || momentum_buffers.size() == n,
              "grng_ext::fused_update: momentum != 0 needs one momentum buffer per parameter");
  std::vector<Tensor> P(n), G(n), D(n), Bf(use_mom ? n : 0);
  std::vector<at::ScalarType> dtype(n);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType type = params[i].scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16,
                "grng_ext::fused_update: dtype must be float32, float64 or bfloat16, got ", type);
    TORCH_CHECK(grads[i].scalar_type() == type && directions[i].scalar_type() == type &&
                    (!use_mom || momentum_buffers[i].scalar_type() == type),
                "grng_ext::fused_update: tensor ", i, " mixes dtypes");
    TORCH_CHECK(params[i].is_cpu() && grads[i].is_cpu() && directions[i].is_cpu() &&
                    (!use_mom || momentum_buffers[i].is_cpu()),
                "grng_ext::fused_update: tensor ", i, " is not on the CPU");
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && directions[i].numel() == numel &&
                    (!use_mom || momentum_buffers[i].numel() == numel),
                "grng_ext::fused_update: tensor ", i, " sizes differ");
    dtype[i] = type;
    P[i] = params[i].contiguous();
    G[i] = grads[i].contiguous();
    D[i] = directions[i].contiguous();
    if (use_mom) Bf[i] = momentum_buffers[i].contiguous();
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({static_cast<int64_t>(i), b, std::min(numel, b + kChunk)});
    total += numel;
  }
  std::vector<void*> pp(n), bp(n, nullptr);
  std::vector<const void*> gp(n), dp(n);
  for (size_t i = 0; i < n; ++i) {
    pp[i] = P[i].data_ptr();
    gp[i] = G[i].const_data_ptr();
    dp[i] = D[i].const_data_ptr();
    if (use_mom) bp[i] = Bf[i].data_ptr();
  }
  if (!flag) return false;
  const bool use_rho = rho != 0.0;
  const bool want_dot = kl_clip.has_value() && lr > 0.0;
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  int finite = 1;
  double dot = 0.0;
#pragma omp parallel for schedule(static) reduction(&& : finite) reduction(+ : dot) if (total >= kFusedParallelMin)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    check_chunk(dtype[ch.t], dp[ch.t], gp[ch.t], ch.begin, ch.end, rho, use_rho, want_dot, finite, dot);
  }
  if (!finite) return false;

  double nu = 1.0;
  // lr^2 dot can underflow to 0 for a tiny lr: then nu = 1, as in the reference.
  if (want_dot && dot > 0.0 && lr * lr * dot > 0.0) nu = std::min(1.0, std::sqrt(*kl_clip / (lr * lr * dot)));
  const UpdateScalars k{rho, nu, momentum, 1.0 - lr * weight_decay, lr, use_rho};
#pragma omp parallel for schedule(static) if (total >= kFusedParallelMin)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    if (use_mom)
      update_chunk<true>(dtype[ch.t], pp[ch.t], gp[ch.t], dp[ch.t], bp[ch.t], ch.begin, ch.end, k);
    else
      update_chunk<false>(dtype[ch.t], pp[ch.t], gp[ch.t], dp[ch.t], bp[ch.t], ch.begin, ch.end, k);
  }
  for (size_t i = 0; i < n; ++i) {
    if (!P[i].is_same(params[i])) params[i].copy_(P[i]);
    if (use_mom && !Bf[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(Bf[i]);
  }
  return true;
}

Tensor fused_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList directions,
                        at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                        double rho, std::optional<double> kl_clip) {
  const bool applied =
      fused_update_run(params, grads, directions, momentum_buffers, lr, momentum, weight_decay, rho, kl_clip, true);
  return at::scalar_tensor(applied, at::TensorOptions().dtype(at::kBool));
}

// fused_update where the flag ok (one bool on the CPU, read here: a CPU read costs no sync) and
// the finiteness of every d + rho g say so; returns that flag, nothing written where it is False.
Tensor fused_update_masked_cpu(at::TensorList params, at::TensorList grads, at::TensorList directions,
                               at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                               double rho, std::optional<double> kl_clip, const Tensor& ok) {
  TORCH_CHECK(ok.is_cpu() && ok.scalar_type() == at::kBool && ok.numel() == 1,
              "grng_ext::fused_update_masked: ok must be a one-element bool tensor on the CPU, got ",
              ok.scalar_type(), " with ", ok.numel(), " elements on ", ok.device());
  const bool applied = fused_update_run(params, grads, directions, momentum_buffers, lr, momentum, weight_decay,
                                        rho, kl_clip, ok.item<bool>());
  return at::scalar_tensor(applied, at::TensorOptions().dtype(at::kBool));
}

// ---------------------------------------------------------------------------------------------
// batched_spd_inverse: one matrix per OpenMP work item, computed in float64 (Cholesky) or in
// the matrix's own precision (Newton-Schulz). Failed matrices come back as zeros with ok = false.

// A (d x d, row-major, lower triangle read) -> A^-1 in place (both triangles); false if not SPD.
bool cholesky_inverse_inplace(double* a, double* z, int64_t d) {
  // a <- L (lower), L L^T = A.
  for (int64_t j = 0; j < d; ++j) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < j; ++k) s += a[j * d + k] * a[j * d + k];
    s = a[j * d + j] - s;
    if (!(s > 0.0) || !std::isfinite(s)) return false;
    const double ljj = std::sqrt(s);
    a[j * d + j] = ljj;
    for (int64_t i = j + 1; i < d; ++i) {
      double t = 0.0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = 0; k < j; ++k) t += a[i * d + k] * a[j * d + k];
      a[i * d + j] = (a[i * d + j] - t) / ljj;
    }
  }
  // z <- L^-T (upper), row j of z is column j of L^-1.
  std::fill(z, z + d * d, 0.0);
  for (int64_t j = 0; j < d; ++j) {
    double* zj = z + j * d;
    zj[j] = 1.0 / a[j * d + j];
    for (int64_t i = j + 1; i < d; ++i) {
      double t = 0.0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = j; k < i; ++k) t += a[i * d + k] * zj[k];
      zj[i] = -t / a[i * d + i];
    }
  }
  // A^-1 = L^-T L^-1 = z z^T: upper triangle by row dot products, then mirrored.
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i; j < d; ++j) {
      double t = 0.0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = j; k < d; ++k) t += z[i * d + k] * z[j * d + k];
      a[i * d + j] = t;
      a[j * d + i] = t;
    }
  return true;
}

// C = A B for d x d row-major matrices (i-k-j order: the inner loop vectorizes).
template <typename A>
void matmul(const A* a, const A* b, A* c, int64_t d) {
  std::fill(c, c + d * d, A(0));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t k = 0; k < d; ++k) {
      const A aik = a[i * d + k];
      const A* bk = b + k * d;
      A* ci = c + i * d;
      for (int64_t j = 0; j < d; ++j) ci[j] += aik * bk[j];
    }
}

// X ~ M^-1 by X <- X (2I - M X) from I / ||M||_F; stops when ||I - M X||_F / sqrt(d) <= tol,
// keeping that step's X (X + X R), as grng.ops.newton_schulz_inverse does. Result symmetrized.
template <typename A>
bool newton_inverse(const A* m, A* x, int64_t d, double tol, int64_t max_iter) {
  std::vector<A> r(d * d), xn(d * d);
  double fro = 0.0;
  for (int64_t i = 0; i < d * d; ++i) fro += static_cast<double>(m[i]) * static_cast<double>(m[i]);
  std::fill(x, x + d * d, A(0));
  for (int64_t i = 0; i < d; ++i) x[i * d + i] = static_cast<A>(1.0 / std::sqrt(fro));
  bool converged = false;
  const double scale = std::sqrt(static_cast<double>(d));
  for (int64_t it = 0; it < max_iter; ++it) {
    matmul(m, x, r.data(), d);
    double res = 0.0;
    for (int64_t i = 0; i < d * d; ++i) {
      r[i] = -r[i];
      if (i % (d + 1) == 0) r[i] += A(1);
      res += static_cast<double>(r[i]) * static_cast<double>(r[i]);
    }
    matmul(x, r.data(), xn.data(), d);
    for (int64_t i = 0; i < d * d; ++i) x[i] += xn[i];
    const double rms = std::sqrt(res) / scale;
    if (rms <= tol) {
      converged = true;
      break;
    }
    if (!std::isfinite(rms)) break;
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i + 1; j < d; ++j) x[i * d + j] = x[j * d + i] = A(0.5) * (x[i * d + j] + x[j * d + i]);
  return converged;
}

template <typename T>
void batched_inverse_typed(const T* in, T* out, bool* ok, int64_t batch, int64_t d, bool newton, double tol,
                           int64_t max_iter) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(dynamic) if (batch > 1 && batch * d * d * d >= kParallelMin)
  for (int64_t b = 0; b < batch; ++b) {
    const T* src = in + b * d * d;
    T* dst = out + b * d * d;
    bool good;
    if (newton) {
      std::vector<A> m(src, src + d * d), x(d * d);
      good = newton_inverse<A>(m.data(), x.data(), d, tol, max_iter);
      for (int64_t i = 0; i < d * d; ++i) dst[i] = static_cast<T>(x[i]);
    } else {
      std::vector<double> a(src, src + d * d), z(d * d);
      good = cholesky_inverse_inplace(a.data(), z.data(), d);
      for (int64_t i = 0; i < d * d; ++i) dst[i] = good ? static_cast<T>(a[i]) : T(0);
    }
    if (!good && newton) std::fill(dst, dst + d * d, T(0));
    ok[b] = good;
  }
}

std::tuple<Tensor, Tensor> batched_spd_inverse_cpu(const Tensor& Ms, c10::string_view method, double tol,
                                                   int64_t max_iter) {
  check_factor_dtype(Ms, "Ms");
  TORCH_CHECK(Ms.dim() == 3 && Ms.size(1) == Ms.size(2), "grng_ext::batched_spd_inverse: Ms must be (B, d, d)");
  TORCH_CHECK(method == "cholesky" || method == "newton",
              "grng_ext::batched_spd_inverse: method must be 'cholesky' or 'newton', got ", std::string(method));
  const Tensor in = Ms.contiguous();
  Tensor out = at::empty_like(in);
  Tensor ok = at::empty({Ms.size(0)}, Ms.options().dtype(at::kBool));
  const bool newton = method == "newton";
  if (Ms.scalar_type() == at::kDouble)
    batched_inverse_typed<double>(in.const_data_ptr<double>(), out.data_ptr<double>(), ok.data_ptr<bool>(),
                                  Ms.size(0), Ms.size(1), newton, tol, max_iter);
  else
    batched_inverse_typed<float>(in.const_data_ptr<float>(), out.data_ptr<float>(), ok.data_ptr<bool>(),
                                 Ms.size(0), Ms.size(1), newton, tol, max_iter);
  return {out, ok};
}

}  // namespace
}  // namespace grng

TORCH_LIBRARY_IMPL(grng_ext, CPU, m) {
  m.impl("fused_update", &grng::fused_update_cpu);
  m.impl("fused_update_masked", &grng::fused_update_masked_cpu);
  m.impl("factor_update", &grng::factor_update_impl);
  m.impl("factor_update_masked", &grng::factor_update_masked_impl);
  m.impl("kalman_update", &grng::kalman_update_impl);
  m.impl("kalman_update_masked", &grng::kalman_update_masked_impl);
  m.impl("batched_spd_inverse", &grng::batched_spd_inverse_cpu);
  m.impl("adam_moments_masked", &grng::adam_moments_masked_impl);
}
