// CUDA kernels of grng_ext: the multi-tensor fused update (one check and one update launch per
// group, no host sync), batched SPD inverses by Cholesky (one block per matrix in shared memory)
// the mirror kernel that makes factor_update / kalman_update exactly symmetric, its masked
// blend for factor_update_masked, and adam_moments_masked's elementwise kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "sym_update.h"

namespace grng {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;

// Sum over the block (kThreads threads); the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[lane] : 0.0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// d + rho g in the accumulation type (intermediates are not rounded to bfloat16, only stored
// results are, as on the CPU). rho == 0 gives d itself, even where g is Inf/NaN.
template <typename T>
__device__ __forceinline__ at::opmath_type<T> combine(T d, T g, at::opmath_type<T> rho, bool use_rho) {
  using A = at::opmath_type<T>;
  return use_rho ? static_cast<A>(d) + rho * static_cast<A>(g) : static_cast<A>(d);
}

// Metadata, one int64 array: per tensor 4 pointers (p, g, d, buf), then per chunk (t, begin, end).
struct FusedArgs {
  const int64_t* meta;
  int64_t n;
  double rho, kl_clip, lr, momentum, decay;
  bool use_rho, want_dot, use_mom;
};

template <typename T>
__global__ void fused_check_kernel(FusedArgs a, int* finite, double* dot) {
  using A = at::opmath_type<T>;
  const int64_t* chunk = a.meta + 4 * a.n + 3 * static_cast<int64_t>(blockIdx.x);
  const int64_t t = chunk[0];
  const T* g = reinterpret_cast<const T*>(a.meta[4 * t + 1]);
  const T* d = reinterpret_cast<const T*>(a.meta[4 * t + 2]);
  const A rho = static_cast<A>(a.rho);
  bool ok = true;
  double s = 0.0;
  for (int64_t i = chunk[1] + threadIdx.x; i < chunk[2]; i += kThreads) {
    const A c = combine<T>(d[i], g[i], rho, a.use_rho);
    ok = ok && isfinite(c);
    if (a.want_dot) s += static_cast<double>(c) * static_cast<double>(static_cast<A>(g[i]));
  }
  if (!__syncthreads_and(ok) && threadIdx.x == 0) atomicExch(finite, 0);
  if (a.want_dot) {
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(dot, s);
  }
}

template <typename T>
__global__ void fused_apply_kernel(FusedArgs a, const int* finite, const double* dot) {
  using A = at::opmath_type<T>;
  if (*finite == 0) return;
  double nu_d = 1.0;
  if (a.want_dot && *dot > 0.0 && a.lr * a.lr * *dot > 0.0) nu_d = fmin(1.0, sqrt(a.kl_clip / (a.lr * a.lr * *dot)));
  const int64_t* chunk = a.meta + 4 * a.n + 3 * static_cast<int64_t>(blockIdx.x);
  const int64_t t = chunk[0];
  T* p = reinterpret_cast<T*>(a.meta[4 * t + 0]);
  const T* g = reinterpret_cast<const T*>(a.meta[4 * t + 1]);
  const T* d = reinterpret_cast<const T*>(a.meta[4 * t + 2]);
  T* buf = reinterpret_cast<T*>(a.meta[4 * t + 3]);
  const A rho = static_cast<A>(a.rho), nu = static_cast<A>(nu_d), m = static_cast<A>(a.momentum);
  const A decay = static_cast<A>(a.decay), neg_lr = static_cast<A>(-a.lr);
  for (int64_t i = chunk[1] + threadIdx.x; i < chunk[2]; i += kThreads) {
    const A c = combine<T>(d[i], g[i], rho, a.use_rho);
    A step = c * nu;
    if (a.use_mom) {
      const T nb = static_cast<T>(m * static_cast<A>(buf[i]) + step);
      buf[i] = nb;
      step = static_cast<A>(nb);
    }
    p[i] = static_cast<T>(static_cast<A>(p[i]) * decay + neg_lr * step);
  }
}

// The two launches of fused_update / fused_update_masked. ``flag`` (an int tensor on the
// parameters' device, 1 = go) starts the check pass: the check clears it where a d + rho g is
// non-finite, the apply pass writes nothing where it is 0. No host read.
Tensor fused_update_launch(at::TensorList params, at::TensorList grads, at::TensorList directions,
                           at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                           double rho, std::optional<double> kl_clip, Tensor finite) {
  const size_t n = params.size();
  if (n == 0) return finite.ne(0);
  const bool use_mom = momentum != 0.0;
  TORCH_CHECK(grads.size() == n && directions.size() == n, "grng_ext::fused_update: list lengths differ");
  TORCH_CHECK(!use_mom || momentum_buffers.size() == n,
              "grng_ext::fused_update: momentum != 0 needs one momentum buffer per parameter");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::ScalarType st = params[0].scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "grng_ext::fused_update: dtype must be float32, float64 or bfloat16, got ", st);
  std::vector<Tensor> P(n), G(n), D(n), Bf(n);
  std::vector<int64_t> chunks;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (const Tensor* t : {&params[i], &grads[i], &directions[i]}) {
      TORCH_CHECK(t->device() == params[0].device() && t->scalar_type() == st && t->numel() == numel,
                  "grng_ext::fused_update (CUDA): tensor ", i, " differs in device, dtype or size");
    }
    if (use_mom) {
      const Tensor& b = momentum_buffers[i];
      TORCH_CHECK(b.device() == params[0].device() && b.scalar_type() == st && b.numel() == numel,
                  "grng_ext::fused_update (CUDA): momentum buffer ", i, " differs in device, dtype or size");
      Bf[i] = b.contiguous();
    }
    P[i] = params[i].contiguous();
    G[i] = grads[i].contiguous();
    D[i] = directions[i].contiguous();
    for (int64_t b = 0; b < numel; b += kChunk) {
      chunks.push_back(static_cast<int64_t>(i));
      chunks.push_back(b);
      chunks.push_back(std::min(numel, b + kChunk));
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) / 3;
  Tensor meta = at::empty({static_cast<int64_t>(4 * n + chunks.size())},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = meta.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    h[4 * i + 0] = reinterpret_cast<int64_t>(P[i].data_ptr());
    h[4 * i + 1] = reinterpret_cast<int64_t>(G[i].const_data_ptr());
    h[4 * i + 2] = reinterpret_cast<int64_t>(D[i].const_data_ptr());
    h[4 * i + 3] = use_mom ? reinterpret_cast<int64_t>(Bf[i].data_ptr()) : 0;
  }
  std::copy(chunks.begin(), chunks.end(), h + 4 * n);
  const auto dev = at::TensorOptions().device(params[0].device());
  const Tensor meta_dev = meta.to(params[0].device(), /*non_blocking=*/true);
  Tensor dot = at::zeros({}, dev.dtype(at::kDouble));
  const FusedArgs args{meta_dev.const_data_ptr<int64_t>(), static_cast<int64_t>(n), rho,
                       kl_clip.value_or(0.0), lr, momentum, 1.0 - lr * weight_decay, rho != 0.0,
                       kl_clip.has_value() && lr > 0.0, use_mom};
  if (nchunks > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "grng_fused_update", [&] {
      fused_check_kernel<scalar_t><<<nchunks, kThreads, 0, stream>>>(args, finite.data_ptr<int>(),
                                                                      dot.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fused_apply_kernel<scalar_t><<<nchunks, kThreads, 0, stream>>>(args, finite.const_data_ptr<int>(),
                                                                      dot.const_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  for (size_t i = 0; i < n; ++i) {
    if (!P[i].is_same(params[i])) params[i].copy_(P[i]);
    if (use_mom && !Bf[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(Bf[i]);
  }
  return finite.ne(0);
}

Tensor fused_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList directions,
                         at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                         double rho, std::optional<double> kl_clip) {
  const auto opts = at::TensorOptions().dtype(at::kInt);
  Tensor finite = params.empty() ? at::ones({}, opts) : at::ones({}, opts.device(params[0].device()));
  return fused_update_launch(params, grads, directions, momentum_buffers, lr, momentum, weight_decay, rho, kl_clip,
                             finite);
}

// fused_update where the device flag ok and the finiteness of every d + rho g say so: ok seeds
// the check pass's flag on the device (a copy, as int), so nothing is read on the host.
Tensor fused_update_masked_cuda(at::TensorList params, at::TensorList grads, at::TensorList directions,
                                at::TensorList momentum_buffers, double lr, double momentum, double weight_decay,
                                double rho, std::optional<double> kl_clip, const Tensor& ok) {
  TORCH_CHECK(ok.scalar_type() == at::kBool && ok.numel() == 1 &&
                  (params.empty() || ok.device() == params[0].device()),
              "grng_ext::fused_update_masked: ok must be a one-element bool tensor on the parameters' device, got ",
              ok.scalar_type(), " with ", ok.numel(), " elements on ", ok.device());
  Tensor finite = ok.reshape({}).to(at::kInt, /*non_blocking=*/false, /*copy=*/true);
  return fused_update_launch(params, grads, directions, momentum_buffers, lr, momentum, weight_decay, rho, kl_clip,
                             finite);
}

// ---------------------------------------------------------------------------------------------
// Batched SPD inverse: Cholesky, in-place triangular inverse, then L^-T L^-1, all in shared
// memory (leading dimension padded to an odd number against bank conflicts).

constexpr int kInvThreads = 128;

template <typename T>
__global__ void batched_cholesky_inverse_kernel(const T* in, T* out, bool* ok, int d, int ld) {
  using A = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  A* a = reinterpret_cast<A*>(smem_raw);
  A* tmp = a + static_cast<int64_t>(d) * ld;
  __shared__ int good;
  const T* src = in + static_cast<int64_t>(blockIdx.x) * d * d;
  T* dst = out + static_cast<int64_t>(blockIdx.x) * d * d;
  for (int idx = threadIdx.x; idx < d * d; idx += kInvThreads) a[(idx / d) * ld + idx % d] = static_cast<A>(src[idx]);
  if (threadIdx.x == 0) good = 1;
  __syncthreads();
  // L L^T = M (lower triangle read), left-looking by columns.
  for (int j = 0; j < d; ++j) {
    if (threadIdx.x == 0) {
      A s = a[j * ld + j];
      for (int k = 0; k < j; ++k) s -= a[j * ld + k] * a[j * ld + k];
      if (!(s > A(0)) || !isfinite(s)) good = 0;
      a[j * ld + j] = sqrt(s);
    }
    __syncthreads();
    if (!good) break;
    const A ljj = a[j * ld + j];
    for (int i = j + 1 + threadIdx.x; i < d; i += kInvThreads) {
      A t = a[i * ld + j];
      for (int k = 0; k < j; ++k) t -= a[i * ld + k] * a[j * ld + k];
      a[i * ld + j] = t / ljj;
    }
    __syncthreads();
  }
  if (good) {
    // L <- L^-1 in place, from the bottom-right corner: column j below the diagonal becomes
    // -inv(L22) x / l_jj with the already inverted trailing block L22.
    for (int j = d - 1; j >= 0; --j) {
      const A inv_jj = A(1) / a[j * ld + j];
      for (int i = j + 1 + threadIdx.x; i < d; i += kInvThreads) {
        A t = 0;
        for (int k = j + 1; k <= i; ++k) t += a[i * ld + k] * a[k * ld + j];
        tmp[i] = -t * inv_jj;
      }
      __syncthreads();
      for (int i = j + 1 + threadIdx.x; i < d; i += kInvThreads) a[i * ld + j] = tmp[i];
      if (threadIdx.x == 0) a[j * ld + j] = inv_jj;
      __syncthreads();
    }
    // M^-1 = L^-T L^-1, row i (lower part) needs rows k >= i only, so rows go in increasing order.
    for (int i = 0; i < d; ++i) {
      for (int j = threadIdx.x; j <= i; j += kInvThreads) {
        A t = 0;
        for (int k = i; k < d; ++k) t += a[k * ld + i] * a[k * ld + j];
        tmp[j] = t;
      }
      __syncthreads();
      for (int j = threadIdx.x; j <= i; j += kInvThreads) a[i * ld + j] = tmp[j];
      __syncthreads();
    }
  }
  for (int idx = threadIdx.x; idx < d * d; idx += kInvThreads) {
    const int i = idx / d, j = idx % d;
    const A v = j <= i ? a[i * ld + j] : a[j * ld + i];
    dst[idx] = good ? static_cast<T>(v) : T(0);
  }
  if (threadIdx.x == 0) ok[blockIdx.x] = good != 0;
}

std::tuple<Tensor, Tensor> batched_spd_inverse_cuda(const Tensor& Ms, c10::string_view method, double tol,
                                                    int64_t max_iter) {
  TORCH_CHECK(method == "cholesky", "grng_ext::batched_spd_inverse: CUDA implements method 'cholesky' only, got ",
              std::string(method));
  TORCH_CHECK(Ms.scalar_type() == at::kFloat || Ms.scalar_type() == at::kDouble,
              "grng_ext::batched_spd_inverse: Ms must be float32 or float64");
  TORCH_CHECK(Ms.dim() == 3 && Ms.size(1) == Ms.size(2), "grng_ext::batched_spd_inverse: Ms must be (B, d, d)");
  const c10::cuda::CUDAGuard guard(Ms.device());
  const Tensor in = Ms.contiguous();
  Tensor out = at::empty_like(in);
  Tensor ok = at::empty({Ms.size(0)}, Ms.options().dtype(at::kBool));
  const int d = static_cast<int>(Ms.size(1));
  const int ld = d % 2 == 0 ? d + 1 : d;
  if (Ms.size(0) == 0 || d == 0) return {out, ok.fill_(true)};
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(Ms.scalar_type(), "grng_batched_spd_inverse", [&] {
    using A = at::opmath_type<scalar_t>;
    const size_t smem = (static_cast<size_t>(d) * ld + d) * sizeof(A);
    TORCH_CHECK(smem <= static_cast<size_t>(max_smem), "grng_ext::batched_spd_inverse: d = ", d,
                " needs ", smem, " bytes of shared memory, the device has ", max_smem);
    C10_CUDA_CHECK(cudaFuncSetAttribute(batched_cholesky_inverse_kernel<scalar_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    batched_cholesky_inverse_kernel<scalar_t><<<Ms.size(0), kInvThreads, smem, stream>>>(
        in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ok.data_ptr<bool>(), d, ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, ok};
}

// ---------------------------------------------------------------------------------------------
// Mirror the upper triangle onto the lower one, diagonal += shift.

template <typename T>
__global__ void mirror_upper_kernel(T* m, int64_t d, int64_t s0, int64_t s1, T shift) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (i >= d || j >= d) return;
  if (j < i)
    m[i * s0 + j * s1] = m[j * s0 + i * s1];
  else if (i == j && shift != T(0))
    m[i * s0 + i * s1] += shift;
}

// Where *ok: for i <= j, v = beta m[i, j] + u[i, j] is stored at (i, j) and (j, i); nothing is
// read or written where the flag is False. Each entry is written from one value (exact symmetry)
// and only its upper-triangle thread reads m there, so no thread reads what another writes.
template <typename T>
__global__ void masked_blend_mirror_kernel(T* m, const T* u, int64_t d, int64_t s0, int64_t s1,
                                           int64_t u0, T beta, const bool* ok) {
  if (!*ok) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (i >= d || j >= d || j < i) return;
  const T v = beta * m[i * s0 + j * s1] + u[i * u0 + j];
  m[i * s0 + j * s1] = v;
  m[j * s0 + i * s1] = v;
}

}  // namespace

void masked_blend_mirror_cuda(Tensor& M, const Tensor& U, double beta, const Tensor& ok) {
  const int64_t d = M.size(0);
  if (d == 0) return;
  TORCH_CHECK(U.is_contiguous() && U.scalar_type() == M.scalar_type(), "grng_ext: scratch must be contiguous");
  const c10::cuda::CUDAGuard guard(M.device());
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((d + 31) / 32), static_cast<unsigned>((d + 7) / 8));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "grng_masked_blend_mirror", [&] {
    masked_blend_mirror_kernel<scalar_t><<<grid, block, 0, stream>>>(
        M.data_ptr<scalar_t>(), U.const_data_ptr<scalar_t>(), d, M.stride(0), M.stride(1), U.stride(0),
        static_cast<scalar_t>(beta), ok.const_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

// adam_moments_masked, one thread per element (grid-stride): m, v written only where *ok; N always.
template <typename T>
__global__ void adam_moments_kernel(const T* g, T* m, T* v, T* n, const at::opmath_type<T>* b1,
                                    const at::opmath_type<T>* b2, int64_t numel, int64_t per,
                                    at::opmath_type<T> beta1, at::opmath_type<T> beta2,
                                    at::opmath_type<T> eps, const bool* ok) {
  using A = at::opmath_type<T>;
  const bool take = *ok;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A mi = static_cast<A>(m[i]), vi = static_cast<A>(v[i]);
    if (take) {
      const A gi = static_cast<A>(g[i]);
      mi = beta1 * mi + (A(1) - beta1) * gi;
      vi = beta2 * vi + (A(1) - beta2) * (gi * gi);
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
    }
    const int64_t r = i / per;
    n[i] = static_cast<T>((mi / b1[r]) / (sqrt(vi) / b2[r] + eps));
  }
}

}  // namespace

void adam_moments_cuda(const Tensor& g, const Tensor& m, const Tensor& v, const Tensor& n,
                       const Tensor& bias1, const Tensor& bias2, int64_t per, double beta1,
                       double beta2, double eps, const Tensor& ok) {
  const int64_t numel = g.numel();
  const c10::cuda::CUDAGuard guard(g.device());
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "grng_adam_moments", [&] {
    using A = at::opmath_type<scalar_t>;
    adam_moments_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(),
        bias1.const_data_ptr<A>(), bias2.const_data_ptr<A>(), numel, per, static_cast<A>(beta1),
        static_cast<A>(beta2), static_cast<A>(eps), ok.const_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mirror_upper_cuda(Tensor& M, double shift) {
  const int64_t d = M.size(0);
  if (d == 0) return;
  const c10::cuda::CUDAGuard guard(M.device());
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((d + 31) / 32), static_cast<unsigned>((d + 7) / 8));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "grng_mirror_upper", [&] {
    mirror_upper_kernel<scalar_t><<<grid, block, 0, stream>>>(M.data_ptr<scalar_t>(), d, M.stride(0), M.stride(1),
                                                             static_cast<scalar_t>(shift));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace grng

TORCH_LIBRARY_IMPL(grng_ext, CUDA, m) {
  m.impl("fused_update", &grng::fused_update_cuda);
  m.impl("fused_update_masked", &grng::fused_update_masked_cuda);
  m.impl("factor_update", &grng::factor_update_impl);
  m.impl("factor_update_masked", &grng::factor_update_masked_impl);
  m.impl("kalman_update", &grng::kalman_update_impl);
  m.impl("kalman_update_masked", &grng::kalman_update_masked_impl);
  m.impl("batched_spd_inverse", &grng::batched_spd_inverse_cuda);
  m.impl("adam_moments_masked", &grng::adam_moments_masked_impl);
}
