"""The name tables: every name a config can give (data source, head, loss, sampler, optimiser, scheduler) and every
metric a run reports, each declared once, here, with what the rest of the program must know about it (a metric's
direction, whether a source can be one of ``data.sources``).

Why the names live in this light module and not beside their code: the config schema builds each key's ``Literal``
from them when its classes are defined, and validating a config must not import torch, timm or pandas. The
builders register themselves next to their code with the decorator (``@HEADS.register("arcface")`` in
``models/heads.py``, much as timm's ``register_model``), and looking a builder up imports that module (the
registry's ``home``) the first time. ``tests/test_architecture.py`` holds the halves together: every declared name
has a builder, and every registry-backed key of the schema allows exactly the registry's names.

A metric name may be a pattern, ``<K>`` standing for a positive integer and any other ``<word>`` for any text
(``knn_recall@<K>``, ``top1@<domain>``): early stopping, ``tune`` and ``compare`` read the direction of
``knn_recall@10`` or ``top1@real`` from there.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from vistrain.errors import UserError, did_you_mean, lookup


@dataclass(frozen=True)
class Entry:
    """One declared name and its attributes; ``pattern`` matches the names it stands for when it has ``<...>``."""

    name: str
    attrs: Mapping[str, Any]
    pattern: re.Pattern[str] | None


def _pattern(name: str) -> re.Pattern[str] | None:
    parts = re.split(r"<(\w+)>", name)  # text, placeholder, text, ...
    if len(parts) == 1:
        return None
    regex = "".join(re.escape(p) if i % 2 == 0 else (r"[1-9]\d*" if p == "K" else ".+") for i, p in enumerate(parts))
    return re.compile(regex)


def fill(pattern: str, **values: Any) -> str:
    """``fill("knn_recall@<K>", K=5)`` -> ``"knn_recall@5"``."""
    return re.sub(r"<(\w+)>", lambda m: str(values[m.group(1)]), pattern)


class Registry(Mapping[str, Any]):
    """Names -> builders for one config key, in declaration order. ``kind`` names an entry in messages ("head"),
    ``key`` is the config key that picks one ("model.head"), ``home`` the module whose decorators register the
    builders (imported on the first builder lookup). As a mapping it gives the builders: ``HEADS["arcface"]``."""

    def __init__(self, kind: str, key: str, home: str | None = None):
        self.kind, self.key, self.home = kind, key, home
        self._entries: dict[str, Entry] = {}
        self._builders: dict[str, Any] = {}

    def add(self, name: str, builder: Any = None, **attrs: Any) -> None:
        """Declare ``name`` with its attributes and, when given, its builder. Declaring a name again (its module
        registering the builder) keeps the attributes; one given again must not contradict them."""
        old = self._entries.get(name)
        if old is not None:
            clash = sorted(k for k, v in attrs.items() if k in old.attrs and old.attrs[k] != v)
            if clash:
                raise ValueError(f"{self.kind} '{name}': {', '.join(clash)} declared as {old.attrs[clash[0]]!r}, "
                                 f"registered as {attrs[clash[0]]!r}")
            attrs = {**old.attrs, **attrs}
        if builder is not None:
            prior = self._builders.get(name)
            if prior is not None and _qualified(prior) != _qualified(builder):  # a module reloaded is no clash
                raise ValueError(f"{self.kind} '{name}' already has a builder: {_qualified(prior)}")
            self._builders[name] = builder
        self._entries[name] = Entry(name, MappingProxyType(dict(attrs)), _pattern(name))

    def register(self, name: str, **attrs: Any) -> Callable[[Any], Any]:
        """Decorator: the function or class below builds ``name``."""

        def bind(builder: Any) -> Any:
            self.add(name, builder, **attrs)
            return builder

        return bind

    def remove(self, name: str) -> None:
        """Take an entry back (a test's or a plugin's temporary name)."""
        self._entries.pop(name)
        self._builders.pop(name, None)

    def names(self, **attrs: Any) -> list[str]:
        """The declared names in declaration order; with ``attrs``, only those whose attributes have these values."""
        return [n for n, e in self._entries.items() if all(e.attrs.get(k) == v for k, v in attrs.items())]

    def literal(self, **attrs: Any) -> Any:
        """``Literal[...]`` of ``names(**attrs)``: the type of the config key that picks one."""
        return Literal[tuple(self.names(**attrs))]

    def find(self, name: str) -> Entry | None:
        """The entry of ``name``: its own, else the first pattern that matches it; None when neither."""
        if name in self._entries:
            return self._entries[name]
        return next((e for e in self._entries.values() if e.pattern and e.pattern.fullmatch(name)), None)

    def info(self, name: str, key: str | None = None) -> Mapping[str, Any]:
        """The attributes of ``name`` (patterns included), or a one-line UserError naming ``key`` and the valid
        names."""
        entry = self.find(name)
        if entry is None:
            raise UserError(f"{key or self.key}: unknown name '{name}'; valid: {', '.join(self._entries)}"
                            f"{did_you_mean(name, self._entries)}")
        return entry.attrs

    def lookup(self, name: str, key: str | None = None) -> Any:
        """The builder of ``name``, or a one-line UserError naming ``key`` (default: the registry's) and the valid
        names, with a did-you-mean."""
        return lookup(self, name, key or self.key)

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        if name not in self._builders and self.home is not None:
            importlib.import_module(self.home)  # its decorators register the builders
        if name not in self._builders:
            raise KeyError(f"{self.kind} '{name}' is declared but no builder is registered for it"
                           + (f" in {self.home}" if self.home else ""))
        return self._builders[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.key!r}: {', '.join(self._entries)})"


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


# ---------------------------------------------------------------------------------------------- builders
# Each name below is the value of its config key; the builder is registered in ``home`` with the decorator.

# (DataCfg, where) -> the item table. mixable: may be an entry of data.sources (reid brings its own query and
# gallery folders, so it is a whole data set, never one source among others).
SOURCES = Registry("data source", "data.source", home="vistrain.data.sources")
SOURCES.add("csv", mixable=True)  # ID,target CSV + an image folder
SOURCES.add("folders", mixable=True)  # one folder per class
SOURCES.add("reid", mixable=False)  # Market-1501 style pid_cXsY names
SOURCES.add("manifest", mixable=True)  # a CSV or JSON-lines list of path,label[,...]

# (in_features, num_classes) -> a head mapping features [B, D] (and labels) to logits [B, C]
HEADS = Registry("head", "model.head", home="vistrain.models.heads")
HEADS.add("linear")
HEADS.add("arcface")  # additive angular margin
HEADS.add("cosface")  # additive cosine margin

# A classifier's loss: (class_weights [C] | None, label_smoothing) -> a module on logits [B, C] and class indices
# [B] or soft targets [B, C] (mixup)
LOSSES = Registry("loss", "train.loss", home="vistrain.models.losses")
LOSSES.add("ce")

# An embedding model's loss terms (loss.terms[i].name): cls(num_classes, feat_dim, **params) on the model's
# training output; the parameters are checked against __init__ when the config loads
EMBEDDING_LOSSES = Registry("loss term", "loss.terms[].name", home="vistrain.models.losses")
EMBEDDING_LOSSES.add("ce")
EMBEDDING_LOSSES.add("triplet")  # batch-hard
EMBEDDING_LOSSES.add("center")

# (labels [N], generator) -> a Sampler of indices; batches: a batch sampler with arguments of its own (P x K)
SAMPLERS = Registry("sampler", "sampler.name", home="vistrain.data.samplers")
SAMPLERS.add("random", batches=False)
SAMPLERS.add("weighted", batches=False)  # every class drawn equally often
SAMPLERS.add("pk", batches=True)  # P classes or identities x K images per batch

# our name -> timm's create_optimizer_v2 name (the builder is timm's)
OPTIMIZERS = Registry("optimizer", "train.optimizer")
OPTIMIZERS.add("adamw", "adamw")
OPTIMIZERS.add("adam", "adam")
OPTIMIZERS.add("sgd", "momentum")  # with train.momentum, Nesterov

# (optimizer, TrainCfg, updates per epoch, monitor mode) -> a timm Scheduler
SCHEDULERS = Registry("scheduler", "train.scheduler", home="vistrain.engine.optim")
SCHEDULERS.add("cosine")
SCHEDULERS.add("step")
SCHEDULERS.add("plateau")  # reads the monitor's direction
SCHEDULERS.add("cosine_restarts")
SCHEDULERS.add("none")  # the warm-up, then a constant rate

# ----------------------------------------------------------------------------------------------- metrics
# Every figure a run reports that something ranks: higher_is_better is what early stopping, the plateau schedule,
# tune's study direction, compare's verdicts and the plots read. monitor: the runs that report it every epoch, so
# train.monitor may name it (in this order: the first is the default): classification; domain (a classifier's
# "<metric>@<domain>" with data domains); reid (data.source: reid); retrieval (other embedding runs: the validation
# images query the training images, a K of eval.recall_ks); split_classes (data.split_classes: true).
METRICS = Registry("metric", "train.monitor")
METRICS.add("macro_f1", higher_is_better=True, monitor="classification")
METRICS.add("accuracy", higher_is_better=True, monitor="classification")
METRICS.add("valid_loss", higher_is_better=False, monitor="classification")
METRICS.add("top1@<domain>", higher_is_better=True, monitor="domain")
METRICS.add("top5@<domain>", higher_is_better=True, monitor="domain")
METRICS.add("macro_f1@<domain>", higher_is_better=True, monitor="domain")
METRICS.add("mAP", higher_is_better=True, monitor="reid")
METRICS.add("rank1", higher_is_better=True, monitor="reid")
METRICS.add("rank5", higher_is_better=True, monitor="reid")
METRICS.add("rank10", higher_is_better=True, monitor="reid")
METRICS.add("mINP", higher_is_better=True, monitor="reid")
METRICS.add("knn_recall@<K>", higher_is_better=True, monitor="retrieval")
METRICS.add("knn_acc", higher_is_better=True, monitor="retrieval")
METRICS.add("knn_macro_f1", higher_is_better=True, monitor="retrieval")
METRICS.add("recall@<K>", higher_is_better=True, monitor="split_classes")
# evaluate's and compare's figures (metrics.classification.classification_report), the loop's training loss
METRICS.add("top1", higher_is_better=True)
METRICS.add("top5", higher_is_better=True)
METRICS.add("weighted_f1", higher_is_better=True)
METRICS.add("balanced_accuracy", higher_is_better=True)
METRICS.add("nll", higher_is_better=False)
METRICS.add("ece", higher_is_better=False)
METRICS.add("train_loss", higher_is_better=False)

REGISTRIES = (SOURCES, HEADS, LOSSES, EMBEDDING_LOSSES, SAMPLERS, OPTIMIZERS, SCHEDULERS, METRICS)


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better (``METRICS``; ``knn_recall@10`` and ``top1@real`` by their patterns).
    An unknown name is a one-line UserError listing the metrics."""
    return bool(METRICS.info(metric)["higher_is_better"])


def domain_metrics() -> tuple[str, ...]:
    """The metrics a classifier reports per data domain, as ``<metric>@<domain>``: ("top1", "top5", "macro_f1")."""
    return tuple(name.partition("@")[0] for name in METRICS.names(monitor="domain"))
