"""A bounded load test of ``vistrain serve``: C clients x R requests against a server started on 127.0.0.1.

    python benchmarks/serve_load.py RUN|MODEL.onnx [--clients 8] [--requests 25] [--valid DIR]
                                    [--mix 0.6,0.3,0.1] [--json out.json] [-- serve flags ...]

Each request uploads one file drawn by the mix (valid, invalid, oversized): valid images come from --valid (default:
generated PNG / JPEG photos-like images), invalid ones are hostile files (text named .jpg, a truncated JPEG, a JPEG
whose header claims 7000x9000, a 30000x30000 PNG decompression bomb, a 16-bit 5000x5000 PNG over the default decode
budget), oversized ones are a few MB over ``--max-mb``. A 503 (max_concurrency) is retried after its Retry-After;
a 503 without one (not vistrain's limiter: a server in front, or the HTTP server's own limit) is counted apart.
Reports p50 / p95 / p99 latency per kind, throughput, status counts, the server's peak
resident memory (sampled from /proc every 20 ms) and whether it still answers /health afterwards; --json writes every
figure with the machine and the command line. Exit status 1 when any answer is a 5xx or the server died.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 30000) -> bytes:
    """A valid all-zero 1-bit PNG of side x side: ~100 KB, 900 M pixels decoded."""
    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def lying_jpeg(width: int = 7000, height: int = 9000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def generated_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """Photo-like uploads: smooth colour fields with noise, 300-700 px, half PNG, half JPEG."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 700, 2))
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        img = np.clip(field_ + rng.normal(0, 12, field_.shape), 0, 255).astype(np.uint8)
        buf, fmt = io.BytesIO(), ("PNG", "JPEG")[i % 2]
        Image.fromarray(img).save(buf, fmt)
        out[f"valid_{i}.{fmt.lower().replace('jpeg', 'jpg')}"] = buf.getvalue()
    return out


def invalid_images() -> dict[str, bytes]:
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(jpeg, "JPEG")
    deep = io.BytesIO()
    Image.fromarray(np.zeros((5000, 5000), np.uint16)).save(deep, "PNG")  # ~50 KB, 25 M pixels of 16 bits
    return {"text.jpg": b"not an image\n" * 10, "truncated.jpg": jpeg.getvalue()[:300], "lying.jpg": lying_jpeg(),
            "bomb.png": png_bomb(), "deep16_5000.png": deep.getvalue()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    peak_rss_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        """Peak resident memory, sampled from /proc while the load runs."""
        status = Path(f"/proc/{self.process.pid}/status")
        while not self._stop.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.02)

    def stop(self) -> str:
        self._stop.set()
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out or ""


def start_server(target: Path, serve_args: list[str], env: dict[str, str] | None = None,
                 timeout: float = 180) -> Server:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vistrain", "serve", str(target), "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.communicate()[0][-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                threading.Thread(target=server.watch, daemon=True).start()
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("the server did not answer /health in time")


def run_load(server: Server, uploads: dict[str, list[tuple[str, bytes]]], mix: tuple[float, float, float],
             clients: int, requests: int, headers: dict[str, str] | None = None, seed: int = 0,
             timeout: float = 120, retries: int = 30) -> dict[str, Any]:
    """``clients`` threads, each sending ``requests`` single-file uploads drawn by ``mix``; every answer kept. A 503
    (the server's max_concurrency) is retried after its Retry-After, as a well-behaved client does, up to
    ``retries`` times; the latency includes the waits."""
    import httpx

    kinds = ("valid", "invalid", "oversized")
    rng = np.random.default_rng(seed)
    plan = [[(kinds[int(rng.choice(3, p=mix))], int(rng.integers(1 << 30))) for _ in range(requests)]
            for _ in range(clients)]
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(jobs: list[tuple[str, int]]) -> None:
        with httpx.Client(base_url=server.url, timeout=timeout, headers=headers) as http:
            for kind, pick in jobs:
                name, body = uploads[kind][pick % len(uploads[kind])]
                start, busy, bare = time.perf_counter(), 0, 0
                while True:
                    try:
                        res = http.post("/predict", files=[("files", (name, body, "application/octet-stream"))])
                        status, payload = res.status_code, res.json() if res.headers.get(
                            "content-type", "").startswith("application/json") else res.text
                    except httpx.HTTPError as err:
                        status, payload = 0, f"{type(err).__name__}: {err}"
                        break
                    bare += status == 503 and "retry-after" not in res.headers
                    if status != 503 or busy == retries:
                        break
                    busy += 1
                    time.sleep(float(res.headers.get("retry-after", "1")))
                with lock:
                    answers.append({"kind": kind, "file": name, "status": status, "ms": (time.perf_counter() - start)
                                    * 1000, "answer": payload, "busy_retries": busy, "busy_without_retry_after": bare})

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, plan))
    wall = time.perf_counter() - start
    return {"answers": answers, "wall_s": wall}


