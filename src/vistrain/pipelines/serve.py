"""``vistrain serve RUN|MODEL.onnx``: HTTP inference (FastAPI) for a run's model or an exported ONNX file.

Endpoints:
  GET  /health    {"status": "ok", "task", "model", "backend", "classes"}
  GET  /metadata  what the model needs and gives: task, classes, display_names, preprocess (the run's
                  preprocess.json), img_size, mean, std, temperature, source (the run id or the file name, never a
                  path on the server)
  POST /predict   multipart form, one or more ``files`` (images). Classification: per file the class, its display
                  name (class_map.json's metadata; null when none), its probability and the ``top_k`` classes;
                  embedding: per file the embedding.

Uploads are checked before anything runs: at most ``max_files`` per request, ``max_mb`` each, and every file must
decode in full as an image (JPEG, PNG, ...; a truncated file, or one whose header lies about its size, is a 400).
Decoding has a budget of ``max_pixels`` per image: a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale while it is
decoded (libjpeg's DCT scaling), any other larger image is refused. A rejected request names the file and the reason
(HTTP 400, or 413 for size) and predicts nothing.

As a public endpoint: a request body over ``max_request_mb`` is refused (413) before it is read (by its length, or
cut off when it passes the limit without one); at most ``max_concurrency`` POST /predict requests are in flight, each
counted from its arrival (its upload included) until its prediction has returned, and one more gets vistrain's 503
(JSON, ``Retry-After``, logged) before its body is read: the only limiter, uvicorn is given none of its own; a
prediction over ``timeout_s`` is a 504, logged as such; ``--api-key-env NAME`` makes every route but /health need
``Authorization: Bearer <key>`` (401 otherwise); no answer carries a traceback or a server path; freed memory is
handed back to the system after each prediction. SIGTERM (Docker, Kubernetes, systemd) stops gracefully: no new
connection is accepted, the requests in flight get up to ``timeout_s`` to be answered, the log ends with
``[EXIT] SERVING SUCCESS code=0`` and the process exits 0.

Uploads are decoded as ``predict`` decodes files, then go through the run's own ``Preprocessor`` (crop, resize,
CLAHE, normalisation): from the checkpoint for a RUN, from the
``vistrain.preprocess`` metadata for an ONNX file (older files without it: resize to ``vistrain.img_size`` and
normalise). A RUN is served with PyTorch: every trained fold averaged, as ``predict`` does, or one ``--fold``. An ONNX
file (one fold, see ``vistrain export``) runs with onnxruntime, its metadata checked against the graph first
(``export.read_onnx_metadata``).

Log: the console, and a file (``--log-file``; by default ``RUN/serve.log`` for a run, ``serve.log`` beside an ONNX
file): the start-up line, each refused upload (one line), each internal error (a 500 whose answer says no more;
its traceback in the file), a stop by SIGTERM and, last, the outcome: a start-up failure with its traceback, then
``[EXIT] SERVING``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time, and the
# endpoints' types (UploadFile) are imported inside create_app, where only evaluated annotations can see them.
import asyncio
import ctypes
import hmac
import io
import json
import logging
import math
import os
import signal
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vistrain.config.schema import ServeCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.errors import UserError, describe
from vistrain.tracking.logs import FILE_ONLY, log_outcome, run_logging

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
    def resolve(cls, section: dict[str, Any], flags: dict[str, Any] | None = None) -> "Limits":
        """``section``'s values, each replaced by the flag of the same name that is not None."""
        values = {**section, **{k: v for k, v in (flags or {}).items() if v is not None}}
        return cls(**{**values, "formats": tuple(values["formats"])})

    def describe(self) -> str:
        return (f"max_files={self.max_files} max_mb={self.max_mb:g} top_k={self.top_k} "
                f"min_resolution={self.min_resolution} formats={','.join(self.formats)} max_pixels={self.max_pixels} "
                f"max_request_mb={self.max_request_mb:g} max_concurrency={self.max_concurrency} "
                f"timeout_s={self.timeout_s:g}")


