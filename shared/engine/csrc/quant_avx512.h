// The block-format matmul with AVX-512 VNNI: four weight rows at a time. One 512-bit vector holds a 16-byte
// half of the same block of four rows (row k in 128-bit lane k), against that half of x's block broadcast to all
// four lanes, so one dpbusd does 64 multiply-adds for four outputs and the per-block float work (convert, scale,
// accumulate) is shared by the four rows — about half the instructions per weight of one row at a time, which
// is what bounds a single-row step (benchmarks/quant_matmul.py). Included by quant_kernels.cpp when the CPU
// has AVX-512 VNNI.
//
// A row's arithmetic is fixed whatever shares the call: its 4 lanes accumulate fma(float(int sums), d * x scale)
// block by block; its result is (l0 + l1) + (l2 + l3), plus for Q4 the chain of fma(block minimum, x's scaled
// block sum) in block order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "quant_blocks.h"

namespace quant::avx512 {

constexpr int64_t ROWS = 4;  // weight rows per group, one per 128-bit lane

struct Group {        // a block of four weight rows, unpacked for any number of x rows
  __m512i low, high;  // the block's elements 0-15 and 16-31: Q4 nibbles (unsigned) or Q8_0 quants (signed)
  __m512i start;      // the integer sums' start: 0, or for Q8_0 (x enters as x + 128) -128 * 4-element sums
  __m512 scale;       // row k's block scale in lanes 4k .. 4k + 3
  __m128 minimum;     // Q4: row k's value at quant 0 in lane k
};

inline __m512i lanes(const uint8_t* const* rows, int64_t offset) {
  __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[0] + offset)));
  for (int k = 1; k < 4; k++) {
    const __m128i part = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k] + offset));
    v = k == 1 ? _mm512_inserti32x4(v, part, 1) : k == 2 ? _mm512_inserti32x4(v, part, 2) : _mm512_inserti32x4(v, part, 3);
  }
  return v;
}

// block b of the four rows from w (row_bytes apart); the hardware prefetcher alone left single-row steps at about
// half the read bandwidth, so each row is also asked for 4 KiB ahead
template <int64_t F>
[[gnu::always_inline]] inline Group unpack(const uint8_t* w, int64_t row_bytes, int64_t b) {
  const uint8_t* rows[4];
  int32_t words[4];  // each row's first 4 bytes: its fp16 d, then Q4_1's fp16 m (other formats: quants, unused)
  for (int k = 0; k < 4; k++) {
    rows[k] = w + k * row_bytes + b * bytes_of(F);
    _mm_prefetch(reinterpret_cast<const char*>(rows[k]) + 4096, _MM_HINT_T0);
    std::memcpy(&words[k], rows[k], 4);
  }
  Group g;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  if constexpr (F == Q8_0) {
    g.low = lanes(rows, 2);
    g.high = lanes(rows, 2 + QK / 2);
    const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, g.low), flip, g.high);
    g.start = _mm512_sub_epi32(_mm512_setzero_si512(), sums);
  } else {
    const __m512i packed = lanes(rows, F == Q4_1 ? 4 : 2);
    g.low = _mm512_and_si512(packed, low_nibbles);
    g.high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
    g.start = _mm512_setzero_si512();
  }
  // built from registers: a 16-byte load of the four 4-byte stores would stall on store forwarding
  const __m256 dm = _mm256_cvtph_ps(_mm_set_epi32(words[3], words[2], words[1], words[0]));  // d0 m0 d1 m1 ..
  g.scale = _mm512_permutexvar_ps(_mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0),
                                  _mm512_castps256_ps512(dm));
  const __m128 first = _mm256_castps256_ps128(dm), second = _mm256_extractf128_ps(dm, 1);
  g.minimum = F == Q4_1 ? _mm_shuffle_ps(first, second, _MM_SHUFFLE(3, 1, 3, 1))
                        : _mm_mul_ps(_mm_set1_ps(-8.f), _mm_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0)));
  return g;
}

