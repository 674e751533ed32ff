"""Long generations through `xllm up`, in both modes: every token arrives, none fails over.

A 2000-token stream once ended with 503 "instance left the registry" while its worker was serving it:
a registry read that came back short was taken for the death of every instance.
"""

import asyncio

import aiohttp
import pytest

from tests.integration.streams import completion_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("system", ["xllm_system", "xllm_colocated"])
async def test_a_2000_token_stream_and_six_700_token_streams_finish_with_every_token(system, request):
    system = request.getfixturevalue(system)
    log_before = len(system.log("gateway"))
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        streams = await asyncio.gather(
            completion_stream(s, system.url, "The long story begins:", 2000),
            *(completion_stream(s, system.url, f"Story number {i}:", 700) for i in range(6)),
        )
    for stream, want in zip(streams, [2000] + [700] * 6):
        assert (stream.status, stream.errors, stream.body) == (200, [], "")
        assert (stream.tokens, stream.finish_reason) == (want, "length")
    failovers = system.log("gateway")[log_before:].count('"event": "failover"')
    assert failovers == 0, "a request failed over while every worker was serving"
