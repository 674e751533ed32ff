// Matmuls with weights kept in GGUF's block formats (quant_blocks.h). The way llama.cpp reaches memory
// bandwidth on AVX2 CPUs: each row of x is quantized once to int8 blocks (Q8: a scale per block), then every
// block pair is an integer dot product (u8 x s8 multiply-adds into int32: VNNI's dpbusd where the CPU has it,
// else maddubs + madd) and one float FMA with the two scales. The unsigned operand is the weight's quants for Q4
// (nibbles 0..15), x + 128 for Q8_0 with VNNI (minus 128 times the weight's sums, folded into the integer sums'
// start), |w| for Q8_0 without (w's sign moved onto x); Q4_0's offset of 8 and Q4_1's (and Q4_K's) minimum enter
// through x's block sums. Q4_K runs as Q4_1 blocks whose scale and minimum come from its super-block's, Q5_K the
// same with 5-bit quants (0..31, still unsigned), Q6_K as Q8_0 blocks with a scale per half.
//
// quant_groups.h runs several weight rows per vector (4 with AVX-512 VNNI, 2 with AVX2), quant_scalar.h one dot
// product at a time elsewhere. Each gives a row the same result whatever rows share the call (the engine relies
// on this: see ops.py). Built with -march=native (shared/engine/cpu_kernels.py), so the path is the CPU's own.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "quant_blocks.h"

#ifdef XLLM_AVX2
#include "quant_groups.h"
namespace kernel = quant::groups;
#else
#include "quant_scalar.h"
namespace kernel = quant::scalar;
#endif

using namespace quant;

void check_weight(const torch::Tensor& weight, int64_t format, int64_t in);
torch::Tensor dequantize_rows(const torch::Tensor& weight, int64_t format, int64_t in, const torch::Tensor& ids);
void dequantize_into(const torch::Tensor& weight, int64_t format, torch::Tensor& out);

namespace {

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / QK;
  QuantizedRows out{rows, blocks, std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks),
                    std::vector<float>(rows * blocks)};
  at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const float* v = x + i * QK;
      float amax = 0.f;
      for (int64_t j = 0; j < QK; j++) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = out.q.data() + i * QK;
      int32_t sum = 0;
      for (int64_t j = 0; j < QK; j++) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));
        sum += q[j];
      }
      out.scale[i] = d;
      out.scaled_sum[i] = d * static_cast<float>(sum);
    }
  });
  return out;
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
  if (format == Q8_0) kernel::linear<Q8_0>(wp, row_bytes, xq, yp, out);
  if (format == Q4_0) kernel::linear<Q4_0>(wp, row_bytes, xq, yp, out);
  if (format == Q4_1) kernel::linear<Q4_1>(wp, row_bytes, xq, yp, out);
  if (format == Q4_K) kernel::linear<Q4_K>(wp, row_bytes, xq, yp, out);
  if (format == Q5_K) kernel::linear<Q5_K>(wp, row_bytes, xq, yp, out);
  if (format == Q6_K) kernel::linear<Q6_K>(wp, row_bytes, xq, yp, out);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_linear", &quantized_linear, "x @ W.T with W in a block format (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K, 4 Q6_K, 5 Q5_K)");
  m.def("dequantize_rows", &dequantize_rows, "rows `ids` of a block-format weight as fp32");
  m.def("dequantize_into", &dequantize_into, "a whole block-format weight as fp32, into `out`");
}
