"""The encoder service over a real NATS: embeddings equal the engine's own encoder's, read through shared
memory and over TCP; a repeated image is served from its cache; concurrent requests share one batch;
bad images are refused; an evicted image reads as gone (the worker then encodes it itself)."""

import asyncio
from dataclasses import asdict

import numpy as np
import pytest
import torch

from services.encoder.config import EncoderConfig
from services.encoder.service import EncoderService
from services.encoder.transfer import read_embeddings
from shared import bus, subjects
from shared.engine.loader import load_checkpoint
from shared.images import ImageProcessorConfig, content_hash, prepare
from shared.messages import EncodeReply, EncodeRequest, ImageRef
from tests.engine.llava_model import PROCESSOR, random_image

pytestmark = pytest.mark.integration


def image_ref(seed: int) -> dict:
    crop = prepare(random_image(seed), ImageProcessorConfig.from_dict(PROCESSOR))
    return asdict(ImageRef(0, 16, content_hash(crop), crop.tobytes(), list(crop.shape)))


@pytest.fixture
async def encoder(nats_server, nc, tiny_llava_dir):
    config = EncoderConfig(nats=nats_server, model=str(tiny_llava_dir), instance_id="encoder-test", num_threads=1)
    service = EncoderService(config)
    await service.start(nc)
    try:
        yield service
    finally:
        await service.stop()


async def encode(nc, images: list[dict], instance: str = "encoder-test") -> EncodeReply:
    return await bus.request(nc, subjects.encoder_encode(instance), EncodeRequest("r", images), EncodeReply, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llava_dir):
    """The engine's own image encoder for the same model: what a worker computes itself."""
    from shared.engine.multimodal import image_encoder_of

    return image_encoder_of(load_checkpoint(str(tiny_llava_dir)), torch.device("cpu"), torch.float32)


async def test_embeddings_read_by_shared_memory_and_tcp_equal_the_engines(encoder, nc, reference):
    images = [image_ref(1), image_ref(2)]
    reply = await encode(nc, images)
    assert reply.error is None and [h["hash"] for h in reply.embeddings] == [i["hash"] for i in images]
    expected = reference.run([np.frombuffer(i["pixels"], np.uint8).reshape(i["shape"]) for i in images])
    for handle, want in zip(reply.embeddings, expected):
        mapped = await read_embeddings(handle, encoder.host)  # same host: the shared-memory segment
        fetched = await read_embeddings({**handle, "host": "127.0.0.1"}, "another-host")  # over TCP
        torch.testing.assert_close(mapped, want)
        torch.testing.assert_close(fetched, want)


async def test_a_repeated_image_is_not_encoded_again(encoder, nc):
    first = await encode(nc, [image_ref(3)])
    again = await encode(nc, [image_ref(3), image_ref(4)])
    assert again.embeddings[0] == first.embeddings[0]
    assert encoder.counters()["images_encoded"] == 2 and encoder.counters()["image_cache_hits"] == 1


async def test_concurrent_requests_for_one_image_encode_it_once(encoder, nc):
    replies = await asyncio.gather(*(encode(nc, [image_ref(5)]) for _ in range(4)))
    assert len({r.embeddings[0]["name"] for r in replies}) == 1
    assert encoder.counters()["images_encoded"] == 1


async def test_bad_images_are_refused_and_the_service_goes_on(encoder, nc):
    wrong_size = {**image_ref(6), "pixels": bytes(8 * 8 * 3), "shape": [8, 8, 3]}
    reply = await encode(nc, [wrong_size])
    assert reply.error is not None and reply.error["status"] == 400
    forged = {**image_ref(6), "hash": "0" * 64}
    reply = await encode(nc, [forged])
    assert reply.error is not None and "hash" in reply.error["message"]
    assert (await encode(nc, [image_ref(6)])).error is None


async def test_an_evicted_image_reads_as_gone(nats_server, nc, tiny_llava_dir):
    config = EncoderConfig(
        nats=nats_server, model=str(tiny_llava_dir), instance_id="encoder-small", num_threads=1, cache_bytes=1
    )
    service = EncoderService(config)
    await service.start(nc)
    try:
        old = (await encode(nc, [image_ref(7)], "encoder-small")).embeddings[0]
        await encode(nc, [image_ref(8)], "encoder-small")  # room for one: the first goes
        assert await read_embeddings(old, service.host) is None
        assert await read_embeddings({**old, "host": "127.0.0.1"}, "another-host") is None
    finally:
        await service.stop()


def test_an_encoder_reads_only_the_vision_tensors(tiny_llava_dir, tiny_model_dir):
    from shared.engine.loader import load_vision

    raw, weights, _ = load_vision(str(tiny_llava_dir))
    assert raw["model_type"] == "llava" and any(n.startswith("multi_modal_projector.") for n in weights)
    assert not [n for n in weights if "language_model" in n or n.startswith("lm_head")]
    with pytest.raises(ValueError, match="takes no images"):
        load_vision(str(tiny_model_dir("llama")))