// G groups x R rows of x from r0: y[r, 4g + k]. Direct: groups unpacked here (few x rows use each once); else
// read from `unpacked` ([group][block]), filled once for many tiles of x rows. The same values either way.
template <int64_t F, int G, int R, bool Direct>
void tile(const uint8_t* w, int64_t row_bytes, const Group* unpacked, const QuantizedRows& x, int64_t r0, float* y,
          int64_t out, int64_t valid) {
  __m512 acc[G][R];
  __m128 offset[G][R];
  for (int g = 0; g < G; g++)
    for (int r = 0; r < R; r++) acc[g][r] = _mm512_setzero_ps(), offset[g][r] = _mm_setzero_ps();
  Group direct[Direct ? G : 1];
  for (int64_t b = 0; b < x.blocks; b++) {
    if constexpr (Direct)
      for (int g = 0; g < G; g++) direct[g] = unpack<F>(w + g * ROWS * row_bytes, row_bytes, b);
    for (int r = 0; r < R; r++) {
      const int64_t block = (r0 + r) * x.blocks + b;
      __m512i low = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&x.q[block * QK])));
      __m512i high = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&x.q[block * QK + 16])));
      if constexpr (F == Q8_0) {  // x + 128, unsigned
        low = _mm512_xor_si512(low, _mm512_set1_epi8(char(0x80)));
        high = _mm512_xor_si512(high, _mm512_set1_epi8(char(0x80)));
      }
      const __m512 x_scale = _mm512_set1_ps(x.scale[block]);
      for (int g = 0; g < G; g++) {
        const Group& q = Direct ? direct[g] : unpacked[g * x.blocks + b];
        const __m512i sums = F == Q8_0 ? _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(q.start, low, q.low), high, q.high)
                                       : _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(q.start, q.low, low), q.high, high);
        acc[g][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(q.scale, x_scale), acc[g][r]);
        if constexpr (F != Q8_0)
          offset[g][r] = _mm_fmadd_ps(q.minimum, _mm_set1_ps(x.scaled_sum[b * x.rows + r0 + r]), offset[g][r]);
      }
    }
  }
  for (int g = 0; g < G; g++)
    for (int r = 0; r < R; r++) {  // per 128-bit lane (l0 + l1) + (l2 + l3), then lane 0 of each: the four rows
      const __m512 pairs = _mm512_add_ps(acc[g][r], _mm512_permute_ps(acc[g][r], _MM_SHUFFLE(2, 3, 0, 1)));
      const __m512 quads = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, _MM_SHUFFLE(1, 0, 3, 2)));
      const __m128 rows4 = _mm512_castps512_ps128(
          _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), quads));
      const int64_t n = std::min<int64_t>(ROWS, valid - g * ROWS);  // 0 to 4
      _mm_mask_storeu_ps(y + (r0 + r) * out + g * ROWS, __mmask8((1 << n) - 1), _mm_add_ps(rows4, offset[g][r]));
    }
}

template <int64_t F, int G, bool Direct>
void tiles(const uint8_t* w, int64_t row_bytes, const Group* unpacked, const QuantizedRows& x, float* y, int64_t out,
           int64_t valid) {
  constexpr int R = 4;
  int64_t r = 0;
  for (; r + R <= x.rows; r += R) tile<F, G, R, Direct>(w, row_bytes, unpacked, x, r, y, out, valid);
  switch (x.rows - r) {
    case 3: tile<F, G, 3, Direct>(w, row_bytes, unpacked, x, r, y, out, valid); break;
    case 2: tile<F, G, 2, Direct>(w, row_bytes, unpacked, x, r, y, out, valid); break;
    case 1: tile<F, G, 1, Direct>(w, row_bytes, unpacked, x, r, y, out, valid); break;
  }
}

// G groups of weight rows from w (`valid` of them real) against all rows of x, into y[:, 0 .. valid]
template <int64_t F, int G>
void groups(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out, int64_t valid,
            std::vector<Group>& unpacked) {
  if (x.rows <= 4) return tiles<F, G, true>(w, row_bytes, nullptr, x, y, out, valid);
  unpacked.resize(G * x.blocks);
  for (int g = 0; g < G; g++)
    for (int64_t b = 0; b < x.blocks; b++) unpacked[g * x.blocks + b] = unpack<F>(w + g * ROWS * row_bytes, row_bytes, b);
  tiles<F, G, false>(w, row_bytes, unpacked.data(), x, y, out, valid);
}

template <int64_t F>
void linear(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  constexpr int64_t G = 2, TILE = G * ROWS;
  at::parallel_for(0, (out + TILE - 1) / TILE, 2, [&](int64_t begin, int64_t end) {
    std::vector<Group> unpacked;
    std::vector<uint8_t> tail;  // the last rows, zero-padded to whole groups
    for (int64_t o = begin * TILE; o < std::min(end * TILE, out); o += TILE) {
      const int64_t valid = std::min(TILE, out - o);
      const uint8_t* rows = w + o * row_bytes;
      if (valid < TILE) {
        tail.assign(TILE * row_bytes, 0);
        std::memcpy(tail.data(), rows, valid * row_bytes);
        rows = tail.data();
      }
      if (valid > ROWS) {
        groups<F, G>(rows, row_bytes, x, y + o, out, valid, unpacked);
      } else {
        groups<F, 1>(rows, row_bytes, x, y + o, out, valid, unpacked);
      }
    }
  });
}

}  // namespace quant::avx512
