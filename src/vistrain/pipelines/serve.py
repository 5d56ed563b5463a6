"""``vistrain serve RUN|MODEL.onnx``: parse, then ``vistrain.api.serve`` (serving/) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console, number, positive_float, positive_int, strict

NAME = "serve"
HELP = "HTTP inference for a run's model or an exported ONNX file (FastAPI)"
LABEL = "SERVING"


def _formats(text: str) -> list[str]:
    """``--formats JPEG,PNG``, checked as ``serve.formats`` is."""
    from pydantic import ValidationError

    from vistrain.config.schema import ServeCfg

    try:
        return ServeCfg(formats=[f.strip() for f in text.split(",") if f.strip()]).formats
    except ValidationError as err:
        raise argparse.ArgumentTypeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN|MODEL.onnx", help="run directory, or an ONNX file from vistrain export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, "a port number, 1..65535", most=65535), default=8000,
                   help="port, 1..65535 (default 8000)")
    p.add_argument("--fold", type=int, metavar="K",
                   help="with a RUN: serve this fold only (default: every trained fold averaged, as predict does)")
    # Default None: the serve: section of the run's config (or the ONNX file's vistrain.serve) applies.
    p.add_argument("--max-files", type=positive_int, metavar="N", help="images per request (serve.max_files: 32)")
    p.add_argument("--max-mb", type=positive_float, metavar="MB", help="size of one upload (serve.max_mb: 20)")
    p.add_argument("--top-k", type=positive_int, metavar="K", help="classes per answer (serve.top_k: 5)")
    p.add_argument("--min-resolution", type=number(int, "a whole number >= 0", above=-1), metavar="PX",
                   help="an image with a side under PX gets a warning (serve.min_resolution: 512; 0: never)")
    p.add_argument("--formats", type=_formats, metavar="JPEG,PNG",
                   help="image formats that get no warning (serve.formats: JPEG,PNG)")
    p.add_argument("--max-pixels", type=positive_int, metavar="N", help="decode budget per image: a larger JPEG "
                   "is decoded reduced (1/2..1/8), other formats refused (serve.max_pixels: 24000000)")
    p.add_argument("--max-request-mb", type=positive_float, metavar="MB",
                   help="a larger request body is refused (413) before it is read (serve.max_request_mb: 64)")
    p.add_argument("--max-concurrency", type=positive_int, metavar="N",
                   help="POST /predict requests in flight, upload to answer; one more gets 503 + Retry-After "
                        "(serve.max_concurrency: 4)")
    p.add_argument("--timeout", type=positive_float, metavar="S",
                   help="a prediction taking longer is answered 504; on SIGTERM the requests in flight get this "
                        "long to be answered (serve.timeout_s: 30)")
    p.add_argument("--api-key-env", metavar="NAME", help="require Authorization: Bearer <key> on every route but "
                   "/health, the key read from environment variable NAME")
    p.add_argument("--log-file", metavar="F", help="log file (appended; default: RUN/serve.log, or serve.log beside "
                                                   "the ONNX file): start-up, refused uploads, errors with traceback")
    strict(p, "a model without its preprocessing served with resize + normalisation only; GET /metadata")


def run_serve(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    limits = {"max_files": args.max_files, "max_mb": args.max_mb, "top_k": args.top_k,
              "min_resolution": args.min_resolution, "formats": args.formats, "max_pixels": args.max_pixels,
              "max_request_mb": args.max_request_mb, "max_concurrency": args.max_concurrency,
              "timeout_s": args.timeout}
    api.serve(args.target, host=args.host, port=args.port, fold=args.fold, limits=limits, log_file=args.log_file,
              api_key_env=args.api_key_env, strict=args.strict)
    return 0
