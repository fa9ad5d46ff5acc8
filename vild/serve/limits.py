"""What one request may ask of the server, and the checks that refuse more with the limit named."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass
class Limits:
    """Per-request limits; each is a ``vild-serve`` flag of the same name (``--max-bytes`` ...).

    Args:
        max_bytes: request body size (a base64 JSON body is 4/3 of the image's bytes).
        max_pixels: image width × height, checked from the image's header before it is decoded.
        max_names: category names in a vocabulary, synonyms included (each one is embedded by the text model).
        max_name_chars: characters in one name.
        max_detections: the most ``max_detections`` a request may ask for.
    """

    max_bytes: int = 20 * 2 ** 20
    max_pixels: int = 25_000_000
    max_names: int = 256
    max_name_chars: int = 100
    max_detections: int = 100

    def as_dict(self) -> dict:
        """The limits by name, as ``GET /info`` reports them."""
        return asdict(self)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a ``detail`` that names the problem and the fix."""

    def __init__(self, status: int, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def too_large(what: str, size: int, limit: int, flag: str) -> RequestError:
    """413 naming the size, the limit and the flag that sets it."""
    return RequestError(413, f"{what} is {size}; the limit is {limit} (vild-serve {flag})")


class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by its Content-Length or as it streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, too_large("the request body", f"{int(declared)} bytes",
                                                    f"{self.max_bytes} bytes", "--max-bytes"))
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body, or one longer than it said
                    raise too_large("the request body", f"over {self.max_bytes} bytes", f"{self.max_bytes} bytes",
                                    "--max-bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Any, error: RequestError) -> None:
    body = json.dumps({"detail": error.detail}).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
