"""How close does the real data path get to the pure training step? (a ratio, measured in one run)

    python benchmarks/bench_loader.py [--model resnet10t] [--img-size 64] [--images 512] [--batch 64]
                                      [--workers 0,2] [--steps 20]

Writes a small PNG dataset to a temporary folder, then times, in the same process:
  ceiling   the training step on synthetic tensors already on the device (no data loading at all)
  loader    the same step fed by vistrain's DataLoader (decode + augment in workers)
and prints images/s for each and loader/ceiling. A ratio near 1.0 means the accelerator never waits for the
CPU. Absolute numbers on a shared CPU mean little; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vistrain.config.schema import AugmentCfg
from vistrain.data.dataset import ImageDataset, worker_init
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform
from vistrain.engine.device import autocast, pick_device, pick_precision
from vistrain.models.build import build_classifier


def make_images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


def time_steps(model, optimizer, batches, device, precision, steps: int) -> float:
    """Seconds per training step over ``steps`` batches after two warm-up steps."""
    it = iter(batches)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, labels = next(it)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = pick_device("auto")
    precision = pick_precision("auto", device)
    model = build_classifier(args.model, 10).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shape = (args.batch, 3, args.img_size, args.img_size)
    synthetic = [(torch.randn(shape, device=device), torch.randint(0, 10, (args.batch,), device=device))]

    def forever(batches):
        while True:
            yield from batches

    ceiling = time_steps(model, optimizer, forever(synthetic), device, precision, args.steps)
    rows = [("ceiling (synthetic on device)", args.batch / ceiling, 1.0)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, int(args.img_size * 1.25))
        pre = Preprocessor(size=(args.img_size, args.img_size), mean=(0.5,) * 3, std=(0.25,) * 3)
        tf = TrainTransform(AugmentCfg(policy="light"), pre)
        for workers in (int(w) for w in args.workers.split(",")):
            ds = ImageDataset(paths, [i % 10 for i in range(len(paths))], tf, pre.load)
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                worker_init_fn=worker_init if workers else None)
            batches = ((x, y) for x, y, _ in forever(loader))
            step = time_steps(model, optimizer, batches, device, precision, args.steps)
            rows.append((f"loader, {workers} worker(s)", args.batch / step, ceiling / step))
    print(f"device={device} precision={precision.name} model={args.model} img={args.img_size} batch={args.batch}")
    print(f"{'path':<32} {'images/s':>10} {'ratio':>7}")
    for name, ips, ratio in rows:
        print(f"{name:<32} {ips:>10.1f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()
