"""The aiohttp application: routes, auth, limits, and the error middleware that speaks OpenAI JSON.

Everything the app talks to is passed in (tokenizer, model info, backend, instance view), so tests can
run it against a real NATS with a scripted router, or with fakes.
"""

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from services.gateway import serving
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.protocol import ModelInfo
from services.gateway.responses import dumps
from services.gateway.state import GATEWAY, Gateway
from services.gateway.telemetry import GatewayMetrics, InstanceCollector
from shared.errors import ApiError
from shared.metrics import exposition

log = structlog.get_logger("xllm.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: GatewayConfig,
    tokenizer: Any,
    model: ModelInfo,
    backend: Backend,
    view: Any | None = None,
    metrics: GatewayMetrics | None = None,
) -> web.Application:
    """The gateway app. `backend` must be started (`await backend.start()`); the caller owns NATS."""
    gw = Gateway(config, tokenizer, model, backend, view, metrics or GatewayMetrics.create())
    gw.metrics.running.set_function(lambda: gw.inflight)
    gw.metrics.registry.register(InstanceCollector(gw.instances))
    backend.on_failover = lambda reason: gw.metrics.failovers.labels(reason).inc()
    app = web.Application(middlewares=[_errors, _auth], client_max_size=config.max_body_bytes)
    app[GATEWAY] = gw
    app.router.add_post("/v1/chat/completions", _generate("chat"))
    app.router.add_post("/v1/completions", _generate("completion"))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/admin/instances", instances)
    if model.vision is not None and config.allow_image_urls:
        app.cleanup_ctx.append(_image_fetcher)
    return app


async def _image_fetcher(app: web.Application) -> AsyncIterator[None]:
    """The HTTP client that downloads image URLs, for the app's lifetime."""
    gw = app[GATEWAY]
    async with aiohttp.ClientSession() as gw.http:
        yield
    gw.http = None


def _generate(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        with gw.slot():
            return await serving.generate(request, gw, kind)

    return handler


def error_response(e: ApiError) -> web.Response:
    headers = {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=e.status, body=dumps(e.body()), content_type="application/json", headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes OpenAI error JSON; counts requests by route and status."""
    gw = request.app[GATEWAY]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = error_response(e)
    except web.HTTPException as e:
        resp = error_response(_from_http(request, e))
        if "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
    except asyncio.CancelledError:  # client disconnected (handler cancellation)
        gw.metrics.requests.labels(route, "499").inc()
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        resp = error_response(ApiError(500, "internal server error", "server_error"))
    status = "499" if request.get("client_gone") else str(resp.status)
    gw.metrics.requests.labels(route, status).inc()
    return resp


def _from_http(request: web.Request, e: web.HTTPException) -> ApiError:
    if e.status == 404:
        return ApiError(404, f"no route {request.method} {request.path}", "invalid_request_error", None, "unknown_url")
    if e.status == 405:
        return ApiError(
            405,
            f"method {request.method} is not allowed for {request.path}",
            "invalid_request_error",
            None,
            "method_not_allowed",
        )
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return ApiError(e.status, e.reason, kind)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[GATEWAY].config.api_key
    if key and request.path.startswith(("/v1/", "/admin/")):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
    return await handler(request)


async def list_models(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": [_model_card(request.app[GATEWAY])]})


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    name = request.match_info["model"]
    if name != gw.model.name:
        raise ApiError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")
    return _json(_model_card(gw))


def _model_card(gw: Gateway) -> dict:
    return {
        "id": gw.model.name,
        "object": "model",
        "created": gw.created,
        "owned_by": "xllm",
        "root": gw.config.model,
        "max_model_len": gw.model.max_model_len,
    }


async def health(request: web.Request) -> web.Response:
    """200 only while a full path to a worker exists: NATS is reachable, and there is a ready colocated
    instance, or a ready prefill and a ready decode instance."""
    gw = request.app[GATEWAY]
    if not gw.backend.nc.is_connected:
        return _json({"status": "unavailable", "reason": "the message bus is unreachable"}, status=503)
    ready: dict[str, int] = {}
    for info in gw.instances():
        if info.state == "ready":
            ready[info.role] = ready.get(info.role, 0) + 1
    ok = "colocated" in ready or ("prefill" in ready and "decode" in ready)
    return _json({"status": "ok" if ok else "unavailable", "ready": ready}, status=200 if ok else 503)


async def instances(request: web.Request) -> web.Response:
    """Live instances for operators: id, role, pid, host, state, load, counters and the step-cost model."""
    return _json(
        [
            {
                "instance_id": i.instance_id,
                "role": i.role,
                "model": i.model,
                "pid": i.pid,
                "host": i.host,
                "state": i.state,
                "updated_at": i.updated_at,
                "load": {
                    "running": i.running,
                    "waiting": i.waiting,
                    "free_blocks": i.free_blocks,
                    "total_blocks": i.total_blocks,
                    **i.load,
                },
                "counters": i.counters,
                "cost": i.cost,
                "roles": i.roles,
            }
            for i in request.app[GATEWAY].instances()
        ]
    )


async def metrics_text(request: web.Request) -> web.Response:
    return exposition(request.app[GATEWAY].metrics.registry)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(obj), content_type="application/json")
