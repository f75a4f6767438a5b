// Device-generic pieces shared by the CPU and CUDA kernels of grng_ext.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace grng {

// Block rows of M updated per GEMM call when only the upper triangle is wanted: 256, or on the
// CPU 96 where d >= 2 * 96 and X has at least kSymCpuMinElements elements (one thread, 512 rows,
// full GEMM -> blocks of 96: d = 192 0.30 -> 0.21 ms, d = 257 0.56 -> 0.39 ms, d = 513 1.84 ->
// 1.30 ms; blocks of 256: 0.26, 0.54, 1.60 ms; with 64 rows at d = 257 one GEMM is fastest).
constexpr int64_t kSymBlock = 256;
constexpr int64_t kSymBlockCpu = 96;
constexpr int64_t kSymCpuMinElements = int64_t{1} << 16;

// The block rows upper_rank_update computes M's upper triangle in (d: M's side, rows: X's).
inline int64_t sym_block(const at::Tensor& M, const at::Tensor& X) {
  const int64_t d = M.size(0);
  if (!M.is_cpu()) return kSymBlock;
  return d >= 2 * kSymBlockCpu && X.numel() >= kSymCpuMinElements ? kSymBlockCpu : kSymBlock;
}

// Upper block rows of M (d x d) <- beta M + alpha X^T X (X: rows x d), one GEMM per block row
// (sym_block rows each), so roughly half the flops of the full product for large d. The strictly
// lower blocks are left stale: the caller mirrors the upper triangle. beta == 0 never reads M
// (GEMM semantics).
inline void upper_rank_update(at::Tensor& M, const at::Tensor& X, double alpha, double beta) {
  const int64_t d = M.size(0);
  const int64_t block = sym_block(M, X);
  if (d <= block) {
    M.addmm_(X.t(), X, beta, alpha);
    return;
  }
  for (int64_t r0 = 0; r0 < d; r0 += block) {
    const int64_t r1 = std::min(d, r0 + block);
    at::Tensor rows = M.slice(0, r0, r1).slice(1, r0, d);
    rows.addmm_(X.slice(1, r0, r1).t(), X.slice(1, r0, d), beta, alpha);
  }
}

// Mirror the upper triangle of a 2-D M onto the lower one and add shift to the diagonal.
void mirror_upper_cpu(at::Tensor& M, double shift);  // cpu_ops.cpp
#ifdef GRNG_WITH_CUDA
void mirror_upper_cuda(at::Tensor& M, double shift);  // cuda_ops.cu
// Where *ok: M's upper triangle <- beta M + U (U: the upper block rows of alpha X^T X), mirrored;
// M untouched where it is False (the flag is read on the device).
void masked_blend_mirror_cuda(at::Tensor& M, const at::Tensor& U, double beta, const at::Tensor& ok);
// adam_moments_masked on dense CUDA tensors (one elementwise launch; the flag read on the device).
void adam_moments_cuda(const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, const at::Tensor& n,
                       const at::Tensor& bias1, const at::Tensor& bias2, int64_t per, double beta1,
                       double beta2, double eps, const at::Tensor& ok);
#endif

inline void mirror_upper(at::Tensor& M, double shift) {
#ifdef GRNG_WITH_CUDA
  if (M.is_cuda()) return mirror_upper_cuda(M, shift);
#endif
  TORCH_CHECK(M.is_cpu(), "grng_ext: no kernel for device ", M.device());
  mirror_upper_cpu(M, shift);
}

// Device-generic ops (cpu_ops.cpp), registered for CPU there and for CUDA in cuda_ops.cu.
void factor_update_impl(const at::Tensor& M, const at::Tensor& X, double alpha, double beta);
void factor_update_masked_impl(const at::Tensor& M, const at::Tensor& X, double alpha, double beta,
                               const at::Tensor& ok);
void kalman_update_impl(const at::Tensor& P, const at::Tensor& H, double r, double beta, double q);
at::Tensor kalman_update_masked_impl(const at::Tensor& P, const at::Tensor& H, double r, double beta, double q);
at::Tensor adam_moments_masked_impl(const at::Tensor& Vb, const at::Tensor& m, const at::Tensor& v, double beta1,
                                    double beta2, const at::Tensor& bias1, const at::Tensor& bias2, double eps,
                                    const at::Tensor& ok);

}  // namespace grng
