// GGUF's block formats as the quantized-weight kernels read them (Q8_0, Q4_0, Q4_1: 32 weights per block with
// an fp16 scale; Q4_1 adds an fp16 minimum), and the small helpers the kernel files share.
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

// x's rows as Q8 blocks: quants, and per block its scale and scale * sum(quants) (Q4's offsets enter through it)
struct QuantizedRows {
  int64_t rows, blocks;
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

}  // namespace quant
