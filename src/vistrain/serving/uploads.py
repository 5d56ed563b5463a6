"""What ``serve`` checks before a model runs: the limits (``serve.*`` keys and flags), the ASGI guard that refuses a
request over its body limit or over the concurrency limit before its upload is read, and the decoding of one upload
(exactly as ``predict`` decodes a file) with its warnings."""

from __future__ import annotations

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time, and the
# endpoints' types (UploadFile) are imported inside create_app, where only evaluated annotations can see them.
import hmac
import io
import json
import logging
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vistrain.data.preprocess import Preprocessor
from vistrain.errors import describe
from vistrain.tracking.logs import FILE_ONLY

log = logging.getLogger(__name__)

SERVE_MISSING = "serve: needs fastapi, uvicorn and python-multipart; pip install 'vistrain[serve]'"
TICKET = "vistrain.ticket"  # the ASGI scope key under which _Limiter hands a POST /predict its slot


@dataclass
class Limits:
    """The upload limits and checks of one server: the ``serve:`` section (``config.schema.ServeCfg``) of the run's
    config or of an exported file's ``vistrain.serve`` metadata, with the CLI flags over it."""

    max_files: int = 32
    max_mb: float = 20.0
    top_k: int = 5
    min_resolution: int = 512
    formats: tuple[str, ...] = ("JPEG", "PNG")
    max_pixels: int = 24_000_000
    max_request_mb: float = 64.0
    max_concurrency: int = 4
    timeout_s: float = 30.0

    @classmethod
    def resolve(cls, section: dict[str, Any], flags: dict[str, Any] | None = None) -> Limits:
        """``section``'s values, each replaced by the flag of the same name that is not None."""
        values = {**section, **{k: v for k, v in (flags or {}).items() if v is not None}}
        return cls(**{**values, "formats": tuple(values["formats"])})

    def describe(self) -> str:
        return (f"max_files={self.max_files} max_mb={self.max_mb:g} top_k={self.top_k} "
                f"min_resolution={self.min_resolution} formats={','.join(self.formats)} max_pixels={self.max_pixels} "
                f"max_request_mb={self.max_request_mb:g} max_concurrency={self.max_concurrency} "
                f"timeout_s={self.timeout_s:g}")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(name: str, data: bytes, limits: Limits, pre: Preprocessor) -> Image.Image:
    """The uploaded bytes as an RGB image decoded exactly as ``predict`` decodes files (``pre.decode``, the model's
    preprocessor: EXIF orientation, transparency on white, 16-bit range rescaled, a large JPEG reduced by the
    preprocessor's rule), or an ``UploadError`` naming the file."""
    if not data:
        raise UploadError(400, f"{name}: empty file")
    if len(data) > limits.max_mb * 2**20:
        raise UploadError(413, f"{name}: larger than the limit of {limits.max_mb:g} MB")
    try:
        with Image.open(io.BytesIO(data)) as img:
            (w, h), fmt = img.size, img.format
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise UploadError(400, f"{name}: not a readable image ({type(err).__name__})") from err
    if w * h > limits.max_pixels and (fmt != "JPEG" or w * h > 64 * limits.max_pixels):
        raise UploadError(400, f"{name}: {w}x{h} pixels is over serve.max_pixels={limits.max_pixels:,} (only a "
                               "JPEG up to 64 times that is decoded reduced)")
    try:
        # The whole file is decoded (a truncated or lying file is refused, never half-read); a large JPEG at the
        # reduced scale every path uses, or smaller where the budget's pixels need it.
        return pre.decode(io.BytesIO(data), max_pixels=limits.max_pixels, reduce_over=limits.max_pixels)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt body behind a valid header
        raise UploadError(400, f"{name}: not a readable image ({type(err).__name__})") from err


def upload_warnings(data: bytes, limits: Limits) -> list[str]:
    """What seed 003's BFF warns about in an image it still passes on: a side under ``min_resolution``, a format not
    in ``formats`` (from the file's header; ``decode_upload`` has already accepted it). A phone's multi-picture
    JPEG (Pillow's MPO) counts as JPEG."""
    with Image.open(io.BytesIO(data)) as img:
        (w, h), fmt = img.size, img.format or "unknown"
    notes = []
    if min(w, h) < limits.min_resolution:
        notes.append(f"resolution {w}x{h} is under serve.min_resolution={limits.min_resolution}")
    if ("JPEG" if fmt == "MPO" else fmt) not in limits.formats:
        notes.append(f"format {fmt} is not one of {', '.join(limits.formats)}")
    return notes


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI, around the whole application: the API key (every route but /health), the request-body limit
    (by Content-Length before anything is read, then by counting what arrives, so an upload without a length is
    cut at the limit too, never spooled whole to disk), and internal errors (a 500 that reveals nothing; the
    traceback goes to the log file)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        where = f"{scope['method']} {scope['path']}"
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] != "/health":
            # compare_digest: the time taken does not tell how much of a guessed key was right
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                log.warning("[SERVE] %s -> 401 missing or wrong API key", where)
                return await _answer(send, 401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                     [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            log.warning("[SERVE] %s -> 413 request body of %s bytes", where, length.decode(errors="replace"))
            return await _answer(send, 413, f"request body over the limit of {self.max_body / 2**20:g} MB "
                                            "(serve.max_request_mb)")
        received, started, over = 0, False, False
        too_large = f"request body over the limit of {self.max_body / 2**20:g} MB (serve.max_request_mb)"

        async def counted() -> dict[str, Any]:
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                over = True
                raise _BodyTooLarge
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            if over:  # the application answered the cut-off body (FastAPI: 400 "error parsing the body"): ours instead
                if not started:
                    started = True
                    log.warning("[SERVE] %s -> 413 request body over %d bytes (no length given)", where,
                                self.max_body)
                    await _answer(send, 413, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge:
            if not started:
                log.warning("[SERVE] %s -> 413 request body over %d bytes (no length given)", where, self.max_body)
                await _answer(send, 413, too_large)
        except Exception as err:  # noqa: BLE001 - every unexpected error of a request ends here
            log.error("[SERVE] %s -> 500 %s", where, describe(err))
            log.error("%s", "".join(traceback.format_exception(err)).rstrip(), extra=FILE_ONLY)
            if not started:
                await _answer(send, 500, "internal error; see the server's log")


async def _answer(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class _Ticket:
    """One POST /predict's slot: held by the request and, once it starts, by its prediction's thread; given back when
    both have let go (a prediction answered 504 keeps its memory, so its slot, until its thread returns)."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self._slots, self._holders, self._lock = slots, 1, threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._slots.release()


class _Limiter:
    """Pure ASGI, inside ``_Guard`` (an unauthorised or oversized request takes no slot): vistrain's one limit on
    POST /predict. A request takes a slot when it arrives, before its body is read, so a busy server is refused
    cheaply (no upload read or spooled to disk) and uploads in progress count against the memory bound; beyond
    ``limit`` the answer is a JSON 503 with ``Retry-After``, and a log line."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit
        self.slots = threading.BoundedSemaphore(limit)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) != ("POST", "/predict"):
            return await self.app(scope, receive, send)
        if not self.slots.acquire(blocking=False):
            log.warning("[SERVE] POST /predict -> 503 busy (%d requests in flight)", self.limit)
            return await _answer(send, 503, f"busy: {self.limit} requests in flight (serve.max_concurrency); retry "
                                            "shortly", [(b"retry-after", b"1")])
        ticket = scope[TICKET] = _Ticket(self.slots)
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.release()


