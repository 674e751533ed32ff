"""Smoke run of `xllm bench serve` against the real gateway from `xllm up` (a few requests).

`xllm_server_url` is the base URL of a running `xllm up`, provided by tests/conftest.py.
"""

import asyncio
import json

import pytest

from xllm.bench import serve


@pytest.mark.integration
async def test_bench_serve_against_xllm_up(xllm_server_url, tmp_path):
    args = [
        "--base-url",
        xllm_server_url,
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--input-len",
        "32",
        "--output-len",
        "8",
        "--ignore-eos",
        "--goodput",
        "ttft:60000",
        "--result-dir",
        str(tmp_path),
        "--result-name",
        "smoke",
        "--no-progress",
        "--timeout",
        "120",
    ]
    assert await asyncio.wait_for(asyncio.to_thread(serve.main, args), 600) == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    s = doc["runs"][0]["summary"]
    assert s["completed"] == 4 and s["failed"] == 0
    assert s["total_output_tokens"] == 4 * 8  # ignore_eos: every request gives max_tokens
    assert s["usage_missing"] == 0
    # The test system speculates: an accepted draft streams several tokens in one chunk, never fewer than one.
    assert all(0 < r["chunks"] <= r["output_tokens"] for r in doc["runs"][0]["requests"])
    assert s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0
    png = tmp_path / "smoke-latency-cdf.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 0
