"""Sources: turn what the user has on disk into the one item table every later stage reads.

The item table (pandas) has the columns ``path, id, label, group`` and, when the input has them,
``camera, domain, split, fold`` (``data.sources``: ``domain`` is each source's name). ``group`` is the unit that
may never straddle train and validation (a document, an object, a person). A new source is one function registered
with ``@SOURCES.register(name)``, its name declared in ``vistrain/registry.py`` (which the config's ``data.source``
takes its values from).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from vistrain.config.schema import DataCfg
from vistrain.data.classmap import load_class_map
from vistrain.data.images import ImageIndex, check_images, is_image_entry
from vistrain.errors import UserError
from vistrain.registry import SOURCES

ITEM_COLUMNS = ["path", "id", "label", "group"]
OPTIONAL_COLUMNS = ["camera", "domain", "split", "fold"]
_SEQ_NAME = re.compile(r"^(?P<group>.+)_(?P<seq>\d+)$")


def require_file(path: Path | None, key: str) -> Path:
    if path is None:
        raise UserError(f"{key}: not set; give the path in the config or as {key}=PATH")
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    return path


def require_dir(path: Path | None, key: str) -> Path:
    if path is None:
        raise UserError(f"{key}: not set; give the folder in the config or as {key}=DIR")
    if not path.is_dir():
        raise UserError(f"{key}: folder not found: {path}")
    return path


def read_csv(path: Path, key: str, required: list[tuple[str, str]]) -> pd.DataFrame:
    """Read a CSV and check its columns; ``required`` holds (column, config key naming it) pairs."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: cannot read CSV {path}: {str(err).splitlines()[0]}") from err
    for column, col_key in required:
        if column not in df.columns:
            have = ", ".join(map(str, df.columns)) or "none"
            raise UserError(f"{col_key}: column '{column}' not in {path}; its columns: {have}")
    empty = df[[c for c, _ in required]].eq("").any(axis=1)
    if empty.any():
        row = int(empty.idxmax()) + 2  # header is line 1
        raise UserError(f"{key}: {path} line {row} has an empty {', '.join(c for c, _ in required)} value")
    return df


def _natural_labels(values: pd.Series) -> pd.Series:
    """Keep integer class labels as ints (so they sort 0, 1, 2, 10 and are written back unchanged)."""
    try:
        as_int = values.astype(int)
    except ValueError:
        return values
    return as_int if (as_int.astype(str) == values).all() else values


@SOURCES.register("csv")
def csv_source(cfg: DataCfg, where: str = "data") -> pd.DataFrame:
    """``data.train_csv`` (ID, target[, group_col, fold, domain, camera, split]) + ``data.image_dir_train``.

    ``where`` is the config prefix of the settings in the messages (``data``, ``data.sources[1]``)."""
    csv_path = require_file(cfg.train_csv, f"{where}.train_csv")
    image_dir = require_dir(cfg.image_dir_train, f"{where}.image_dir_train")
    required = [(cfg.id_col, f"{where}.id_col"), (cfg.target_col, f"{where}.target_col")]
    if cfg.group_col:
        required.append((cfg.group_col, f"{where}.group_col"))
    df = read_csv(csv_path, f"{where}.train_csv", required)
    dupes = df[cfg.id_col][df[cfg.id_col].duplicated()]
    if len(dupes):
        raise UserError(f"{where}.train_csv: ID '{dupes.iloc[0]}' appears more than once in {csv_path} "
                        f"({len(dupes)} repeated IDs)")
    index = ImageIndex(image_dir, cfg.image_ext)
    paths = [index.find(i) for i in df[cfg.id_col]]
    items = pd.DataFrame({
        "path": [str(p) if p is not None else "" for p in paths],
        "id": df[cfg.id_col].astype(str),
        "label": _natural_labels(df[cfg.target_col]),
        "group": df[cfg.group_col].astype(str) if cfg.group_col else df[cfg.id_col].astype(str),
    })
    for col in OPTIONAL_COLUMNS:
        if col in df.columns:
            items[col] = df[col].values
    missing = items["path"] == ""
    if missing.all():
        raise UserError(f"{where}.image_dir_train: none of the {len(items)} IDs in {csv_path.name} has an image in "
                        f"{image_dir} (tried the ID as given and with {', '.join(index.exts[:4])}, ...)")
    return items


