"""The step-driven engine on its own thread, for asyncio services.

torch releases the GIL inside its kernels, so the event loop (NATS, heartbeats, HTTP) stays
responsive while a step runs. All engine state is touched only on the engine thread: callers
submit closures, and outputs come back through per-request asyncio queues. What the event loop may
read directly: `stats` (a snapshot the engine thread replaces after every step) and the engine's
limits, which never change once it is built (`validate`, `kv_layout`). Anything else (the KV hand-off,
`LLMEngine.handoff`, included) goes through `call`.
"""

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from shared.engine.expert_parallel import ExpertGroupError
from shared.engine.llm_engine import LLMEngine, RequestOutput
from shared.engine.model_runner import KvLayout
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams

log = structlog.get_logger()


class EngineDeadError(RuntimeError):
    """A step failed (a bug, not bad input): the requests it was running are failed with this."""


class EngineLostError(EngineDeadError):
    """The engine cannot run any more (a rank of its expert-parallel group is gone): its requests are failed
    with this, and the worker leaves, so the gateway fails them over."""


class RequestAborted(Exception):
    """Raised to whoever is reading the outputs of a request that was aborted."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: set[asyncio.Future] = set()  # `call`s not answered yet
        self.stats: dict[str, int] = engine.stats()  # replaced, never mutated, by the engine thread
        self.on_lost: Callable[[Exception], None] = lambda error: None  # on the event loop, once
        self.lost: Exception | None = None  # why the engine cannot run any more (set on the event loop)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10)
        for future in list(self._calls):  # queued behind the last step: they will never run
            _set_exception(future, EngineDeadError("the engine stopped"))
        if not self._thread.is_alive():
            await asyncio.to_thread(self.engine.close)

    # ---- API for the event loop ---------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, images: list[ImageInput] = ()) -> None:
        """InvalidRequestError unless this engine can run the request (reads only fixed limits)."""
        self.engine.validate(prompt_token_ids, params, images)

    @property
    def kv_layout(self) -> KvLayout:
        """The KV cache's layout, as a KV copy between workers needs it (ModelRunner.kv_layout)."""
        return self.engine.runner.kv_layout

    @property
    def hidden_size(self) -> int:
        """The model's hidden size (what an image's embeddings must have), fixed at start."""
        return self.engine.model_config.hidden_size

    @property
    def speculative(self) -> str:
        """The speculative decoding method ("none" when off), fixed at start."""
        return self.engine.config.speculative

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        images: list[ImageInput] | None = None,
    ) -> asyncio.Queue:
        """Queue a request its caller validated; its outputs (or the error that refused it) arrive on the
        queue."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream = self.register_stream(request_id)

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, priority, images=images)
            except Exception as e:
                self._loop.call_soon_threadsafe(self._fail, request_id, e)

        if self.lost is None:
            self._submit(add)
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; cancelling the iteration aborts it."""
        stream = self.add_request(request_id, prompt_token_ids, params, priority)
        async for out in self.outputs(request_id, stream):
            yield out

    async def outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished or item.held  # held: the rest happens on another worker
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request now (its blocks are freed on the engine thread at the next turn)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put_nowait(RequestAborted(request_id))
        self._submit(lambda: self.engine.abort_request(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread, between steps, and return its result. Once this returns or
        raises, even when cancelled, fn has finished: it may be using memory the caller frees next."""
        if self.lost is not None:  # no thread would ever run it
            raise EngineLostError(str(self.lost))
        future = self._loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:
                self._loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)

        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        self._submit(run)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    def register_stream(self, request_id: str) -> asyncio.Queue:
        """A stream for a request added through `call` (e.g. one imported from a prefill worker); once the
        engine is lost, one that says so at once (no thread would ever run the request)."""
        stream: asyncio.Queue = asyncio.Queue()
        if self.lost is not None:
            stream.put_nowait(EngineLostError(str(self.lost)))
        else:
            self._streams[request_id] = stream
        return stream

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # ---- the engine thread --------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            while not self._commands.empty():
                self._run_command(self._commands.get())
            self.stats = self.engine.stats()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()  # a command, or stop()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except ExpertGroupError as e:  # for good: fail everything, stop stepping, tell the worker
                log.error("engine_lost", error=str(e))
                self._fail_all(EngineLostError(str(e)))
                self._loop.call_soon_threadsafe(self._lose, e)
                return
            except Exception as e:  # a bug, not bad input: fail what is running, keep serving
                log.exception("engine step failed; aborting running requests")
                self._fail_all(e)
                continue
            for out in outputs:
                self._loop.call_soon_threadsafe(self._deliver, out)

    def _run_command(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:
            log.exception("engine command failed")

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # aborted meanwhile
        stream.put_nowait(out)
        if out.finished or out.held:
            del self._streams[out.request_id]

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            lost = error if isinstance(error, EngineDeadError) else EngineDeadError(str(error))
            self._loop.call_soon_threadsafe(self._fail, request_id, lost)

    def _lose(self, error: Exception) -> None:
        """On the event loop, once the engine thread has stopped for good: what it will never run (requests
        and calls queued behind the failed step) fails now, and so does anything added from now on."""
        self.lost = error
        for request_id in list(self._streams):
            self._fail(request_id, EngineLostError(str(error)))
        for future in list(self._calls):
            _set_exception(future, EngineLostError(str(error)))
        self.on_lost(error)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put_nowait(error)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


__all__ = ["AsyncEngine", "EngineDeadError", "RequestAborted", "RequestOutput"]
