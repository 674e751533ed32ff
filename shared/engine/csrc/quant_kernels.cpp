// Matmuls with weights kept in GGUF's block formats (Q8_0, Q4_0, Q4_1: 32 weights per block, fp16 scales).
// The way llama.cpp reaches memory bandwidth on AVX2 CPUs: each row of x is quantized once to int8 blocks
// (Q8: a scale and the sum of its quants per block), then every block pair is an integer dot product
// (u8 x s8 multiply-adds into int32: VNNI's dpbusd where the CPU has it, else maddubs + madd) and one float
// FMA with the two scales. The unsigned operand is the weight's quants (Q4: nibbles 0..15; Q8_0: |w|, with
// w's sign moved onto x); Q4_0's offset of 8 and Q4_1's minimum are folded in through x's block sums.
// Built with -march=native (shared/engine/cpu_kernels.py), so the vector path is chosen at build time for
// the CPU it runs on; a portable scalar path gives the same results elsewhere.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define XLLM_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // weights per block, in every format here
enum Format : int64_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };

constexpr int64_t bytes_of(int64_t format) { return format == Q8_0 ? 2 + QK : format == Q4_0 ? 2 + QK / 2 : 4 + QK / 2; }

float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef XLLM_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: exact as a float
    float f = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// x's rows as Q8 blocks: quants, and per block the scale and scale * sum(quants)
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / QK;
  QuantizedRows out{std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks), std::vector<float>(rows * blocks)};
  at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      const float* v = x + b * QK;
      float amax = 0.f;
      for (int64_t i = 0; i < QK; i++) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = out.q.data() + b * QK;
      int32_t sum = 0;
      for (int64_t i = 0; i < QK; i++) {
        q[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        sum += q[i];
      }
      out.scale[b] = d;
      out.scaled_sum[b] = d * static_cast<float>(sum);
    }
  });
  return out;
}

#ifdef XLLM_AVX2
// 8 int32 partial sums of u[i] * s[i] over 32 unsigned/signed byte pairs
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // pairs stay < 2^15: no saturation
#endif
}

// a Q4 block's 16 bytes -> 32 nibbles in element order (low nibbles are elements 0..15, high 16..31)
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// y[r * stride] = one weight row (its blocks) . row r of x, for R rows of x at once: the weight's block is
// unpacked once for all R, and the R accumulators are independent chains (no waiting on one FMA's latency).
template <int64_t F, int R>
void dot_rows(const uint8_t* w, int64_t blocks, const QuantizedRows& x, int64_t r0, int64_t in, float* y,
              int64_t stride) {
  const int64_t nb = in / QK;
  float offsets[R] = {};  // Q4_0's -8 and Q4_1's minimum, through x's block sums
#ifdef XLLM_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
#else
  float acc[R] = {};
#endif
  for (int64_t b = 0; b < blocks; b++, w += bytes_of(F)) {
    const float d = half_to_float(w);
    const float m = F == Q4_1 ? half_to_float(w + 2) : -8.f * d;  // a Q4 block's value at quant 0
#ifdef XLLM_AVX2
    __m256i q, u;
    if constexpr (F == Q8_0) {
      q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
      u = _mm256_sign_epi8(q, q);  // |q|; q's sign goes onto x
    } else {
      u = nibbles(w + (F == Q4_1 ? 4 : 2));
    }
#endif
    for (int r = 0; r < R; r++) {
      const int64_t row = r0 + r;
      const int8_t* xq = x.q.data() + row * in + b * QK;
      const float scale = d * x.scale[row * nb + b];
#ifdef XLLM_AVX2
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      if constexpr (F == Q8_0) xv = _mm256_sign_epi8(xv, q);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(u, xv)), _mm256_set1_ps(scale), acc[r]);
#else
      int32_t sum = 0;
      if constexpr (F == Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(w + 2);
        for (int64_t i = 0; i < QK; i++) sum += q[i] * xq[i];
      } else {
        const uint8_t* qs = w + (F == Q4_1 ? 4 : 2);
        for (int64_t i = 0; i < QK / 2; i++) sum += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + QK / 2];
      }
      acc[r] += static_cast<float>(sum) * scale;
#endif
      if constexpr (F != Q8_0) offsets[r] += m * x.scaled_sum[row * nb + b];
    }
  }
  for (int r = 0; r < R; r++) {
#ifdef XLLM_AVX2
    y[r * stride] = hsum(acc[r]) + offsets[r];
#else
    y[r * stride] = acc[r] + offsets[r];
#endif
  }
}

