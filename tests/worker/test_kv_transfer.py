"""The KV data plane: an export written layer by layer is sent as it is written, over shared memory or
TCP, and lands bit-identical through the reader's `write`; the trailer carries what the decode side
needs; segments are reused only once received."""

import asyncio
import threading

import pytest
import torch

import services.worker.kv_transfer
from services.worker.kv_transfer import KvDataServer, KvExport, KvTransferError, import_kv
from services.worker.shm import SegmentPool, attach_if_there
from shared.engine.config import ModelConfig
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner

TINY = ModelConfig(
    architecture="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
LAYERS = TINY.num_hidden_layers
TRAILER = {"sequences": [{"index": 0, "token_id": 7, "rng_state": None}]}


def runner() -> ModelRunner:
    r = ModelRunner(CausalLM(TINY), num_blocks=12, block_size=4, device=torch.device("cpu"), dtype=torch.float32)
    r.k_cache.normal_()
    r.v_cache.normal_()
    return r


HOST = "127.0.0.1"  # the exporter's host; a reader there uses shared memory, one elsewhere TCP


def into(dst: ModelRunner, blocks: list[int]):
    """The reader's `write`: every layer into `blocks` of `dst` (the decode worker does it on its engine
    thread)."""

    async def write(kv: torch.Tensor) -> None:
        dst.write_kv(blocks, kv)

    return write


async def read(export: KvExport, port: int, dst: ModelRunner, blocks: list[int], reader_host: str):
    return await import_kv(export.handle(HOST, port), dst.kv_layout, len(blocks), reader_host, into(dst, blocks))


@pytest.fixture
async def server():
    s = KvDataServer()
    await s.start("127.0.0.1")
    yield s
    await s.stop()


def landed(dst: ModelRunner, src: ModelRunner, dst_blocks: list[int], src_blocks: list[int], layer: int) -> bool:
    return torch.equal(dst.k_cache[layer, dst_blocks], src.k_cache[layer, src_blocks]) and torch.equal(
        dst.v_cache[layer, dst_blocks], src.v_cache[layer, src_blocks]
    )


async def test_over_tcp_layers_are_sent_while_later_ones_are_still_being_computed(server, monkeypatch):
    """The writer (an engine thread) does not write layer 1 until layer 0 went to the reader."""
    src, dst = runner(), runner()
    export = KvExport("req", src.kv_layout, num_tokens=10)
    server.exports["req"] = export
    sent = threading.Event()
    send = services.worker.kv_transfer._send

    async def sending(writer, kind: bytes, payload: bytes) -> None:
        await send(writer, kind, payload)
        if kind == b"L" and payload:
            sent.set()

    monkeypatch.setattr(services.worker.kv_transfer, "_send", sending)
    loop = asyncio.get_running_loop()

    def engine_thread() -> None:
        for layer in range(LAYERS):
            export.stream_layer(src, layer, [5, 2, 7])
            if layer == 0 and not sent.wait(5):
                raise AssertionError("layer 0 was not sent before layer 1 was written")
        loop.call_soon_threadsafe(export.finish, TRAILER)

    importing = asyncio.create_task(read(export, server.port, dst, [0, 1, 2], "elsewhere"))
    await export.connected.wait()  # the prefill worker starts the prompt once the reader is there
    await asyncio.wait_for(asyncio.to_thread(engine_thread), 10)
    stats, trailer = await asyncio.wait_for(importing, 10)
    assert trailer == TRAILER and stats.bytes == export.nbytes > 0
    assert all(landed(dst, src, [0, 1, 2], [5, 2, 7], layer) for layer in range(LAYERS))
    await asyncio.wait_for(export.received.wait(), 5)
    name = export.shm.name
    export.close()
    assert attach_if_there(name) is None  # no pool: unlinked


@pytest.mark.parametrize("reader_host", [HOST, "elsewhere"])  # shared memory, TCP
async def test_written_layers_land_bit_identical(server, reader_host):
    src, dst = runner(), runner()
    export = KvExport("req", src.kv_layout, num_tokens=10)
    server.exports["req"] = export
    importing = asyncio.create_task(read(export, server.port, dst, [0, 1, 2], reader_host))
    await asyncio.to_thread(lambda: [export.stream_layer(src, layer, [5, 2, 7]) for layer in range(LAYERS)])
    await asyncio.to_thread(export.write_rest, src, [5, 2, 7])  # all of it for a reader on this host
    export.finish(TRAILER)
    stats, trailer = await asyncio.wait_for(importing, 10)
    assert trailer == TRAILER and stats.bytes == export.nbytes
    assert all(landed(dst, src, [0, 1, 2], [5, 2, 7], layer) for layer in range(LAYERS))
    export.close()


async def test_an_early_trailer_ends_the_stream(server):
    """The request finished on its first token (or failed) before every layer was written."""
    src, dst = runner(), runner()
    export = KvExport("req", src.kv_layout, num_tokens=4)
    server.exports["req"] = export
    export.finish({"done": True})
    before = dst.k_cache.clone()
    stats, trailer = await read(export, server.port, dst, [0], "elsewhere")
    assert trailer == {"done": True} and stats.bytes == 0
    assert torch.equal(dst.k_cache, before)  # nothing to write
    export.close()


async def test_sequences_after_missing_layers_are_an_error(server):
    src, dst = runner(), runner()
    export = KvExport("req", src.kv_layout, num_tokens=4)
    server.exports["req"] = export
    export._write(src, 0, [1])  # one layer of three... and then the trailer says the request goes on
    export.finish(TRAILER)
    with pytest.raises(KvTransferError):
        await read(export, server.port, dst, [0], "elsewhere")
    export.close()


async def test_layout_mismatch_and_a_gone_export(server):
    src, dst = runner(), runner()
    export = KvExport("req", src.kv_layout, num_tokens=8)
    with pytest.raises(KvTransferError):
        await read(export, server.port, dst, [0], HOST)  # 2 blocks into 1
    export.close()  # lease lapsed: the export is gone
    _, trailer = await read(export, server.port, dst, [0, 1], "elsewhere")
    assert "error" in trailer


async def test_a_received_export_s_segment_is_reused_and_a_lapsed_one_unlinked(server):
    src, dst = runner(), runner()
    segments = SegmentPool()

    async def export_of(rid: str, blocks: list[int]) -> KvExport:
        export = KvExport(rid, src.kv_layout, num_tokens=4 * len(blocks), segments=segments)
        server.exports[rid] = export
        export.write_rest(src, blocks)
        export.finish(TRAILER)
        return export

    first = await export_of("a", [1, 2])
    await read(first, server.port, dst, [0, 1], HOST)
    await asyncio.wait_for(first.received.wait(), 5)
    first.close()  # received: the segment stays mapped, for the next export
    assert attach_if_there(first.shm.name) is not None
    src.k_cache.normal_()  # new contents: the reused segment must carry these, not the old ones
    second = await export_of("b", [3])
    assert second.shm.name == first.shm.name
    await read(second, server.port, dst, [4], HOST)
    assert landed(dst, src, [4], [3], 0)
    third = await export_of("c", [3])  # nobody reads it: the lease lapses
    third.close()
    assert attach_if_there(third.shm.name) is None
    segments.close()
