// The small elementwise ops of a decoder layer, fused for CPU: residual add + RMSNorm, RoPE, and
// SiLU(gate) * up. In PyTorch each is three to eight ops over a [tokens, hidden] tensor, and at
// decode sizes (32 rows) an op costs more in dispatch than in arithmetic: about 20 per layer. Every
// intermediate is rounded to the tensor's dtype exactly where the PyTorch composition rounds it, so
// half-precision results match that composition up to the order of a row's sum of squares.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGrainRows = 64;  // rows per task: decode batches run on one thread, prefills spread

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

template <typename T>
void add_rms_norm_impl(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim, float eps,
                       bool add) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* res = residual + i * dim;
      const T* xi = x + i * dim;
      float sum = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = add ? static_cast<float>(round_to<T>(static_cast<float>(res[d]) + static_cast<float>(xi[d])))
                            : static_cast<float>(xi[d]);
        if (add) res[d] = round_to<T>(v);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
      const T* src = add ? res : xi;
      T* o = out + i * dim;
      for (int64_t d = 0; d < dim; ++d)
        o[d] = round_to<T>(static_cast<float>(weight[d]) *
                           static_cast<float>(round_to<T>(static_cast<float>(src[d]) * inv)));
    }
  });
}

template <typename T>
void rope_impl(T* x, int64_t rows, int64_t heads, int64_t hd, int64_t row_stride, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(hd);
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * hd;
      const T* s = sin + t * hd;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + t * row_stride + h * hd;
        for (int64_t d = 0; d < hd; ++d) tmp[d] = static_cast<float>(v[d]);
        for (int64_t d = 0; d < hd; ++d) {
          const float rotated = d < half ? -tmp[d + half] : tmp[d - half];
          const float a = static_cast<float>(round_to<T>(tmp[d] * static_cast<float>(c[d])));
          const float b = static_cast<float>(round_to<T>(rotated * static_cast<float>(s[d])));
          v[d] = round_to<T>(a + b);
        }
      }
    }
  });
}

template <typename T>
void silu_and_mul_impl(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = gate_up + i * 2 * inter;
      const T* u = g + inter;
      T* o = out + i * inter;
      for (int64_t d = 0; d < inter; ++d) {
        const float gv = static_cast<float>(g[d]);
        const float act = static_cast<float>(round_to<T>(gv / (1.f + std::exp(-gv))));
        o[d] = round_to<T>(act * static_cast<float>(u[d]));
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, ": a contiguous [rows, dim] tensor expected");
}

}  // namespace

// residual is None: returns weight * norm(x). Otherwise residual += x in place and returns
// weight * norm(residual): the decoder's "add the sublayer's output, normalize for the next one".
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual must match x");
  }
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [dim] in x's dtype");
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                                weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                static_cast<float>(eps), residual.has_value());
  });
  return out;
}

// x [T, heads, hd] rotated in place (rotate-half convention); any row stride, heads contiguous, so
// the q and k heads of a fused projection rotate in one call. cos, sin [T, hd] in x's dtype.
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x: rows of contiguous heads expected");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "cos and sin must be [T, hd] in x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_", [&] {
    rope_impl<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0),
                        cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>());
  });
}

// gate_up [T, 2 * I] (gate first) -> silu(gate) * up [T, I]
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0), inter);
  });
  return out;
}
