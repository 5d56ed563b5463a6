"""What a training run settles before its first fold: the folds to train and the checks on them, the machine
(device, precision, threads), the ``auto`` settings resolved for it, the run directory's files, and the
``[BOOT]`` / ``[CFG]`` / ``[PATH]`` / ``[DATA]`` lines that say all of it."""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch

from vistrain._version import __version__
from vistrain.config.loader import ModeInfo, config_to_dict
from vistrain.config.schema import AugmentCfg, Config, domain_monitor
from vistrain.data.device_augment import device_supports
from vistrain.data.prepare import Prepared
from vistrain.data.preprocess import Preprocessor
from vistrain.data.sources import single_domain_classes
from vistrain.data.splits import splits_table
from vistrain.engine import device as dev
from vistrain.engine.distributed import DistInfo
from vistrain.errors import UserError, did_you_mean
from vistrain.fallbacks import Fallbacks
from vistrain.models.build import is_convolutional
from vistrain.tracking import rundir
from vistrain.tracking.files import atomic_write_bytes, atomic_write_text, write_csv, write_json, write_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    """Where this process trains."""

    device: torch.device
    precision: dev.Precision

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"cpu ({torch.get_num_threads()} threads)"


def training_folds(cfg: Config, folds: list[int] | None) -> list[int]:
    """The folds to train: ``--fold`` or ``data.valid_fold``; one model (fold 0) for an embedding or ratio split."""
    folds = folds if folds is not None else cfg.folds_to_train()
    if cfg.task == "embedding" or cfg.data.split == "ratio":
        folds = [0]  # one model: the split comes from data.items["split"], not from K folds
    bad = [k for k in folds if not 0 <= k < cfg.data.folds]
    if bad:
        raise UserError(f"--fold: {bad[0]} is not a fold of data.folds={cfg.data.folds}; "
                        f"valid: 0..{cfg.data.folds - 1}")
    return folds


def check_domain_monitor(cfg: Config, data: Prepared, folds: list[int]) -> None:
    """A ``<metric>@<domain>`` monitor needs that domain among the validation images of every fold to train (and
    ``top5`` five classes): a user error now, before the run directory, rather than a missing key after an epoch."""
    found = domain_monitor(cfg.train.monitor) if cfg.task == "classification" else None
    if found is None:
        return
    metric, domain = found
    if "domain" not in data.items.columns:
        raise UserError(f"train.monitor: domain '{domain}' is not in the data, which has no domains (give them as a "
                        "'domain' column of the CSV or manifest, or as the names of data.sources)")
    domains = data.items["domain"].fillna("").astype(str).to_numpy()
    known = sorted(set(domains) - {""})
    if domain not in known:
        raise UserError(f"train.monitor: domain '{domain}' is not in the data; domains: {', '.join(known)}"
                        f"{did_you_mean(domain, known)}")
    if metric == "top5" and len(data.classes) < 5:
        raise UserError(f"train.monitor: {cfg.train.monitor} is reported only with 5 or more classes; the data has "
                        f"{len(data.classes)}; use top1@{domain} or macro_f1@{domain}")
    for fold in folds:
        if not np.any(domains[data.fold_indices(fold)[1]] == domain):
            where = "the val split" if data.ratio_split else f"fold {fold}"
            fix = "raise data.val_ratio" if data.ratio_split else "lower data.folds"
            raise UserError(f"train.monitor: domain '{domain}' has no validation image in {where} "
                            f"({int(np.sum(domains == domain))} image(s) in all); {fix} or monitor another domain")


def setup_machine(cfg: Config, data: Prepared, info: DistInfo, fallbacks: Fallbacks | None = None) -> Machine:
    """Device, CPU threads, precision and backends, on every rank before anything computes (``resolve_auto``
    records the same thread count in config.yaml). bf16 / fp16 asked for on a CPU trains in fp32: a fallback."""
    device = dev.pick_device(cfg.train.device, info.local_rank)
    dev.apply_num_threads(cfg.train.num_threads, dev.auto_workers(cfg.train.num_workers, device,
                                                                  data.cache is not None))
    precision = dev.pick_precision(cfg.train.amp, device)
    if cfg.train.amp not in ("auto", precision.name):
        (fallbacks or Fallbacks()).note(
            "train.amp", cfg.train.amp, precision.name, f"this run trains on the {device.type}, where vistrain uses "
            f"{precision.name} (autocast there is slower for most networks)",
            f"set train.amp: auto (or {precision.name}) for {device.type} training", log)
    dev.configure_backends(device)
    return Machine(device, precision)


