// Matmuls with weights kept in GGUF's block formats (quant_blocks.h). The way llama.cpp reaches memory
// bandwidth on AVX2 CPUs: each row of x is quantized once to int8 blocks (Q8: a scale per block), then every
// block pair is an integer dot product (u8 x s8 multiply-adds into int32: VNNI's dpbusd where the CPU has it,
// else maddubs + madd) and one float FMA with the two scales. The unsigned operand is the weight's quants for Q4
// (nibbles 0..15), x + 128 for Q8_0 with VNNI (minus 128 times the weight's sums, folded into the accumulator's
// start), |w| for Q8_0 without (w's sign moved onto x); Q4_0's offset of 8 and Q4_1's minimum enter through
// x's block sums.
//
// Tiles of C weight rows x R rows of x: a weight step is unpacked once per tile for all R rows, an x step loaded
// once for all C weight rows, and the C x R accumulators are independent chains. With AVX-512 VNNI a vector
// step is two blocks (64 bytes), else one. A row's arithmetic is the same whatever tile it lands in, so its
// result does not depend on which or how many rows share the call (the engine relies on this: see ops.py).
// Built with -march=native (shared/engine/cpu_kernels.py), so the vector path is the CPU's own; a portable
// scalar path computes the same products elsewhere.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "quant_blocks.h"

using namespace quant;

void check_weight(const torch::Tensor& weight, int64_t format, int64_t in);
torch::Tensor dequantize_rows(const torch::Tensor& weight, int64_t format, int64_t in, const torch::Tensor& ids);
void dequantize_into(const torch::Tensor& weight, int64_t format, torch::Tensor& out);

namespace {

#if defined(XLLM_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(XLLM_NO_AVX512)
#define XLLM_VNNI 1
// a vector step is two blocks: lanes 0-7 hold the first block's partial sums, 8-15 the second's
struct Simd {
  using I = __m512i;
  using V = __m512;
  static constexpr int64_t STEP = 2, TILE_C = 4, TILE_R = 4;  // 16 accumulators of 32 registers
  static I join(__m256i first, __m256i second) { return _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1); }
  static V spread(float first, float second) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(first)), _mm256_set1_ps(second), 1);
  }
  static I load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static I bytes(char v) { return _mm512_set1_epi8(v); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static I dpbusd(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I negate(I v) { return _mm512_sub_epi32(_mm512_setzero_si512(), v); }
  static I flip_sign_bits(I v) { return _mm512_xor_si512(v, bytes(char(0x80))); }
  static V fma(I dot, V scale, V acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V zero() { return _mm512_setzero_ps(); }
  static float sum(V v) { return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
};
#elif defined(XLLM_AVX2)
struct Simd {
  using I = __m256i;
  using V = __m256;
  static constexpr int64_t STEP = 1, TILE_C = 2, TILE_R = 4;  // 8 accumulators of 16 registers
  static I join(__m256i first, __m256i) { return first; }
  static V spread(float first, float) { return _mm256_set1_ps(first); }
  static I load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I bytes(char v) { return _mm256_set1_epi8(v); }
  static I zero_i() { return _mm256_setzero_si256(); }
#if defined(__AVXVNNI__)
#define XLLM_VNNI 1
  static I dpbusd(I acc, I u, I s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define XLLM_VNNI 1
  static I dpbusd(I acc, I u, I s) { return _mm256_dpbusd_epi32(acc, u, s); }
#endif
  static I negate(I v) { return _mm256_sub_epi32(_mm256_setzero_si256(), v); }
  static I flip_sign_bits(I v) { return _mm256_xor_si256(v, bytes(char(0x80))); }
  static V fma(I dot, V scale, V acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V zero() { return _mm256_setzero_ps(); }
  static float sum(V v) { return hsum(v); }
};
#endif

#if !defined(XLLM_AVX2)
struct Simd {
  static constexpr int64_t STEP = 1, TILE_C = 4;
};
#endif

// x's rows as Q8 blocks: per row `padded` blocks (a whole number of vector steps; zeros past the row's own) of
// quants and scales; and each block's scale * sum(quants), block-major ([block][row]) for the Q4 offsets
struct QuantizedRows {
  int64_t rows, blocks, padded;
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / QK, padded = (blocks + Simd::STEP - 1) / Simd::STEP * Simd::STEP;
  QuantizedRows out{rows, blocks, padded, std::vector<int8_t>(rows * padded * QK), std::vector<float>(rows * padded),
                    std::vector<float>(blocks * rows + 8)};  // + 8: the offsets read 8 rows at a time
  at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t row = i / blocks, b = i % blocks;
      const float* v = x + i * QK;
      float amax = 0.f;
      for (int64_t j = 0; j < QK; j++) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = out.q.data() + (row * padded + b) * QK;
      int32_t sum = 0;
      for (int64_t j = 0; j < QK; j++) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));
        sum += q[j];
      }
      out.scale[row * padded + b] = d;
      out.scaled_sum[b * rows + row] = d * static_cast<float>(sum);
    }
  });
  return out;
}

