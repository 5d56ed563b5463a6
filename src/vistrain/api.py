"""The Python API: what a notebook imports and what every ``vistrain`` command calls.

    import vistrain
    run = vistrain.train("configs/demo.yaml", overrides={"train.epochs": 1})
    run.predict([PIL.Image.open("a.png")], top_k=3)      # a DataFrame: input, target, confidence, top_k ...
    run.evaluate(split="val")["macro_f1"]
    run.export(quantize="int8")                           # RUN/export/

Each function takes what the matching command takes and gives what it writes, as Python objects: a config is a
path, a dict or a ``Config``; overrides are a ``{"train.lr": 3e-4}`` dict or ``["train.lr=3e-4"]`` strings; a run
is a ``Run``. A mistake raises ``vistrain.UserError`` (``vistrain.ConfigError`` for the config, with every problem
listed), the one line the command would print. Torch, timm and the other heavy libraries load on first use.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd

from vistrain.config.loader import load_config as _load_config
from vistrain.config.schema import Config
from vistrain.errors import UserError

if TYPE_CHECKING:
    import optuna
    import torch
    from PIL import Image

    from vistrain.data.preprocess import Preprocessor
    from vistrain.engine.hooks import Hook
    from vistrain.tracking.prune import PruneResult

__all__ = ["Audit", "Demo", "ImageLike", "Run", "Study", "audit", "augment_grid", "compare", "convert_checkpoint",
           "demo", "doctor", "import_config", "init", "load_config", "manifest", "prune_runs", "runs", "serve", "split",
           "train", "tune"]

ImageLike = Union[str, Path, "Image.Image", np.ndarray]  # noqa: UP007 - a file, or an image already in memory
Overrides = Mapping[str, Any] | Sequence[str]


# ------------------------------------------------------------------------------------------------ config


def load_config(source: str | Path | Mapping[str, Any] | Config | None, overrides: Overrides = (),
                mode: str | None = None) -> Config:
    """The validated config of a YAML file, a dict (relative paths resolve against the working directory) or a
    ``Config`` (overrides applied on top), with ``overrides`` and the ``mode`` preset as on the command line.

    >>> cfg = vistrain.load_config("configs/demo.yaml", {"train.epochs": 2})
    >>> cfg.train.epochs
    2
    """
    if isinstance(source, Config):
        from vistrain.config.loader import config_to_dict

        source = config_to_dict(source)
    return _load_config(source, mode=mode, overrides=override_list(overrides))


def override_list(overrides: Overrides | None) -> list[str]:
    """``{"train.lr": 3e-4, "augment.policy": "hard"}`` -> ``["train.lr=0.0003", "augment.policy=hard"]``; a list
    of ``key=value`` strings is returned as it is. Values are written as JSON (which YAML reads back as given)."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise UserError(f"overrides: a dict or a list of key=value strings, not one string ({overrides!r})")
    return [str(o) for o in overrides]


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return value if value and value.strip() == value and "\n" not in value else json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _config_and_path(config: str | Path | Mapping[str, Any] | Config, overrides: Overrides, mode: str | None
                     ) -> tuple[Config, Path | None]:
    path = Path(config) if isinstance(config, (str, Path)) else None
    return load_config(config, overrides, mode), path


# ---------------------------------------------------------------------------------------------- training


