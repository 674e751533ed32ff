"""Image URLs -> Pillow images (services/gateway/images.py): data: URLs, downloads from a local server,
and the limits and refusals around both."""

import asyncio
import base64
import io
import os
import socket
import struct
import warnings
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from services.gateway import images
from services.gateway.images import ImageLimits, load_image
from shared.errors import ApiError

WHERE = "messages[0].content[1].image_url"
LOOPS = web.AppKey("loops", list)
LIMITS = ImageLimits()
COLORS = {"1": 1, "RGBA": (255, 0, 0, 128)}  # half transparent: an opaque RGBA WebP is stored as RGB


def encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = (7, 5), **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, COLORS.get(mode, "red")).save(out, fmt, **save)
    return out.getvalue()


def noise_png(side: int) -> bytes:
    """Incompressible: the encoded size is about side*side*3 bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def resized_png(width: int, height: int) -> bytes:
    """A 1x1 1-bit PNG whose header claims width x height: what a decompression bomb's headers look like."""
    png = bytearray(encode("PNG", "1", (1, 1)))
    ihdr = bytes(png[12:16]) + struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:24] = ihdr[4:12]
    png[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(png)


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


async def refused(url, fragment: str, limits: ImageLimits = LIMITS, session=None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await load_image(url, WHERE, limits, session)
    e = caught.value
    assert (e.status, e.param) == (400, WHERE)
    assert fragment in e.message, e.message
    return e


# --- data: URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "save", "expect"),
    [
        ("PNG", "RGB", {}, "RGB"),
        ("PNG", "RGBA", {}, "RGBA"),
        ("PNG", "L", {}, "L"),
        ("JPEG", "RGB", {}, "RGB"),
        ("JPEG", "L", {}, "L"),
        ("WEBP", "RGB", {"lossless": True}, "RGB"),
        ("WEBP", "RGBA", {"lossless": True}, "RGBA"),
        ("GIF", "RGB", {}, "P"),
    ],
)
async def test_data_url_decodes(fmt: str, mode: str, save: dict, expect: str) -> None:
    image = await load_image(data_url(encode(fmt, mode, **save), f"image/{fmt.lower()}"), WHERE, LIMITS, None)
    assert (image.format, image.size, image.mode) == (fmt, (7, 5), expect)
    want = Image.new(mode, (1, 1), COLORS.get(mode, "red")).convert("RGBA").getpixel((0, 0))
    got = image.convert("RGBA").getpixel((3, 2))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 8, (got, want)  # JPEG is lossy


async def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in ("red", "blue", "lime")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    image = await load_image(data_url(out.getvalue(), "image/gif"), WHERE, LIMITS, None)
    assert image.n_frames == 3
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


async def test_media_type_is_advisory() -> None:
    image = await load_image(data_url(encode("PNG"), "image/jpeg"), WHERE, LIMITS, None)
    assert image.format == "PNG"
    image = await load_image("DATA:Image/PNG;BASE64," + data_url(encode("PNG")).split(",")[1], WHERE, LIMITS, None)
    assert image.size == (7, 5)


async def test_large_images_decode_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    async def spy(fn, *args):
        calls.append(fn)
        return fn(*args)

    monkeypatch.setattr(images.asyncio, "to_thread", spy)
    await load_image(data_url(encode("PNG")), WHERE, LIMITS, None)
    assert calls == []
    big = noise_png(320)
    assert len(big) > images.INLINE_BYTES
    image = await load_image(data_url(big), WHERE, LIMITS, None)
    assert image.size == (320, 320)
    assert calls == [images._load]


async def test_bad_base64() -> None:
    url = data_url(encode("PNG"))
    head, payload = url.split(",")
    await refused(f"{head},{payload[:8]}!!!!{payload[8:]}", "not valid base64")  # a lenient decoder skips these
    await refused(f"{head},{payload[:8]}\n{payload[8:]}", "not valid base64")
    await refused(url[:-1], "not valid base64")  # padding
    await refused(url + "é", "not valid base64")


async def test_data_url_shape() -> None:
    raw = base64.b64encode(b"hello").decode()
    await refused(f"data:text/plain;base64,{raw}", "'text/plain'; expected an image")
    await refused("data:image/png,%89PNG", "must be base64-encoded")
    await refused(f"data:image/png;base64{raw}", "malformed")


async def test_undecodable_bytes() -> None:
    await refused(data_url(os.urandom(4096)), "could not decode the image at " + WHERE)
    await refused(data_url(b""), "not a PNG, JPEG, WebP or GIF image")
    await refused(data_url(encode("BMP"), "image/bmp"), "not a PNG, JPEG, WebP or GIF image")


async def test_truncated_image() -> None:
    png = noise_png(64)
    await refused(data_url(png[: len(png) // 2]), "could not decode the image at " + WHERE)


async def test_oversize_data_url_refused_before_decoding() -> None:
    limits = ImageLimits(max_bytes=1000)
    await load_image(data_url(noise_png(10)), WHERE, limits, None)  # ~300 bytes: fits
    # Not base64 at all: refused for its size, so the payload was never decoded.
    await refused(
        "data:image/png;base64," + "!" * 1500, "too large (about 1125 bytes); the limit is 1000 bytes", limits
    )
    await refused(data_url(noise_png(32)), "the limit is 1000 bytes", limits)


async def test_decompression_bombs() -> None:
    # Our limit, from the headers: a 1x1 image that claims 5000x5000 would fail as truncated if loaded.
    limits = ImageLimits(max_pixels=1 << 20)
    await refused(data_url(resized_png(5000, 5000)), "(5000x5000 = 25000000 pixels); the limit is 1048576", limits)
    # Pillow's own: beyond twice its MAX_IMAGE_PIXELS an error ...
    await refused(data_url(resized_png(20000, 20000)), "too many pixels", limits)
    # ... and beyond it a warning, made an error for this call only.
    big = ImageLimits(max_pixels=1 << 30)
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    await refused(data_url(resized_png(10000, 10000)), f"the limit is {Image.MAX_IMAGE_PIXELS} pixels", big)
    assert not [f for f in warnings.filters if f[0] == "error" and f[2] is Image.DecompressionBombWarning]


async def test_url_must_be_a_data_or_http_url() -> None:
    for value in (None, 7, {"url": "x"}, ["data:"]):
        await refused(value, f"{WHERE}.url must be a string")
    await refused("file:///etc/passwd", "got a 'file' URL")
    await refused("ftp://example.com/a.png", "got a 'ftp' URL")
    await refused("", "got no URL scheme")
    await refused("iVBORw0KGgo=", "got no URL scheme")


# --- http(s) URLs ---------------------------------------------------------------------------------------

PNG = encode("PNG", "RGBA", (9, 4))


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    release = asyncio.Event()
    loops = []

    async def loop(request: web.Request) -> web.Response:
        loops.append(request)
        raise web.HTTPFound("/loop")

    async def hop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/hop/{n - 1}" if n > 1 else "/a.png")

    async def stream(request: web.Request, size: int, length: int | None = None, hold: bool = False):
        response = web.StreamResponse()
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        for _ in range(size // 1000):
            await response.write(b"x" * 1000)
        if hold:
            await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/a.png", lambda r: web.Response(body=PNG, content_type="image/png"))
    app.router.add_get("/missing.png", lambda r: web.Response(status=404))
    app.router.add_get("/big", lambda r: web.Response(body=b"x" * 5000))
    app.router.add_get("/chunked", lambda r: stream(r, 5000))
    app.router.add_get("/claims-big", lambda r: stream(r, 1000, length=10**9, hold=True))
    app.router.add_get("/hang", lambda r: stream(r, 1000, length=len(PNG) + 1000, hold=True))
    app.router.add_get("/loop", loop)
    app.router.add_get("/hop/{n}", hop)
    app[LOOPS] = loops
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield srv
    finally:
        release.set()
        await srv.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_fetches_an_image(server: TestServer, session: aiohttp.ClientSession) -> None:
    image = await load_image(str(server.make_url("/a.png")), WHERE, LIMITS, session)
    assert (image.format, image.size, image.mode) == ("PNG", (9, 4), "RGBA")


async def test_follows_a_redirect(server: TestServer, session: aiohttp.ClientSession) -> None:
    image = await load_image(str(server.make_url("/hop/1")), WHERE, LIMITS, session)
    assert image.size == (9, 4)
    image = await load_image(str(server.make_url(f"/hop/{images.MAX_REDIRECTS}")), WHERE, LIMITS, session)
    assert image.size == (9, 4)


async def test_http_errors(server: TestServer, session: aiohttp.ClientSession) -> None:
    await refused(str(server.make_url("/missing.png")), "from 127.0.0.1: HTTP 404 Not Found", session=session)
    await refused(str(server.make_url("/loop")), "from 127.0.0.1: more than 3 redirects", session=session)
    assert len(server.app[LOOPS]) == 1 + images.MAX_REDIRECTS
    await refused(str(server.make_url("/big")), "could not decode the image", session=session)


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    await refused(f"http://127.0.0.1:{port}/a.png", "could not fetch the image at", session=session)


async def test_oversize_downloads(server: TestServer, session: aiohttp.ClientSession) -> None:
    limits = ImageLimits(max_bytes=2000, fetch_timeout_s=60)
    await refused(str(server.make_url("/big")), "too large (5000 bytes); the limit is 2000", limits, session)
    await refused(str(server.make_url("/chunked")), "too large; the limit is 2000 bytes", limits, session)
    # Refused from Content-Length alone: the body never finishes, so reading it would hang.
    async with asyncio.timeout(30):
        await refused(str(server.make_url("/claims-big")), "too large (1000000000 bytes)", limits, session)


async def test_download_timeout(server: TestServer, session: aiohttp.ClientSession) -> None:
    limits = ImageLimits(fetch_timeout_s=0.5)
    async with asyncio.timeout(30):
        await refused(str(server.make_url("/hang")), "from 127.0.0.1: timed out after 0.5 s", limits, session)


async def test_url_images_disabled(server: TestServer, session: aiohttp.ClientSession) -> None:
    url = str(server.make_url("/a.png"))
    await refused(url, "image URLs are disabled on this server")
    await refused(url, "image URLs are disabled on this server", ImageLimits(allow_http=False), session)
    await refused("http://", "is not a valid http(s) URL", session=session)
