"""The C++ CPU kernels against the torch ops they replace (which CUDA and other dtypes still run)."""

import pytest
import torch
import torch.nn.functional as F

from shared.engine import cpu_kernels, ops
from shared.engine.attention import _attend
from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence
from tests.engine.helpers import greedy, make_engine, run_all


@pytest.fixture
def torch_ops(monkeypatch):
    """Within the test, ops take their torch path (as on CUDA)."""

    def use_torch():
        monkeypatch.setattr(cpu_kernels, "usable", lambda tensor: False)

    return use_torch


def test_kernels_build():
    # the Makefile builds them at setup; without them every op silently takes the slow torch path
    assert cpu_kernels.load() is not None


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(37, 24)  # odd sizes: the kernel's tails
    b = torch.randn(37) if bias else None
    x = torch.randn(rows, 24)
    expected = F.linear(x, weight, b)
    torch.testing.assert_close(ops.linear(x, weight, b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear(x, weight, b, ops.prepack_weight(weight)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # large activations: exp far from 0 (silu)
def test_norms_and_silu_match_torch(torch_ops, scale):
    torch.manual_seed(0)
    x, residual, weight = torch.randn(5, 48) * scale, torch.randn(5, 48), torch.randn(48)
    gate_up = torch.randn(5, 96) * scale
    fast = (ops.rms_norm(x, weight, 1e-6), ops.silu_and_mul(gate_up))
    fast_residual = residual.clone()
    fast_added = ops.add_rms_norm_(x, fast_residual, weight, 1e-6)
    torch_ops()
    slow = (ops.rms_norm(x, weight, 1e-6), ops.silu_and_mul(gate_up))
    slow_residual = residual.clone()
    slow_added = ops.add_rms_norm_(x, slow_residual, weight, 1e-6)
    for got, expected in zip(fast, slow):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(fast_residual, slow_residual)
    torch.testing.assert_close(fast_added, slow_added, rtol=1e-5, atol=1e-5)


def test_rotary_and_cache_matches_torch(torch_ops):
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(tokens, dim // 2), torch.randn(tokens, dim // 2)
    slots = torch.tensor([7, 0, 3, 12, 9, 1])

    def run():
        q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided views
        k_cache, v_cache = torch.zeros(4, 4, kv_heads, dim), torch.zeros(4, 4, kv_heads, dim)
        q, k = ops.rotary_and_cache(
            q.view(tokens, heads, dim),
            k.view(tokens, kv_heads, dim),
            v.view(tokens, kv_heads, dim),
            cos,
            sin,
            k_cache,
            v_cache,
            slots,
        )
        return q, k, k_cache, v_cache

    fast = run()
    torch_ops()
    for got, expected in zip(fast, run()):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 8, 2), (5, 8, 2), (3, 4, 4)])
def test_paged_decode_attention_matches_sdpa(batch, heads, kv_heads):
    torch.manual_seed(batch)
    block_size, dim, num_blocks = 4, 16, 64
    k_cache, v_cache = (
        torch.randn(num_blocks, block_size, kv_heads, dim),
        torch.randn(num_blocks, block_size, kv_heads, dim),
    )
    lens = torch.randint(1, 30, (batch,))
    max_blocks = -(-int(lens.max()) // block_size)
    tables = torch.randperm(num_blocks)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, heads, dim)
    mask = (torch.arange(max_blocks * block_size) < lens.unsqueeze(1)).view(batch, 1, 1, -1)
    expected = _attend(q.unsqueeze(2), k_cache, v_cache, tables, mask, dim**-0.5).squeeze(2)
    for threads in (1, 2):  # a task per sequence, or per KV head of one when there are few sequences
        torch.set_num_threads(threads)
        got = cpu_kernels.load().paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.set_num_threads(2)


def test_paged_decode_attention_rejects_a_length_beyond_its_blocks():
    cache = torch.zeros(4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the block table"):
        cpu_kernels.load().paged_decode_attention(
            torch.zeros(1, 1, 8), cache, cache, torch.tensor([[0]]), torch.tensor([5]), 1.0
        )


def test_model_with_and_without_kernels(tiny_model_dir, torch_ops):
    """The whole forward (prefill chunk, decode batch) agrees between the kernels and the torch path."""
    ckpt = load_checkpoint(str(tiny_model_dir("qwen3")))  # qk-norm and untied: every op of the model
    prompts = {"a": ([5, 9, 200, 31, 7, 7, 64, 1000, 12], greedy(12)), "b": ([17, 3, 3], greedy(12))}

    def logits_and_tokens():
        engine = make_engine(ckpt)
        seq = Sequence("x", prompts["a"][0], SamplingParams())
        assert engine.block_manager.allocate(seq, len(seq.token_ids))
        logits, _ = engine.runner.run([ScheduledSeq(seq, len(seq.token_ids))])
        engine.block_manager.free(seq)
        return logits, run_all(engine, prompts)

    fast_logits, fast_out = logits_and_tokens()
    torch_ops()
    slow_logits, slow_out = logits_and_tokens()
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-4)
    assert fast_out == slow_out