def log_boot(machine: Machine, info: DistInfo, run: rundir.RunDir, mode: ModeInfo | None) -> None:
    log.info("[BOOT] vistrain %s | torch %s | timm %s | device=%s | precision=%s | processes=%d | run=%s%s",
             __version__, torch.__version__, timm.__version__, machine.name(), machine.precision.name,
             info.world, run.path, " (resumed)" if run.resumed else "")
    if mode is not None:
        log.info("[CFG] %s", mode.line())


def resolve_auto(cfg: Config, machine: Machine, n_classes: int, cached: bool, world: int = 1) -> Config:
    """Replace ``auto`` settings with what was chosen for this machine, so config.yaml records the values
    the run actually used (precision, workers, threads, batch size and accumulation) and re-runs them elsewhere.
    ``cached``: the data comes from the decode-once cache (the loader's work is then augmentation alone);
    ``world``: the number of processes, over which ``train.target_batch_size`` is shared."""
    t, device, precision = cfg.train, machine.device, machine.precision
    update: dict[str, Any] = {"amp": precision.name, "num_workers": dev.auto_workers(t.num_workers, device, cached)}
    if cfg.augment.device != "cpu":
        cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(
            update={"device": _augment_device(cfg.augment, device)})})
    if t.channels_last == "auto":  # NHWC pays on CUDA for convolutions; on the CPU and for ViTs it does not
        update["channels_last"] = device.type == "cuda" and is_convolutional(cfg.model.name)
        cfg = cfg.model_copy(update={"train": t.model_copy(update={"channels_last": update["channels_last"]})})
    workers_why = dev.workers_reason(t.num_workers, device, cached)
    log.info("[CFG] train.num_workers=%d (%s)", update["num_workers"], workers_why)
    update["num_threads"], why = dev.resolve_num_threads(t.num_threads, update["num_workers"])
    log.info("[CFG] train.num_threads=%d (%s)", update["num_threads"], why)
    crowded = dev.oversubscription(update["num_threads"], update["num_workers"]) if device.type == "cpu" else None
    if crowded:
        log.warning("[CFG] %s", crowded)
    if t.batch_size == "auto":
        from vistrain.engine.autobatch import resolve_batch_size

        update["batch_size"], why = resolve_batch_size(cfg, device, precision, n_classes)
        target = ""
        if t.target_batch_size:
            update["batch_size"], update["grad_accum_steps"] = share_target(t.target_batch_size, update["batch_size"],
                                                                            world)
            target = (f"; grad_accum_steps={update['grad_accum_steps']} for target_batch_size={t.target_batch_size} "
                      f"(global batch {update['batch_size'] * update['grad_accum_steps'] * world} over {world} "
                      f"process{'es' if world > 1 else ''})")
        log.info("[CFG] train.batch_size=auto -> %d (%s)%s", update["batch_size"], why, target)
    changed = {k: v for k, v in update.items() if getattr(t, k) != v}
    if changed:
        log.info("[CFG] resolved for this machine: %s", ", ".join(f"train.{k}={v}" for k, v in changed.items()))
    return cfg.model_copy(update={"train": t.model_copy(update=update)})


