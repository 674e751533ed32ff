// The block-format matmul in plain C++, for CPUs without AVX2 + FMA + F16C: one dot product at a time, the same
// integer sums as the vector paths (quant_groups.h). Included by quant_kernels.cpp.
#pragma once

#include <ATen/Parallel.h>

#include "quant_blocks.h"

namespace quant::scalar {

template <int64_t F>
float dot_k(const uint8_t* w, const QuantizedRows& x, int64_t r) {
  float acc = 0.f, offset = 0.f;
  for (int64_t b = 0; b < x.blocks; b++) {
    const KBlock block = k_block<F>(w, b);
    const int8_t* xq = &x.q[(r * x.blocks + b) * QK];
    int32_t sum = 0;
    for (int64_t i = 0; i < QK; i++) sum += k_quant(block, i) * xq[i];
    offset = std::fma(block.minimum, x.scaled_sum[r * x.blocks + b], offset);
    acc = std::fma(static_cast<float>(sum), block.scale * x.scale[r * x.blocks + b], acc);
  }
  return acc + offset;
}

float dot_6(const uint8_t* w, const QuantizedRows& x, int64_t r) {
  float acc = 0.f;
  for (int64_t b = 0; b < x.blocks; b++) {
    const Q6Block block = q6_k_block(w, b);
    const int8_t* xq = &x.q[(r * x.blocks + b) * QK];
    int32_t sums[2] = {};
    for (int64_t i = 0; i < QK; i++) sums[i / 16] += q6_k_quant(block, i) * xq[i];
    const float x_scale = x.scale[r * x.blocks + b];
    acc = std::fma(static_cast<float>(sums[0]), block.scale[0] * x_scale, acc);
    acc = std::fma(static_cast<float>(sums[1]), block.scale[1] * x_scale, acc);
  }
  return acc;
}

template <int64_t F>
float dot_legacy(const uint8_t* w, const QuantizedRows& x, int64_t r) {  // Q8_0, Q4_0, Q4_1
  float acc = 0.f, offset = 0.f;
  for (int64_t b = 0; b < x.blocks; b++, w += bytes_of(F)) {
    const int8_t* xq = &x.q[(r * x.blocks + b) * QK];
    int32_t sum = 0;
    if constexpr (F == Q8_0) {
      for (int64_t i = 0; i < QK; i++) sum += reinterpret_cast<const int8_t*>(w + 2)[i] * xq[i];
    } else {
      const uint8_t* qs = block_quants(w, F);
      for (int64_t i = 0; i < QK / 2; i++) sum += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + QK / 2];
      offset = std::fma(block_minimum(w, F), x.scaled_sum[r * x.blocks + b], offset);
    }
    acc = std::fma(static_cast<float>(sum), half_to_float(w) * x.scale[r * x.blocks + b], acc);
  }
  return acc + offset;
}

template <int64_t F>
float dot(const uint8_t* w, const QuantizedRows& x, int64_t r) {
  if constexpr (F == Q4_K || F == Q5_K) {
    return dot_k<F>(w, x, r);
  } else if constexpr (F == Q6_K) {
    return dot_6(w, x, r);
  } else {
    return dot_legacy<F>(w, x, r);
  }
}

template <int64_t F>
void linear(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, float* y, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o++)
      for (int64_t r = 0; r < x.rows; r++) y[r * out + o] = dot<F>(w + o * row_bytes, x, r);
  });
}

}  // namespace quant::scalar
