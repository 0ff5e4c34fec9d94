// One extension module for the CPU kernels (see cpu_kernel.py).

#include <torch/extension.h>

#include <optional>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slot_mapping,
                              torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor q_start, torch::Tensor context_lens, int64_t block_size, double scale);
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight, double eps);
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention);
  m.def("rms_norm", &rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_and_mul", &silu_and_mul);
}
