"""Images in chat requests at the gateway: what reaches the router (placeholders and prepared images with their
hashes), image URLs fetched, and the refusals (a text-only model, too many images, a bad image, a template
that drops images)."""

import base64
import io

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from services.gateway.app import create_app
from services.gateway.backend import Backend
from services.gateway.chat import parse_chat
from services.gateway.config import GatewayConfig
from services.gateway.multimodal import PreparedImage, VisionInfo
from services.gateway.protocol import ModelInfo
from shared.errors import ApiError
from shared.images import ImageProcessorConfig, content_hash, prepare
from tests.gateway.conftest import MODEL, FakeTokenizer, reply_words

IMAGE_TOKEN = 300
PROCESSOR = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}})
VISION = VisionInfo(IMAGE_TOKEN, 5, PROCESSOR)
VISION_MODEL = ModelInfo(MODEL.name, 512, 301, vision=VISION)


class FakeVisionTokenizer(FakeTokenizer):
    """Byte-level, with content as a list of parts: an image part is written as the image token."""

    vocab_size = 301

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = []
        for m in messages:
            ids += self.encode(f"<{m['role']}>", add_special_tokens=False)
            for part in m["content"]:
                ids += [IMAGE_TOKEN] if part["type"] == "image" else self.encode(part["text"], False)
        return ids + self.encode("<assistant>", add_special_tokens=False)


def picture(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat(*urls: str, text: str = "what is this?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"model": MODEL.name, "max_tokens": 4, "messages": [{"role": "user", "content": parts}]}


@pytest.fixture
async def vision_client(nc, router):
    config = GatewayConfig(first_token_timeout_s=5.0, inter_token_timeout_s=5.0, max_images=3)
    backend = Backend(nc, config.retry_after_s)
    await backend.start()
    client = TestClient(TestServer(create_app(config, FakeVisionTokenizer(), VISION_MODEL, backend)))
    await client.start_server()
    router.script = reply_words()
    yield client
    await client.close()
    await backend.close()


async def test_images_reach_the_router_as_placeholders_and_prepared_pixels(vision_client, router):
    urls = [data_url(picture(1)), data_url(picture(2, (20, 50)), "JPEG")]
    async with vision_client.post("/v1/chat/completions", json=chat(*urls)) as r:
        assert r.status == 200, await r.text()
    (req,) = router.requests
    assert [image["offset"] for image in req.images] == [len("<user>"), len("<user>") + 5]
    for image, url in zip(req.images, urls):
        assert req.prompt_token_ids[image["offset"] : image["offset"] + 5] == [IMAGE_TOKEN] * 5
        crop = np.frombuffer(image["pixels"], np.uint8).reshape(image["shape"])
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(crop, prepare(decoded, PROCESSOR)) and image["hash"] == content_hash(crop)
    assert req.prompt_token_ids.count(IMAGE_TOKEN) == 10


async def test_an_image_url_is_fetched(vision_client, router):
    png = io.BytesIO()
    picture(3).save(png, format="PNG")
    app = web.Application()
    app.router.add_get("/cat.png", lambda _: web.Response(body=png.getvalue(), content_type="image/png"))
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("/cat.png"))
        async with vision_client.post("/v1/chat/completions", json=chat(url)) as r:
            assert r.status == 200, await r.text()
    assert router.requests[0].images[0]["hash"] == content_hash(prepare(picture(3), PROCESSOR))


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (chat("data:image/png;base64,AAAA"), "messages[0].content[0].image_url", "decode"),
        (chat(*[data_url(picture(i)) for i in range(4)]), "messages[0].content[3].image_url", "limit is 3"),
    ],
)
async def test_bad_images_are_refused_naming_the_part(vision_client, router, body, param, message):
    async with vision_client.post("/v1/chat/completions", json=body) as r:
        error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == param and message in error["message"], error
    assert router.requests == []


async def test_images_too_large_for_the_bus_get_a_413(nc, router):
    """Prepared pixels travel in the request: past the bus's max_payload the gateway refuses it clearly."""
    big = ImageProcessorConfig.from_dict(
        {"size": {"shortest_edge": 1024}, "crop_size": {"height": 1024, "width": 1024}}
    )
    model = ModelInfo(MODEL.name, 1 << 14, 301, vision=VisionInfo(IMAGE_TOKEN, 5, big))
    config = GatewayConfig(first_token_timeout_s=5.0, inter_token_timeout_s=5.0)
    backend = Backend(nc, config.retry_after_s)
    await backend.start()
    client = TestClient(TestServer(create_app(config, FakeVisionTokenizer(), model, backend)))
    await client.start_server()
    try:
        smooth = [data_url(Image.new("RGB", (64, 64), (i * 40, 0, 0))) for i in range(3)]  # 3 MiB each, prepared
        async with client.post("/v1/chat/completions", json=chat(*smooth)) as r:
            error = (await r.json())["error"]
            assert r.status == 413 and "message bus" in error["message"], error
        assert router.requests == []
    finally:
        await client.close()
        await backend.close()


async def test_a_text_only_model_refuses_images(make_client, router):
    client = await make_client()
    async with client.post("/v1/chat/completions", json=chat(data_url(picture(4)))) as r:
        error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == "messages[0].content[0].image_url"
        assert "does not take images" in error["message"]


def test_a_template_that_drops_images_is_refused():
    class DropsImages(FakeVisionTokenizer):
        def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
            return [t for t in super().encode_chat(messages, add_generation_prompt) if t != IMAGE_TOKEN]

    crop = prepare(picture(5), PROCESSOR)
    with pytest.raises(ApiError, match="0 image tokens for 1 images"):
        parse_chat(chat("x"), VISION_MODEL, DropsImages(), images=[PreparedImage(crop, content_hash(crop))])
