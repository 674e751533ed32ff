// The block-format matmul with AVX2 (VNNI's dpbusd where the CPU has AVX-VNNI, else maddubs + madd), and a
// portable scalar path. Tiles of C weight rows x R rows of x: a weight block is unpacked once for all R rows, an
// x block loaded once for all C weight rows, and the C x R accumulators are independent chains. Included by
// quant_kernels.cpp on CPUs without AVX-512 VNNI.
//
// A row's arithmetic is fixed whatever shares the call: 8 lanes accumulate fma(float(int sums), d * x scale)
// block by block, then a horizontal sum; plus for Q4 the chain of fma(block minimum, x's scaled block sum) in
// block order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "quant_blocks.h"

namespace quant::avx2 {

#ifdef XLLM_AVX2
constexpr int C = 2, R = 4;  // 8 accumulators of 16 registers

struct WeightBlock {  // one weight row's block, unpacked once for every row of x
  __m256i a, start;   // the unsigned or signed operand and the integer sums' start (see quant_kernels.cpp)
  float scale;
};

#if defined(__AVXVNNI__)
#define XLLM_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define XLLM_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#endif

template <int64_t F>
[[gnu::always_inline]] inline WeightBlock unpack(const uint8_t* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + 4096, _MM_HINT_T0);  // rows are short: ask ahead
  const __m256i q = quants(w, F);
  const float scale = half_to_float(w);
  if constexpr (F != Q8_0) return {q, _mm256_setzero_si256(), scale};
#ifdef XLLM_VNNI
  const __m256i sums = dpbusd(_mm256_setzero_si256(), _mm256_set1_epi8(char(0x80)), q);
  return {q, _mm256_sub_epi32(_mm256_setzero_si256(), sums), scale};
#else
  return {_mm256_sign_epi8(q, q), q, scale};  // start holds w, for its signs
#endif
}

template <int64_t F>
[[gnu::always_inline]] inline __m256i dot(const WeightBlock& w, __m256i x) {  // x: Q8_0 with VNNI: sign bits flipped
#ifdef XLLM_VNNI
  return F == Q8_0 ? dpbusd(w.start, x, w.a) : dpbusd(w.start, w.a, x);
#else
  const __m256i s = F == Q8_0 ? _mm256_sign_epi8(x, w.start) : x;
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w.a, s), _mm256_set1_epi16(1));  // pairs < 2^15: no saturation
#endif
}

// y[r, c] (before Q4's offsets) for CT weight rows and x's rows r0 .. r0 + RT. Direct: blocks unpacked here (one
// tile of x rows uses them once); else read from `unpacked` ([row][block]). The same values either way.
template <int64_t F, int CT, int RT, bool Direct>
void tile(const uint8_t* w, int64_t row_bytes, const WeightBlock* unpacked, const QuantizedRows& x, int64_t r0,
          float* y, int64_t out) {
  __m256 acc[CT][RT];
  for (int c = 0; c < CT; c++)
    for (int r = 0; r < RT; r++) acc[c][r] = _mm256_setzero_ps();
  WeightBlock direct[Direct ? CT : 1];
  for (int64_t b = 0; b < x.blocks; b++) {
    if constexpr (Direct)
      for (int c = 0; c < CT; c++) direct[c] = unpack<F>(w + c * row_bytes + b * bytes_of(F));
    for (int r = 0; r < RT; r++) {
      const int64_t block = (r0 + r) * x.blocks + b;
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.q[block * QK]));
#ifdef XLLM_VNNI
      if constexpr (F == Q8_0) xq = _mm256_xor_si256(xq, _mm256_set1_epi8(char(0x80)));  // x + 128, unsigned
#endif
      for (int c = 0; c < CT; c++) {
        const WeightBlock& wb = Direct ? direct[c] : unpacked[c * x.blocks + b];
        const __m256 scale = _mm256_set1_ps(wb.scale * x.scale[block]);
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot<F>(wb, xq)), scale, acc[c][r]);
      }
    }
  }
  for (int c = 0; c < CT; c++)
    for (int r = 0; r < RT; r++) y[(r0 + r) * out + c] = hsum(acc[c][r]);
}

