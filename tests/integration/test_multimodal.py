"""Images through the whole system: `xllm up` serving a tiny random LLaVA, colocated and disaggregated. The
greedy text of a chat completion with images equals transformers' for the same pictures and prompt; the
same picture again is served from the prefix cache; bad images are refused with a 400 naming the part."""

import os
import signal

import aiohttp
import pytest
import torch

from shared.model_files import smollm2_gguf
from shared.tokenizer import Tokenizer
from tests.engine.llava_model import build_tiny_llava, data_url, hf_greedy_with_images, random_image
from tests.waiting import until
from xllm.bench.local_system import start_system, stop_system

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What do you see? Answer in one long sentence, please."


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), Tokenizer.from_gguf(smollm2_gguf()))


LAYOUTS = {  # colocated EPD, EP -> D, and E -> P -> D with the images always on the encoder
    "colocated": ["--mode", "colocated"],
    "disaggregated": ["--mode", "disaggregated"],
    "epd": ["--mode", "disaggregated", "--encoder", "1", "--encode", "always"],
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def llava_system(request, tiny_llava_dir, tmp_path_factory):
    args = ["--model", str(tiny_llava_dir), *LAYOUTS[request.param], "--kv-cache-fraction", "0.02"]
    system = start_system(tmp_path_factory.mktemp(f"llava-{request.param}"), *args, "--worker-threads", "1")
    system.layout = request.param
    try:
        yield system
    finally:
        stop_system(system.proc)


def messages(pictures: list, fmt: str = "PNG", **save_options) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p, fmt, **save_options)}} for p in pictures]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


def expected_text(tiny_llava_dir, pictures: list, n: int) -> str:
    from transformers import LlavaForConditionalGeneration

    tokenizer = Tokenizer.from_pretrained_dir(tiny_llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    parts = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": QUESTION}]
    ids = tokenizer.encode_chat([{"role": "user", "content": parts}])
    image_id = model.config.image_token_index
    expanded = []
    for t in ids:  # the processor's expansion: each image token becomes one per image feature
        expanded += [t] * (16 if t == image_id else 1)
    return tokenizer.decode(hf_greedy_with_images(model, expanded, pictures, n))


async def post(session, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def test_images_through_the_api_equal_transformers_and_hit_the_cache(llava_system, tiny_llava_dir):
    model = str(tiny_llava_dir)
    pictures = [random_image(21), random_image(22, (40, 90))]
    body = {"model": model, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        status, first = await post(s, llava_system.url, {**body, "messages": messages(pictures)})
        assert status == 200, first
        assert first["choices"][0]["message"]["content"] == expected_text(tiny_llava_dir, pictures, 16)
        # the same pictures again, as lossless WebP this time: the same pixels, so the same content hash
        again_messages = messages(pictures, "WEBP", lossless=True)
        status, again = await post(s, llava_system.url, {**body, "messages": again_messages})
        assert status == 200 and again["choices"] == first["choices"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32  # both images' blocks at least
        status, other = await post(s, llava_system.url, {**body, "messages": messages([pictures[0], random_image(24)])})
        assert status == 200, other
        assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]

    def encoded() -> dict[str, int]:  # by role, as the heartbeats after these requests report it
        return {i["role"]: i["counters"].get("images_encoded", 0) for i in llava_system.instances()}

    # Each image encoded once (the repeat hit the cache); with an encoder, all of them there.
    want = {"encoder": 3, "prefill": 0, "decode": 0} if llava_system.layout == "epd" else None
    await until(lambda: encoded() == want if want else max(encoded().values()) == 3, 30, f"encoded {encoded()}")


async def test_a_killed_encoder_costs_time_not_requests(llava_system, tiny_llava_dir):
    """Without its encoder, the prefill worker encodes the images itself; the output is the same."""
    if llava_system.layout != "epd":
        pytest.skip("needs an encoder")
    encoder = next(i for i in llava_system.instances() if i["role"] == "encoder")
    os.kill(encoder["pid"], signal.SIGKILL)
    pictures = [random_image(31)]
    body = {"model": str(tiny_llava_dir), "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        status, reply = await post(s, llava_system.url, {**body, "messages": messages(pictures)})
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == expected_text(tiny_llava_dir, pictures, 16)


async def test_bad_images_are_refused_naming_the_part(llava_system, tiny_llava_dir):
    model = str(tiny_llava_dir)
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    content = [{"type": "text", "text": "Hi"}, bad]
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    async with aiohttp.ClientSession() as s:
        status, error = await post(s, llava_system.url, body)
        assert status == 400
        assert error["error"]["param"] == "messages[0].content[1].image_url"
        status, ok = await post(s, llava_system.url, {**body, "messages": messages([random_image(23)])})
        assert status == 200, ok  # and the server goes on serving
