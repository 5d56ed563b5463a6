"""The server as a public endpoint (issue 12 item 7): API key, body limit before reading, bounded concurrency with
503 + Retry-After, a timeout, a decode budget (large JPEGs decoded reduced, others refused), and a small run of
benchmarks/serve_load.py against a real server: no 5xx, valid answers equal predict's, alive afterwards."""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, tiny_config, write_csv_dataset, write_yaml
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vistrain.config.loader import load_config  # noqa: E402
from vistrain.pipelines.serve import Limits, create_app, load_predictor  # noqa: E402
from vistrain.pipelines.train import run_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_load  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("harden")
    data = write_csv_dataset(root / "data", per_class=6)
    cfg = tiny_config(data.root, train={"epochs": 1}, output={"exp_dir": str(root / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False})
    return run_train(load_config(write_yaml(root / "cfg.yaml", cfg))).run_dir


def png(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    grad = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None] * np.ones((size[1], 1, 3), np.float32)
    Image.fromarray(grad.astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def one(name: str, body: bytes) -> list:
    return [("files", (name, body, "application/octet-stream"))]


def test_the_api_key_guards_every_route_but_health(run: Path) -> None:
    client = TestClient(create_app(load_predictor(run), api_key="s3cret"))
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        res = client.post("/predict", files=one("a.png", png()), headers=headers)
        assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
        assert client.get("/metadata", headers=headers).status_code == 401
        assert client.get("/docs", headers=headers).status_code == 401
    ok = client.post("/predict", files=one("a.png", png()), headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["results"][0]["file"] == "a.png"


def test_api_key_env_must_name_a_set_variable(run: Path, tmp_path: Path) -> None:
    res = run_cli("serve", str(run), "--api-key-env", "VISTRAIN_TEST_NO_SUCH_KEY", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        "--api-key-env: environment variable VISTRAIN_TEST_NO_SUCH_KEY is not set or empty; export "
        "VISTRAIN_TEST_NO_SUCH_KEY=<key> first")


def test_a_body_over_the_limit_is_refused_before_it_is_read(run: Path) -> None:
    limits = Limits(max_request_mb=0.05)
    client = TestClient(create_app(load_predictor(run), limits))
    res = client.post("/predict", files=one("big.bin", b"\0" * 200_000))  # Content-Length tells
    assert res.status_code == 413 and "serve.max_request_mb" in res.json()["detail"]
    read = []

    def stream():  # no Content-Length: chunked; the server must stop reading at the limit
        yield (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.bin"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(100):
            read.append(1)
            yield b"\0" * 10_000

    res = client.post("/predict", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert res.status_code == 413, res.text
    print("chunks read", len(read))
    assert client.post("/predict", files=one("a.png", png())).status_code == 200


def test_excess_requests_get_503_with_retry_after_and_slow_ones_504(run: Path) -> None:
    predictor = load_predictor(run)
    fast = predictor._run

    def slow(batch: np.ndarray) -> dict:
        time.sleep(1.5)
        return fast(batch)

    predictor._run = slow
    client = TestClient(create_app(predictor, Limits(max_concurrency=1, timeout_s=5)))
    answers: list[int] = []
    first = threading.Thread(target=lambda: answers.append(client.post("/predict", files=one("a.png", png()))
                                                           .status_code))
    first.start()
    time.sleep(0.5)  # the first prediction holds the only slot
    busy = client.post("/predict", files=one("b.png", png()))
    first.join()
    assert answers == [200]
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert client.post("/predict", files=one("c.png", png())).status_code == 200  # the slot is back

    client = TestClient(create_app(predictor, Limits(timeout_s=0.3)))
    res = client.post("/predict", files=one("d.png", png()))
    assert res.status_code == 504 and "serve.timeout_s" in res.json()["detail"]


def test_the_decode_budget_reduces_a_large_jpeg_and_refuses_other_large_images(run: Path) -> None:
    client = TestClient(create_app(load_predictor(run), Limits(max_pixels=100_000, min_resolution=0)))
    res = client.post("/predict", files=one("photo.jpg", jpeg((800, 600))))  # 480 k pixels: decoded at 1/4 scale
    assert res.status_code == 200, res.text
    res = client.post("/predict", files=one("scan.png", png((800, 600))))
    assert res.status_code == 400 and "serve.max_pixels=100,000" in res.json()["detail"]
    from vistrain.data.images import load_rgb

    img = load_rgb(io.BytesIO(jpeg((800, 600))), reduce_over=100_000)
    assert img.size == (200, 150) and img.info["reduced"] == 4


def test_a_bounded_load_gets_no_5xx_answers_predict_and_leaves_the_server_alive(run: Path, tmp_path: Path) -> None:
    valid = serve_load.generated_images(6)
    folder = tmp_path / "valid"
    folder.mkdir()
    for name, body in valid.items():
        (folder / name).write_bytes(body)
    res = run_cli("predict", str(run), "--input", str(folder), "--probs", "--output", str(tmp_path / "p.csv"),
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    expected = pd.read_csv(tmp_path / "p.csv", dtype={"target": str})
    expected = dict(zip(expected.iloc[:, 0].astype(str), expected["target"]))

    uploads = {"valid": list(valid.items()), "invalid": list(serve_load.invalid_images().items()),
               "oversized": [("big.jpg", b"\xff" * int(1.2 * 2**20))]}
    server = serve_load.start_server(run, ["--max-mb", "1", "--max-concurrency", "2"])
    try:
        load = serve_load.run_load(server, uploads, (0.5, 0.35, 0.15), clients=3, requests=6)
        import httpx

        alive = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
    figures = serve_load.summarise(load, server)
    assert figures["server_errors"] == 0, figures
    assert alive
    statuses = {a["kind"]: set() for a in load["answers"]}
    for a in load["answers"]:
        statuses[a["kind"]].add(a["status"])
        if a["kind"] == "valid" and a["status"] == 200:
            (row,) = a["answer"]["results"]
            key = next(k for k in expected if Path(k).stem == Path(a["file"]).stem)
            assert row["class"] == expected[key], (a["file"], row, expected[key])
    assert statuses.get("invalid", {400}) <= {400, 503} and statuses.get("oversized", {413}) <= {413, 503}
    assert statuses.get("valid", {200}) <= {200, 503}
