// Causal attention of decode / verify queries straight over the paged KV cache (CPU).
//
// The PyTorch path gathers every sequence's blocks into a padded tensor per layer and then
// runs SDPA over it: the cache is read, written and read again, and short contexts are
// padded to the longest. Here each (sequence, KV head) task walks its own block table once,
// so the cache is read once per step and no padding exists. The n_rep query heads that share
// a KV head, and all query tokens of the sequence, are the task's rows: each key is loaded
// once for all of them. Softmax is online (running max and sum per row), one block of keys
// at a time, in float32 whatever the cache dtype. The task also writes its sequence's new keys
// and values into the cache first, which saves two scatter ops per layer. Scores and value sums
// take four keys per pass (independent chains for the FMA units), and the next block's cache
// lines are prefetched, since a block table scatters blocks over the pool.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr float kNegBig = -1e30f;  // not -inf: the kernel is built with -ffast-math

// Four dot products against one query row at once: four independent sums keep the FMA units
// busy, where one dot at a time waits on its own reduction chain.
template <int HD>
inline void dot4(const float* q, const float* k, int64_t stride, int64_t hd_runtime, float* out) {
  const int64_t hd = HD ? HD : hd_runtime;
  const float *k0 = k, *k1 = k + stride, *k2 = k + 2 * stride, *k3 = k + 3 * stride;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < hd; ++d) {
    const float x = q[d];
    a0 += x * k0[d];
    a1 += x * k1[d];
    a2 += x * k2[d];
    a3 += x * k3[d];
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

template <int HD>
inline float dot(const float* q, const float* k, int64_t hd_runtime) {
  const int64_t hd = HD ? HD : hd_runtime;
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t d = 0; d < hd; ++d) a += q[d] * k[d];
  return a;
}

// Touch the cache lines of a block's keys and values for head g before they are needed: blocks
// sit anywhere in the cache, so the hardware prefetcher cannot guess the next one.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* k_cache, const scalar_t* v_cache, int64_t slot0, int64_t n, int64_t n_kv,
                           int64_t g, int64_t hd) {
  const int64_t bytes = hd * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t k = 0; k < n; ++k) {
    const char* kp = reinterpret_cast<const char*>(k_cache + ((slot0 + k) * n_kv + g) * hd);
    const char* vp = reinterpret_cast<const char*>(v_cache + ((slot0 + k) * n_kv + g) * hd);
    for (int64_t off = 0; off < bytes; off += 64) {
      __builtin_prefetch(kp + off);
      __builtin_prefetch(vp + off);
    }
  }
}