#ifdef XLLM_AVX2
// one weight row's vector step, unpacked once for every row of x: the unsigned or signed operand (see the top),
// the accumulator's start (zero, or Q8_0's -128 * sums), and the block scales spread over their lanes
struct WeightStep {
  Simd::I a, start;
  Simd::V scale;
};

#ifdef XLLM_AVX512
// Two Q4 blocks in fewer instructions than two single ones (this is most of a batch-1 step's work): both nibble
// arrays from one 256-bit load, both fp16 scale words in one conversion
template <int64_t F>
[[gnu::always_inline]] inline WeightStep unpack_q4_pair(const uint8_t* w, float* minima, int64_t stride) {
  const uint8_t* next = w + bytes_of(F);
  const __m256i packed = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(block_quants(next, F)),
                                             reinterpret_cast<const __m128i*>(block_quants(w, F)));
  // 128-bit lanes [q0, q0, q1, q1], the odd ones shifted down a nibble: low nibbles then high, block by block
  const __m512i twice = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), _mm512_castsi256_si512(packed));
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0, 0x0004000400040004,
                                          0x0004000400040004, 0, 0);
  const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(twice, shifts), _mm512_set1_epi8(0x0f));
  uint32_t first_word, second_word;  // Q4_1: d and m; Q4_0: d and two quant bytes (unused)
  std::memcpy(&first_word, w, 4);
  std::memcpy(&second_word, next, 4);
  const __m128 words = _mm_cvtph_ps(_mm_set_epi32(0, 0, int(second_word), int(first_word)));  // [d0, m0, d1, m1]
  const __m512 scale = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0),
                                             _mm512_castps128_ps512(words));
  alignas(16) float values[4];
  _mm_store_ps(values, words);
  minima[0] = F == Q4_1 ? values[1] : -8.f * values[0];
  minima[stride] = F == Q4_1 ? values[3] : -8.f * values[2];
  return {q, Simd::zero_i(), scale};
}
#endif

// Weight rows are read once per call, in address order, a few hundred bytes each: the hardware prefetcher alone
// left the single-row kernel at about half the machine's read bandwidth. Asking this far ahead (the next tiles'
// rows) made a whole decode step's matmuls 1.3-1.7x faster (benchmarks/quant_matmul.py, docs/performance.md).
constexpr int64_t PREFETCH_BYTES = 4096;

inline void prefetch(const uint8_t* w) { _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH_BYTES, _MM_HINT_T0); }

// the step's first block at w, and a second block where `second`; Q4 blocks' minima go to minima[0], [stride]
template <int64_t F>
[[gnu::always_inline]] inline WeightStep unpack_step(const uint8_t* w, bool second, float* minima, int64_t stride) {
#ifdef XLLM_AVX512
  if constexpr (F != Q8_0)
    if (second) return unpack_q4_pair<F>(w, minima, stride);
#endif
  const uint8_t* next = w + bytes_of(F);
  const Simd::I q = Simd::join(quants(w, F), second ? quants(next, F) : _mm256_setzero_si256());
  const Simd::V scale = Simd::spread(half_to_float(w), second ? half_to_float(next) : 0.f);
  if constexpr (F != Q8_0) {
    minima[0] = block_minimum(w, F);
    if (second) minima[stride] = block_minimum(next, F);
    return {q, Simd::zero_i(), scale};
  }
#ifdef XLLM_VNNI
  return {q, Simd::negate(Simd::dpbusd(Simd::zero_i(), Simd::bytes(char(0x80)), q)), scale};
#else
  return {_mm256_sign_epi8(q, q), q, scale};  // start holds w, for its signs
#endif
}

