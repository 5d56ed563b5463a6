"""The model behind ``serve``: a ``Predictor`` (a run's fold models with PyTorch, or an exported ONNX file with
onnxruntime), loaded once, and the JSON answer rows built from its outputs."""

from __future__ import annotations

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time, and the
# endpoints' types (UploadFile) are imported inside create_app, where only evaluated annotations can see them.
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vistrain.config.schema import ServeCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.errors import UserError

log = logging.getLogger(__name__)

SERVE_MISSING = "serve: needs fastapi, uvicorn and python-multipart; pip install 'vistrain[serve]'"
TICKET = "vistrain.ticket"  # the ASGI scope key under which _Limiter hands a POST /predict its slot


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
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # fallbacks.py: a preprocessing assumed

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
    from vistrain.engine.export import Deployable
    from vistrain.engine.inference import load_fold_model, load_run, select_folds

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
    from vistrain.engine.export import onnx_session, read_onnx_metadata
    from vistrain.fallbacks import Fallbacks

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