def train(config: str | Path | Mapping[str, Any] | Config | None = None, *, overrides: Overrides = (),
          folds: Sequence[int] | None = None, resume: bool | str | Path | None = None, fresh: bool = False,
          calibrate: bool = False, progress: bool | None = True, mode: str | None = None,
          full_pipeline: bool = False, hooks: Sequence[Hook] = (), strict: bool = False) -> Run:
    """Train a run (every fold of ``data.folds``, or ``folds``) and return it.

    ``resume``: True continues the newest unfinished run of this config, a run directory continues that run
    (``config`` may then be left out); ``fresh`` always starts a new one. ``calibrate`` fits a temperature on the
    out-of-fold logits afterwards (``--use-calibration``). ``progress``: tqdm bars (None: on a terminal only).
    ``full_pipeline`` then predicts ``data.image_dir_test`` into ``RUN/submission.csv``. ``hooks``: extra Trainer
    hooks run after the default ones in every fold (``vistrain.engine.hooks.Hook``). ``strict``: a fallback
    (torch.compile -> eager, bf16 / fp16 -> fp32 on a CPU) is a ``vistrain.FallbackRefused`` instead of a
    ``fallbacks`` entry in summary.json.

    >>> run = vistrain.train("configs/demo.yaml", overrides={"train.epochs": 1})
    >>> run.summary["mean"]["macro_f1"]
    """
    from vistrain.engine.training import run_train
    from vistrain.tracking.logs import progress_bars

    if isinstance(resume, (str, Path)):
        run_dir = Path(resume).resolve()
        if fresh:
            raise UserError("--fresh: cannot be combined with --resume RUN_DIR")
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not a vistrain run directory (no config.yaml)")
        cfg = _load_config(run_dir / "config.yaml", overrides=override_list(overrides), run_file=True)
        config_path, resume_arg = None, run_dir
    else:
        if config is None:
            raise UserError("--config: required (or --resume RUN_DIR to continue a run)")
        cfg, config_path = _config_and_path(config, overrides, mode)
        resume_arg = bool(resume)
    with progress_bars(progress):
        result = run_train(cfg, resume=resume_arg, fresh=fresh, folds=list(folds) if folds is not None else None,
                           config_path=config_path, use_calibration=calibrate, full_pipeline=full_pipeline,
                           hooks=hooks, strict=strict)
    return Run(result.run_dir)


@dataclass
class Study:
    """A finished (or joined) Optuna study: its best trial, its tune directory and, with ``auto_continue``, the run
    trained with the best values. ``study`` is the ``optuna.Study`` itself (trials, plots, ``trials_dataframe``)."""

    tune_dir: Path
    study_name: str
    storage: str  # the URL, password hidden
    monitor: str
    direction: str  # "maximize" | "minimize"
    best_value: float
    best_params: dict[str, Any]  # dotted config key -> value
    best_trial: int
    counts: dict[str, int]  # trial state -> trials
    run_dir: Path | None  # the full training of the best values (auto_continue)
    study: optuna.Study | None = None

    @property
    def run(self) -> Run | None:
        """The run trained with the best values (``auto_continue``), else None."""
        return Run(self.run_dir) if self.run_dir is not None else None

    def trials(self) -> pd.DataFrame:
        """One row per trial (Optuna's ``trials_dataframe``), from the study's storage."""
        if self.study is None:
            raise UserError(f"{self.tune_dir}: the study object is not loaded")
        return self.study.trials_dataframe()


def tune(config: str | Path | Mapping[str, Any] | Config, *, n_trials: int | None = None,
         storage: str | None = None, study_name: str | None = None, timeout: float | None = None,
         overrides: Overrides = (), mode: str | None = None, auto_continue: bool = False,
         folds: Sequence[int] | None = None, calibrate: bool = False, full_pipeline: bool = False,
         continue_study: bool = False) -> Study:
    """Search ``tune.space`` with Optuna (``vistrain tune``): ``n_trials`` is the study's total, ``storage`` /
    ``study_name`` join a shared study. ``auto_continue`` then trains the config with the best values (its run is
    ``Study.run``). ``continue_study`` continues the newest unfinished study of this config instead
    (``train --auto-continue``).

    >>> study = vistrain.tune("configs/demo.yaml", n_trials=6)
    >>> study.best_params
    """
    from vistrain.tuning.run import continue_tune, run_tune

    cfg, config_path = _config_and_path(config, overrides, mode)
    final = {"config_path": config_path, "folds": list(folds) if folds is not None else None,
             "use_calibration": calibrate, "full_pipeline": full_pipeline}
    if continue_study:
        result = continue_tune(cfg, **final)
    else:
        result = run_tune(cfg, n_trials=n_trials, storage=storage, study_name=study_name, timeout=timeout,
                          auto_continue=auto_continue, **final)
    return Study(result.tune_dir, result.study_name, result.storage, result.monitor, result.direction,
                 result.best_value, result.best_params, result.best_trial, dict(result.counts),
                 result.run_dir, result.study)


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class Audit:
    """``Run.audit()``: audit.json's content (``summary``) and its tables, read from ``folder``."""

    folder: Path
    summary: dict[str, Any]

    def table(self, name: str) -> pd.DataFrame:
        """``label_issues``, ``duplicates``, ``outliers`` (or ``clean_changes``) as a DataFrame."""
        return pd.read_csv(self.folder / f"{name}.csv", keep_default_na=False)


