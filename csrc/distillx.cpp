// distillx._C: every operator schema in one place, the CUDA kernels, and build information for
// `distillx info`. Kernels register per device and family in csrc/cpu/<family>.cpp (built once per
// vector ISA into distillx/_cpu_<isa>*.so, one of which distillx/_ext.py loads) and csrc/cuda/<family>.cu.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef DISTILLX_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

#ifndef DISTILLX_CPU_ISAS
#define DISTILLX_CPU_ISAS "default"
#endif

TORCH_LIBRARY(distillx, m) {
  // Per-row divergence of logits (N, C). row_weight (N,) scales each row (0 drops it). Returns the
  // weighted row losses (float32; float64 for float64 input) and, when compute_grad, the weighted
  // gradient w.r.t. student (N, C) in the student's dtype (else an empty tensor).
  // divergence: 0 forward KL, 1 reverse KL, 2 generalised JSD with beta.
  m.def(
      "logit_divergence(Tensor student, Tensor teacher, Tensor? row_weight, float temperature, int divergence, "
      "float beta, bool compute_grad) -> (Tensor, Tensor)");
  // The same divergence on logits = hidden @ weight.T + bias, computed in row chunks so no (N, C)
  // tensor exists. Returns the total (sum of weighted row losses), the row losses and, when
  // compute_grad, the gradients of the total for student_hidden, student_weight and student_bias
  // (empty tensors otherwise or when there is no bias). chunk_size <= 0 picks one.
  m.def(
      "linear_divergence(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor? teacher_bias, Tensor? row_weight, float temperature, int divergence, "
      "float beta, int chunk_size, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Kernel Gram matching mean_ij (k(s_i,s_j) − k(t_i,t_j))² over row panels (never (N, N)). s, t:
  // float32/float64 (N, Ds), (N, Dt). kernel: 0 linear, 1 polynomial {a, c, d}, 2 rbf {γ},
  // 3 chebyshev {D, ε} on expanded features; params are 1-D tensors (so data-dependent values such
  // as the rbf bandwidth stay in the graph under torch.compile). normalize_rows: L2-normalise each
  // row of both Gram matrices first (SP-KD with any kernel; one more sweep). Returns the loss (0-d)
  // and, when compute_grad, ∂loss/∂s.
  m.def(
      "kernel_gram(Tensor s, Tensor t, int kernel, Tensor s_params, Tensor t_params, bool normalize_rows, "
      "int panel_rows, bool compute_grad) -> (Tensor, Tensor)");
  // Kernel MMD as a weighted Gram sum over the concatenated sets x = [s; t] with weights a (N+M,)
  // (a = [1/N…, −1/M…] gives mean k(s,s') + mean k(t,t') − 2 mean k(s,t)): Σ_ij a_i a_j k(x_i, x_j),
  // tiled like kernel_gram (one kernel and params for both sets). t is a constant, so the t×t panels
  // skip the gradient. Returns the loss and ∂loss/∂s.
  m.def(
      "kernel_mmd(Tensor s, Tensor t, Tensor weights, int kernel, Tensor params, int panel_rows, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // Attention transfer's channel reduction of a (B, C, H, W) map (float32/float64) on the unit-scaled
  // feature: a = mean_c |f / m_b|^p, m_b = max |f| over sample b (1 for an all-zero sample), so |f/m|^p
  // stays finite for any p. Returns (a, m); m is a constant (no gradient). One pass over the feature
  // each way (the forward keeps a running maximum and rescales, as online softmax does).
  m.def("attention_map(Tensor feature, float p) -> (Tensor, Tensor)");
  m.def("attention_map_backward(Tensor grad_map, Tensor feature, Tensor scale, float p) -> Tensor");
  // MiniLM relation loss Σ KL(softmax(q_t k_tᵀ/√dt) ‖ softmax(q_s k_sᵀ/√ds)) / #valid query rows, inputs
  // (B, A, L, d), key_padding_mask (B, L) bool (True = real token). Flash-attention style: one online-
  // softmax pass over key blocks, never (L, L). Returns the loss and the per-row log-sum-exps
  // (B, A, L, 2) {student, teacher} that the backward needs to recompute the score tiles.
  m.def(
      "attention_relation(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor? key_padding_mask) "
      "-> (Tensor, Tensor)");
  // Its backward: recomputes the score tiles block by block; returns the gradients for q_s and k_s.
  m.def(
      "attention_relation_backward(Tensor grad, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, "
      "Tensor? key_padding_mask, Tensor stats) -> (Tensor, Tensor)");
  // The same loss in one pass with, when compute_grad, its gradients for q_s and k_s at unit upstream
  // gradient (empty tensors otherwise): a query block's score rows are held whole (rows × L, about
  // 1 MB per side), so nothing is recomputed. CPU only; the Python wrapper picks it for L up to a limit.
  m.def(
      "attention_relation_fused(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor? key_padding_mask, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["cpu_isas"] = DISTILLX_CPU_ISAS;  // the ISA libraries this build compiled
#ifdef DISTILLX_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distillx compiled core: registers the distillx::* operators";
  m.def("build_info", &build_info, "Versions and backends this extension was built with");
}