template <int64_t F>
[[gnu::always_inline]] inline Simd::I dot(const WeightStep& w, Simd::I x) {  // x: the step's quants, sign bits flipped for Q8_0 with VNNI
#ifdef XLLM_VNNI
  return F == Q8_0 ? Simd::dpbusd(w.start, x, w.a) : Simd::dpbusd(w.start, w.a, x);
#else
  const __m256i s = F == Q8_0 ? _mm256_sign_epi8(x, w.start) : x;
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w.a, s), _mm256_set1_epi16(1));  // pairs < 2^15: no saturation
#endif
}

// y[r, c] (before Q4's offsets) for C weight rows and x's rows r0 .. r0 + R. Direct: each weight step unpacked
// here (one tile of x rows uses it once); else read from `unpacked`, filled once for many tiles. Same values.
template <int64_t F, int C, int R, bool Direct>
void tile(const uint8_t* w, int64_t row_bytes, const WeightStep* unpacked, float* minima, const QuantizedRows& x,
          int64_t r0, float* y, int64_t out) {
  const int64_t steps = x.padded / Simd::STEP;
  Simd::V acc[C][R];
  for (int c = 0; c < C; c++)
    for (int r = 0; r < R; r++) acc[c][r] = Simd::zero();
  WeightStep direct[Direct ? C : 1];
  for (int64_t s = 0; s < steps; s++) {
    const int64_t b = s * Simd::STEP;
    if constexpr (Direct)
      for (int c = 0; c < C; c++) {
        prefetch(w + c * row_bytes + b * bytes_of(F));
        direct[c] = unpack_step<F>(w + c * row_bytes + b * bytes_of(F), Simd::STEP == 2 && b + 1 < x.blocks,
                                   minima + b * C + c, C);
      }
    for (int r = 0; r < R; r++) {
      const int64_t block = (r0 + r) * x.padded + b;
      Simd::I xq = Simd::load(x.q.data() + block * QK);
#ifdef XLLM_VNNI
      if constexpr (F == Q8_0) xq = Simd::flip_sign_bits(xq);
#endif
      const Simd::V x_scale = Simd::spread(x.scale[block], x.scale[block + Simd::STEP - 1]);
      for (int c = 0; c < C; c++) {
        const WeightStep& ws = Direct ? direct[c] : unpacked[c * steps + s];
        acc[c][r] = Simd::fma(dot<F>(ws, xq), Simd::mul(ws.scale, x_scale), acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; c++)
    for (int r = 0; r < R; r++) y[(r0 + r) * out + c] = Simd::sum(acc[c][r]);
}

template <int64_t F, int C, bool Direct>
void tiles(const uint8_t* w, int64_t row_bytes, const WeightStep* unpacked, float* minima, const QuantizedRows& x,
           float* y, int64_t out) {
  const int64_t rows = x.rows;
  constexpr int R = Simd::TILE_R;
  static_assert(R == 4, "the switch below covers tails of up to 3 rows");
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile<F, C, R, Direct>(w, row_bytes, unpacked, minima, x, r, y, out);
  switch (rows - r) {
    case 3: tile<F, C, 3, Direct>(w, row_bytes, unpacked, minima, x, r, y, out); break;
    case 2: tile<F, C, 2, Direct>(w, row_bytes, unpacked, minima, x, r, y, out); break;
    case 1: tile<F, C, 1, Direct>(w, row_bytes, unpacked, minima, x, r, y, out); break;
  }
}

#else
// the portable path: C weight rows against all rows of x, one dot product at a time
template <int64_t F, int C>
void tiles(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* minima, float* y, int64_t out) {
  for (int c = 0; c < C; c++)
    for (int64_t r = 0; r < x.rows; r++) {
      const uint8_t* wb = w + c * row_bytes;
      float acc = 0.f;
      for (int64_t b = 0; b < x.blocks; b++, wb += bytes_of(F)) {
        const int8_t* xq = x.q.data() + (r * x.padded + b) * QK;
        int32_t sum = 0;
        if constexpr (F == Q8_0) {
          for (int64_t i = 0; i < QK; i++) sum += reinterpret_cast<const int8_t*>(wb + 2)[i] * xq[i];
        } else {
          const uint8_t* qs = block_quants(wb, F);
          for (int64_t i = 0; i < QK / 2; i++) sum += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + QK / 2];
        }
        acc = std::fma(static_cast<float>(sum), half_to_float(wb) * x.scale[r * x.padded + b], acc);
        minima[b * C + c] = block_minimum(wb, F);
      }
      y[r * out + c] = acc;
    }
}
#endif

// a thread's working memory, kept across its weight tiles
struct Scratch {
#ifdef XLLM_AVX2
  std::vector<WeightStep> unpacked;
#endif
  std::vector<float> minima;
};

// Q4: y[r, c] += the chain, block by block, of fma(weight row c's block minimum, x row r's scaled block sum), the
// same for every (r, c) whichever rows share the call: vectorized across x's rows 8 at a time (the sums are
// [block][row], padded), or across the 4 weight rows of a tile where x has one row.
template <int C>
void add_offsets(const float* minima, const QuantizedRows& x, float* y, int64_t out) {
  const int64_t rows = x.rows;
#ifdef XLLM_AVX2
  if (rows == 1 && C == 4) {
    __m128 chain = _mm_setzero_ps();
    for (int64_t b = 0; b < x.blocks; b++)
      chain = _mm_fmadd_ps(_mm_loadu_ps(minima + b * C), _mm_set1_ps(x.scaled_sum[b]), chain);
    _mm_storeu_ps(y, _mm_add_ps(_mm_loadu_ps(y), chain));
    return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    __m256 chain[C];
    for (int c = 0; c < C; c++) chain[c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < x.blocks; b++) {
      const __m256 scaled_sums = _mm256_loadu_ps(x.scaled_sum.data() + b * rows + r0);  // lanes past the rows: unused
      for (int c = 0; c < C; c++) chain[c] = _mm256_fmadd_ps(_mm256_set1_ps(minima[b * C + c]), scaled_sums, chain[c]);
    }
    for (int c = 0; c < C; c++) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, chain[c]);
      for (int64_t k = 0; k < std::min<int64_t>(8, rows - r0); k++) y[(r0 + k) * out + c] += lanes[k];
    }
  }
#else
  for (int64_t r = 0; r < rows; r++)
    for (int c = 0; c < C; c++) {
      float chain = 0.f;
      for (int64_t b = 0; b < x.blocks; b++) chain = std::fma(minima[b * C + c], x.scaled_sum[b * rows + r], chain);
      y[r * out + c] += chain;
    }
#endif
}