template <typename scalar_t, int HD>
void attend(const scalar_t* q, int64_t q_stride, const scalar_t* k_new, int64_t k_stride, const scalar_t* v_new,
            int64_t v_stride, const int64_t* slots, scalar_t* k_cache, scalar_t* v_cache, scalar_t* out,
            const int64_t* tables, int64_t max_blocks, const int64_t* q_start, const int64_t* context_lens, int64_t num_seqs,
            int64_t n_heads, int64_t n_kv, int64_t hd_runtime, int64_t bs, float scale) {
  const int64_t hd = HD ? HD : hd_runtime;
  const int64_t rep = n_heads / n_kv;
  at::parallel_for(0, num_seqs * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, m, l, s, kf, vf;
    kf.resize(bs * hd);
    vf.resize(bs * hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_kv, g = task % n_kv;
      const int64_t t0 = q_start[b], nq = q_start[b + 1] - t0, ctx = context_lens[b];
      const int64_t rows = nq * rep;  // row r = i * rep + j: query token i, head g * rep + j
      qf.assign(rows * hd, 0.f);
      acc.assign(rows * hd, 0.f);
      m.assign(rows, kNegBig);
      l.assign(rows, 0.f);
      s.resize(rows * bs);
      for (int64_t i = 0; i < nq; ++i) {  // this task's keys and values of the new tokens go in first
        const int64_t dst = (slots[t0 + i] * n_kv + g) * hd;
        const scalar_t* ks = k_new + (t0 + i) * k_stride + g * hd;
        const scalar_t* vs = v_new + (t0 + i) * v_stride + g * hd;
        std::copy(ks, ks + hd, k_cache + dst);
        std::copy(vs, vs + hd, v_cache + dst);
      }
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < rep; ++j) {
          const scalar_t* src = q + (t0 + i) * q_stride + (g * rep + j) * hd;
          float* dst = qf.data() + (i * rep + j) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(src[d]) * scale;
        }
      const int64_t num_blocks = (ctx + bs - 1) / bs;
      const int64_t* table = tables + b * max_blocks;
      prefetch_block(k_cache, v_cache, table[0] * bs, std::min(bs, ctx), n_kv, g, hd);
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * bs;
        const int64_t n = std::min(bs, ctx - first);
        const int64_t slot0 = table[blk] * bs;
        if (blk + 1 < num_blocks)
          prefetch_block(k_cache, v_cache, table[blk + 1] * bs, std::min(bs, ctx - first - bs), n_kv, g, hd);
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
            float* kd = kf.data() + k * hd;
            float* vd = vf.data() + k * hd;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) {
              kd[d] = static_cast<float>(kp[d]);
              vd[d] = static_cast<float>(vp[d]);
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
          float* sr = s.data() + r * bs;
          int64_t k = 0;
          for (; k + 4 <= nv; k += 4) dot4<HD>(qr, kb + k * stride, stride, hd, sr + k);
          for (; k < nv; ++k) sr[k] = dot<HD>(qr, kb + k * stride, hd);
          float mx = m[r];
          for (k = 0; k < nv; ++k) mx = std::max(mx, sr[k]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (k = 0; k < nv; ++k) {
            sr[k] = std::exp(sr[k] - mx);
            sum += sr[k];
          }
          const float correction = std::exp(m[r] - mx);
          l[r] = l[r] * correction + sum;
          m[r] = mx;
          float* ar = acc.data() + r * hd;
          if (correction != 1.f) {
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ar[d] *= correction;
          }
          for (k = 0; k + 4 <= nv; k += 4) {  // four values per pass: fewer read-modify-writes of ar
            const float p0 = sr[k], p1 = sr[k + 1], p2 = sr[k + 2], p3 = sr[k + 3];
            const float *v0 = vb + k * stride, *v1 = v0 + stride, *v2 = v1 + stride, *v3 = v2 + stride;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ar[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
          }
          for (; k < nv; ++k) {
            const float p = sr[k];
            const float* vr = vb + k * stride;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ar[d] += p * vr[d];
          }
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

// q [T, n_heads, hd]; k, v [T, n_kv, hd] the new tokens' keys and values, written to their slots
// [T] here (each by the task that reads them); q, k and v may be views into one fused projection
// (any row stride, heads and head dims contiguous); caches [slots, n_kv, hd]; block_tables
// [B, max_blocks] int64; q_start [B + 1] int64 (sequence b's query tokens are rows q_start[b] ..
// q_start[b + 1] - 1, its last ones in the context); context_lens [B] int64 (new tokens included).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slot_mapping,
                              torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor q_start, torch::Tensor context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches expected");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2), "rows of contiguous heads expected");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && q_start.scalar_type() == torch::kLong &&
                  context_lens.scalar_type() == torch::kLong && slot_mapping.scalar_type() == torch::kLong,
              "int64 metadata expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k.scalar_type() == k_cache.scalar_type() &&
                  v.scalar_type() == k_cache.scalar_type(),
              "q, k, v and cache dtypes differ");
  auto tables = block_tables.contiguous();
  auto slots = slot_mapping.contiguous();
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int64_t num_seqs = context_lens.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    // the common head sizes get compile-time loop bounds (fully unrolled vector loops)
    auto run = [&](auto head_dim) {
      attend<scalar_t, decltype(head_dim)::value>(
          q.data_ptr<scalar_t>(), q.stride(0), k.data_ptr<scalar_t>(), k.stride(0), v.data_ptr<scalar_t>(), v.stride(0),
          slots.data_ptr<int64_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), tables.size(1), q_start.data_ptr<int64_t>(),
          context_lens.data_ptr<int64_t>(), num_seqs, q.size(1), k_cache.size(1), q.size(2), block_size,
          static_cast<float>(scale));
    };
    if (q.size(2) == 64)
      run(std::integral_constant<int, 64>{});
    else if (q.size(2) == 128)
      run(std::integral_constant<int, 128>{});
    else
      run(std::integral_constant<int, 0>{});
  });
  return out;
}
