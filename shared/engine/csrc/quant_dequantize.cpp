// Block-format weights back to fp32: rows of an embedding, or a whole weight into a kept buffer. Bit for bit
// what the gguf package's reference gives (d * q + m, fused or not the same: the product is exact in fp32).
// K-quants in plain C++: they are dequantized only for the fp32 copy prompt tokens run on (ops.py), once at load.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "quant_blocks.h"

using namespace quant;

namespace {

#ifdef XLLM_AVX2
// a block's 32 quants as bytes in element order: Q8_0's signed, Q4's unsigned nibbles (low nibbles are elements
// 0..15, high 16..31)
__m256i quants(const uint8_t* w, int64_t format) {
  if (format == Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_quants(w, format)));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0f));
}
#endif

template <int64_t F>
void dequantize_row_k(const uint8_t* w, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; b++, out += QK) {
    const KBlock block = k_block<F>(w, b);
    for (int64_t i = 0; i < QK; i++) out[i] = block.scale * static_cast<float>(k_quant(block, i)) + block.minimum;
  }
}

void dequantize_row_6(const uint8_t* w, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; b++, out += QK) {
    const Q6Block block = q6_k_block(w, b);
    for (int64_t i = 0; i < QK; i++) out[i] = block.scale[i / 16] * static_cast<float>(q6_k_quant(block, i));
  }
}

void dequantize_row(const uint8_t* w, int64_t format, int64_t blocks, float* out) {
  if (format == Q4_K) return dequantize_row_k<Q4_K>(w, blocks, out);
  if (format == Q5_K) return dequantize_row_k<Q5_K>(w, blocks, out);
  if (format == Q6_K) return dequantize_row_6(w, blocks, out);
  const int64_t bytes = bytes_of(format);
  for (int64_t b = 0; b < blocks; b++, w += bytes, out += QK) {
    const float d = half_to_float(w), m = block_minimum(w, format);
#ifdef XLLM_AVX2
    // the 32 quants as bytes in element order, then 8 at a time: widen to int32, to float, d * q + m
    alignas(32) int8_t bytes32[QK];
    _mm256_store_si256(reinterpret_cast<__m256i*>(bytes32), quants(w, format));
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
    const uint8_t* qs = block_quants(w, format);
    for (int64_t i = 0; i < QK / 2; i++) {
      out[i] = d * (qs[i] & 0x0f) + m;
      out[i + QK / 2] = d * (qs[i] >> 4) + m;
    }
#endif
  }
}

}  // namespace

void check_weight(const torch::Tensor& weight, int64_t format, int64_t in) {
  TORCH_CHECK(weight.dtype() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(), "weight: uint8 [out, row bytes]");
  TORCH_CHECK(format >= Q8_0 && format <= Q5_K, "unknown block format ", format);
  TORCH_CHECK(weight.size(1) == row_bytes_of(format, in), "weight rows do not hold ", in, " values");
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

// the whole weight dequantized into `out` ([out rows, in] fp32, contiguous)
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
