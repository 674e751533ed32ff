"""Shared fixtures: a real nats-server (JetStream on) for integration tests, and a client to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client

from shared.bus import connect
from xllm.natsd import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one nats-server for the whole session (starts in ~30 ms, stopped at the end).

    Shared: tests isolate themselves with unique names (instance ids, buckets) or by purging what
    they use first.
    """
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: str) -> AsyncIterator[Client]:
    """A connected client to `nats_server`, closed after the test."""
    client = await connect(nats_server, name="test", connect_wait_s=2.0)
    try:
        yield client
    finally:
        await client.close()


# Small KV caches and one torch thread per worker: the test machine has 2 cores and is shared.
SMALL_SYSTEM = ("--kv-cache-fraction", "0.02", "--worker-threads", "1", "--max-num-seqs", "32")
# The disaggregated system's decode worker scores every draft token proposed, so every serving test
# checks that speculation leaves the output as it was.
SPECULATING = ("--speculative", "ngram", "--draft-length", "fixed")


@pytest.fixture(scope="session")
def xllm_system(tmp_path_factory: pytest.TempPathFactory):
    """`xllm up` in its default disaggregated mode (1 prefill + 1 decode, speculating), real default model."""
    from xllm.bench.local_system import start_system, stop_system

    system = start_system(tmp_path_factory.mktemp("xllm-disagg"), *SMALL_SYSTEM, *SPECULATING)
    try:
        yield system
    finally:
        stop_system(system.proc)


@pytest.fixture(scope="session")
def xllm_colocated(tmp_path_factory: pytest.TempPathFactory):
    """`xllm up --mode colocated` with two workers, so one can die while the other serves."""
    from xllm.bench.local_system import start_system, stop_system

    system = start_system(
        tmp_path_factory.mktemp("xllm-colocated"), *SMALL_SYSTEM, "--mode", "colocated", "--decode", "2"
    )
    try:
        yield system
    finally:
        stop_system(system.proc)


@pytest.fixture(scope="session")
def xllm_server_url(xllm_system) -> str:
    return xllm_system.url