@SOURCES.register("folders")
def folders_source(cfg: DataCfg, where: str = "data") -> pd.DataFrame:
    """``data.image_dir_train/<class>/<ID>_<seq>.ext``: the folder is the class, ``<ID>`` the group. A name whose
    ``<ID>`` is the class folder's own name (ImageNet's and timm's ImageFolder layout: ``n01440764/n01440764_10026``)
    numbers the class's images, not an object's views: such a file is its own group, else the whole class would be
    one group and sit in one fold."""
    root = require_dir(cfg.image_dir_train, f"{where}.image_dir_train")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if is_image_entry(path):
                m = _SEQ_NAME.match(path.stem)
                own = m is None or m["group"] == class_dir.name
                group = f"{class_dir.name}/{path.stem if own else m['group']}"
                rows.append((str(path), str(path.relative_to(root)), class_dir.name, group))
    if not rows:
        raise UserError(f"{where}.image_dir_train: no images in class sub-folders of {root} "
                        f"(expected {root}/<class>/<name>{cfg.image_ext})")
    items = pd.DataFrame(rows, columns=ITEM_COLUMNS)
    items["label"] = _natural_labels(items["label"])
    return items


# Market-1501: 0002_c1s1_000451_03.jpg -> person 2, camera 1 (DukeMTMC: 0001_c2_f0046182.jpg).
_REID_NAME = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d+)")


def parse_reid_name(name: str) -> tuple[int, int] | None:
    """``(person id, camera)`` from a Market-1501 style file name, or None when it does not follow it.

    Person -1 marks junk detections and 0 distractors; the caller decides what to keep.
    """
    m = _REID_NAME.match(Path(name).name)
    return (int(m["pid"]), int(m["cam"])) if m else None


@SOURCES.register("reid")
def reid_source(cfg: DataCfg, where: str = "data") -> pd.DataFrame:
    """``data.root/{train_folder, query_folder, gallery_folder}`` -> items with ``camera`` and ``split``.

    Junk (-1) is dropped everywhere; distractors (0) stay in the gallery only, where they are never a match.
    """
    root = require_dir(cfg.root, f"{where}.root")
    rows = []
    for split, key, folder in (("train", "data.train_folder", cfg.train_folder),
                               ("query", "data.query_folder", cfg.query_folder),
                               ("gallery", "data.gallery_folder", cfg.gallery_folder)):
        path = root / folder
        if not path.is_dir():
            have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
            raise UserError(f"{key}: folder '{folder}' not found in {root} (is it unzipped?); folders there: {have}")
        files = [p for p in sorted(path.iterdir()) if is_image_entry(p)]
        bad = [p.name for p in files if parse_reid_name(p.name) is None]
        if bad:
            raise UserError(f"{key}: {len(bad)} file(s) in {path} do not follow the <person>_c<camera>... name "
                            f"pattern, e.g. {bad[0]}")
        for p in files:
            pid, cam = parse_reid_name(p.name)
            if pid == -1 or (pid == 0 and split != "gallery"):
                continue
            rows.append((str(p), f"{folder}/{p.name}", pid, str(pid), cam, split))
    items = pd.DataFrame(rows, columns=[*ITEM_COLUMNS, "camera", "split"])
    for split, key in (("train", "data.train_folder"), ("query", "data.query_folder"),
                       ("gallery", "data.gallery_folder")):
        if not (items["split"] == split).any():
            raise UserError(f"{key}: no usable images (person ids other than -1) in {root / getattr(cfg, key[5:])}")
    return items


SPLIT_VALUES = ("train", "val", "test")  # what a data ``split`` column may hold (reid folders add query, gallery)