@dataclass
class Predictor:
    """One model behind one ``__call__``: a float32 batch [N, 3, H, W] -> the output arrays by name."""

    task: str
    classes: list[str]
    preprocessor: Preprocessor  # the run's: decoded uploads -> the model's input
    temperature: float
    backend: str  # "torch" or "onnxruntime"
    source: str  # the run id and folds, or the file's name: never a path on the server's disk
    model_name: str
    _run: Any = field(repr=False, default=None)
    serve: dict[str, Any] = field(default_factory=lambda: ServeCfg().model_dump())  # the serve: section it came with
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    display_names: list[str | None] | None = None  # per class, from class_map.json's metadata; None: none known
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # engine/fallbacks.py: a preprocessing assumed

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB upload -> float32 [3, H, W]."""
        return self.preprocessor.process(np.asarray(image))

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:  # one request at a time on the model: predictable memory, no oversubscribed threads
            return self._run(batch)

    def metadata(self) -> dict[str, Any]:
        p = self.preprocessor
        return {"task": self.task, "model": self.model_name, "backend": self.backend, "source": self.source,
                "classes": self.classes, "display_names": self.display_names, "preprocess": p.to_dict(),
                "img_size": list(p.size), "mean": list(p.mean), "std": list(p.std), "temperature": self.temperature,
                "input": "multipart/form-data, field 'files': one or more images", "fallbacks": self.fallbacks}


def torch_predictor(run_dir: Path, fold: int | None = None, strict: bool = False) -> Predictor:
    """A run's best checkpoints with PyTorch on the run's device: every trained fold, averaged as ``predict``
    averages them (probabilities; logits too), or the one ``fold``."""
    from vistrain.engine import device as dev
    from vistrain.engine.inference import load_fold_model, load_run, select_folds
    from vistrain.pipelines.export import Deployable

    run = load_run(run_dir, strict=strict)
    chosen = select_folds(run, [fold] if fold is not None else None, key="--fold")
    device = dev.pick_device(run.cfg.train.device)
    # Several folds averaged: the ensemble's temperature (T = 1 unless one was fitted on the ensemble's outputs),
    # each fold's softmax at it, then the mean; one fold: that model's temperature.
    temperature = run.temperature_for(chosen) or 1.0
    modules = []
    for k in chosen:
        model, pre = load_fold_model(run, k, device)  # one run, one preprocessing: every fold records the same
        modules.append(Deployable.of_run(model, run, temperature))
    names = modules[0].output_names

    @torch.no_grad()
    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(batch).to(device)
        per_fold = [m(x) for m in modules]
        per_fold = [o if isinstance(o, tuple) else (o,) for o in per_fold]
        return {name: torch.stack([o[i] for o in per_fold]).float().mean(dim=0).cpu().numpy()
                for i, name in enumerate(names)}

    which = f"fold {chosen[0]}" if len(chosen) == 1 else f"folds {','.join(map(str, chosen))} averaged"
    return Predictor(run.cfg.task, [str(c) for c in run.classes], pre, float(temperature), "torch",
                     f"{run.path.name} {which}", run.cfg.model.name, infer, serve=run.cfg.serve.model_dump(),
                     display_names=run.display_names(), fallbacks=run.fallbacks.entries)


def onnx_predictor(path: Path, strict: bool = False) -> Predictor:
    """An ONNX file written by ``vistrain export``, run with onnxruntime on the CPU; its metadata checked first."""
    from vistrain.engine import device as dev
    from vistrain.engine.fallbacks import Fallbacks
    from vistrain.pipelines.export import onnx_session, read_onnx_metadata

    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError("MODEL: serving an ONNX file needs onnxruntime; pip install 'vistrain[export]'") from err
    try:
        session = onnx_session(path, dev.apply_num_threads("auto", workers=0))  # no DataLoader: requests decode
    except Exception as err:  # noqa: BLE001 - onnxruntime's own error types: not an ONNX file, corrupt, ...
        raise UserError(f"MODEL: {path} is not a readable ONNX file ({str(err).splitlines()[0][:200]})") from err
    fallbacks = Fallbacks(strict)
    meta = read_onnx_metadata(path, session, fallbacks)
    names = [o.name for o in session.get_outputs()]

    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {"image": batch})))

    return Predictor(meta["task"], meta["classes"], meta["preprocessor"], meta["temperature"], "onnxruntime",
                     path.name, meta["model"], infer, serve=meta["serve"], display_names=meta["display_names"],
                     fallbacks=fallbacks.entries)


def load_predictor(target: Path, fold: int | None = None, strict: bool = False) -> Predictor:
    """``strict``: a fallback (a preprocessing assumed for a model that does not record its own) is an error."""
    if target.is_file() and target.suffix.lower() == ".onnx":
        if fold is not None:
            raise UserError("--fold: only for a run directory; an ONNX file holds one model")
        return onnx_predictor(target, strict)
    if target.is_dir():
        return torch_predictor(target, fold, strict)
    raise UserError(f"RUN|MODEL: {target} is neither a run directory nor an .onnx file")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(name: str, data: bytes, limits: Limits) -> Image.Image:
    """The uploaded bytes as an RGB image decoded exactly as ``predict`` decodes files (``load_rgb``: EXIF
    orientation, transparency on white, 16-bit range rescaled), or an ``UploadError`` naming the file."""
    from vistrain.data.images import load_rgb

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
        # The whole file is decoded (a truncated or lying file is refused, never half-read); a large JPEG at a
        # reduced scale, so no upload costs more than the budget's pixels.
        return load_rgb(io.BytesIO(data), max_pixels=limits.max_pixels, reduce_over=limits.max_pixels)
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


def results(predictor: Predictor, names: list[str], outputs: dict[str, np.ndarray], top_k: int
            ) -> list[dict[str, Any]]:
    """The JSON answer for each file, in upload order."""
    rows = []
    for i, name in enumerate(names):
        if predictor.task == "classification":
            probs = outputs["probs"][i]
            top = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
            names = predictor.display_names or [None] * len(predictor.classes)
            rows.append({"file": name, "class": predictor.classes[int(top[0])], "display_name": names[int(top[0])],
                         "prob": float(probs[top[0]]),
                         "top": [{"class": predictor.classes[int(j)], "display_name": names[int(j)],
                                  "prob": float(probs[j])} for j in top]})
        else:
            rows.append({"file": name, "embedding": [float(x) for x in outputs["embedding"][i]]})
    return rows


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


def _return_memory() -> None:
    """Give freed heap back to the system after a request (glibc keeps large freed arenas otherwise, so one burst
    of big uploads would leave the server's resident size high for good)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _after_timeout(job: Future) -> None:
    """A prediction answered 504 that ends later: an unusable upload was no answer anyone got (not logged); an internal
    error is still a bug to see in the log."""
    err = None if job.cancelled() else job.exception()
    if err is not None and not isinstance(err, UploadError):
        log.error("[SERVE] POST /predict (answered 504) then failed: %s", describe(err))
        log.error("%s", "".join(traceback.format_exception(err)).rstrip(), extra=FILE_ONLY)


def create_app(predictor: Predictor, limits: Limits | None = None, api_key: str | None = None) -> Any:
    """The FastAPI application around ``predictor`` (``uvicorn`` serves it; tests use its TestClient).
    ``api_key``: every route but /health needs ``Authorization: Bearer <api_key>``."""
    try:
        from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    except ImportError as err:
        raise UserError(SERVE_MISSING) from err
    limits = limits or Limits.resolve(predictor.serve)
    app = FastAPI(title="vistrain", description=f"{predictor.task} model {predictor.model_name}")
    app.add_middleware(_Limiter, limit=limits.max_concurrency)
    app.add_middleware(_Guard, api_key=api_key, max_body=int(limits.max_request_mb * 2**20))  # added last: outermost
    # One thread per slot (each prediction decodes one upload at a time): a timed-out prediction is left to finish in
    # its thread while its slot stays taken.
    pool = ThreadPoolExecutor(limits.max_concurrency, thread_name_prefix="predict")

    def refuse(status: int, message: str) -> HTTPException:
        log.warning("[SERVE] POST /predict -> %d %s", status, message)
        return HTTPException(status, message)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "task": predictor.task, "model": predictor.model_name, "backend": predictor.backend,
                "classes": len(predictor.classes)}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return predictor.metadata()

    def answer(names: list[str], bodies: list[bytes]) -> dict[str, Any]:
        """Runs in a pool thread; an unusable upload raises UploadError, which the request answers (and logs)
        unless it has already answered 504."""
        try:
            tensors, notes = [], []
            for n, data in zip(names, bodies):  # one decoded image in memory at a time; only its tensor stays
                tensors.append(predictor.preprocess(decode_upload(n, data, limits)))
                notes.append(upload_warnings(data, limits))
            batch = torch.stack(tensors).numpy()
            rows = results(predictor, names, predictor(batch), limits.top_k)
            for row, warnings in zip(rows, notes):
                row["warnings"] = warnings
            return {"task": predictor.task, "results": rows}
        finally:
            _return_memory()

    @app.post("/predict")
    async def predict(request: Request, files: list[UploadFile] = File(...)) -> Any:  # noqa: B008 - FastAPI's style
        if len(files) > limits.max_files:
            raise refuse(400, f"files: {len(files)} in one request, over the limit of {limits.max_files}")
        names = [f.filename or f"file{i}" for i, f in enumerate(files)]
        bodies = [await f.read(int(limits.max_mb * 2**20) + 1) for f in files]
        ticket: _Ticket = request.scope[TICKET]
        ticket.hold()
        try:
            job = pool.submit(answer, names, bodies)
        except BaseException:
            ticket.release()
            raise
        job.add_done_callback(lambda _: ticket.release())  # also when it never ran (cancelled)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), limits.timeout_s)
        except UploadError as err:
            raise refuse(err.status, str(err)) from None
        except TimeoutError:
            job.add_done_callback(_after_timeout)
            raise refuse(504, f"the prediction took longer than {limits.timeout_s:g} s (serve.timeout_s)") from None

    return app


