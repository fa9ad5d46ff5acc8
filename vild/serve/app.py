"""The HTTP app: ``POST /detect``, ``GET /healthz``, ``GET /info``, the page at ``/``, OpenAPI at ``/docs``."""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..api import Detector
from .batcher import DynamicBatcher, Overloaded
from .limits import BodySizeLimit, Limits, RequestError
from .parsing import DetectJSON, decode_upload, read_detect_request
from .response import DetectResponse, detections_json
from .runner import DetectorRunner

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# the page loads nothing from elsewhere: it works offline, and injected markup could not call out either
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                          "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

_DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "vocabulary"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       "vocabulary": {"type": "string", "example": "cat,dog|puppy"},
                       "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                       "max_detections": {"type": "integer", "minimum": 1},
                       "masks": {"type": "boolean", "default": False}}}},
    "application/json": {"schema": DetectJSON.model_json_schema()},
}}}
_ERRORS = {400: {"description": "not an image, truncated or corrupt image, invalid JSON or base64"},
           401: {"description": "missing or wrong API key (when the server has one)"},
           413: {"description": "too many bytes or pixels; the detail names the limit"},
           415: {"description": "neither multipart/form-data nor application/json"},
           422: {"description": "empty vocabulary, too many names or characters, a bad field; the detail says which"},
           503: {"description": "the queue is full or the model is late: retry after Retry-After seconds"}}


def create_app(detector: Detector, limits: Optional[Limits] = None, *, max_batch: int = 8, max_wait: float = 0.01,
               max_queue: int = 64, timeout: float = 60.0, api_key: Optional[str] = None) -> FastAPI:
    """Serve ``detector`` over HTTP, batching concurrent requests onto it.

    Args:
        detector: answers every request; its ``score_thresh`` and ``max_dets`` are the requests' defaults.
            Only the batcher's worker thread uses it once the app runs.
        limits: what one request may ask (``Limits()`` by default).
        max_batch: the most images per forward pass.
        max_wait: seconds a request may wait for others (with the same vocabulary) to share its pass; it
            waits only while other requests are being read.
        max_queue: the most requests waiting; more get 503 with Retry-After.
        timeout: seconds a request waits for its answer before a 503.
        api_key: when given, ``/detect`` and ``/info`` need ``Authorization: Bearer KEY`` (or ``X-API-Key``).
    """
    limits = limits or Limits()
    batcher = DynamicBatcher(DetectorRunner(detector), max_batch, max_wait, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="vild", summary="Open-vocabulary detection: an image and category names in, boxes out.",
                  lifespan=lifespan)
    app.state.batcher, app.state.detector, app.state.limits = batcher, detector, limits
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_bytes)
    _add_error_handlers(app)
    authorized = Depends(_key_check(api_key))
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness and load: requests waiting and on the model, batches run so far; whether an API key is needed."""
        return {"status": "ok", "queued": batcher.queued, "running": batcher.running, "batches": batcher.batches,
                "images": batcher.items, "api_key": bool(api_key)}

    @app.get("/info", dependencies=[authorized])
    async def info() -> dict:
        """The model, the default settings, the training vocabulary and the limits."""
        return {"variant": detector.variant, "device": str(detector.device),
                "masks": detector.has_masks, "score_threshold": detector.score_thresh,
                "max_detections": min(detector.max_dets, limits.max_detections),
                "training_vocabulary": [syns[0] for syns in detector.training_vocabulary],
                "limits": limits.as_dict(),
                "batching": {"max_batch": max_batch, "max_wait_ms": max_wait * 1000, "max_queue": max_queue}}

    async def decode(data: bytes, max_pixels: int) -> torch.Tensor:
        return await run_in_threadpool(decode_upload, data, max_pixels)

    @app.post("/detect", dependencies=[authorized], openapi_extra=_DETECT_BODY,
              responses={200: {"model": DetectResponse}, **_ERRORS})
    async def detect(request: Request) -> JSONResponse:
        """Detect the vocabulary's categories in an image (multipart upload, or JSON with a base64 image)."""
        with batcher.incoming():  # a batch forming now waits for this request (up to max_wait)
            req = await read_detect_request(request, limits, detector.score_thresh,
                                            min(detector.max_dets, limits.max_detections), decode)
            future = batcher.submit(req, req.vocabulary)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"no answer from the model within {timeout:g} s (vild-serve --timeout): "
                                    f"the server is overloaded, try again later", {"Retry-After": "5"}) from None
        except Overloaded:
            raise
        except Exception:
            logger.exception("detection failed")
            raise RequestError(500, "detection failed: an internal error (the server's log has the details)") \
                from None
        body = await run_in_threadpool(detections_json, result, req.score_threshold, req.max_detections, req.masks)
        return JSONResponse(body)

    return app


def _key_check(api_key: Optional[str]) -> Any:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), expected):  # constant time: no guessing it byte by byte
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                    "(or 'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})
    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"{e}: try again in {e.retry_after} s"}, status_code=503,
                            headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        # the traceback goes to the log only: it could show paths and code to a client
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse({"detail": "internal error (the server's log has the details)"}, status_code=500)