class Run:
    """A run directory written by ``vistrain train``: its files as Python objects, and every command that takes
    ``RUN`` as a method.

    >>> run = vistrain.Run("exp/20261207/demo_0930")
    >>> run.status, run.classes[:3]
    ('success', ['0', '1', '2'])
    """

    def __init__(self, path: str | Path):
        from vistrain.tracking.rundir import require_run_dir

        self.path = require_run_dir(path)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- the run's files

    @property
    def config(self) -> Config:
        """The run's config (config.yaml as this vistrain reads it)."""
        return _load_config(self.path / "config.yaml", run_file=True)

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json ({} while the run has none)."""
        return self._json("summary.json")

    @property
    def status(self) -> str:
        """run.json's status: running, success, error, interrupted, diverged, pruned ..."""
        return str(self._json("run.json").get("status", "unknown"))

    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.jsonl (one row per fold and epoch) as a DataFrame."""
        path = self.path / "metrics.jsonl"
        return pd.read_json(path, lines=True) if path.is_file() and path.stat().st_size else pd.DataFrame()

    @property
    def classes(self) -> list[str]:
        """Class names in the order of the model's outputs (class_map.json)."""
        idx = self._json("class_map.json").get("idx_to_class", {})
        return [str(idx[str(i)]) for i in range(len(idx))]

    def _json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- using the model

    def predict(self, inputs: ImageLike | Sequence[ImageLike] | pd.DataFrame, *, folds: str | Sequence[int] = "all",
                tta: bool = False, top_k: int = 5, image_dir: str | Path | None = None) -> pd.DataFrame:
        """The fold ensemble's answer for each image, as ``vistrain predict`` computes it: PIL images, numpy arrays
        (uint8 RGB or greyscale), files, a folder, or a DataFrame with the config's ID column (files found in
        ``image_dir``, default ``data.image_dir_test``). One row per image: ``input`` (the file or ``#i``),
        ``target``, ``confidence``, ``top_classes`` / ``top_probs`` (``top_k`` each) and ``prob_<class>`` per class
        (classifiers); ``target`` and ``top1_similarity`` (the nearest labelled training image) for embedding runs.

        >>> run.predict([Image.open("a.jpg"), np.zeros((64, 64, 3), np.uint8)], top_k=3)
        """
        from vistrain.engine.prediction import predict_table

        names, images = _images(self, inputs, image_dir)
        return predict_table(self.path, names, images, folds=folds, tta=tta, top_k=top_k)

    def embed(self, images: ImageLike | Sequence[ImageLike], *, fold: int = 0, flip: bool | None = None
              ) -> np.ndarray:
        """Embeddings [N, D] of an embedding run's model (unit length with ``eval.feat_norm``; mirror-averaged
        with ``eval.flip_feats``, or as ``flip`` says), for files or images in memory.

        >>> run.embed(["q.jpg"]).shape
        (1, 512)
        """
        from vistrain.engine.prediction import embed_images

        _, items = _images(self, images, None)
        return embed_images(self.path, items, fold=fold, flip=flip)

    def search(self, query: ImageLike, gallery: str | Path, *, top_k: int = 20, output: str | Path | None = None
               ) -> pd.DataFrame:
        """The ``top_k`` nearest images under the folder ``gallery`` to ``query`` (``vistrain search``): rank, path,
        class, similarity / distance, correct; a PNG grid and CSV are written to ``output`` (default
        ``RUN/search/<query>.png``).

        >>> run.search("query.jpg", "gallery/", top_k=5)[["rank", "path", "similarity"]]
        """
        from vistrain.engine.search import run_search

        with _as_file(query) as path:
            return run_search(self.path, Path(gallery), path, top_k=top_k,
                              output=Path(output) if output is not None else None)

    def model(self, fold: int = 0) -> torch.nn.Module:
        """The fold's best model in eval mode on the CPU; ``model.preprocessor`` is the run's ``Preprocessor``.

        >>> model = run.model()
        >>> logits = model(model.preprocessor(rgb_uint8_array)[None])
        """
        import torch

        from vistrain.engine.inference import load_fold_model, load_run

        net, pre = load_fold_model(load_run(self.path, command="Run.model"), fold, torch.device("cpu"))
        net.preprocessor = pre
        return net

    @property
    def preprocessor(self) -> Preprocessor:
        """The run's preprocessing (preprocess.json).

        >>> run.preprocessor(np.asarray(Image.open("a.jpg").convert("RGB"))).shape
        torch.Size([3, 224, 224])
        """
        from vistrain.data.preprocess import Preprocessor

        return Preprocessor.from_dict(self._json("preprocess.json"))

    # ---- the other commands on a run

    def evaluate(self, split: str = "val", *, folds: str | Sequence[int] = "all", tta: bool = False,
                 echo: bool = False, overrides: Overrides = (), strict: bool = False, **options: Any
                 ) -> dict[str, Any]:
        """``vistrain evaluate RUN --split SPLIT``: metrics.json's content; files in ``RUN/eval/SPLIT/``. Evaluation
        options as ``overrides`` (``{"data.test_csv": "labels.csv"}``) or as keywords with ``__`` for the dots
        (``run.evaluate("test", data__test_csv="labels.csv")``); ``echo`` prints the console table.

        >>> run.evaluate("val")["macro_f1"]
        """
        from vistrain.engine.evaluation import run_evaluate

        keys = override_list(overrides) + override_list({k.replace("__", "."): v for k, v in options.items()})
        return run_evaluate(self.path, split, folds=_folds_text(folds), overrides=keys, echo=echo, tta=tta,
                            strict=strict)

    def predict_csv(self, inputs: str | Path, *, output: str | Path | None = None, image_dir: str | Path | None = None,
                    sample: str | Path | None = None, tta: bool = False, folds: str | Sequence[int] = "all",
                    probs: bool = False, overrides: Overrides = (), strict: bool = False) -> pd.DataFrame:
        """``vistrain predict RUN --input F`` as a function: a folder or an ID CSV in, the ``ID,target`` table (with
        ``display_name`` and ``prob_<class>`` columns as asked) written to ``output`` (default RUN/predictions.csv)
        in the order of ``sample`` when given, and returned."""
        from vistrain.engine.prediction import run_predict

        def path(p: str | Path | None) -> Path | None:
            return Path(p) if p is not None else None

        return run_predict(self.path, Path(inputs), output=path(output), image_dir=path(image_dir),
                           sample=path(sample), tta=tta, folds=_folds_text(folds), probs=probs,
                           overrides=override_list(overrides), strict=strict)

    def calibrate(self) -> dict[str, Any]:
        """Fit a temperature on the out-of-fold logits (``vistrain calibrate``): calibration.json's content.

        >>> run.calibrate()["temperature"]
        """
        from vistrain.engine.calibration import run_calibrate

        return run_calibrate(self.path)

    def export(self, format: str = "onnx", *, quantize: str | None = None, fp16: bool = False,
               folds: str | Sequence[int] | None = None, output: str | Path | None = None, verify: bool = False,
               benchmark: bool = False, budget_ms: float | None = None, budget_mb: float | None = None,
               fail_over_budget: bool = True, strict: bool = False, push_to_hub: str | None = None,
               dry_run: bool = False) -> Path:
        """``vistrain export``: the folder written. ONNX (``RUN/export`` unless ``output``): model_fold{k}.onnx,
        preprocess.json and export.json (the figures: sizes, verify, benchmark, int8 agreement, budgets). ``"timm"``
        (``RUN/export/timm_fold{k}`` unless ``output``): one fold (``folds``, default 0) as a Hugging Face hub folder
        (config.json, model.safetensors, README.md) that ``timm.create_model("local-dir:DIR", pretrained=True)``
        loads; ``push_to_hub``: a hub repo to upload it to (huggingface_hub; ``dry_run``: the folder only).

        >>> onnx_dir = run.export(quantize="int8", verify=True)
        >>> timm_dir = run.export("timm", push_to_hub="me/pills-classifier", dry_run=True)
        """
        from vistrain.engine.export import run_export

        out = Path(output).resolve() if output is not None else None
        summary = run_export(self.path, fmt=format, folds=_folds_text(folds), output=out, do_verify=verify,
                             do_benchmark=benchmark, quantize=quantize, fp16=fp16, budget_ms=budget_ms,
                             budget_mb=budget_mb, fail_over_budget=fail_over_budget, strict=strict,
                             push_to_hub=push_to_hub, dry_run=dry_run)
        return Path(summary["folder"])

    def audit(self, *, output: str | Path | None = None, overrides: Overrides = (), **options: Any) -> Audit:
        """``vistrain audit RUN``: audit.json's content and its tables (``Audit.table("duplicates")``); audit
        options as ``overrides`` or ``audit__near_dup_z=8`` keywords.

        >>> run.audit().summary["duplicates"]
        """
        keys = override_list(overrides) + override_list({k.replace("__", "."): v for k, v in options.items()})
        return audit(self, output=output, overrides=keys)

    def report(self) -> Path:
        """Write RUN/report.html (``vistrain report``) and return its path.

        >>> webbrowser.open(run.report().as_uri())
        """
        from vistrain.viz.report import write_report

        return write_report(self.path)

    def model_card(self) -> Path:
        """Write RUN/MODEL_CARD.md from the run's files (what ``train``, ``evaluate``, ``calibrate``, ``export`` and
        ``report`` refresh) and return its path: a Hugging Face style model card, its numbers the run's own.

        >>> print(run.model_card().read_text())
        """
        from vistrain.viz.model_card import write_model_card

        return write_model_card(self.path)