def default_log_file(target: Path) -> Path | None:
    """``RUN/serve.log`` for a run, ``serve.log`` beside an ONNX file; None for anything else."""
    if target.is_dir():
        return target / "serve.log"
    return target.parent / "serve.log" if target.is_file() else None


def api_key_from(env_name: str | None) -> str | None:
    """``--api-key-env NAME``: the key in that environment variable (a key on the command line would be visible to
    every user of the machine in the process list)."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise UserError(f"--api-key-env: environment variable {env_name} is not set or empty; export {env_name}=<key> "
                        "first")
    return key


class _Terminated(BaseException):
    """SIGTERM: the orderly stop that Docker, Kubernetes and systemd ask for, not an error (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it)."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def run_serve(target: Path, host: str = "127.0.0.1", port: int = 8000, fold: int | None = None,
              limits: dict[str, Any] | None = None, log_file: Path | None = None, api_key_env: str | None = None,
              strict: bool = False) -> None:
    """Serve until Ctrl-C or SIGTERM (both an orderly stop: the requests in flight are answered first); the log file
    (``log_file``, else ``default_log_file``) ends with the outcome. ``limits``: the ``Limits`` fields given on the
    command line (None: the model's ``serve:`` section). ``strict``: see ``load_predictor``."""
    api_key = api_key_from(api_key_env)
    log_file = log_file or default_log_file(target)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.open("a").close()
        except OSError as err:
            raise UserError(f"--log-file: cannot write {log_file} ({err.strerror or err}); choose another "
                            "--log-file") from err
    # While uvicorn serves, its own handler takes SIGTERM (stop accepting, let the requests in flight finish) and
    # raises the signal again once done: this handler then ends the command as a success. Before that (loading the
    # model) it stops the start-up.
    main = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    with run_logging([log_file] if log_file else []):
        log.info("[SERVE] log: %s | target: %s", log_file, target)
        try:
            _serve(target, host, port, fold, limits, api_key, strict)
        except _Terminated:
            log.info("[SERVE] SIGTERM during start-up: stopped before serving")
        except BaseException as err:
            log_outcome(log, "SERVING", err)
            raise
        finally:
            if main:  # None: the previous handler was not set from Python (the default, as far as it can tell)
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        log_outcome(log, "SERVING")