def share_target(target: int, fits: int, world: int) -> tuple[int, int]:
    """(per-process batch, accumulation steps) for a global ``target`` batch over ``world`` processes when each
    fits ``fits`` images: batch x steps x world >= target, with no process given more than its share."""
    share = -(-target // world)
    batch = min(fits, share)
    return batch, -(-share // batch)


def _augment_device(aug: AugmentCfg, device: torch.device) -> str:
    """``augment.device``: cuda needs a CUDA training device and Kornia; auto takes it when both are there. A key that
    no batched op runs (``device_supports``) keeps the CPU policy, with one [DATA] line naming it."""
    import importlib.util

    setting = aug.device
    if setting == "cpu":
        return "cpu"
    if setting == "cuda" and device.type != "cuda":
        raise UserError(f"augment.device: cuda needs training on a GPU; train.device resolved to {device.type} "
                        "(valid here: auto, cpu)")
    if device.type == "cuda" and (unsupported := device_supports(aug)):
        log.info("[DATA] augment.device: cpu, not cuda: %s", unsupported)
        return "cpu"
    has_kornia = importlib.util.find_spec("kornia") is not None
    if setting == "cuda" and not has_kornia:
        raise UserError("augment.device: cuda needs Kornia: pip install 'vistrain[augment]' (or use cpu)")
    return "cuda" if device.type == "cuda" and has_kornia else "cpu"


def log_config(cfg: Config) -> None:
    """One [CFG] line per section with the keys this run reads (config.yaml keeps them all)."""
    unread = set(cfg.keys_not_read()) | {"audit"}  # audit: read by `vistrain audit`, never by training
    for section, values in config_to_dict(cfg).items():
        if section in unread:
            continue
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if f"{section}.{k}" not in unread}
        log.info("[CFG] %s: %s", section, values)
    t = cfg.train
    if t.eval_every_n_epochs > 1:
        patience = (f"early stopping patience counts evaluations ({t.early_stopping_patience} = "
                    f"{t.early_stopping_patience * t.eval_every_n_epochs} epochs)" if t.early_stopping_patience
                    else "no early stopping")
        log.info("[CFG] validation every %d epochs; %s", t.eval_every_n_epochs, patience)


def write_run_files(cfg: Config, run: rundir.RunDir, data: Prepared, config_path: Path | None) -> None:
    """config.yaml (a new run; a resumed one records its changes in run.json), splits.csv (a resumed run's must
    be the same), preprocess.json, augment_pipeline.yaml / .json (a copy of augment.albumentations' file),
    class_map.json, bad_images.csv."""
    splits = splits_table(data.items, data.fold_of)
    if run.resumed and (run / "splits.csv").is_file():
        before = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
        if before["id"].tolist() != splits["id"].astype(str).tolist() or \
                before["fold"].tolist() != splits["fold"].astype(str).tolist():
            raise UserError(f"--resume: the data or split changed since {run.path} started; use --fresh")
    if run.resumed:
        rundir.record_resume(run, cfg)
    else:
        write_yaml(run / "config.yaml", config_to_dict(cfg))
        if cfg.output.snapshots and config_path is not None and config_path.is_file():
            shutil.copyfile(config_path, run / "config.source.yaml")
            atomic_write_text(run / "command.txt", " ".join(sys.argv) + "\n")
    write_csv(run / "splits.csv", splits)
    write_json(run / "preprocess.json", Preprocessor.from_config(cfg).to_dict())
    if cfg.augment.albumentations is not None:  # the pipeline this run trains with, whatever happens to the file
        pipeline = Path(cfg.augment.albumentations)
        atomic_write_bytes(run / f"augment_pipeline{pipeline.suffix.lower()}", pipeline.read_bytes())
    class_map: dict[str, Any] = {
        "class_to_idx": {str(c): i for i, c in enumerate(data.classes)},
        "idx_to_class": {str(i): c for i, c in enumerate(data.classes)},
    }
    if data.class_map is not None and data.class_map.metadata:
        class_map["metadata"] = data.class_map.run_file()  # display_name (or name), training_weight, free fields
    write_json(run / "class_map.json", class_map)
    if len(data.bad):
        write_csv(run / "bad_images.csv", data.bad[["id", "path", "reason"]])


def log_data(cfg: Config, data: Prepared, folds: list[int], run: rundir.RunDir) -> None:
    """The [PATH] and [DATA] lines: where the data came from, its classes, domains, split and folds."""
    d = cfg.data
    if d.sources:
        log.info("[PATH] OK | sources: %s", "; ".join(
            f"{s.name} ({s.source}) " + " ".join(f"{k}={getattr(s, k)}" for k in ("train_csv", "image_dir_train",
                                                                                  "manifest") if getattr(s, k))
            for s in d.sources))
    elif d.source == "reid":
        log.info("[PATH] OK | root=%s | train=%s | query=%s | gallery=%s", d.root, d.train_folder, d.query_folder,
                 d.gallery_folder)
    elif d.source == "manifest":
        log.info("[PATH] OK | manifest=%s | sample_csv=%s", d.manifest, d.sample_csv)
    else:
        log.info("[PATH] OK | train_csv=%s | sample_csv=%s | image_dir_train=%s", d.train_csv, d.sample_csv,
                 d.image_dir_train)
    counts = pd.Series(data.targets[data.targets >= 0]).value_counts().sort_index()
    per_class = {str(data.classes[i]): int(n) for i, n in counts.items()}
    shown = dict(list(per_class.items())[:30])
    log.info("[DATA] %d images, %d %s | per class: %s%s", len(data.items), len(data.classes),
             "classes" if cfg.task == "classification" else "training identities/classes", shown,
             f" ... ({len(per_class) - 30} more)" if len(per_class) > 30 else "")
    _log_domains(cfg, data)
    for line in data.cache.lines if data.cache else []:
        log.info("[DATA] %s", line)
    for message, listed in data.left_out(d):
        if len(listed):
            log.warning("[DATA] %s; listed in %s", message, run / "bad_images.csv")
        else:
            log.info("[DATA] %s", message)
    if cfg.task == "embedding":
        log.info("[DATA] split: %s", data.items["split"].value_counts().to_dict())
        if data.queries_without_match:
            log.info("[DATA] %d of %d queries have no gallery image of their person from another camera; the "
                     "metrics skip them (Market-1501 protocol)", data.queries_without_match,
                     int((data.items["split"] == "query").sum()))
        return
    if data.ratio_split:
        sizes = data.items["split"].value_counts().to_dict()
        how = "the data's split column" if data.split_given else \
            f"data.train_ratio/val_ratio/test_ratio {d.train_ratio}/{d.val_ratio}/{d.test_ratio}, grouped, stratified"
        log.info("[DATA] split=ratio (%s) | train=%d val=%d test=%d | one model; data.folds and data.valid_fold are "
                 "not used", how, sizes.get("train", 0), sizes.get("val", 0), sizes.get("test", 0))
        return
    if "split" in data.items.columns:
        log.info("[DATA] the data's split column is not used by data.split: kfold (data.split: ratio uses it)")
    grouped = data.items["group"].nunique() < len(data.items)
    sizes = {int(k): int(n) for k, n in zip(*np.unique(data.fold_of, return_counts=True))}
    log.info("[DATA] folds=%d (%s) | validation sizes: %s | training folds: %s", d.folds,
             "grouped" if grouped else "stratified" if d.stratify else "plain", sizes, folds)


def _log_domains(cfg: Config, data: Prepared) -> None:
    """Images per domain (with the sources' ratios), classes found in one domain only, and the training sampler."""
    if "domain" not in data.items.columns:
        return
    ratios = cfg.data.domain_ratios() or {}
    counts = data.items["domain"].astype(str).value_counts()
    log.info("[DATA] domains: %s", ", ".join(f"{name}={int(counts[name])}" + (
        f" (ratio {ratios[name]:g})" if name in ratios else "") for name in sorted(counts.index)))
    for domain, classes in single_domain_classes(data.items).items():
        log.warning("[DATA] %d class(es) only in domain %s: %s%s", len(classes), domain, ", ".join(classes[:20]),
                    f" ... ({len(classes) - 20} more)" if len(classes) > 20 else "")
    if ratios and cfg.sampler.name != "pk":
        balanced = " and the classes drawn equally often (sampler.name: weighted)" \
            if cfg.sampler.name == "weighted" else ""
        log.info("[DATA] sampler: each epoch draws %s of the training images%s", " / ".join(
            f"{name} {r:.0%}" for name, r in ratios.items()), balanced)