template <int64_t F>
void linear_rows(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, int64_t rows, int64_t in, float* y,
                 int64_t out) {
  // each weight row is read from memory once for all rows of x (it stays in L1 while they pass)
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o++) {
      const uint8_t* wo = w + o * row_bytes;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) dot_rows<F, 4>(wo, in / QK, x, r, in, y + r * out + o, out);
      switch (rows - r) {
        case 3: dot_rows<F, 3>(wo, in / QK, x, r, in, y + r * out + o, out); break;
        case 2: dot_rows<F, 2>(wo, in / QK, x, r, in, y + r * out + o, out); break;
        case 1: dot_rows<F, 1>(wo, in / QK, x, r, in, y + r * out + o, out); break;
      }
    }
  });
}

void dequantize_row(const uint8_t* w, int64_t format, int64_t blocks, float* out) {
  const int64_t bytes = bytes_of(format);
  for (int64_t b = 0; b < blocks; b++, w += bytes, out += QK) {
    const float d = half_to_float(w);
    const float m = format == Q8_0 ? 0.f : format == Q4_1 ? half_to_float(w + 2) : -8.f * d;
#ifdef XLLM_AVX2
    // the 32 quants as bytes in element order, then 8 at a time: widen to int32, to float, d * q + m
    const __m256i q = format == Q8_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2))
                                     : nibbles(w + (format == Q4_1 ? 4 : 2));
    alignas(32) int8_t bytes32[QK];
    _mm256_store_si256(reinterpret_cast<__m256i*>(bytes32), q);
    for (int64_t i = 0; i < QK; i += 8) {
      const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes32 + i));
      const __m256i wide = format == Q8_0 ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight);
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(d), _mm256_set1_ps(m)));
    }
#else
    if (format == Q8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w + 2);
      for (int64_t i = 0; i < QK; i++) out[i] = d * q[i];
      continue;
    }
    const uint8_t* qs = w + (format == Q4_1 ? 4 : 2);
    for (int64_t i = 0; i < QK / 2; i++) {
      out[i] = d * (qs[i] & 0x0f) + m;
      out[i + QK / 2] = d * (qs[i] >> 4) + m;
    }
#endif
  }
}

void check_weight(const torch::Tensor& weight, int64_t format, int64_t in) {
  TORCH_CHECK(weight.dtype() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(), "weight: uint8 [out, row bytes]");
  TORCH_CHECK(format == Q8_0 || format == Q4_0 || format == Q4_1, "unknown block format ", format);
  TORCH_CHECK(in % QK == 0 && weight.size(1) == in / QK * bytes_of(format), "weight rows do not hold ", in, " values");
}

}  // namespace

// x: [rows, in] fp32; weight: [out, in / 32 * block bytes] uint8 blocks -> x @ W.T, [rows, out]
torch::Tensor quantized_linear(const torch::Tensor& x, const torch::Tensor& weight, int64_t format) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [rows, in]");
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  check_weight(weight, format, in);
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), rows, in);
  auto y = torch::empty({rows, out}, x.options());
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = weight.size(1);
  if (format == Q8_0) linear_rows<Q8_0>(wp, row_bytes, xq, rows, in, yp, out);
  if (format == Q4_0) linear_rows<Q4_0>(wp, row_bytes, xq, rows, in, yp, out);
  if (format == Q4_1) linear_rows<Q4_1>(wp, row_bytes, xq, rows, in, yp, out);
  return y;
}

// the weight's rows `ids`, dequantized to fp32: [len(ids), in] (an embedding lookup)
torch::Tensor dequantize_rows(const torch::Tensor& weight, int64_t format, int64_t in, const torch::Tensor& ids) {
  check_weight(weight, format, in);
  const auto index = ids.to(torch::kLong).contiguous();
  const int64_t n = index.numel(), row_bytes = weight.size(1);
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; i++) TORCH_CHECK(ip[i] >= 0 && ip[i] < weight.size(0), "row ", ip[i], " out of range");
  auto out = torch::empty({n, in}, torch::dtype(torch::kFloat));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) dequantize_row(wp + ip[i] * row_bytes, format, in / QK, op + i * in);
  });
  return out;
}

// the whole weight dequantized into `out` ([out rows, in] fp32, contiguous): a buffer the caller keeps, since
// fresh memory for every large step's weight would cost a page fault per 4 KiB
void dequantize_into(const torch::Tensor& weight, int64_t format, torch::Tensor& out) {
  TORCH_CHECK(out.dtype() == torch::kFloat && out.dim() == 2 && out.is_contiguous() && out.size(0) == weight.size(0));
  const int64_t in = out.size(1), row_bytes = weight.size(1);
  check_weight(weight, format, in);
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, weight.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o++) dequantize_row(wp + o * row_bytes, format, in / QK, op + o * in);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_linear", &quantized_linear, "x @ W.T with W in a block format (0 Q8_0, 1 Q4_0, 2 Q4_1)");
  m.def("dequantize_rows", &dequantize_rows, "rows `ids` of a block-format weight as fp32");
  m.def("dequantize_into", &dequantize_into, "a whole block-format weight as fp32, into `out`");
}