def _serve(target: Path, host: str, port: int, fold: int | None, flags: dict[str, Any] | None,
           api_key: str | None = None, strict: bool = False) -> None:
    try:
        import uvicorn
    except ImportError as err:
        raise UserError(SERVE_MISSING) from err
    predictor = load_predictor(target, fold, strict)
    limits = Limits.resolve(predictor.serve, flags)
    given = sorted(k for k, v in (flags or {}).items() if v is not None)
    log.info("[SERVE] limits: %s (the %s's serve: section%s)", limits.describe(),
             "run" if predictor.backend == "torch" else "file", f"; flags: {', '.join(given)}" if given else "")
    app = create_app(predictor, limits, api_key)
    if api_key is not None:
        log.info("[SERVE] every route but /health needs Authorization: Bearer <the key>")
    _check_port(host, port)
    log.info("[SERVE] %s model %s (%s, %s) on http://%s:%d  (POST /predict, GET /health, GET /metadata)",
             predictor.task, predictor.model_name, predictor.backend, predictor.source, host, port)
    # No limit_concurrency: uvicorn's own limit would answer a plain-text 503 (no Retry-After, not logged) before
    # vistrain's _Limiter sees the request. On Ctrl-C or SIGTERM the requests in flight get timeout_s to finish.
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                    timeout_graceful_shutdown=math.ceil(limits.timeout_s))
    except _Terminated:
        log.info("[SERVE] stopped by SIGTERM: new connections refused, the requests in flight given up to %g s "
                 "(serve.timeout_s) to be answered", math.ceil(limits.timeout_s))
        return
    log.info("[SERVE] stopped")


def _check_port(host: str, port: int) -> None:
    """A port that cannot be bound is a user error now, not a uvicorn traceback after the start-up line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, OverflowError) as err:
        raise UserError(f"--host: cannot use {host}:{port} ({err})") from err
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise UserError(f"--port: cannot listen on {host}:{port} ({err.strerror or err}); is another server "
                            "using it? choose another --port") from err
