// grng._C: the op schemas of the namespace grng_ext and the (empty) Python module whose import
// runs the static registrations. Kernels: cpu_ops.cpp (CPU), cuda_ops.cu (CUDA, optional).
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "grng compiled ops (torch.ops.grng_ext)", -1,
                            nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(grng_ext, m) {
  m.set_python_module("grng.ops.ext");
  // theta <- (1 - lr wd) theta - lr buf, buf = m buf + nu (d + rho g); returns a 0-d bool
  // tensor, False (nothing touched) when any d + rho g is non-finite.
  m.def(
      "fused_update(Tensor(a!)[] params, Tensor[] grads, Tensor[] directions, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum, float weight_decay, float rho, "
      "float? kl_clip) -> Tensor");
  // fused_update where the device flag ok (a one-element bool tensor on the parameters' device)
  // and the finiteness of every d + rho g say so; returns that flag, nothing written where it is
  // False; the KL-clip scale is computed on the device (no host read on CUDA).
  m.def(
      "fused_update_masked(Tensor(a!)[] params, Tensor[] grads, Tensor[] directions, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum, float weight_decay, float rho, "
      "float? kl_clip, Tensor ok) -> Tensor");
  // M <- beta M + alpha X^T X (exactly symmetric; beta == 0 never reads M).
  m.def("factor_update(Tensor(a!) M, Tensor X, float alpha, float beta) -> ()");
  // factor_update where the device flag ok (a one-element bool tensor on M's device) is True;
  // nothing written where it is False, whatever X holds (no host read on CUDA).
  m.def("factor_update_masked(Tensor(a!) M, Tensor X, float alpha, float beta, Tensor ok) -> ()");
  // P <- P/beta + qI - W W^T, W = U L^-T, L L^T = rI + H U, U = P H^T/beta + q H^T.
  m.def("kalman_update(Tensor(a!) P, Tensor H, float r, float beta, float q) -> ()");
  // kalman_update in place where the innovation Cholesky succeeds and the result is finite (P
  // kept otherwise, no host read); returns that flag as a 0-d bool tensor on P's device.
  m.def("kalman_update_masked(Tensor(a!) P, Tensor H, float r, float beta, float q) -> Tensor");
  // (inverses, ok) of a batch (B, d, d) of SPD matrices; method "cholesky" or "newton".
  // where ok (a one-element bool tensor on Vb's device): m <- beta1 m + (1 - beta1) Vb,
  // v <- beta2 v + (1 - beta2) Vb^2 in place; returns N = (m / bias1) / (sqrt(v) / bias2 + eps),
  // bias1 and bias2 shaped as a leading part of Vb's shape (no host read on CUDA).
  m.def(
      "adam_moments_masked(Tensor Vb, Tensor(a!) m, Tensor(b!) v, float beta1, float beta2, "
      "Tensor bias1, Tensor bias2, float eps, Tensor ok) -> Tensor");
  m.def("batched_spd_inverse(Tensor Ms, str method, float tol, int max_iter) -> (Tensor, Tensor)");
}
