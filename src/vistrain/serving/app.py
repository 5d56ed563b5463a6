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
import logging
import math
import os
import signal
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vistrain.errors import UserError, describe
from vistrain.serving.predictor import Predictor, load_predictor, results  # noqa: F401 - load_predictor: what a caller of create_app loads
from vistrain.serving.uploads import (  # noqa: F401 - decode_upload: the upload decoding tests reach through the app
    SERVE_MISSING,
    TICKET,
    Limits,
    UploadError,
    _Guard,
    _Limiter,
    _Ticket,
    decode_upload,
    upload_warnings,
)
from vistrain.tracking.logs import FILE_ONLY, log_outcome, run_logging

log = logging.getLogger(__name__)


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
                tensors.append(predictor.preprocess(decode_upload(n, data, limits, predictor.preprocessor)))
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
