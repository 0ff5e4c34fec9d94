// Causal attention of decode / verify queries straight over the paged KV cache (CPU).
//
// The PyTorch path gathers every sequence's blocks into a padded tensor per layer and then
// runs SDPA over it: the cache is read, written and read again, and short contexts are
// padded to the longest. Here each (sequence, KV head) task walks its own block table once,
// so the cache is read once per step and no padding exists. The n_rep query heads that share
// a KV head, and all query tokens of the sequence, are the task's rows: each key is loaded
// once for all of them. Softmax is online (running max and sum per row), one block of keys
// at a time, in float32 whatever the cache dtype.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr float kNegBig = -1e30f;  // not -inf: the kernel is built with -ffast-math

template <typename scalar_t>
void attend(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, scalar_t* out,
            const int64_t* tables, int64_t max_blocks, const int64_t* q_start, const int64_t* context_lens,
            int64_t num_seqs, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t bs, float scale) {
  const int64_t rep = n_heads / n_kv;
  at::parallel_for(0, num_seqs * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, m, l, s, kf, vf;
    kf.resize(bs * hd);
    vf.resize(bs * hd);
    s.resize(bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_kv, g = task % n_kv;
      const int64_t t0 = q_start[b], nq = q_start[b + 1] - t0, ctx = context_lens[b];
      const int64_t rows = nq * rep;  // row r = i * rep + j: query token i, head g * rep + j
      qf.assign(rows * hd, 0.f);
      acc.assign(rows * hd, 0.f);
      m.assign(rows, kNegBig);
      l.assign(rows, 0.f);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < rep; ++j) {
          const scalar_t* src = q + ((t0 + i) * n_heads + g * rep + j) * hd;
          float* dst = qf.data() + (i * rep + j) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(src[d]) * scale;
        }
      const int64_t num_blocks = (ctx + bs - 1) / bs;
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * bs;
        const int64_t n = std::min(bs, ctx - first);
        const int64_t slot0 = tables[b * max_blocks + blk] * bs;
        const float* kb;  // this block's keys and values for head g, as float: [n, hd] each
        const float* vb;
        int64_t stride;
        if constexpr (std::is_same_v<scalar_t, float>) {  // read in place
          kb = k_cache + (slot0 * n_kv + g) * hd;
          vb = v_cache + (slot0 * n_kv + g) * hd;
          stride = n_kv * hd;
        } else {  // widen once per block, not once per query row
          for (int64_t k = 0; k < n; ++k) {
            const scalar_t* kp = k_cache + ((slot0 + k) * n_kv + g) * hd;
            const scalar_t* vp = v_cache + ((slot0 + k) * n_kv + g) * hd;
            for (int64_t d = 0; d < hd; ++d) {
              kf[k * hd + d] = static_cast<float>(kp[d]);
              vf[k * hd + d] = static_cast<float>(vp[d]);
            }
          }
          kb = kf.data();
          vb = vf.data();
          stride = hd;
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t last = ctx - nq + r / rep;  // the last key position this query token sees
          const int64_t nv = std::min(n, last - first + 1);
          if (nv <= 0) continue;
          const float* qr = qf.data() + r * hd;
          float mx = m[r];
          for (int64_t k = 0; k < nv; ++k) {
            const float* kr = kb + k * stride;
            float dot = 0.f;
            for (int64_t d = 0; d < hd; ++d) dot += qr[d] * kr[d];
            s[k] = dot;
            mx = std::max(mx, dot);
          }
          const float correction = std::exp(m[r] - mx);
          float* ar = acc.data() + r * hd;
          for (int64_t d = 0; d < hd; ++d) ar[d] *= correction;
          float sum = 0.f;
          for (int64_t k = 0; k < nv; ++k) {
            const float p = std::exp(s[k] - mx);
            sum += p;
            const float* vr = vb + k * stride;
            for (int64_t d = 0; d < hd; ++d) ar[d] += p * vr[d];
          }
          l[r] = l[r] * correction + sum;
          m[r] = mx;
        }
      }
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < rep; ++j) {
          const int64_t r = i * rep + j;
          const float inv = 1.f / l[r];
          scalar_t* dst = out + ((t0 + i) * n_heads + g * rep + j) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<scalar_t>(acc[r * hd + d] * inv);
        }
    }
  });
}

}  // namespace

// q [T, n_heads, hd]; caches [slots, n_kv, hd]; block_tables [B, max_blocks] int64;
// q_start [B + 1] int64 (sequence b's query tokens are rows q_start[b] .. q_start[b + 1] - 1,
// its last ones in the context); context_lens [B] int64 (cache included, new tokens last).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor q_start, torch::Tensor context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && q_start.scalar_type() == torch::kLong &&
                  context_lens.scalar_type() == torch::kLong,
              "int64 metadata expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  auto tables = block_tables.contiguous();
  auto out = torch::empty_like(q);
  const int64_t num_seqs = context_lens.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    attend<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), tables.size(1),
                     q_start.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), num_seqs, q.size(1),
                     k_cache.size(1), q.size(2), block_size, static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_attention", &paged_attention); }
