"""Weights kept in block formats (shared/engine/quant.py, csrc/quant_kernels.cpp): each kernel against
dequantize-then-matmul, the loader and model keeping blocks, and the whole model against its fp32 self."""

from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F

from shared.engine import cpu_kernels, ops
from shared.engine.layers import Embedding, Linear
from shared.engine.loader import load_checkpoint
from shared.engine.model import CausalLM
from shared.engine.quant import GGML_TYPES, KERNEL_FORMATS, QuantizedWeight, plan, quantize_weight
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence
from tests.engine.gguf_writer import quantize_blocks, write_gguf
from tests.engine.helpers import greedy, make_engine, run_all

FORMATS = list(GGML_TYPES)
K_FORMATS = {"q4_k", "q5_k", "q6_k"}
WIDE = 256  # a K-quant super-block: the tests' input widths for K-quants are multiples of this
TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
pytestmark = pytest.mark.skipif(cpu_kernels.load_quant() is None, reason="the C++ quant kernels did not build")


def kernel_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """What the kernel computes: x's rows as Q8 blocks (fp32 scale amax/127, quants rounded half to even)
    times the dequantized weight, in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    quants = torch.round(blocks * torch.where(scale > 0, 1 / scale, 0))
    return (quants * scale).reshape(x.shape).double() @ weight.dequantize().double().T


SHAPES = [(1, 32), (3, 96), (7, 64), (33, 1536), (50, 576)]
K_SHAPES = [(1, WIDE), (3, 2 * WIDE), (7, WIDE), (33, 6 * WIDE), (50, 3 * WIDE)]


@pytest.mark.parametrize(
    "format,out,inp", [(f, *shape) for f in FORMATS for shape in (K_SHAPES if f in K_FORMATS else SHAPES)]
)
def test_the_kernel_equals_dequantize_then_matmul(format, out, inp):
    torch.manual_seed(out * inp)
    weight = quantize_blocks(torch.randn(out, inp) * 0.1, format)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17, 33):  # every tail of its 4-row groups
        x = torch.randn(rows, inp)
        x[0, :32] = 0  # an all-zero block: scale 0
        got = cpu_kernels.load_quant().quantized_linear(x, weight.data, KERNEL_FORMATS[format])
        expected = kernel_reference(x, weight)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max()), (format, rows)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("inp", [96, 576])  # an odd number of blocks, and an even one (K-quants: 1 and 3 super-blocks)
def test_the_kernel_gives_a_row_the_same_bits_whatever_shares_the_call(format, inp):
    """Rows land in different tiles (and offset chunks) as the row count changes; their arithmetic may not."""
    torch.manual_seed(inp)
    inp = inp if format not in K_FORMATS else WIDE * (1 if inp == 96 else 3)
    weight = quantize_blocks(torch.randn(70, inp) * 0.1, format)  # 70: whole tiles of weight rows and a tail
    x = torch.randn(41, inp)
    kernel = cpu_kernels.load_quant().quantized_linear
    alone = torch.cat([kernel(x[i : i + 1], weight.data, KERNEL_FORMATS[format]) for i in range(41)])
    for start, rows in [(0, 41), (3, 4), (5, 5), (1, 8), (9, 9), (7, 17), (2, 33)]:
        together = kernel(x[start : start + rows].contiguous(), weight.data, KERNEL_FORMATS[format])
        assert torch.equal(together, alone[start : start + rows]), (start, rows)


@pytest.mark.parametrize("format", FORMATS)
def test_dequantizing_equals_the_gguf_reference_bit_for_bit(format):
    torch.manual_seed(0)
    weight = torch.randn(40, 96 if format not in K_FORMATS else WIDE)
    weight[3] = 0
    blocks = quantize_blocks(weight, format)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks.data.numpy(), GGML_TYPES[format]).copy())
    assert torch.equal(blocks.dequantize(), expected)
    ids = torch.tensor([[5, 0], [39, 5]])
    assert torch.equal(blocks.rows(ids), expected[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        blocks.rows(torch.tensor([40]))


def test_outside_a_step_every_row_runs_in_the_kernel():
    torch.manual_seed(1)
    weight, bias = quantize_weight(torch.randn(70, 128), "q4_1"), torch.randn(70)
    packed = ops.prepack_weight(weight.dequantize())
    for rows in (1, 9, 200):
        x = torch.randn(rows, 128)
        expected = kernel_reference(x, weight) + bias
        assert torch.allclose(ops.quantized_linear(x, weight, bias, packed).double(), expected, atol=1e-4), rows


@pytest.mark.parametrize("format", FORMATS)
def test_in_a_step_a_row_gets_the_same_bits_whatever_shares_it(format):
    """Prompt rows run on the fp32 copy, generated rows in the integer kernel: each row's result is the same
    alone as in any mix, so the activation rounding of the kernel cannot make a token depend on batching."""
    torch.manual_seed(2)
    inp = 128 if format not in K_FORMATS else WIDE
    weight, bias = quantize_blocks(torch.randn(70, inp), format), torch.randn(70)
    packed = ops.prepack_weight(weight.dequantize())
    x, is_prompt = torch.randn(40, inp), [bool(b) for b in torch.rand(40) < 0.5]
    with ops.prompt_rows(is_prompt):
        together = ops.quantized_linear(x, weight, bias, packed)
    for i in range(40):
        with ops.prompt_rows([is_prompt[i]]):
            assert torch.equal(ops.quantized_linear(x[i : i + 1], weight, bias, packed), together[i : i + 1]), i
    generated = kernel_reference(x[[not p for p in is_prompt]], weight) + bias
    assert torch.allclose(together[[not p for p in is_prompt]].double(), generated, atol=1e-4)
    assert torch.allclose(together[is_prompt], F.linear(x[is_prompt], weight.dequantize(), bias), atol=1e-4)


def test_greedy_tokens_of_a_quantized_model_do_not_depend_on_batching(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir("llama_untied")))
    prompts = {f"p{n}": (list(range(5, 5 + n)), greedy(12, logprobs=0)) for n in (3, 6, 13, 40)}
    together = run_with_logprobs(make_engine(ckpt, quantization="q4_0"), prompts)
    engine = make_engine(ckpt, quantization="q4_0", enable_prefix_caching=False)
    for rid, request in prompts.items():
        assert run_with_logprobs(engine, {rid: request}) == {rid: together[rid]}, rid
    # and whether drafted and verified, or decoded (a repeating prompt: the n-gram drafts get accepted)
    repeating = {"r": ([5, 6, 7, 8, 9] * 8, greedy(24, logprobs=0))}
    speculating = make_engine(ckpt, quantization="q4_0", speculative="ngram", draft_length="fixed")
    assert run_with_logprobs(speculating, repeating) == run_with_logprobs(engine, repeating)
    assert speculating.speculator.accepted > 0


def run_with_logprobs(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Per request: its tokens' logprobs (each [logprob, top]) as floats, to compare bit for bit."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    results: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] += [lp for d in out.outputs for lp in d.logprobs]
    return results


@pytest.mark.parametrize(
    "kind,qtype",
    [("llama", gguf.GGMLQuantizationType.Q8_0), ("llama", gguf.GGMLQuantizationType.Q4_0)]
    + [("llama_wide", getattr(gguf.GGMLQuantizationType, k)) for k in ("Q4_K", "Q5_K", "Q6_K")],
)
def test_a_gguf_keeps_its_blocks_and_stays_close_to_its_dequantized_self(
    tmp_path, tiny_model_dir, tiny_hf_model, kind, qtype
):
    folder = load_checkpoint(str(tiny_model_dir(kind)))
    write_gguf(tmp_path / "m.gguf", folder, tiny_hf_model(kind).state_dict(), qtype)
    kept = load_checkpoint(str(tmp_path / "m.gguf"), keep_blocks=True)
    matrices = [w for name, w in kept.weights.items() if not name.endswith("norm.weight")]
    assert all(isinstance(w, QuantizedWeight) and w.format == qtype.name.lower() for w in matrices)
    blocks = make_engine(kept)
    fp32 = make_engine(load_checkpoint(str(tmp_path / "m.gguf")), quantization="none")
    linears = [m for m in blocks.model.modules() if isinstance(m, Linear | Embedding)]
    assert linears and all(m.quantized is not None and m.weight.numel() == 0 for m in linears)
    assert blocks.model.lm_head.quantized is blocks.model.model.embed_tokens.quantized  # tied
    assert not any(m.quantized is not None for m in fp32.model.modules() if isinstance(m, Linear | Embedding))
    ids = folder.tokenizer.encode("The capital of France is a city on the river")
    assert next_token_kl(blocks, fp32, ids) < 0.01


@pytest.mark.parametrize("format", ["q8_0", "q4_0"])
def test_a_hf_model_is_quantized_at_load(tiny_model_dir, format):
    ckpt = load_checkpoint(str(tiny_model_dir("llama_untied")))
    fp32 = make_engine(ckpt, quantization="none")
    quantized = make_engine(ckpt, quantization=format)
    model = quantized.model
    assert model.model.layers[0].mlp.gate_up_proj.quantized.format == format
    assert model.lm_head.quantized.format == "q8_0"  # the output projection keeps 8 bits, as llama.cpp's does
    assert model.model.embed_tokens.quantized.format == format
    ids = ckpt.tokenizer.encode("Once upon a time, in a land far away,")
    assert next_token_kl(quantized, fp32, ids) < (0.01 if format == "q8_0" else 0.1)
    assert run_all(quantized, {"g": (ids, greedy(8))})["g"][0][0]  # it generates


def test_packed_shards_in_different_formats_are_dequantized(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir("llama")))
    weights = dict(ckpt.weights)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    weights[q], weights[k] = quantize_weight(weights[q], "q8_0"), quantize_weight(weights[k], "q4_0")
    weights["model.layers.0.mlp.gate_proj.weight"] = quantize_weight(
        weights["model.layers.0.mlp.gate_proj.weight"], "q4_1"
    )
    weights["model.layers.0.mlp.up_proj.weight"] = quantize_weight(weights["model.layers.0.mlp.up_proj.weight"], "q4_1")
    model = CausalLM.build(ckpt.config, weights, 64, torch.device("cpu"), torch.float32, keep_blocks=True)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.quantized is None
    assert torch.equal(layer.self_attn.qkv_proj.shard(layer.self_attn.qkv_proj.weight, 1), weights[k].dequantize())
    assert layer.mlp.gate_up_proj.quantized.format == "q4_1"  # both shards q4_1: one weight of their rows
    gate_up = torch.cat(
        [
            weights["model.layers.0.mlp.gate_proj.weight"].dequantize(),
            weights["model.layers.0.mlp.up_proj.weight"].dequantize(),
        ]
    )
    assert torch.equal(layer.mlp.gate_up_proj.quantized.dequantize(), gate_up)


def test_where_block_formats_cannot_run_the_flag_says_so():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan("auto", cpu, torch.float32) == (True, None)
    assert plan("q4_0", cpu, torch.float32) == (False, "q4_0")
    assert plan("none", cpu, torch.float32) == (False, None)
    assert plan("auto", cuda, torch.bfloat16) == (False, None)  # auto: dequantized, as before
    with pytest.raises(ValueError, match="--quantization q8_0 runs on the CPU kernels"):
        plan("q8_0", cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        plan("int4", cpu, torch.float32)


def test_an_engine_told_none_dequantizes_blocks_it_is_given(tmp_path, tiny_model_dir, tiny_hf_model):
    folder = load_checkpoint(str(tiny_model_dir("llama")))
    write_gguf(tmp_path / "m.gguf", folder, tiny_hf_model("llama").state_dict(), gguf.GGMLQuantizationType.Q4_1)
    engine = make_engine(load_checkpoint(str(tmp_path / "m.gguf"), keep_blocks=True), quantization="none")
    assert not any(m.quantized is not None for m in engine.model.modules() if isinstance(m, Linear | Embedding))
    with pytest.raises(ValueError, match="must be one of"):
        make_engine(folder, quantization="fp4")


@pytest.mark.integration
def test_smollm2_in_its_own_q4_1_blocks_against_its_dequantized_self(smollm2_gguf):
    """The default model as shipped (Q4_1, a Q8_0 embedding) against the same weights in fp32: next-token KL
    and perplexity over a fixed text, every position on the integer kernel (the text goes in as draft tokens, which
    run as generated rows); and greedy output."""
    blocks = make_engine(load_checkpoint(str(smollm2_gguf), keep_blocks=True))
    fp32 = make_engine(load_checkpoint(str(smollm2_gguf)), quantization="none")
    ids = blocks.tokenizer.encode(TEXT)
    logp_blocks, logp_fp32 = log_probs(blocks, ids), log_probs(fp32, ids)
    kl = (logp_fp32.exp() * (logp_fp32 - logp_blocks)).sum(-1).mean().item()
    targets = torch.tensor(ids[1:])
    ppl_blocks = perplexity(logp_blocks, targets)
    ppl_fp32 = perplexity(logp_fp32, targets)
    print(f"mean KL {kl:.5f}; perplexity {ppl_blocks:.3f} in blocks vs {ppl_fp32:.3f} fp32")
    assert kl < 0.01
    assert abs(ppl_blocks / ppl_fp32 - 1) < 0.02
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "The chess club meets on"]
    requests = {p: (blocks.tokenizer.encode(p), greedy(8)) for p in prompts}
    same = run_all(blocks, requests), run_all(fp32, requests)
    agree = sum(same[0][p][0][0] == same[1][p][0][0] for p in prompts)
    assert agree >= 3, f"greedy output agreed on {agree} of {len(prompts)} prompts"


def next_token_kl(engine, reference, ids: list[int]) -> float:
    p, q = log_probs(reference, ids), log_probs(engine, ids)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def log_probs(engine, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the logits at every position of `ids` but the last, in one step: the text after its
    first token goes in as draft tokens, whose logits the runner returns."""
    seq = Sequence("text", ids[:1], SamplingParams())
    seq.spec_token_ids = ids[1:]
    assert engine.block_manager.allocate(seq, len(ids))
    logits, _ = engine.runner.run([ScheduledSeq(seq, len(ids), len(ids) - 1)])
    engine.block_manager.free(seq)
    return torch.log_softmax(logits[:-1].double(), -1)


def perplexity(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    return log_probs.gather(1, targets.unsqueeze(1)).mean().neg().exp().item()
