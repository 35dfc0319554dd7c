"""``create_app``: the FastAPI application that serves one classifier over HTTP.

    GET  /          the web page (static files under ``serve/web``)
    GET  /healthz   the process is up
    GET  /readyz    the model is loaded and warmed up (503 until then)
    GET  /model     classes, input size, preprocessing, architecture
    POST /predict   one or more images (multipart or a raw image body) -> classes, latency
    POST /explain   one image -> feature maps and Grad-CAM (run directories only)
    GET  /explore   the explorer page and its JSON under /explore/... (see ``explore``)

Safe by default: the model is fixed when the app is made (no request names a file or URL);
request bodies, image sizes, pixels per request, the memory all requests hold together
(``budget``) and the work queue are bounded; bodies have a deadline (``guard``); every model
call runs on one worker thread (``worker``: waiting predictions run as one batch) with a
timeout; with a ``token``, everything but the page and the health probes needs it; every error
is JSON ``{"error": ...}`` with its status, and every response carries security headers. The
server keeps answering after any bad request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnkit.errors import ConfigError, ImageError
from cnnkit.serve.budget import MB, Hold, MemoryBudget
from cnnkit.serve.explore import add_explore_routes
from cnnkit.serve.guard import BearerAuth, BodyDeadline, check_token
from cnnkit.serve.model import ServedModel
from cnnkit.serve.uploads import ApiError, UploadLimits, error_status, read_images
from cnnkit.serve.worker import ModelWorker

__all__ = ["SECURITY_HEADERS", "ServeSettings", "create_app", "make_settings", "web_dir"]

log = logging.getLogger("cnnkit")

SECURITY_HEADERS = {
    # Scripts and styles only from this server's own files: no inline script, no eval.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server; the defaults suit a laptop serving a small model."""

    max_body_bytes: int = 10 * 1024 * 1024
    max_images: int = 16  # images in one /predict request
    max_pixels: int = 4096 * 4096  # per image, from its header
    max_request_pixels: int = 2 * 4096 * 4096  # all images of a request, as decoded
    max_inflight_bytes: int = 512 * MB  # bodies and decoded images of all requests at once
    max_queue: int = 32  # requests admitted to the model (running + waiting); more get 503
    max_batch: int = 64  # images of waiting requests run in one forward pass
    timeout_s: float = 10.0  # per request, for its model work
    header_timeout_s: float = 10.0  # from connecting to the end of a request's headers
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    max_waiting: int = 256  # connections waiting for a complete request; more close the oldest
    max_maps: int = 8  # feature maps per layer in /explain
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_images",
            "max_pixels",
            "max_request_pixels",
            "max_inflight_bytes",
            "max_queue",
            "max_batch",
            "max_waiting",
            "max_maps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve: {name} must be a positive integer, got {value!r}")
        for name in ("timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ConfigError(f"serve: {name} must be positive, got {value!r}")


def make_settings(**limits: Any) -> ServeSettings:
    """``ServeSettings(**limits)``, with a ConfigError naming a setting that does not exist."""
    unknown = sorted(set(limits) - set(ServeSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"serve: unknown setting {unknown[0]!r}")
    return ServeSettings(**limits)


def web_dir() -> Path:
    """The folder of the page's HTML, CSS and JavaScript (package data)."""
    return Path(str(files("cnnkit.serve") / "web"))


class SecurityHeaders:
    """ASGI middleware adding ``SECURITY_HEADERS`` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.encode() not in present:
                        headers.append((key.encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message}, status, {"cache-control": "no-store", **(headers or {})}
    )


class _Server:
    """One app's model, worker, limits and readiness, and the handlers of its routes."""

    def __init__(self, served: ServedModel, settings: ServeSettings) -> None:
        self.served, self.settings = served, settings
        self.worker = ModelWorker(served, settings.max_queue, settings.max_batch)
        self.budget = MemoryBudget(settings.max_inflight_bytes)
        self.ready = threading.Event()
        self.warm_error: list[str] = []
        self.upload_limits = UploadLimits(
            settings.max_body_bytes,
            settings.max_images,
            settings.max_pixels,
            settings.max_request_pixels,
            served.classifier.meta.preprocessing.size,
            settings.retry_after_s,
        )
        self.busy_headers = {"retry-after": str(settings.retry_after_s)}

    def warm_up(self) -> None:
        try:
            self.served.warm_up()
            self.ready.set()
        except Exception as exc:  # reported by /readyz; the process stays up for /healthz
            self.warm_error.append(f"warm-up failed: {exc}")
            log.error("model warm-up failed: %s", exc)

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        if self.worker.submit(self.warm_up) is None:  # pragma: no cover - empty at start
            self.warm_error.append("warm-up could not be queued")
        try:
            yield
        finally:
            self.worker.close()

    async def run_model(self, future: Future | None, hold: Hold) -> Any:
        """The worker's answer within the timeout; image errors become 400/413. What the
        request holds of the memory budget goes back when the work is done, not before."""
        settings = self.settings
        if future is None:
            raise ApiError(
                503, f"server busy: {settings.max_queue} requests queued; retry", self.busy_headers
            )
        hold.release_with(future)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except TimeoutError:
            raise ApiError(
                504, f"inference timed out after {settings.timeout_s:g}s", self.busy_headers
            ) from None
        except ImageError as exc:
            raise ApiError(error_status(exc), exc.reason) from None

    async def index(self) -> FileResponse:
        return FileResponse(web_dir() / "index.html", media_type="text/html; charset=utf-8")

    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    async def readyz(self) -> JSONResponse:
        if self.ready.is_set():
            return JSONResponse({"ready": True}, headers={"cache-control": "no-store"})
        why = self.warm_error[0] if self.warm_error else "model is warming up"
        return _error(503, why, self.busy_headers)

    async def model_info(self) -> JSONResponse:
        return JSONResponse(self.served.info(), headers={"cache-control": "no-store"})

    async def predict(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        with self.budget.hold() as hold:
            uploads = await read_images(request, self.upload_limits, hold)
            images = [u.image for u in uploads]
            result = await self.run_model(self.worker.predict(images), hold)
        classes = self.served.classes
        predictions = []
        for upload, probs in zip(uploads, result.probabilities, strict=True):
            best = int(probs.argmax())
            predictions.append(
                {
                    "name": upload.name,
                    "class": classes[best],
                    "confidence": round(float(probs[best]), 6),
                    "probabilities": {
                        c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)
                    },
                }
            )
        latency = {
            "decode": round(result.decode_ms, 3),
            "inference": round(result.inference_ms, 3),
            "total": round(1000 * (time.perf_counter() - start), 3),
        }
        body = {
            "predictions": predictions,
            "batch_size": len(uploads),
            "model_batch_size": result.batch_size,  # with other requests' images
            "latency_ms": latency,
        }
        return JSONResponse(body, headers={"cache-control": "no-store"})

    async def explain(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        if not self.served.can_explain:
            raise ApiError(
                501,
                "feature maps and Grad-CAM need a run directory; "
                f"this server runs an exported {self.served.format} file",
            )
        with self.budget.hold() as hold:
            uploads = await read_images(request, self.upload_limits, hold)
            if len(uploads) != 1:
                raise ApiError(400, f"explain takes one image, got {len(uploads)}")
            image = uploads[0].image

            def explain_and_close() -> dict[str, Any]:
                with image:  # its decoded pixels are freed as soon as the work is done
                    return self.served.explain(image, self.settings.max_maps)

            body = await self.run_model(self.worker.submit(explain_and_close), hold)
        body["latency_ms"] = {"total": round(1000 * (time.perf_counter() - start), 3)}
        return JSONResponse(body, headers={"cache-control": "no-store"})


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": ...}`` with its status; nothing else leaks."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return _error(500, "internal server error")


def create_app(
    model_source: str | Path | ServedModel, *, token: str | None = None, **limits: Any
) -> FastAPI:
    """The app for a run directory, a ``.onnx`` file or an already loaded ``ServedModel``.

    ``limits`` are ``ServeSettings`` fields. With a ``token``, every request but the page,
    its files and the health probes needs ``Authorization: Bearer TOKEN`` (``guard``). The
    model is loaded here (cnnkit's errors surface now, not at the first request) and warmed
    up on the worker thread when the app starts; ``/readyz`` says when that is done.
    """
    settings = make_settings(**limits)
    token = check_token(token)
    served = (
        model_source if isinstance(model_source, ServedModel) else ServedModel.load(model_source)
    )
    server = _Server(served, settings)
    app = FastAPI(
        title="cnnkit",
        lifespan=server.lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN: not with this CSP
        redoc_url=None,
        openapi_url=None,
    )
    app.state.served = served
    app.state.settings = settings
    app.state.worker = server.worker
    app.state.budget = server.budget
    app.add_middleware(BodyDeadline, seconds=settings.body_timeout_s)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(SecurityHeaders)  # the last added runs first: 401s get the headers too
    _add_error_handlers(app)
    app.add_api_route("/", server.index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/healthz", server.healthz, methods=["GET"])
    app.add_api_route("/readyz", server.readyz, methods=["GET"])
    app.add_api_route("/model", server.model_info, methods=["GET"])
    app.add_api_route("/predict", server.predict, methods=["POST"])
    app.add_api_route("/explain", server.explain, methods=["POST"])
    app.state.run_model = server.run_model  # the explorer's routes wait for the model so too
    app.state.limits = limits
    app.state.upload_limits = server.upload_limits
    source = None if isinstance(model_source, ServedModel) else Path(model_source)
    add_explore_routes(app, source)
    app.mount("/static", StaticFiles(directory=web_dir()), name="static")
    return app
