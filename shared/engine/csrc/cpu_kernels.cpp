// CPU kernels for the places where torch's own ops leave most of this machine's speed unused
// (measured in docs/performance.md):
//  - linear_small_batch: y = x @ W.T for a few rows of x. MKL's GEMV reads the weight at ~18 GB/s here;
//    dot products over W's rows, all of x's rows per weight row, read it at ~25-30 GB/s.
//  - paged_decode_attention: one query token per sequence against its KV blocks read in place. The
//    torch path gathers every block into a contiguous copy first and then reads it again in SDPA.
//  - the small per-layer ops (RMSNorm with the residual add, SiLU-and-mul, rotary + KV write), fused.
// All parallelize with at::parallel_for, so they share torch's OpenMP threads instead of adding a pool.
// Built with -ffast-math so that the reductions vectorize; results match the torch path to
// float rounding (tests/engine/test_cpu_kernels.py).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// exp(x) in plain arithmetic that the compiler vectorizes: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by its Taylor polynomial (relative error < 1e-7). glibc's vector expf takes a scalar path for
// arguments far from 0, which made silu 10x slower on real activations than on random ones.
inline float fast_exp(float x) {
  x = std::clamp(x, -87.f, 88.f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln 2 split in two for precision
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// y[:, o] = x @ w[o] for o in [begin, end), four weight rows at a time: each is read from memory once for
// all rows of x (the four stay in L1 while the rows of x pass).
void dot_rows(const float* x, int64_t rows, const float* w, int64_t in, float* y, int64_t out, int64_t begin,
              int64_t end) {
  int64_t o = begin;
  for (; o + 4 <= end; o += 4) {
    const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
    for (int64_t b = 0; b < rows; b++) {
      const float* xb = x + b * in;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int64_t i = 0; i < in; i++) {
        s0 += xb[i] * w0[i];
        s1 += xb[i] * w1[i];
        s2 += xb[i] * w2[i];
        s3 += xb[i] * w3[i];
      }
      float* yb = y + b * out + o;
      yb[0] = s0, yb[1] = s1, yb[2] = s2, yb[3] = s3;
    }
  }
  for (; o < end; o++) {
    for (int64_t b = 0; b < rows; b++) {
      const float *xb = x + b * in, *wo = w + o * in;
      float s = 0.f;
      for (int64_t i = 0; i < in; i++) s += xb[i] * wo[i];
      y[b * out + o] = s;
    }
  }
}

}  // namespace

// x: [rows, in], weight: [out, in] (nn.Linear's layout), both contiguous fp32 -> [rows, out]
torch::Tensor linear_small_batch(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dtype() == torch::kFloat && weight.dtype() == torch::kFloat, "fp32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.dim() == 2 && x.size(1) == weight.size(1));
  const int64_t rows = x.size(0), in = weight.size(1), out = weight.size(0);
  auto y = torch::empty({rows, out}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) { dot_rows(xp, rows, wp, in, yp, out, begin, end); });
  return y;
}

namespace {

struct PagedKv {
  const float *k, *v;
  const int64_t* table;  // this sequence's blocks
  int64_t block_size, row;  // row: floats per token slot (kv_heads * dim)
  const float* key(int64_t t) const { return k + (table[t / block_size] * block_size + t % block_size) * row; }
  const float* value(int64_t t) const { return v + (table[t / block_size] * block_size + t % block_size) * row; }
};

// Query heads of KV heads [h0, h1) of one sequence over its `len` keys. Walking the tokens in order and
// reading all of a slot's heads together keeps the reads sequential within a block (the prefetcher's case).
// scores: (h1 - h0) * group * len floats, acc: (h1 - h0) * group * dim floats, both scratch.
void attend(const PagedKv& kv, int64_t len, const float* q, float* out, int64_t h0, int64_t h1, int64_t group,
            int64_t dim, float scale, float* scores, float* acc) {
  const int64_t rows = (h1 - h0) * group;  // query heads handled here; q and out point at the first
  for (int64_t t = 0; t < len; t++) {
    const float* key = kv.key(t);
    for (int64_t r = 0; r < rows; r++) {
      const float *k = key + (h0 + r / group) * dim, *qh = q + r * dim;
      float s = 0.f;
      for (int64_t d = 0; d < dim; d++) s += qh[d] * k[d];
      scores[r * len + t] = s * scale;
    }
  }
  for (int64_t r = 0; r < rows; r++) {
    float* s = scores + r * len;
    float max = s[0];
    for (int64_t t = 1; t < len; t++) max = std::max(max, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < len; t++) {
      s[t] = fast_exp(s[t] - max);
      sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; t++) s[t] *= inv;
  }
  std::fill(acc, acc + rows * dim, 0.f);
  for (int64_t t = 0; t < len; t++) {
    const float* value = kv.value(t);
    for (int64_t r = 0; r < rows; r++) {
      const float *v = value + (h0 + r / group) * dim, p = scores[r * len + t];
      float* a = acc + r * dim;
      for (int64_t d = 0; d < dim; d++) a[d] += p * v[d];
    }
  }
  std::copy(acc, acc + rows * dim, out);
}

}  // namespace