def _folds_text(folds: str | Sequence[int] | None) -> str | None:
    if folds is None or isinstance(folds, str):
        return folds
    return ",".join(str(int(f)) for f in folds)


def _images(run: Run, inputs: Any, image_dir: str | Path | None) -> tuple[list[str], list[Any]]:
    """(names, items): a file's path (str) or an image in memory (a PIL image or a numpy array) per input, in
    order; a folder gives its images sorted by name; a DataFrame its ID column's files."""
    from PIL import Image

    from vistrain.data.images import ImageIndex, list_images

    if isinstance(inputs, pd.DataFrame):
        cfg = run.config
        col = cfg.data.id_col
        if col not in inputs.columns:
            raise UserError(f"inputs: the DataFrame has no '{col}' column (data.id_col); columns: "
                            f"{', '.join(map(str, inputs.columns))}")
        folder = Path(image_dir) if image_dir is not None else cfg.data.image_dir_test
        if folder is None or not Path(folder).is_dir():
            raise UserError(f"image_dir: {folder} is not a folder; give image_dir= for the DataFrame's IDs")
        index = ImageIndex(Path(folder), cfg.data.image_ext)
        found = [index.find(str(i)) for i in inputs[col]]
        missing = [str(i) for i, f in zip(inputs[col], found) if f is None]
        if missing:
            raise UserError(f"inputs: no image for ID '{missing[0]}' in {folder} ({len(missing)} missing)")
        return [str(i) for i in inputs[col]], [str(f) for f in found]
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        files = list_images(Path(inputs))
        if not files:
            raise UserError(f"inputs: no images in {inputs}")
        return [str(f) for f in files], [str(f) for f in files]
    if isinstance(inputs, (str, Path, Image.Image, np.ndarray)):
        inputs = [inputs]
    names, items = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, (str, Path)):
            if not Path(item).is_file():
                raise UserError(f"inputs[{i}]: file not found: {item}")
            names.append(str(item))
            items.append(str(item))
        elif isinstance(item, (Image.Image, np.ndarray)):
            names.append(f"#{i}")
            items.append(item)
        else:
            raise UserError(f"inputs[{i}]: a {type(item).__name__}; valid: a file path, a PIL image or a numpy "
                            "array (H x W x 3 uint8 RGB, or H x W greyscale)")
    if not items:
        raise UserError("inputs: no images given")
    return names, items