def summarise(load: dict[str, Any], server: Server) -> dict[str, Any]:
    answers = load["answers"]
    out: dict[str, Any] = {"requests": len(answers), "wall_s": round(load["wall_s"], 3),
                           "throughput_rps": round(len(answers) / load["wall_s"], 2),
                           "peak_rss_mb": round(server.peak_rss_mb, 1), "status": {}, "latency_ms": {}}
    for a in answers:
        out["status"][str(a["status"])] = out["status"].get(str(a["status"]), 0) + 1
    for kind in ("valid", "invalid", "oversized", "all"):
        ms = [a["ms"] for a in answers if kind in ("all", a["kind"])]
        if ms:
            out["latency_ms"][kind] = {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}
    out["busy_retries"] = sum(a["busy_retries"] for a in answers)  # 503, then retried
    out["busy_without_retry_after"] = sum(a["busy_without_retry_after"] for a in answers)
    out["server_errors"] = sum(a["status"] >= 500 or a["status"] == 0 for a in answers)
    return out


def main(argv: list[str] | None = None) -> int:
    import httpx

    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--valid", type=Path, help="folder of valid images (default: generated)")
    p.add_argument("--mix", default="0.6,0.3,0.1", help="valid,invalid,oversized shares")
    p.add_argument("--max-mb", type=float, default=20.0, help="the server's upload limit (passed on)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    mix = tuple(float(x) for x in args.mix.split(","))
    if args.valid:
        valid = [(f.name, f.read_bytes()) for f in sorted(args.valid.iterdir()) if f.is_file()]
    else:
        valid = list(generated_images(16).items())
    oversized = [("big.jpg", os.urandom(int((args.max_mb + 2) * 2**20)))]
    uploads = {"valid": valid, "invalid": list(invalid_images().items()), "oversized": oversized}
    server = start_server(args.target, ["--max-mb", str(args.max_mb), *serve_args])
    try:
        load = run_load(server, uploads, mix, args.clients, args.requests)
        alive = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        log = server.stop()
    figures = summarise(load, server) | {"alive_after": alive}
    figures |= {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
                "command": " ".join(sys.argv), "clients": args.clients, "requests_per_client": args.requests,
                "mix": mix}
    print(f"{figures['requests']} requests in {figures['wall_s']} s ({figures['throughput_rps']} req/s), "
          f"status {figures['status']} ({figures['busy_retries']} retries after 503, "
          f"{figures['busy_without_retry_after']} 503 without Retry-After), server peak RSS "
          f"{figures['peak_rss_mb']} MB, alive after: {alive}")
    for kind, q in figures["latency_ms"].items():
        print(f"  {kind:10s} p50 {q['p50']:8.1f} ms   p95 {q['p95']:8.1f} ms   p99 {q['p99']:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if figures["server_errors"] or not alive:
        print(log[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        sys.exit(main())