def _manifest_rows(path: Path, key: str) -> tuple[pd.DataFrame, list[int]]:
    """The manifest as text columns, and each row's line in the file (CSV: header is line 1; JSON array: item)."""
    if path.suffix.lower() == ".csv":
        df = read_csv(path, key, [("path", key), ("label", key)])
        return df, list(range(2, len(df) + 2))
    try:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):  # a JSON array of objects is accepted too
            rows, lines = json.loads(text), None
        else:
            numbered = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
            lines = [n for n, _ in numbered]
            rows = []
            for n, line in numbered:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{key}: {path} line {n}: not a JSON object ({err.msg}); expected one "
                                    '{"path": ..., "label": ...} per line') from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{key}: cannot read {path}: {err}") from None
    lines = lines or list(range(1, len(rows) + 1))
    for n, row in zip(lines, rows):
        missing = [f for f in ("path", "label") if not isinstance(row, dict) or row.get(f) in (None, "")]
        if missing:
            raise UserError(f"{key}: {path} line {n}: no {' or '.join(missing)}; every row needs path and label")
    df = pd.DataFrame(rows).map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    return df, lines


@SOURCES.register("manifest")
def manifest_source(cfg: DataCfg, where: str = "data") -> pd.DataFrame:
    """``data.manifest``: a CSV or JSON-lines list of ``path,label[,domain][,group][,split]``; relative paths
    resolve against the manifest's folder. A row whose file is missing, whose label is not in ``data.class_map``
    or whose split is not train / val / test is an error naming its line."""
    key = f"{where}.manifest"
    path = require_file(cfg.manifest, key)
    df, lines = _manifest_rows(path, key)
    if df.empty:
        raise UserError(f"{key}: {path} lists no images")
    known = set(load_class_map(cfg.class_map).classes) if cfg.class_map is not None else None
    resolved, seen = [], {}
    for n, written, label, split in zip(lines, df["path"], df["label"], df.get("split", [""] * len(df))):
        file = Path(written).expanduser()
        file = file if file.is_absolute() else path.parent / file
        problem = None
        if not file.is_file():
            problem = f"file not found: {file}"
        elif written in seen:
            problem = f"'{written}' is listed twice (line {seen[written]} too)"
        elif known is not None and label not in known:
            problem = f"label '{label}' is not in data.class_map {cfg.class_map}"
        elif "split" in df.columns and split not in SPLIT_VALUES:
            problem = f"split '{split}' is not one of {', '.join(SPLIT_VALUES)}"
        if problem:
            raise UserError(f"{key}: {path} line {n}: {problem}")
        seen[written] = n
        resolved.append(str(file))
    if "domain" in df.columns and (df["domain"] == "").any():
        n = lines[int((df["domain"] == "").to_numpy().argmax())]
        raise UserError(f"{key}: {path} line {n}: empty domain (other rows have one); give every row one or none")
    items = pd.DataFrame({"path": resolved, "id": df["path"], "label": _natural_labels(df["label"]),
                          "group": df["group"].where(df["group"] != "", df["path"]) if "group" in df else df["path"]})
    for col in ("domain", "split"):
        if col in df.columns:
            items[col] = df[col].to_numpy()
    return items


def _entry_settings(cfg: DataCfg, i: int) -> DataCfg:
    """The data section's settings under ``data.sources[i]``'s own."""
    entry = (cfg.sources or [])[i]
    own = {k: v for k, v in entry.model_dump(exclude={"name", "ratio"}).items() if v is not None}
    return cfg.model_copy(update={**own, "sources": None})


def _image_own_groups(items: pd.DataFrame, source: str, settings: DataCfg) -> pd.Series:
    """Items whose group is only the image itself, the source declaring none: a csv without ``group_col``, a file
    not named ``<ID>_<seq>``, a manifest row without a group (its group is its path, its ID). Equal names of such
    groups in two sources (img_001 in both) are two unrelated images, never joined."""
    if source == "csv":
        return pd.Series(not settings.group_col, index=items.index)
    if source == "folders":
        return ~items["id"].map(lambda i: bool(_SEQ_NAME.match(Path(i).stem)))
    alone = items.groupby("group")["group"].transform("size") == 1  # a group of one named after its path
    return alone & (items["group"].astype(str) == items["id"].astype(str))