@contextmanager
def _as_file(image: ImageLike) -> Iterator[Path]:
    """A path for ``image``: a file as it is; an image in memory written as a PNG in a temporary folder."""
    if isinstance(image, (str, Path)):
        yield Path(image)
        return
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "query.png"
        (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(path)
        yield path


# ---------------------------------------------------------------------------------- commands without a run


def audit(run: Run | str | Path | None = None, *, config: str | Path | None = None, output: str | Path | None = None,
          write_clean: str | Path | None = None, policy: str | None = None, force: bool = False,
          overrides: Overrides = ()) -> Audit:
    """``vistrain audit RUN`` or ``vistrain audit --config F``: label issues, duplicates and leakage, outliers and
    class health; ``write_clean`` also writes a cleaned manifest (``policy``: drop, relabel, review)."""
    from vistrain.audit.run import run_audit

    def path(p: Any) -> Path | None:
        return Path(p) if p is not None else None

    summary = run_audit(path(run), path(config), output=path(output), clean=path(write_clean), policy=policy,
                        overrides=override_list(overrides), force=force)
    return Audit(Path(summary["output"]), summary)


def compare(runs: Sequence[Run | str | Path], *, split: str | None = None, output: str | Path = "compare",
            echo: bool = False) -> dict[str, Any]:
    """``vistrain compare``: figures with 95% intervals and paired differences to the first run, on the same
    images; compare.json's content (compare.html and curves.png beside it in ``output``)."""
    from vistrain.engine.compare import run_compare

    return run_compare([Path(r) for r in runs], split=split, output=Path(output), echo=echo)


def runs(directory: str | Path | None = None, *, config: str | Path | Mapping[str, Any] | Config | None = None,
         mode: str | None = None, sort: str | None = None) -> pd.DataFrame:
    """``vistrain runs``: one row per run directory under ``directory`` (default ``experiments``, or ``config``'s
    ``output.exp_dir``): date, run_id, project, kind (run / trial / tuned), study, config_hash, task, mode, status,
    folds done / planned, the monitor's (or ``sort``'s) mean and std over folds, the test figure and its 95%
    interval, duration, size on disk, path. ``config`` (with its ``mode``): only the runs of that resolved config
    and of its studies. ``sort``: a metric of the runs' summary.json (best first), or date / duration / size.
    Reads run.json, summary.json and eval/test/metrics.json only (no torch)."""
    from vistrain.tracking.runs import list_runs

    folder, wanted = _runs_scope(directory, config, mode)
    return list_runs(folder, config_hash=wanted, sort=sort)


def prune_runs(directory: str | Path | None = None, *, keep_best: int, older_than: str | timedelta,
               dry_run: bool = True, config: str | Path | Mapping[str, Any] | Config | None = None,
               mode: str | None = None, sort: str | None = None) -> PruneResult:
    """``vistrain runs --prune``: delete the weight files (ckpt/*.pth, *.safetensors) of the runs of ``runs(...)``
    started more than ``older_than`` ago ("12h", "30d", "2w"), except the ``keep_best`` best of each project (a
    study's trials: of each study) by ``sort`` (default: each run's monitor), runs that may be training and each
    study's best trial; run.json records it. ``dry_run`` (the default here) deletes nothing. A ``PruneResult``:
    ``.pruned`` (path, files, bytes of each run), ``.freed``, ``.kept`` (runs old enough that were kept, by why)."""
    from vistrain.tracking.prune import prune

    table = runs(directory, config=config, mode=mode, sort=sort)
    return prune(table, keep_best=keep_best, older_than=older_than, dry_run=dry_run)


def _runs_scope(directory: str | Path | None, config: str | Path | Mapping[str, Any] | Config | None,
                mode: str | None) -> tuple[Path, str | None]:
    """The experiments folder to list, and the config hash its runs must have (None: any)."""
    if config is None:
        if mode is not None:
            raise UserError("--mode: the preset the runs of --config F were trained with; give --config too")
        return Path(directory if directory is not None else "experiments"), None
    from vistrain.tracking.rundir import config_hash

    cfg = load_config(config, mode=mode)
    return (Path(directory) if directory is not None else Path(cfg.output.exp_dir)), config_hash(cfg)


def split(config: str | Path | Mapping[str, Any] | Config, output: str | Path = "splits.csv", *,
          overrides: Overrides = (), mode: str | None = None) -> pd.DataFrame:
    """``vistrain split``: the fold (or train / val / test) assignment ``train`` would use, written to ``output``."""
    from vistrain.data.prepare import write_splits

    return write_splits(load_config(config, overrides, mode), Path(output))


def augment_grid(config: str | Path | Mapping[str, Any] | Config, *, n: int = 32,
                 output: str | Path = "augment_grid.png", overrides: Overrides = (), mode: str | None = None) -> Path:
    """``vistrain augment``: the first ``n`` images of fold 0's first training batch as the model receives them
    (preprocessed, augmented on the configured device, mixed; de-normalised for display), each with its label
    (a mixed one as ``a 0.7 / b 0.3``), drawn to the PNG ``output``; returns its path."""
    from vistrain.engine.augment_preview import write_augment_grid

    if not (isinstance(n, int) and n > 0):
        raise UserError(f"n: expected a positive whole number of images; got {n!r}")
    return write_augment_grid(load_config(config, overrides, mode), Path(output), n)


def manifest(config: str | Path | Mapping[str, Any] | Config, output: str | Path = "manifest.json", *,
             overrides: Overrides = (), mode: str | None = None) -> dict[str, Any]:
    """``vistrain manifest``: classes, per-split and per-domain counts, the dataset hash and the preprocessing of the
    data ``train`` would use, written to ``output`` without training."""
    from vistrain.data.manifest import run_manifest

    return run_manifest(load_config(config, overrides, mode), Path(output))


def doctor(config: str | Path | Mapping[str, Any] | Config | None = None, *, overrides: Overrides = (),
           mode: str | None = None, auto_batch: bool = False, echo: bool = False) -> dict[str, Any]:
    """``vistrain doctor``: versions, GPUs, precision, workers and threads for this machine (and ``config``);
    ``auto_batch`` also finds the batch size ``train.batch_size=auto`` would pick."""
    from vistrain.engine.doctor import run_doctor

    cfg = load_config(config, overrides, mode) if config is not None or overrides else None
    return run_doctor(cfg, auto_batch=auto_batch, echo=echo)


def serve(target: Run | str | Path, *, host: str = "127.0.0.1", port: int = 8000, fold: int | None = None,
          limits: Mapping[str, Any] | None = None, log_file: str | Path | None = None,
          api_key_env: str | None = None, strict: bool = False) -> None:
    """``vistrain serve``: HTTP inference for a run or an exported ONNX file until SIGTERM / Ctrl-C. ``limits``:
    ``serve.*`` values over the run's (max_files, max_mb, top_k, max_pixels, max_concurrency, timeout_s ...)."""
    from vistrain.serving.app import run_serve

    run_serve(Path(target), host=host, port=port, fold=fold, limits=dict(limits or {}),
              log_file=Path(log_file) if log_file is not None else None, api_key_env=api_key_env, strict=strict)


@dataclass
class Demo:
    """``vistrain demo``: the run it trained, the class count, the seconds taken and (pills) the export's figures."""

    run: Run
    num_classes: int
    seconds: float
    export: dict[str, Any] | None


def demo(scenario: str = "digits", *, out: str | Path | None = None, config: str | Path | None = None,
         overrides: Overrides = ()) -> Demo:
    """Write the scenario's data (scikit-learn's digits, or the generated pills) and train its ready config on the
    CPU; the pills demo then exports int8 ONNX with its budget lines."""
    import time

    from vistrain.data.demo import DEFAULT_OUT, PILLS_EXPORT, SCENARIOS, default_demo_config

    if scenario not in SCENARIOS:
        raise UserError(f"--scenario: unknown scenario '{scenario}'; valid: {', '.join(SCENARIOS)}")
    start = time.time()
    config = Path(config) if config is not None else default_demo_config(scenario)
    if not config.is_file():
        raise UserError(f"--config: {config} not found; pass the demo config with --config")
    folder = Path(out or DEFAULT_OUT[scenario]).resolve()
    data_overrides, num_classes = SCENARIOS[scenario](folder, config)
    run = train(config, overrides=data_overrides + override_list(overrides), progress=None)
    export = None
    if scenario == "pills":
        exported = run.export(verify=True, **PILLS_EXPORT)
        export = json.loads((exported / "export.json").read_text())
    return Demo(run, num_classes, time.time() - start, export)


def convert_checkpoint(src: str | Path, dst: str | Path, *, trust: bool = False, ema: bool = False,
                       force: bool = False) -> Path:
    """``vistrain convert-checkpoint``: the weights of a checkpoint (timm train.py's ``state_dict``, or
    ``state_dict_ema`` with ``ema``; a vistrain checkpoint's evaluated weights; a plain state dict) written to
    ``dst`` as .safetensors, which every tool reads without an unpickler. A file the safe unpickler refuses (timm
    train.py's keeps its arguments as an ``argparse.Namespace``) is read with the full unpickler only with ``trust``:
    that runs any code the file holds. An existing ``dst`` is replaced only with ``force``. Returns ``dst``."""
    from vistrain.models.weights import convert_checkpoint as convert

    return convert(Path(src), Path(dst), trust=trust, ema=ema, force=force)


def init(task: str = "classification", output: str | Path = "vistrain.yaml", *, force: bool = False) -> Path:
    """``vistrain init``: a commented starter config of ``task`` (classification, embedding, reid, pills) written to
    ``output`` (an existing file only with ``force``); returns its path."""
    from vistrain.config.starter import check_output, starter_text
    from vistrain.tracking.files import atomic_write_text

    path = Path(output)
    text = starter_text(task, path)
    check_output(path, force)
    atomic_write_text(path, text)
    return path


def import_config(source: str | Path, *, from_format: str | None = None, output: str | Path | None = None,
                  force: bool = False) -> str | Path:
    """``vistrain import-config``: the vistrain config of timm train.py's ``args.yaml`` (``from_format="timm"``) or
    of a reid-strong-baseline / fast-reid yacs file (``"yacs"``; None: told from the file's keys), validated.
    Returns the YAML text when ``output`` is None, else writes it there (an existing file only with ``force``) and
    returns the path. Each source key vistrain does not carry exactly is one ``[IMPORT]`` log line and a comment in
    the text (docs/migrating.md)."""
    from vistrain.config.starter import check_output
    from vistrain.importers import import_file
    from vistrain.tracking.files import atomic_write_text

    path = Path(output) if output is not None else None
    if path is not None:
        check_output(path, force)
    imported = import_file(source, from_format, run_as=path)
    if path is None:
        return imported.text
    atomic_write_text(path, imported.text)
    return path
