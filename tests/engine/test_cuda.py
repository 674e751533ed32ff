"""The same engine on a CUDA device (runs only where one exists): greedy tokens equal the CPU engine's."""

import pytest
import torch

from shared.engine.loader import load_checkpoint
from tests.engine.helpers import greedy, make_engine, run_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_greedy_equals_cpu(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir("qwen3")))
    reqs = {f"r{i}": ([11 + i, 22, 33, 44 + i] * (i + 1), greedy(16)) for i in range(4)}
    cpu = run_all(make_engine(ckpt), reqs)
    gpu = run_all(make_engine(ckpt, device="cuda", dtype="fp32"), reqs)
    assert {k: v[0][0] for k, v in gpu.items()} == {k: v[0][0] for k, v in cpu.items()}
