"""How far the default int8 recipe (``vistrain export --quantize int8``) moves a run's answers, on images it was not
calibrated on, over several calibration draws.

    python benchmarks/int8_agreement.py RUN [--draws 3] [--fold 0]

Each draw calibrates ``deploy.quantize_int8`` on ``CALIB_IMAGES`` training images of the fold (a different seeded
draw of its training rows each time) and compares the int8 file with the float one on every held-out row: the fold's
validation rows plus, for a ratio split, its ``test`` rows (neither is ever calibrated on). Prints per draw the top-1
agreement, the changed rows and how many of them were near ties in the float file (top-2 margin under 0.05), and the
largest probability change. Needs ``RUN/export/model_fold{k}.onnx`` (``vistrain export RUN``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from vistrain.engine import deploy
from vistrain.engine.inference import load_fold_model, load_run

NEAR_TIE = 0.05  # a float top-2 margin under this is a coin toss for any rounding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.run)
    if run.cfg.task != "classification":
        parser.error(f"{args.run}: a classifier's run is needed (top-1 agreement); this one is {run.cfg.task}")
    _, pre = load_fold_model(run, args.fold, torch.device("cpu"))
    float_path = run.path / "export" / f"model_fold{args.fold}.onnx"
    train, _, val, _ = deploy.deploy_rows(run, args.fold)
    items = run.splits()
    held = val["path"].tolist() + (items.loc[items["split"] == "test", "path"].tolist()
                                   if "split" in items.columns and run.cfg.data.split == "ratio" else [])
    inputs = np.concatenate(list(deploy.input_batches(run, pre, held)))
    ref = deploy.onnx_session(float_path).run(["probs"], {"image": inputs})[0]
    top2 = np.sort(ref, axis=1)[:, -2:]
    near = top2[:, 1] - top2[:, 0] < NEAR_TIE
    print(f"{len(held)} held-out images ({len(val)} validation), {int(near.sum())} near ties in the float file; "
          f"calibration: {deploy.CALIB_IMAGES} of {len(train)} training images per draw")
    with tempfile.TemporaryDirectory() as tmp:
        for draw in range(args.draws):
            calib = train.sample(n=min(deploy.CALIB_IMAGES, len(train)), random_state=draw).sort_index()["path"]
            dst = Path(tmp) / f"draw{draw}.int8.onnx"
            info = deploy.quantize_int8(float_path, dst, deploy.input_batches(run, pre, calib.tolist()))
            got = deploy.onnx_session(dst).run(["probs"], {"image": inputs})[0]
            changed = got.argmax(axis=1) != ref.argmax(axis=1)
            print(f"draw {draw} ({info['method']}): top-1 agreement {1 - changed.mean():.2%}, {int(changed.sum())} "
                  f"changed ({int((changed & near).sum())} near ties), max |d prob| {np.abs(got - ref).max():.3f}")


if __name__ == "__main__":
    main()