// C weight rows (from w) against all rows of x, into y[:, 0 .. C]
template <int64_t F, int C>
void weight_rows(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out, Scratch& scratch) {
  scratch.minima.resize(x.padded * C);
#ifdef XLLM_AVX2
  float* minima = scratch.minima.data();
  if (x.rows <= Simd::TILE_R) {
    tiles<F, C, true>(w, row_bytes, nullptr, minima, x, y, out);
  } else {
    const int64_t steps = x.padded / Simd::STEP;
    scratch.unpacked.resize(C * steps);
    for (int c = 0; c < C; c++)
      for (int64_t s = 0, b = 0; s < steps; s++, b += Simd::STEP) {
        prefetch(w + c * row_bytes + b * bytes_of(F));
        scratch.unpacked[c * steps + s] = unpack_step<F>(w + c * row_bytes + b * bytes_of(F),
                                                         Simd::STEP == 2 && b + 1 < x.blocks, minima + b * C + c, C);
      }
    tiles<F, C, false>(w, row_bytes, scratch.unpacked.data(), minima, x, y, out);
  }
#else
  tiles<F, C>(w, row_bytes, x, scratch.minima.data(), y, out);
#endif
  if constexpr (F != Q8_0) add_offsets<C>(scratch.minima.data(), x, y, out);
}

template <int64_t F>
void linear(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  constexpr int64_t C = Simd::TILE_C;
  at::parallel_for(0, (out + C - 1) / C, 4, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t o = begin * C; o < std::min(end * C, out); o += C) {
      if (o + C <= out) {
        weight_rows<F, C>(w + o * row_bytes, row_bytes, x, y + o, out, scratch);
      } else {
        for (int64_t c = o; c < out; c++) weight_rows<F, 1>(w + c * row_bytes, row_bytes, x, y + c, out, scratch);
      }
    }
  });
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
  if (format == Q8_0) linear<Q8_0>(wp, row_bytes, xq, yp, out);
  if (format == Q4_0) linear<Q4_0>(wp, row_bytes, xq, yp, out);
  if (format == Q4_1) linear<Q4_1>(wp, row_bytes, xq, yp, out);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_linear", &quantized_linear, "x @ W.T with W in a block format (0 Q8_0, 1 Q4_0, 2 Q4_1)");
  m.def("dequantize_rows", &dequantize_rows, "rows `ids` of a block-format weight as fp32");
  m.def("dequantize_into", &dequantize_into, "a whole block-format weight as fp32, into `out`");
}
