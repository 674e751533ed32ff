"""A chat content part's image URL -> a decoded Pillow image, or a 400 naming the part.

Takes `data:image/...;base64,...` URLs and, when the gateway has an HTTP session, http(s) URLs. Every
step is bounded: the encoded size (before base64 is decoded, and while downloading), the download's
time, the pixel count (from the headers, before any pixel is decoded) and the formats Pillow may try.
Note that an http(s) URL is fetched from the gateway's network: where that network holds services
clients must not reach, run with allow_http=False.
"""

import asyncio
import base64
import io
import warnings
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image, UnidentifiedImageError
from yarl import URL

from shared.errors import ApiError, invalid

# Only these decoders run on untrusted bytes: Pillow's other plugins are rarer, less hardened, and one
# (EPS) runs Ghostscript.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_REDIRECTS = 3  # followed; one more is refused
# Decoding more than this (encoded bytes, or pixels) goes to a thread so the event loop keeps serving.
INLINE_BYTES = 256 << 10
INLINE_PIXELS = 1 << 20


@dataclass
class ImageLimits:
    max_bytes: int = 20 << 20  # encoded size, for data: URLs and downloads alike
    max_pixels: int = 64 << 20  # width*height after decoding headers (decompression bombs)
    fetch_timeout_s: float = 10.0  # whole download
    allow_http: bool = True  # http(s) URLs fetched by the gateway; False refuses them clearly
    max_images: int = 8  # per request (checked by multimodal.load_images)


async def load_image(url: Any, where: str, limits: ImageLimits, session: aiohttp.ClientSession | None) -> Image.Image:
    """`part["image_url"]["url"]` -> the image, fully loaded, in the mode it was decoded to (raises ApiError).
    `where` is the param path errors name, e.g. "messages[0].content[1].image_url"."""
    if not isinstance(url, str):
        raise invalid(f"{where}.url must be a string: a data:image/...;base64 URL or an http(s) URL", where)
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _from_data_url(url, where, limits)
    elif scheme in ("http", "https"):
        data = await _download(url, where, limits, session)
    else:
        got = f"a {scheme[:20]!r} URL" if scheme else "no URL scheme"
        raise invalid(f"{where}.url must be a data:image/...;base64 URL or an http(s) URL; got {got}", where)
    return await _decode(data, where, limits)


def _from_data_url(url: str, where: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise invalid(f"the data URL at {where} is malformed: expected data:image/png;base64,<data>", where)
    media, *params = (p.strip().lower() for p in header.split(";"))
    if media and not media.startswith("image/"):  # advisory otherwise: Pillow decides what the bytes are
        raise invalid(f"the data URL at {where} has media type {media[:50]!r}; expected an image (image/png...)", where)
    if params[-1:] != ["base64"]:
        raise invalid(f"the data URL at {where} must be base64-encoded: data:image/png;base64,<data>", where)
    # Size first, from the length: a huge payload is refused before any of it is decoded.
    estimate = len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("=")))
    if estimate > limits.max_bytes:
        raise _too_large(where, f"about {estimate} bytes", limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII characters
        raise invalid(f"the data URL at {where} is not valid base64 ({e})", where) from None
    if len(data) > limits.max_bytes:
        raise _too_large(where, f"{len(data)} bytes", limits)
    return data


async def _download(url: str, where: str, limits: ImageLimits, session: aiohttp.ClientSession | None) -> bytes:
    if session is None or not limits.allow_http:
        raise invalid(
            f"image URLs are disabled on this server; send the image at {where} inline as a data:image/...;base64 URL",
            where,
        )
    try:
        host = URL(url).host
    except ValueError:
        host = None
    if not host:
        raise invalid(f"{where}.url is not a valid http(s) URL", where)
    fail = f"could not fetch the image at {where} from {host}"
    try:
        async with (
            asyncio.timeout(limits.fetch_timeout_s),
            session.get(url, max_redirects=MAX_REDIRECTS + 1) as response,  # aiohttp counts the refused one
        ):
            if not 200 <= response.status < 300:
                raise invalid(f"{fail}: HTTP {response.status} {response.reason or ''}".rstrip(), where)
            if response.content_length is not None and response.content_length > limits.max_bytes:
                raise _too_large(where, f"{response.content_length} bytes", limits)
            data = bytearray()
            async for chunk in response.content.iter_any():  # chunked bodies have no length to trust
                data.extend(chunk)
                if len(data) > limits.max_bytes:
                    raise _too_large(where, None, limits)
            return bytes(data)
    except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
        raise invalid(f"{fail}: timed out after {limits.fetch_timeout_s:g} s", where) from None
    except aiohttp.TooManyRedirects:
        raise invalid(f"{fail}: more than {MAX_REDIRECTS} redirects", where) from None
    except aiohttp.ClientError as e:
        raise invalid(f"{fail}: {e or type(e).__name__}", where) from None


async def _decode(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    image = _open(data, where, limits)
    if len(data) > INLINE_BYTES or image.width * image.height > INLINE_PIXELS:
        return await asyncio.to_thread(_load, image, where, limits)
    return _load(image, where, limits)


def _open(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    """The headers only (cheap, so on the event loop), and the pixel count checked before any pixel is decoded."""
    try:
        # Local, not global; and only ever entered on the event loop's thread, never across an await, so
        # concurrent catch_warnings cannot interleave and leave the filter behind.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(where, None, limits) from None
    except UnidentifiedImageError:
        raise invalid(f"could not decode the image at {where}: not a PNG, JPEG, WebP or GIF image", where) from None
    except Exception as e:  # Pillow's parsers raise many types on hostile input
        raise invalid(f"could not decode the image at {where}: {e or type(e).__name__}", where) from None
    if image.width * image.height > limits.max_pixels:
        raise _too_many_pixels(where, image.size, limits)
    return image


def _load(image: Image.Image, where: str, limits: ImageLimits) -> Image.Image:
    """All pixels now, so a truncated or corrupt image is refused here rather than failing later."""
    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(where, None, limits) from None
    except Exception as e:  # OSError for truncated data, and whatever else a damaged file provokes
        raise invalid(f"could not decode the image at {where}: {e or type(e).__name__}", where) from None
    return image


def _too_large(where: str, size: str | None, limits: ImageLimits) -> ApiError:
    got = f" ({size})" if size else ""
    return invalid(f"the image at {where} is too large{got}; the limit is {limits.max_bytes} bytes", where)


def _too_many_pixels(where: str, size: tuple[int, int] | None, limits: ImageLimits) -> ApiError:
    # Pillow's own bomb check may be the stricter one: name the limit that actually applies.
    limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    got = f" ({size[0]}x{size[1]} = {size[0] * size[1]} pixels)" if size else ""
    return invalid(f"the image at {where} has too many pixels{got}; the limit is {limit} pixels", where)
