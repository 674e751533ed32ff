// The block-format matmul in vectors (AVX-512 VNNI or AVX2): several weight rows at a time. A vector holds a
// 16-byte half of the same block of ROWS weight rows (row k in 128-bit lane k: 4 rows in 512 bits, 2 in 256)
// against that half of x's block broadcast to every lane, so one dot-product instruction serves ROWS outputs and
// the per-block float work (convert, scale, accumulate) is shared by them: about half the instructions per
// weight of one row at a time, which is what bounds a single-row step (benchmarks/quant_matmul.py).
//
// A row's arithmetic is fixed whatever shares the call: its 4 lanes accumulate fma(float(int sums), d * x scale)
// block by block; its result is (l0 + l1) + (l2 + l3), plus for Q4 the chain of fma(block minimum, x's scaled
// block sum) in block order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_blocks.h"

namespace quant::groups {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define XLLM_VNNI 1
struct Vec {
  using I = __m512i;
  using F = __m512;
  static constexpr int ROWS = 4;
  static I lanes(const uint8_t* const* rows, int64_t offset) {  // 16 bytes at `offset` of each row
    const auto part = [&](int k) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k] + offset)); };
    const I low = _mm512_inserti32x4(_mm512_castsi128_si512(part(0)), part(1), 1);
    return _mm512_inserti32x4(_mm512_inserti32x4(low, part(2), 2), part(3), 3);
  }
  static I broadcast(const int8_t* p) { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I bytes(char v) { return _mm512_set1_epi8(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I shift4(I a) { return _mm512_srli_epi16(a, 4); }
  static I shift_left4(I a) { return _mm512_slli_epi16(a, 4); }
  static I shift_right(I a, int bits) { return _mm512_srl_epi16(a, _mm_cvtsi32_si128(bits)); }
  static I sub_bytes(I a, I b) { return _mm512_sub_epi8(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I dpbusd(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static F scales(__m256 dm) {  // [d0 m0 d1 m1 ..] -> row k's d in lanes 4k .. 4k + 3
    return _mm512_permutexvar_ps(_mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0), _mm512_castps256_ps512(dm));
  }
  static F fma(I sums, F scale, F acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F zero_ps() { return _mm512_setzero_ps(); }
  static __m128 row_sums(F acc) {  // per 128-bit lane (l0 + l1) + (l2 + l3), lane 0 of each -> rows 0..3
    const F pairs = _mm512_add_ps(acc, _mm512_permute_ps(acc, _MM_SHUFFLE(2, 3, 0, 1)));
    const F quads = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), quads));
  }
};
#else
struct Vec {
  using I = __m256i;
  using F = __m256;
  static constexpr int ROWS = 2;
  static I lanes(const uint8_t* const* rows, int64_t offset) {
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(rows[1] + offset), reinterpret_cast<const __m128i*>(rows[0] + offset));
  }
  static I broadcast(const int8_t* p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I bytes(char v) { return _mm256_set1_epi8(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I shift4(I a) { return _mm256_srli_epi16(a, 4); }
  static I shift_left4(I a) { return _mm256_slli_epi16(a, 4); }
  static I shift_right(I a, int bits) { return _mm256_srl_epi16(a, _mm_cvtsi32_si128(bits)); }
  static I sub_bytes(I a, I b) { return _mm256_sub_epi8(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
#if defined(__AVXVNNI__)
#define XLLM_VNNI 1
  static I dpbusd(I acc, I u, I s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define XLLM_VNNI 1
  static I dpbusd(I acc, I u, I s) { return _mm256_dpbusd_epi32(acc, u, s); }
#else
  static I dpbusd(I acc, I u, I s) {  // pairs of u8 x s8 products stay < 2^15 here: no saturation
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
#endif
  static F scales(__m256 dm) { return _mm256_permutevar8x32_ps(dm, _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0)); }
  static F fma(I sums, F scale, F acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zero_ps() { return _mm256_setzero_ps(); }
  static __m128 row_sums(F acc) {
    const F pairs = _mm256_add_ps(acc, _mm256_permute_ps(acc, _MM_SHUFFLE(2, 3, 0, 1)));
    const F quads = _mm256_add_ps(pairs, _mm256_permute_ps(pairs, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_castps256_ps128(_mm256_permutevar8x32_ps(quads, _mm256_set_epi32(0, 0, 0, 0, 0, 0, 4, 0)));
  }
};
#endif

constexpr int ROWS = Vec::ROWS;

struct Group {      // a block of ROWS weight rows, unpacked for any number of x rows
  Vec::I low, high;  // the block's elements 0-15 and 16-31: Q4 nibbles (unsigned) or Q8_0 quants (signed)
  Vec::I start;      // the integer sums' start: 0, or for Q8_0 with VNNI (x enters as x + 128) -128 * 4-element sums
  Vec::F scale;      // row k's block scale in its lanes
  __m128 minimum;    // Q4: row k's value at quant 0 in lane k
};

struct HalvesGroup : Group {  // Q6_K: the block's halves have scales of their own (`start`, `scale`: the low one's)
  Vec::I start_high;
  Vec::F scale_high;
};

template <int64_t F>
using GroupOf = std::conditional_t<F == Q6_K, HalvesGroup, Group>;

// row k's scale and value at quant 0 from [s0 m0 s1 m1 ..]
[[gnu::always_inline]] inline void set_scales(Group& g, __m256 dm) {
  g.scale = Vec::scales(dm);
  g.minimum = _mm_shuffle_ps(_mm256_castps256_ps128(dm), _mm256_extractf128_ps(dm, 1), _MM_SHUFFLE(3, 1, 3, 1));
}

// A K-quant super-block's scales for ROWS rows, decoded once for its 8 blocks (one at a time per block was most of
// a step's time), laid out as the vectors a block reads: Q4_K's or Q5_K's block j at lanes[j] = [row 0's scale, its
// minimum, row 1's ..]; Q6_K's half-block i (block j's halves are 2j and 2j + 1) at lanes[i] = [row 0's scale, 0,
// row 1's, 0, ..]. The same products as k_block / q6_k_block, exact in fp32.
struct SuperScales {
  alignas(32) float lanes[16][8] = {};
};
struct NoScales {};  // what other formats carry instead: nothing

template <int64_t F>
using ScalesOf = std::conditional_t<is_k(F), SuperScales, NoScales>;

inline __m256 bytes_to_floats(__m128i eight, float times, bool is_signed) {
  const __m256i wide = is_signed ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(times));
}

// row k's Q4_K / Q5_K scales and minimums
inline void decode_k_scales(const uint8_t* super, int k, SuperScales& out) {
  alignas(16) uint8_t bytes[16];
  k_scale_bytes(super, bytes, bytes + 8);
  const __m128i scales_and_minimums = _mm_load_si128(reinterpret_cast<const __m128i*>(bytes));
  alignas(32) float scale[8], minimum[8];
  _mm256_store_ps(scale, bytes_to_floats(scales_and_minimums, half_to_float(super), false));
  _mm256_store_ps(minimum, bytes_to_floats(_mm_srli_si128(scales_and_minimums, 8), -half_to_float(super + 2), false));
  for (int j = 0; j < 8; j++) out.lanes[j][2 * k] = scale[j], out.lanes[j][2 * k + 1] = minimum[j];
}

// row k's Q6_K scales: 16 int8 times d
inline void decode_q6_k(const uint8_t* super, int k, SuperScales& out) {
  const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q6_k_scales(super)));
  const float d = q6_k_d(super);
  alignas(32) float scale[16];
  _mm256_store_ps(scale, bytes_to_floats(scales, d, true));
  _mm256_store_ps(scale + 8, bytes_to_floats(_mm_srli_si128(scales, 8), d, true));
  for (int i = 0; i < 16; i++) out.lanes[i][2 * k] = scale[i];
}

// Q4_K's (Q5_K's) block b of the ROWS rows: its nibbles (and fifth bits) like Q4_1's, its scale and minimum from the
// super-block's. Blocks are unpacked in order from a super-block's first: that one decodes `super`.
template <int64_t F>
[[gnu::always_inline]] inline Group unpack_k(const uint8_t* w, int64_t row_bytes, int64_t b, SuperScales& super) {
  const int64_t j = b % 8, offset = (b / 8) * bytes_of(F);
  const uint8_t *quants[ROWS], *fifths[ROWS];
  KQuants where{};
  for (int k = 0; k < ROWS; k++) {
    const uint8_t* row = w + k * row_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(row + offset) + 4096, _MM_HINT_T0);
    if (j == 0) decode_k_scales(row + offset, k, super);
    where = k_quants<F>(row, b);
    quants[k] = where.quants, fifths[k] = where.fifth;
  }
  Group g;
  Vec::I low = Vec::lanes(quants, 0), high = Vec::lanes(quants, 16);
  if (where.shift) low = Vec::shift4(low), high = Vec::shift4(high);  // an odd block's quants are the high nibbles
  g.low = Vec::and_(low, Vec::bytes(0x0f));
  g.high = Vec::and_(high, Vec::bytes(0x0f));
  if constexpr (F == Q5_K) {  // bit j of each of the 32 bytes, as bit 4
    const auto fifth = [&](int64_t at) {
      return Vec::shift_left4(Vec::and_(Vec::shift_right(Vec::lanes(fifths, at), where.bit), Vec::bytes(0x01)));
    };
    g.low = Vec::or_(g.low, fifth(0));
    g.high = Vec::or_(g.high, fifth(16));
  }
  g.start = Vec::zero();
  set_scales(g, _mm256_load_ps(super.lanes[j]));
  return g;
}

// Q6_K's block b of the ROWS rows: signed quants like Q8_0's (6 bits from a nibble and a 2-bit part, minus 32).
// Blocks in order, as unpack_k.
[[gnu::always_inline]] inline HalvesGroup unpack_6(const uint8_t* w, int64_t row_bytes, int64_t b, SuperScales& super) {
  const int64_t j = b % 8, offset = (b / 8) * bytes_of(Q6_K);
  const uint8_t *low[ROWS], *high[ROWS];
  Q6Quants where{};
  for (int k = 0; k < ROWS; k++) {
    const uint8_t* row = w + k * row_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(row + offset) + 4096, _MM_HINT_T0);
    if (j == 0) decode_q6_k(row + offset, k, super);
    where = q6_k_quants(row, b);
    low[k] = where.low, high[k] = where.high;
  }
  const auto quants = [&](int64_t at) {  // elements at .. at + 15, as signed bytes
    const Vec::I nibbles = Vec::and_(Vec::shift_right(Vec::lanes(low, at), where.low_shift), Vec::bytes(0x0f));
    const Vec::I tops = Vec::and_(Vec::shift_right(Vec::lanes(high, at), where.high_shift), Vec::bytes(0x03));
    return Vec::sub_bytes(Vec::or_(nibbles, Vec::shift_left4(tops)), Vec::bytes(32));
  };
  HalvesGroup g;
  g.low = quants(0);
  g.high = quants(16);
#ifdef XLLM_VNNI
  const Vec::I flip = Vec::bytes(char(0x80));
  g.start = Vec::sub(Vec::zero(), Vec::dpbusd(Vec::zero(), flip, g.low));
  g.start_high = Vec::sub(Vec::zero(), Vec::dpbusd(Vec::zero(), flip, g.high));
#else
  g.start = g.start_high = Vec::zero();
#endif
  g.scale = Vec::scales(_mm256_load_ps(super.lanes[2 * j]));
  g.scale_high = Vec::scales(_mm256_load_ps(super.lanes[2 * j + 1]));
  g.minimum = _mm_setzero_ps();
  return g;
}

// block b of the ROWS rows from w (row_bytes apart); the hardware prefetcher alone left single-row steps at about
// half the read bandwidth, so each row is also asked for 4 KiB ahead
template <int64_t F>
[[gnu::always_inline]] inline GroupOf<F> unpack(const uint8_t* w, int64_t row_bytes, int64_t b, ScalesOf<F>& super) {
  if constexpr (F == Q4_K || F == Q5_K) {
    return unpack_k<F>(w, row_bytes, b, super);
  } else if constexpr (F == Q6_K) {
    return unpack_6(w, row_bytes, b, super);
  } else {
    const uint8_t* rows[ROWS];
    int32_t words[4] = {};  // each row's first 4 bytes: its fp16 d, then Q4_1's fp16 m (other formats: quants, unused)
    for (int k = 0; k < ROWS; k++) {
      rows[k] = w + k * row_bytes + b * bytes_of(F);
      _mm_prefetch(reinterpret_cast<const char*>(rows[k]) + 4096, _MM_HINT_T0);
      std::memcpy(&words[k], rows[k], 4);
    }
    Group g;
    if constexpr (F == Q8_0) {
      g.low = Vec::lanes(rows, 2);
      g.high = Vec::lanes(rows, 2 + QK / 2);
#ifdef XLLM_VNNI
      const Vec::I flip = Vec::bytes(char(0x80));
      g.start = Vec::sub(Vec::zero(), Vec::dpbusd(Vec::dpbusd(Vec::zero(), flip, g.low), flip, g.high));
#else
      g.start = Vec::zero();
#endif
    } else {
      const Vec::I packed = Vec::lanes(rows, F == Q4_1 ? 4 : 2), low_nibbles = Vec::bytes(0x0f);
      g.low = Vec::and_(packed, low_nibbles);
      g.high = Vec::and_(Vec::shift4(packed), low_nibbles);
      g.start = Vec::zero();
    }
    // built from registers: a 16-byte load of the four 4-byte stores would stall on store forwarding
    const __m256 dm = _mm256_cvtph_ps(_mm_set_epi32(words[3], words[2], words[1], words[0]));  // d0 m0 d1 m1 ..
    set_scales(g, dm);
    if constexpr (F != Q4_1) {  // Q4_0's value at quant 0 is -8 d (Q8_0 has none: unused)
      const __m128 first = _mm256_castps256_ps128(dm), second = _mm256_extractf128_ps(dm, 1);
      g.minimum = _mm_mul_ps(_mm_set1_ps(-8.f), _mm_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0)));
    }
    return g;
  }
}

// signed weights w against x, added to `start` (with VNNI x enters sign-flipped, as x + 128; without, |w| is the
// unsigned operand and w's sign moves onto x)
[[gnu::always_inline]] inline Vec::I dot_signed(Vec::I start, Vec::I x, Vec::I w) {
#ifdef XLLM_VNNI
  return Vec::dpbusd(start, x, w);
#else
  return Vec::dpbusd(start, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#endif
}

// the integer sums of a group's block against x's block (its halves broadcast; Q8_0 with VNNI: sign bits flipped)
template <int64_t F>
[[gnu::always_inline]] inline Vec::I dot(const Group& g, Vec::I low, Vec::I high) {
  if constexpr (F == Q8_0) return dot_signed(dot_signed(g.start, low, g.low), high, g.high);
  return Vec::dpbusd(Vec::dpbusd(g.start, g.low, low), g.high, high);
}

// G groups x R rows of x from r0: y[r, ROWS g + k]. Direct: groups unpacked here (few x rows use each once);
// else read from `unpacked` ([group][block]), filled once for many tiles of x rows. The same values either way.
template <int64_t F, int G, int R, bool Direct>
void tile(const uint8_t* w, int64_t row_bytes, const GroupOf<F>* unpacked, const QuantizedRows& x, int64_t r0, float* y,
          int64_t out, int64_t valid) {
  Vec::F acc[G][R];
  __m128 offset[G][R];
  for (int g = 0; g < G; g++)
    for (int r = 0; r < R; r++) acc[g][r] = Vec::zero_ps(), offset[g][r] = _mm_setzero_ps();
  GroupOf<F> direct[Direct ? G : 1];
  ScalesOf<F> supers[Direct ? G : 1];
  for (int64_t b = 0; b < x.blocks; b++) {
    if constexpr (Direct)
      for (int g = 0; g < G; g++) direct[g] = unpack<F>(w + g * ROWS * row_bytes, row_bytes, b, supers[g]);
    for (int r = 0; r < R; r++) {
      const int64_t block = (r0 + r) * x.blocks + b;
      Vec::I low = Vec::broadcast(&x.q[block * QK]), high = Vec::broadcast(&x.q[block * QK + 16]);
#ifdef XLLM_VNNI
      if constexpr (F == Q8_0 || F == Q6_K) {  // x + 128, unsigned
        low = Vec::xor_(low, Vec::bytes(char(0x80)));
        high = Vec::xor_(high, Vec::bytes(char(0x80)));
      }
#endif
      const Vec::F x_scale = Vec::set1(x.scale[block]);
      const __m128 x_sum = _mm_set1_ps(x.scaled_sum[block]);
      for (int g = 0; g < G; g++) {
        const GroupOf<F>& q = Direct ? direct[g] : unpacked[g * x.blocks + b];
        if constexpr (F == Q6_K) {
          acc[g][r] = Vec::fma(dot_signed(q.start, low, q.low), Vec::mul(q.scale, x_scale), acc[g][r]);
          acc[g][r] = Vec::fma(dot_signed(q.start_high, high, q.high), Vec::mul(q.scale_high, x_scale), acc[g][r]);
        } else {
          acc[g][r] = Vec::fma(dot<F>(q, low, high), Vec::mul(q.scale, x_scale), acc[g][r]);
        }
        if constexpr (F != Q8_0 && F != Q6_K)
          offset[g][r] = _mm_fmadd_ps(q.minimum, x_sum, offset[g][r]);
      }
    }
  }
  for (int g = 0; g < G; g++)
    for (int r = 0; r < R; r++) {
      alignas(16) float result[4];
      _mm_store_ps(result, _mm_add_ps(Vec::row_sums(acc[g][r]), offset[g][r]));
      for (int64_t k = 0; k < std::min<int64_t>(ROWS, valid - g * ROWS); k++) y[(r0 + r) * out + g * ROWS + k] = result[k];
    }
}

template <int64_t F, int G, bool Direct>
void tiles(const uint8_t* w, int64_t row_bytes, const GroupOf<F>* unpacked, const QuantizedRows& x, float* y, int64_t out,
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
            std::vector<GroupOf<F>>& unpacked) {
  if (x.rows <= 4) return tiles<F, G, true>(w, row_bytes, nullptr, x, y, out, valid);
  unpacked.resize(G * x.blocks);
  ScalesOf<F> super;
  for (int g = 0; g < G; g++)
    for (int64_t b = 0; b < x.blocks; b++) unpacked[g * x.blocks + b] = unpack<F>(w + g * ROWS * row_bytes, row_bytes, b, super);
  tiles<F, G, false>(w, row_bytes, unpacked.data(), x, y, out, valid);
}

template <int64_t F>
void linear(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  constexpr int64_t G = 2, TILE = G * ROWS;
  at::parallel_for(0, (out + TILE - 1) / TILE, 2, [&](int64_t begin, int64_t end) {
    std::vector<GroupOf<F>> unpacked;
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

}  // namespace quant::groups
