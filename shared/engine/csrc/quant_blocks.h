// GGUF's block formats as the quantized-weight kernels read them (Q8_0, Q4_0, Q4_1: 32 weights per block with
// an fp16 scale; Q4_1 adds an fp16 minimum), and the small helpers both kernel files share.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define XLLM_AVX2 1
#endif

namespace quant {

constexpr int64_t QK = 32;  // weights per block, in every format here
enum Format : int64_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };

constexpr int64_t bytes_of(int64_t format) { return format == Q8_0 ? 2 + QK : format == Q4_0 ? 2 + QK / 2 : 4 + QK / 2; }

inline float half_to_float(const uint8_t* p) {
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

// A Q4 block's value at quant 0 (Q4_0: -8 d; Q4_1: its stored minimum); 0 for Q8_0
inline float block_minimum(const uint8_t* w, int64_t format) {
  return format == Q8_0 ? 0.f : format == Q4_1 ? half_to_float(w + 2) : -8.f * half_to_float(w);
}

inline const uint8_t* block_quants(const uint8_t* w, int64_t format) { return w + (format == Q4_1 ? 4 : 2); }

// x's rows as Q8 blocks (quants, and a scale per block), and each block's scale * sum(quants) block-major
// ([block][row], 8 floats of padding: the offsets of Q4 formats read 8 rows at a time)
struct QuantizedRows {
  int64_t rows, blocks;
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

#ifdef XLLM_AVX2
// a Q4 block's 16 bytes -> 32 nibbles in element order (low nibbles are elements 0..15, high 16..31)
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

// a block's 32 quants as bytes in element order: Q8_0's signed, Q4's unsigned nibbles
inline __m256i quants(const uint8_t* w, int64_t format) {
  return format == Q8_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)) : nibbles(block_quants(w, format));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace quant
