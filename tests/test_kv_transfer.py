"""The KV data plane: an export read back over shared memory and over TCP lands bit-identical."""

import pytest
import torch

from shared.engine.config import ModelConfig
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner
from shared.kv_transfer import KvDataServer, KvExport, KvTransferError, SegmentPool, _shm_exists, import_kv

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def runner() -> ModelRunner:
    return ModelRunner(CausalLM(TINY), num_blocks=12, block_size=4, device=torch.device("cpu"),
                       dtype=torch.float32)


@pytest.mark.parametrize("local_host", ["here", "elsewhere"])  # same host: shm; another: TCP
async def test_export_import_roundtrip(local_host):
    src, dst = runner(), runner()
    src.k_cache.normal_()
    src.v_cache.normal_()
    server = KvDataServer()
    await server.start("127.0.0.1")
    export = KvExport("req", src, [5, 2, 7], num_tokens=10)
    server.exports["req"] = export
    try:
        host = "here" if local_host == "here" else "127.0.0.1"
        stats = await import_kv(export.handle(host, server.port), dst, [0, 1, 2], local_host)
    finally:
        export.close()
        await server.stop()
    assert stats.bytes == export.nbytes > 0
    assert torch.equal(dst.k_cache[:, :3], src.k_cache[:, [5, 2, 7]])
    assert torch.equal(dst.v_cache[:, :3], src.v_cache[:, [5, 2, 7]])
    assert not _shm_exists(export.shm.name)  # the exporter's close unlinked it


async def test_layout_mismatch_is_refused():
    src, dst = runner(), runner()
    export = KvExport("req", src, [1, 2], num_tokens=8)
    try:
        with pytest.raises(KvTransferError):
            await import_kv(export.handle("here", None), dst, [0], "here")
    finally:
        export.close()


async def test_gone_export_over_tcp_is_an_error():
    src, dst = runner(), runner()
    server = KvDataServer()
    await server.start("127.0.0.1")
    export = KvExport("req", src, [1], num_tokens=4)
    handle = export.handle("127.0.0.1", server.port)
    export.close()  # lease lapsed: the export is gone
    try:
        with pytest.raises(KvTransferError):
            await import_kv(handle, dst, [0], "elsewhere")
    finally:
        await server.stop()


async def test_a_received_export_s_segment_is_reused_and_a_lapsed_one_unlinked():
    src, dst = runner(), runner()
    segments = SegmentPool()
    src.k_cache.normal_()
    first = KvExport("a", src, [1, 2], num_tokens=8, segments=segments)
    await import_kv(first.handle("here", None), dst, [0, 1], "here")
    first.close(received=True)  # the decode worker acked: the segment stays mapped, for the next one
    assert _shm_exists(first.shm.name)
    src.k_cache.normal_()  # new contents: the reused segment must carry these, not the old ones
    second = KvExport("b", src, [3], num_tokens=4, segments=segments)
    assert second.shm.name == first.shm.name
    await import_kv(second.handle("here", None), dst, [4], "here")
    assert torch.equal(dst.k_cache[:, 4], src.k_cache[:, 3])
    second.close(received=False)  # no ack (lease lapsed): a late reader must find nothing
    assert not _shm_exists(second.shm.name)
    segments.close()