template <int64_t F, int CT, bool Direct>
void tiles(const uint8_t* w, int64_t row_bytes, const WeightBlock* unpacked, const QuantizedRows& x, float* y,
           int64_t out) {
  static_assert(R == 4, "the switch below covers tails of up to 3 rows");
  int64_t r = 0;
  for (; r + R <= x.rows; r += R) tile<F, CT, R, Direct>(w, row_bytes, unpacked, x, r, y, out);
  switch (x.rows - r) {
    case 3: tile<F, CT, 3, Direct>(w, row_bytes, unpacked, x, r, y, out); break;
    case 2: tile<F, CT, 2, Direct>(w, row_bytes, unpacked, x, r, y, out); break;
    case 1: tile<F, CT, 1, Direct>(w, row_bytes, unpacked, x, r, y, out); break;
  }
}
#else
constexpr int C = 1;
struct WeightBlock {};
#endif

// Q4: y[r, c] += the chain of fma(weight row c's block minimum, x row r's scaled block sum), block by block
template <int64_t F, int CT>
void add_offsets(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  for (int c = 0; c < CT; c++)
    for (int64_t r = 0; r < x.rows; r++) {
      float chain = 0.f;
      for (int64_t b = 0; b < x.blocks; b++)
        chain = std::fma(block_minimum(w + c * row_bytes + b * bytes_of(F), F), x.scaled_sum[b * x.rows + r], chain);
      y[r * out + c] += chain;
    }
}

// CT weight rows (from w) against all rows of x, into y[:, 0 .. CT]
template <int64_t F, int CT>
void weight_rows(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out,
                 std::vector<WeightBlock>& unpacked) {
#ifdef XLLM_AVX2
  if (x.rows <= R) {
    tiles<F, CT, true>(w, row_bytes, nullptr, x, y, out);
  } else {
    unpacked.resize(CT * x.blocks);
    for (int c = 0; c < CT; c++)
      for (int64_t b = 0; b < x.blocks; b++) unpacked[c * x.blocks + b] = unpack<F>(w + c * row_bytes + b * bytes_of(F));
    tiles<F, CT, false>(w, row_bytes, unpacked.data(), x, y, out);
  }
#else
  for (int c = 0; c < CT; c++)  // the portable path: one dot product at a time
    for (int64_t r = 0; r < x.rows; r++) {
      const uint8_t* wb = w + c * row_bytes;
      float acc = 0.f;
      for (int64_t b = 0; b < x.blocks; b++, wb += bytes_of(F)) {
        const int8_t* xq = &x.q[(r * x.blocks + b) * QK];
        int32_t sum = 0;
        if constexpr (F == Q8_0) {
          for (int64_t i = 0; i < QK; i++) sum += reinterpret_cast<const int8_t*>(wb + 2)[i] * xq[i];
        } else {
          const uint8_t* qs = block_quants(wb, F);
          for (int64_t i = 0; i < QK / 2; i++) sum += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + QK / 2];
        }
        acc = std::fma(static_cast<float>(sum), half_to_float(wb) * x.scale[r * x.blocks + b], acc);
      }
      y[r * out + c] = acc;
    }
#endif
  if constexpr (F != Q8_0) add_offsets<F, CT>(w, row_bytes, x, y, out);
}

template <int64_t F>
void linear(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  at::parallel_for(0, (out + C - 1) / C, 4, [&](int64_t begin, int64_t end) {
    std::vector<WeightBlock> unpacked;
    for (int64_t o = begin * C; o < std::min<int64_t>(end * C, out); o += C) {
      if (o + C <= out) {
        weight_rows<F, C>(w + o * row_bytes, row_bytes, x, y + o, out, unpacked);
      } else {
        for (int64_t c = o; c < out; c++) weight_rows<F, 1>(w + c * row_bytes, row_bytes, x, y + c, out, unpacked);
      }
    }
  });
}

}  // namespace quant::avx2