def mixed_source(cfg: DataCfg) -> pd.DataFrame:
    """``data.sources``: each entry read by its own source, the data section's settings under the entry's.
    Every item gets the source's name as ``domain`` and as a prefix of its ``id`` (``studio/x``), so IDs stay unique
    across sources. A group the source declares keeps its name (``data.group_across_sources``), so the same object
    in two sources is one group and stays on one side of every split; an image's own group, and with
    ``group_across_sources: false`` every group, gets the prefix too."""
    parts = []
    for i, entry in enumerate(cfg.sources or []):
        where = f"data.sources[{i}]"
        settings = _entry_settings(cfg, i)
        items = SOURCES.lookup(entry.source, f"{where}.source")(settings, where)
        own = _image_own_groups(items, entry.source, settings) | (not cfg.group_across_sources)
        items["group"] = items["group"].astype(str).mask(own, entry.name + "/" + items["group"].astype(str))
        items["id"] = entry.name + "/" + items["id"].astype(str)
        items["domain"] = entry.name
        parts.append(items)
    names = [e.name for e in cfg.sources or []]
    for col in ("split", "fold"):
        has = [n for n, p in zip(names, parts) if col in p.columns]
        if has and len(has) < len(parts):
            lacks = next(n for n in names if n not in has)
            raise UserError(f"data.sources: source '{has[0]}' has a {col} column but '{lacks}' has none; give every "
                            f"source one or none")
    items = pd.concat(parts, ignore_index=True)
    # Labels as text first: one source's integer labels and another's names must meet as the same type.
    items["label"] = _natural_labels(items["label"].astype(str))
    return items


def _source_groups(source: str, settings: DataCfg, where: str) -> tuple[str, str]:
    """(what a source's groups are, the key that sets it) for the messages about groups."""
    if source == "csv":
        if settings.group_col:
            return f"column '{settings.group_col}'", f"{where}.group_col"
        return f"column '{settings.id_col}', every image its own group", f"{where}.id_col"
    if source == "folders":
        return "the <ID> of <ID>_<seq> file names", f"{where}.image_dir_train"
    if source == "manifest":
        return "the manifest's group field", f"{where}.manifest"
    return "the person ids of the file names", f"{where}.root"


def group_origin(cfg: DataCfg) -> tuple[str, str]:
    """(config key, where the groups come from) for a message about groups: ``("data.group_col", "column
    'patient' (data.group_col)")``; with ``data.sources`` the key is ``data.sources`` and each source's origin is
    named, with whether ``data.group_across_sources`` joins them."""
    if not cfg.sources:
        what, key = _source_groups(cfg.source, cfg, "data")
        return key, f"{what} ({key})"
    keys: dict[str, list[str]] = {}
    for i, entry in enumerate(cfg.sources):
        settings = _entry_settings(cfg, i)
        field = ("group_col" if settings.group_col else "id_col") if entry.source == "csv" else None
        inherited = field is not None and getattr(entry, field) is None  # a csv column key of the data section
        what, key = _source_groups(entry.source, settings, "data" if inherited else f"data.sources[{i}]")
        keys.setdefault(what, [])
        if key not in keys[what]:
            keys[what].append(key)
    text = ", ".join(f"{what} ({', '.join(k)})" for what, k in keys.items())
    joined = "one group in every source" if cfg.group_across_sources else "each source's groups its own"
    return "data.sources", f"{text}; {joined} (data.group_across_sources: {str(cfg.group_across_sources).lower()})"