// q: [B, heads, D]; k_cache, v_cache: [blocks, block_size, kv_heads, D]; block_tables: [B, max_blocks] int64;
// context_lens: [B] int64 (keys visible to each query, its own included) -> [B, heads, D]
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat && k_cache.dtype() == torch::kFloat && v_cache.dtype() == torch::kFloat);
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.dtype() == torch::kLong && context_lens.dtype() == torch::kLong);
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), max_blocks = tables.size(1);
  const int64_t group = heads / kv_heads;  // query heads sharing one KV head (GQA)
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(3) == dim && tables.size(0) == batch && lens.size(0) == batch);
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; b++) {
    TORCH_CHECK(lp[b] > 0 && lp[b] <= max_blocks * block_size, "context length ", lp[b], " outside the block table");
    max_len = std::max(max_len, lp[b]);
  }
  // A task is a whole sequence when there are enough to keep every thread busy, else one KV head of one.
  const int64_t split = batch >= at::get_num_threads() ? 1 : kv_heads, step = kv_heads / split;
  at::parallel_for(0, batch * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(step * group * max_len), acc(step * group * dim);
    for (int64_t task = begin; task < end; task++) {
      const int64_t b = task / split, h0 = task % split * step;
      const PagedKv kv{kp, vp, tp + b * max_blocks, block_size, kv_heads * dim};
      const int64_t offset = (b * heads + h0 * group) * dim;
      attend(kv, lp[b], qp + offset, op + offset, h0, h0 + step, group, dim, static_cast<float>(scale),
             scores.data(), acc.data());
    }
  });
  return out;
}

// The small per-layer ops of a decode step, fused: in torch each is 3-8 ops over tiny tensors, and at
// batch 1 their dispatch costs more than their arithmetic.

namespace {

// out = row * rsqrt(mean(row^2) + eps) * weight, for one row of `hidden` floats.
void rms_norm_row(const float* row, const float* weight, float* out, int64_t hidden, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < hidden; i++) ss += row[i] * row[i];
  const float inv = 1.f / std::sqrt(ss / hidden + eps);
  for (int64_t i = 0; i < hidden; i++) out[i] = row[i] * inv * weight[i];
}

}  // namespace

// rms_norm(x) * weight, row by row. x: [T, hidden] -> new tensor.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dtype() == torch::kFloat && weight.is_contiguous());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) rms_norm_row(xp + r * hidden, w, yp + r * hidden, hidden, eps);
  });
  return y;
}

// residual += x, then rms_norm(residual) * weight (vLLM's fused_add_rms_norm), one pass over the rows.
torch::Tensor add_rms_norm_(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes());
  TORCH_CHECK(x.dtype() == torch::kFloat && residual.dtype() == torch::kFloat && weight.is_contiguous());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *rp = residual.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      float* row = rp + r * hidden;
      for (int64_t i = 0; i < hidden; i++) row[i] += xp[r * hidden + i];
      rms_norm_row(row, w, yp + r * hidden, hidden, eps);  // the row is still in L1
    }
  });
  return y;
}

// silu(gate) * up for gate_up = [gate | up] along the last dimension: [T, 2 * n] -> [T, n].
torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dtype() == torch::kFloat);
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * n);
  auto y = torch::empty({rows, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *g = gp + r * 2 * n, *u = g + n;
      for (int64_t i = 0; i < n; i++) yp[r * n + i] = g[i] / (1.f + fast_exp(-g[i])) * u[i];
    }
  });
  return y;
}

// Rotates q and k in place (HF "rotate_half" layout) by each token's cos/sin, then writes k and v into
// the paged caches at slot_mapping. q: [T, heads, D], k, v: [T, kv_heads, D], each with unit stride in D
// (views into the packed qkv output are fine); cos, sin: [T, D / 2]; caches: [slots..., kv_heads, D].
void rotary_and_cache(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                      const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                      const torch::Tensor& slot_mapping) {
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slot_mapping.dtype() == torch::kLong);
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2), half = dim / 2;
  const int64_t slots = k_cache.numel() / (kv_heads * dim);
  auto slot_index = slot_mapping.contiguous();
  const int64_t* sp = slot_index.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; t++) TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "slot ", sp[t], " outside the cache");
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  auto rotate = [half](float* x, const float* c, const float* s) {
    for (int64_t i = 0; i < half; i++) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i] + x1 * s[i];
    }
  };
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const float *c = cp + t * half, *s = snp + t * half;
      for (int64_t h = 0; h < heads; h++) rotate(qp + t * q.stride(0) + h * q.stride(1), c, s);
      for (int64_t h = 0; h < kv_heads; h++) {
        float* kh = kp + t * k.stride(0) + h * k.stride(1);
        const float* vh = vp + t * v.stride(0) + h * v.stride(1);
        rotate(kh, c, s);
        std::copy(kh, kh + dim, kc + (sp[t] * kv_heads + h) * dim);
        std::copy(vh, vh + dim, vc + (sp[t] * kv_heads + h) * dim);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_small_batch", &linear_small_batch, "y = x @ weight.T for a few rows of x");
  m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its paged KV");
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; rms_norm(residual)");
  m.def("silu_and_mul", &silu_and_mul);
  m.def("rotary_and_cache", &rotary_and_cache, "rotate q and k in place, write k and v into the caches");
}
