// GGUF's block formats as the quantized-weight kernels read them (Q8_0, Q4_0, Q4_1: 32 weights per block with
// an fp16 scale; Q4_1 adds an fp16 minimum; Q4_K: super-blocks of 8 such blocks whose scales and minimums are 6-bit
// multiples of two fp16 ones; Q5_K: Q4_K with a fifth bit per quant; Q6_K: 6-bit signed quants in super-blocks of
// 256 with an 8-bit scale per 16 and an fp16 one), and the small helpers the kernel files share.
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
enum Format : int64_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q6_K = 4, Q5_K = 5 };

constexpr bool is_k(int64_t format) { return format == Q4_K || format == Q5_K || format == Q6_K; }

// bytes per block; K-quants: per super-block of QK_K weights
constexpr int64_t bytes_of(int64_t format) {
  return format == Q8_0   ? 2 + QK
         : format == Q4_0 ? 2 + QK / 2
         : format == Q4_1 ? 4 + QK / 2
         : format == Q4_K ? 144
         : format == Q5_K ? 176
                          : 210;
}
constexpr int64_t QK_K = 256;  // weights per K-quant super-block

// the bytes of a row of `in` weights, or -1 when `in` does not split into the format's blocks
constexpr int64_t row_bytes_of(int64_t format, int64_t in) {
  const int64_t unit = is_k(format) ? QK_K : QK;
  return in % unit == 0 ? in / unit * bytes_of(format) : -1;
}

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

// Block b (of 32 weights) of a Q4_K or Q5_K row: a super-block is fp16 d and dmin, 12 bytes packing 8 6-bit
// scales and 8 6-bit minimums, (Q5_K: 32 bytes whose bit j is block j's fifth bit of each quant,) then 128 bytes of
// nibbles, 32 bytes per pair of blocks (the first block's in the low nibbles).
// Weight = d * scale * q - dmin * minimum; both products are exact in fp32.
struct KQuants {          // where a block's quants lie
  const uint8_t* quants;  // 32 bytes: this block's quants in element order, in the nibbles `shift` selects
  const uint8_t* fifth;   // Q5_K: 32 bytes whose bit `bit` is each quant's bit 4; Q4_K: null
  int shift, bit;         // shift 0: low nibbles, 4: high
};

template <int64_t F>
inline KQuants k_quants(const uint8_t* row, int64_t b) {
  const uint8_t* super = row + (b / 8) * bytes_of(F);
  const int64_t j = b % 8;
  return {super + (F == Q5_K ? 48 : 16) + 32 * (j / 2), F == Q5_K ? super + 16 : nullptr, static_cast<int>(4 * (j % 2)),
          static_cast<int>(j)};
}

inline int k_quant(const KQuants& block, int64_t i) {  // element i's quant
  const int low = (block.quants[i] >> block.shift) & 0x0f;
  return block.fifth == nullptr ? low : low | (((block.fifth[i] >> block.bit) & 1) << 4);
}

// A Q4_K / Q5_K super-block's 8 scales and 8 minimums as bytes, from their 12 bytes of 6-bit values (the unpacking
// llama.cpp does: word by word)
inline void k_scale_bytes(const uint8_t* super, uint8_t scales[8], uint8_t minimums[8]) {
  uint32_t packed[3];
  std::memcpy(packed, super + 4, 12);
  constexpr uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
  const uint32_t words[4] = {
      packed[0] & six,                                        // scales 0-3
      (packed[2] & four) | (((packed[0] >> 6) & two) << 4),   // scales 4-7
      packed[1] & six,                                        // minimums 0-3
      ((packed[2] >> 4) & four) | (((packed[1] >> 6) & two) << 4),  // minimums 4-7
  };
  std::memcpy(scales, words, 8);
  std::memcpy(minimums, words + 2, 8);
}

struct KBlock : KQuants {
  float scale, minimum;  // d * scale; the value at quant 0, -dmin * minimum
};

template <int64_t F>
inline KBlock k_block(const uint8_t* row, int64_t b) {
  const uint8_t* super = row + (b / 8) * bytes_of(F);
  uint8_t scales[8], minimums[8];
  k_scale_bytes(super, scales, minimums);
  const int64_t j = b % 8;
  return {k_quants<F>(row, b), half_to_float(super) * static_cast<float>(scales[j]),
          -half_to_float(super + 2) * static_cast<float>(minimums[j])};
}

// x's rows as Q8 blocks: quants, and per block its scale and scale * sum(quants) (Q4's offsets enter through it)
struct QuantizedRows {
  int64_t rows, blocks;
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

// Block b (of 32 weights) of a Q6_K row: a super-block is 128 bytes of low nibbles, 64 of 2-bit high parts, 16
// int8 scales (one per 16 weights), fp16 d. Each half of 128 weights takes 64 low-nibble bytes and 32 high-part
// bytes; its 4 blocks read low-nibble bytes 0-31, 32-63, 0-31, 32-63 (low, low, high, high nibbles) and high-part
// bits 0-1, 2-3, 4-5, 6-7 of bytes 0-31. Weight = d * scale * (q - 32).
struct Q6Quants {       // where a block's quants lie
  const uint8_t* low;   // 32 bytes whose nibble `low_shift` selects holds the quants' low 4 bits
  const uint8_t* high;  // 32 bytes whose bits `high_shift`, + 1 hold the quants' top 2 bits
  int low_shift, high_shift;
};

inline Q6Quants q6_k_quants(const uint8_t* row, int64_t b) {
  const uint8_t* super = row + (b / 8) * bytes_of(Q6_K);
  const int64_t half = (b % 8) / 4, j = b % 4;
  return {super + 64 * half + 32 * (j % 2), super + 128 + 32 * half, static_cast<int>(4 * (j / 2)),
          static_cast<int>(2 * j)};
}

inline int q6_k_quant(const Q6Quants& block, int64_t i) {  // element i's quant, minus 32
  return (((block.low[i] >> block.low_shift) & 0x0f) | (((block.high[i] >> block.high_shift) & 0x03) << 4)) - 32;
}

// a Q6_K super-block's 16 int8 scales (one per 16 weights, in order) and its d
inline const int8_t* q6_k_scales(const uint8_t* super) { return reinterpret_cast<const int8_t*>(super + 192); }
inline float q6_k_d(const uint8_t* super) { return half_to_float(super + 208); }

struct Q6Block : Q6Quants {
  float scale[2];  // d * scale of elements 0-15 and of 16-31
};

inline Q6Block q6_k_block(const uint8_t* row, int64_t b) {
  const uint8_t* super = row + (b / 8) * bytes_of(Q6_K);
  const int8_t* scales = q6_k_scales(super) + 2 * (b % 8);
  const float d = q6_k_d(super);
  return {q6_k_quants(row, b), {d * scales[0], d * scales[1]}};
}

}  // namespace quant