def drop_small_groups(items: pd.DataFrame, min_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop every image of a group that holds an image whose shorter side is under ``min_size`` pixels.

    Returns (kept, dropped with a ``reason``). Only image headers are read.
    """
    def is_small(path: str) -> bool:
        try:
            with Image.open(path) as img:
                return min(img.size) < min_size
        except Exception:  # noqa: BLE001 - unreadable or missing files are reported by split_bad_images, as such
            return False

    small = items["path"].map(is_small).astype(bool)
    bad_groups = set(items.loc[small, "group"])
    drop = items["group"].isin(bad_groups)
    dropped = items[drop].copy()
    dropped["reason"] = f"its group holds an image smaller than data.min_image_size={min_size}"
    return items[~drop].reset_index(drop=True), dropped.reset_index(drop=True)


def check_classes(items: pd.DataFrame, class_names: list[str] | None) -> list:
    """The ordered class list: ``data.class_names`` when given (it must match exactly), else sorted labels."""
    found = sorted(items["label"].unique().tolist())
    if class_names is None:
        return found
    by_name = {str(v): v for v in found}
    missing = [n for n in class_names if n not in by_name]
    extra = [str(v) for v in found if str(v) not in class_names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"listed but not in the data: {', '.join(missing)}")
        if extra:
            parts.append(f"in the data but not listed: {', '.join(extra)}")
        raise UserError(f"data.class_names: does not match the data; {'; '.join(parts)}")
    return [by_name[n] for n in class_names]


def split_bad_images(items: pd.DataFrame, on_bad_image: str, errors: dict[str, str] | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image once (or take ``errors``, ``{path: reason}`` found while building the decode-once
    cache); return (readable items, bad items with a ``reason`` column).

    With ``on_bad_image: error`` the first bad file stops the run with its path and reason.
    """
    reasons = {p: "file not found" for p in items.loc[items["path"] == "", "id"]}
    found = items[items["path"] != ""]
    if errors is None:
        errors = check_images(found["path"].tolist())
    bad_mask = items["path"].isin(errors) | (items["path"] == "")
    bad = items[bad_mask].copy()
    bad["reason"] = [errors.get(p) or reasons.get(i, "unreadable") for p, i in zip(bad["path"], bad["id"])]
    if len(bad) and on_bad_image == "error":
        first = bad.iloc[0]
        where = first["path"] or f"ID {first['id']}"
        raise UserError(f"data.on_bad_image=error: {len(bad)} unreadable image(s); first: {where}: {first['reason']}")
    return items[~bad_mask].reset_index(drop=True), bad.reset_index(drop=True)


def load_items(cfg: DataCfg) -> pd.DataFrame:
    """The item table of ``cfg.sources`` (mixed) or ``cfg.source``; files a CSV names but that are missing are
    kept with an empty path (see split_bad_images)."""
    if cfg.sources:
        return mixed_source(cfg)
    return SOURCES.lookup(cfg.source)(cfg, "data")


def check_min_images(items: pd.DataFrame, classes: list, minimum: int | None) -> None:
    """``data.min_images_per_class``: every class needs that many readable images, all domains together."""
    if not minimum:
        return
    counts = items["label"].astype(str).value_counts()
    low = [(str(c), int(counts.get(str(c), 0))) for c in classes if counts.get(str(c), 0) < minimum]
    if low:
        low.sort(key=lambda cn: cn[1])
        shown = ", ".join(f"{c} ({n})" for c, n in low[:20]) + (f" ... ({len(low) - 20} more)" if len(low) > 20 else "")
        raise UserError(f"data.min_images_per_class: {len(low)} class(es) have fewer than {minimum} readable images "
                        f"(all domains together): {shown}; add images or lower data.min_images_per_class")


def single_domain_classes(items: pd.DataFrame) -> dict[str, list[str]]:
    """``{domain: [classes found in that domain only]}`` (domains with none left out); {} without domains."""
    if "domain" not in items.columns or items["domain"].nunique() < 2:
        return {}
    where = items.groupby(items["label"].astype(str))["domain"].agg(lambda d: sorted(set(map(str, d))))
    out: dict[str, list[str]] = {}
    for label, domains in where.items():
        if len(domains) == 1:
            out.setdefault(domains[0], []).append(label)
    return {d: out[d] for d in sorted(out)}
