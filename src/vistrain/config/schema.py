"""The typed configuration: one section per concern, every default with the reason for it.

Validation is pydantic v2 with ``extra="forbid"``: an unknown key, a wrong type or an impossible
value becomes a problem naming its dotted key (``train.lr``), collected with every other problem
before anything is built (see ``config.loader``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from vistrain.errors import did_you_mean
from vistrain.registry import HEADS, LOSSES, METRICS, OPTIMIZERS, SAMPLERS, SCHEDULERS, SOURCES, domain_metrics, fill

PositiveInt = Annotated[int, Field(gt=0)]
# The values of the keys that name a builder are its registry's names (vistrain/registry.py), never a second list.
SourceName = SOURCES.literal()
MixableSourceName = SOURCES.literal(mixable=True)
HeadName = HEADS.literal()
LossName = LOSSES.literal()
OptimizerName = OPTIMIZERS.literal()
SchedulerName = SCHEDULERS.literal()
SamplerName = SAMPLERS.literal()
TTA_VIEWS = ("hflip", "vflip")  # eval.tta: the flipped views inference can average with the plain image
ImgSize = int | tuple[int, int]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectCfg(Section):
    name: str = "vistrain"  # prefix of the run id; the config file's stem when left as is
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42  # seeds Python, NumPy and torch; also fixes the fold assignment
    # what the model is for (task, images, users), in a sentence or two: the opening of RUN/MODEL_CARD.md
    description: str | None = None


class SourceCfg(Section):
    """One entry of ``data.sources``: a named source of any kind. Its domain is its name; the column and
    extension keys left out take the data section's values."""

    name: str  # unique; every item of this source gets it in the `domain` column (studio, real ...)
    ratio: Annotated[float, Field(gt=0, le=1)] | None = None  # share of each training epoch; all sources or none
    source: MixableSourceName = "csv"  # any source but reid (a whole data set with query and gallery folders)
    train_csv: Path | None = None  # csv
    image_dir_train: Path | None = None  # csv: the images; folders: the root of the class folders
    manifest: Path | None = None  # manifest: CSV or JSON-lines list
    image_ext: str | None = None  # data.image_ext when empty
    id_col: str | None = None  # data.id_col when empty
    target_col: str | None = None  # data.target_col when empty
    group_col: str | None = None  # data.group_col when empty

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or "/" in v:
            raise ValueError(f"must be a non-empty name without '/' (it prefixes the items' IDs); got {v!r}")
        return v

    @field_validator("image_ext")
    @classmethod
    def _dot(cls, v: str | None) -> str | None:
        return v if v is None or v.startswith(".") else f".{v}"


class DataCfg(Section):
    source: SourceName = "csv"  # csv: ID,target + images; folders: a folder
    # per class; reid: Market-1501 style pid_cXsY names in root/{train_folder, query_folder, gallery_folder};
    # manifest: a CSV or JSON-lines list of path,label[,domain][,group][,split] (data.manifest)
    manifest: Path | None = None  # source: manifest: the list; relative paths in it resolve against its folder
    # several named sources (each as above) mixed by ratio, e.g. [{name: studio, source: folders,
    # image_dir_train: ..., ratio: 0.3}, {name: real, ..., ratio: 0.7}]; replaces data.source when given
    sources: list[SourceCfg] | None = None
    # data.sources: a group the sources declare (group_col value, folders' <ID>, manifest group) is one group in
    # every source, so the same object never sits on both sides of a split; false: each source's groups are its own
    group_across_sources: bool = True
    class_map: Path | None = None  # class_map.json (class_to_idx, idx_to_class, metadata): fixes the class order
    min_images_per_class: PositiveInt | None = None  # classification: fewer readable images (all domains) is an error
    split: Literal["kfold", "ratio"] = "kfold"  # classification: K folds, or one train/val/test split by ratio
    root: Path | None = None  # reid: the dataset folder
    train_folder: str = "bounding_box_train"  # reid: which folder trains (e.g. bounding_box_train_sub)
    query_folder: str = "query"
    gallery_folder: str = "bounding_box_test"
    train_csv: Path | None = None  # CSV with id_col and target_col (source: csv)
    sample_csv: Path | None = None  # sample submission: fixes the order of predictions
    test_csv: Path | None = None  # labelled test CSV for `evaluate --split test`
    image_dir_train: Path | None = None  # training images (source: folders: the root of the class folders)
    image_dir_test: Path | None = None  # test images, only needed by predict / full-pipeline
    image_ext: str = ".jpg"  # tried first when an ID has no extension
    id_col: str = "ID"
    target_col: str = "target"
    group_col: str | None = None  # optional column whose values must never straddle train and validation
    folds: Annotated[int, Field(ge=2)] = 5
    valid_fold: int | Literal["all"] = 0  # one fold index, or "all" to train every fold (gives OOF)
    stratify: bool = True  # keep class proportions in every fold
    class_names: list[str] | None = None  # when given, must equal the classes found in the data
    on_bad_image: Literal["skip", "error"] = "skip"  # unreadable images: list and skip, or stop the run
    max_image_pixels: PositiveInt = 100_000_000  # a larger image (header) is unreadable, refused before decoding
    # decode each image once for every epoch, fold, tune trial and resumed run: auto = memory when the pixels fit
    # in a quarter of the available memory, else disk (one memory-mapped file under data.cache_dir); off = decode
    # every epoch
    cache: Literal["auto", "off", "memory", "disk"] = "auto"
    cache_dir: Path | None = None  # where disk caches live; default $VISTRAIN_CACHE_DIR, else ~/.cache/vistrain
    # data.split: ratio and task: embedding (csv / folders / manifest data without a split column): a grouped,
    # class-stratified train/val/test split by ratio
    train_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.70
    val_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.15
    min_image_size: PositiveInt | None = None  # drop every image of a group holding an image smaller than this
    # task: embedding (retrieval): every class's images in one of train / val / test (classes drawn by the ratios),
    # as retrieval benchmarks split; validation then reports recall@K on unseen classes, each val image querying
    # the other val images. false: val images query the training images of the same classes (knn_recall@K)
    split_classes: bool = False

    @field_validator("image_ext")
    @classmethod
    def _dot(cls, v: str) -> str:
        return v if v.startswith(".") else f".{v}"

    @field_validator("class_names")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            dupes = sorted({n for n in v if v.count(n) > 1})
            raise ValueError(f"names must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[SourceCfg] | None) -> list[SourceCfg] | None:
        if v is None:
            return v
        names = [s.name for s in v]
        if not v:
            raise ValueError("needs at least one source, e.g. [{name: studio, source: folders, image_dir_train: DIR}]")
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"names must be unique; repeated: {', '.join(repeated)}")
        given = [s.ratio is not None for s in v]
        if any(given) and not all(given):
            missing = [n for n, g in zip(names, given) if not g]
            raise ValueError(f"give every source a ratio or none; without one: {', '.join(missing)}")
        if all(given) and abs(sum(s.ratio for s in v) - 1) > 1e-6:
            listed = " + ".join(f"{s.ratio:g} ({s.name})" for s in v)
            raise ValueError(f"the ratios must sum to 1; {listed} = {sum(s.ratio for s in v):g}")
        return v

    def domain_ratios(self) -> dict[str, float] | None:
        """``{source name: ratio}`` when ``data.sources`` gives ratios (the training sampler follows them)."""
        if not self.sources or self.sources[0].ratio is None:
            return None
        return {s.name: float(s.ratio) for s in self.sources}


class ModelCfg(Section):
    name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # load ImageNet weights (from pretrained_path when given)
    pretrained_path: Path | None = None  # local .pth/.safetensors file (or a vistrain checkpoint); no download then
    init_from: Path | None = None  # fine-tune from a vistrain run directory or checkpoint: matching tensors load
    # a timm train.py checkpoint as pretrained_path / init_from: its EMA weights (state_dict_ema) instead of
    # state_dict; a vistrain checkpoint gives its evaluated weights either way (the EMA ones when the run kept them)
    use_ema_weights: bool = False
    pooling: Literal["avg", "max", "avgmax", "catavgmax", "gem"] = "avg"  # timm global_pool
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout before the classifier
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0  # stochastic depth, where the model has it
    # task: embedding
    last_stride: Literal[1, 2] | None = None  # 1: ResNet layer4 without its stride (2x larger last feature map)
    embedding_dim: PositiveInt | None = None  # linear projection after pooling; the backbone's width when empty
    neck: Literal["bnneck", "none"] = "bnneck"  # BN without bias shift: triplet sees the feature before it
    head: HeadName = "linear"
    arcface_s: Annotated[float, Field(gt=0)] = 30.0  # scale of the arcface / cosface logits
    arcface_m_warmup: Annotated[float, Field(ge=0, lt=1.6)] = 0.0  # margin while train.freeze_backbone_epochs
    arcface_m_finetune: Annotated[float, Field(ge=0, lt=1.6)] = 0.5  # margin afterwards
    margin_ramp_epochs: Annotated[int, Field(ge=0)] = 0  # reach the finetune margin linearly over these epochs


class TrainCfg(Section):
    img_size: ImgSize = 224  # int or [H, W]
    batch_size: PositiveInt | Literal["auto"] = 32  # auto: the largest batch that fits the GPU (CPU: batch_size_cpu)
    batch_size_cpu: PositiveInt = 32  # what batch_size: auto means on a CPU
    # with batch_size auto: the global batch (batch_size x grad_accum_steps x processes) to reach by accumulation
    target_batch_size: PositiveInt | None = None
    epochs: PositiveInt = 10
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr: Annotated[float, Field(ge=0)] = 1e-6  # floor of cosine schedules
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    optimizer: OptimizerName = "adamw"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    scheduler: SchedulerName = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] = 1  # linear warm-up from warmup_lr_factor * lr
    warmup_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.01
    step_milestones: list[PositiveInt] = [30, 60]  # step: epochs at which lr *= step_gamma
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    restart_epochs: PositiveInt = 10  # cosine_restarts: length of the first cycle
    restart_mult: Annotated[float, Field(ge=1)] = 1.0  # cosine_restarts: cycle length multiplier
    plateau_patience: Annotated[int, Field(ge=0)] = 2  # plateau: epochs without improvement before lr *= step_gamma
    amp: Literal["auto", "bf16", "fp16", "fp32"] | bool = "auto"  # auto: bf16 on Ampere+, fp16 older, fp32 CPU
    # NHWC memory format (faster convolutions on tensor cores); auto: on CUDA for convolutional models
    channels_last: Literal["auto"] | bool = "auto"
    # torch.compile the model: true (default mode), max-autotune (longer compile, faster steps); a model that
    # cannot be compiled here trains without it (the log says why)
    compile: Literal["max-autotune"] | bool = False
    ema: bool = False  # evaluate and checkpoint an exponential moving average of the weights
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.9998  # reached gradually (warm-up) in short runs
    grad_clip_norm: Annotated[float, Field(gt=0)] | None = None
    grad_accum_steps: PositiveInt = 1
    # several GPU processes: BatchNorm batch statistics over all ranks (SyncBatchNorm); false: each rank's own,
    # the running statistics averaged over the ranks before each evaluation (timm's distribute_bn)
    sync_bn: bool = False
    loss: LossName = "ce"  # the classifier's loss on its logits; train.label_smoothing and class_weights are its own
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # balanced: CE weights inverse to class frequency; from_class_map: data.class_map's metadata.training_weight
    class_weights: Literal["none", "balanced", "from_class_map"] = "none"
    early_stopping_patience: Annotated[int, Field(ge=0)] = 5  # evaluations without improvement; 0 disables
    eval_every_n_epochs: PositiveInt = 1  # validate (monitor, best, early stopping) every N epochs and at the last
    save_every_n_epochs: Annotated[int, Field(ge=0)] = 0  # also keep ckpt/epoch{E}_fold{k}.pth every N epochs; 0: no
    keep_best_k: Annotated[int, Field(ge=0)] = 0  # also keep the K best evaluated epochs: ckpt/top_epoch{E}_fold{k}.pth
    # macro_f1 (classification), mAP (re-id), knn_recall@<min eval.recall_ks> (retrieval; recall@<min K> with
    # data.split_classes: true) when empty; a classifier may also
    # monitor one domain: top1@<domain>, top5@<domain>, macro_f1@<domain> (e.g. top1@real)
    monitor: str | None = None
    freeze_backbone_epochs: Annotated[int, Field(ge=0)] = 0  # train only neck and head for the first epochs
    backbone_lr_mult: Annotated[float, Field(gt=0)] = 1.0  # backbone lr = train.lr * this
    log_interval: Annotated[int, Field(ge=0)] = 50  # steps between progress lines in train.log; 0: none
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # DataLoader workers; auto: by device and cache
    # CPU compute threads (torch, OpenMP/BLAS, OpenCV, onnxruntime); auto: $OMP_NUM_THREADS when set, else the
    # usable cores left after the DataLoader workers (at least 1): more threads than free cores only make them wait
    num_threads: PositiveInt | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The exit code of a run that SIGTERM / SIGUSR1 stopped after writing its checkpoint (status interrupted);
    # null: 143, as a process ended by SIGTERM. 0 for a job that requeues itself and must not count as failed.
    requeue_exit_code: Annotated[int, Field(ge=0, le=255)] | None = None

    @field_validator("img_size")
    @classmethod
    def _size(cls, v: ImgSize) -> ImgSize:
        sizes = (v,) if isinstance(v, int) else v
        if any(s < 8 for s in sizes):
            raise ValueError(f"must be at least 8 pixels (an int or [H, W]); got {v}")
        return v

    @field_validator("amp")
    @classmethod
    def _amp(cls, v: str | bool) -> str:
        if v is True:
            return "auto"
        if v is False:
            return "fp32"
        return v


class AugmentCfg(Section):
    policy: Literal["none", "light", "hard"] = "light"  # light: small affine + colour; hard: crops, blur, erasing
    hflip: Annotated[float, Field(ge=0, le=1)] = 0.5  # probability of a horizontal flip
    vflip: Annotated[float, Field(ge=0, le=1)] = 0.0
    rotate: Annotated[float, Field(ge=0, le=180)] = 10.0  # max rotation in degrees
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.2  # brightness/contrast/saturation strength
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0  # hue shift of the colour jitter (fraction of the hue circle)
    random_erasing: Annotated[float, Field(ge=0, le=1)] = 0.0  # probability (hard policy defaults to 0.25)
    # where the random operations run: cpu (loader workers, torchvision), cuda (uint8 batches on the GPU, per
    # sample, Kornia: pip install 'vistrain[augment]'); auto: cuda when training on a GPU and Kornia is installed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables mixup
    cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables cutmix
    mix_prob: Annotated[float, Field(ge=0, le=1)] = 1.0  # probability a batch is mixed at all
    mix_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5  # cutmix instead of mixup when both are on
    # timm's auto-augment policy by name, after the flips and crop, the model's mean as fill: rand-m9-mstd0.5-inc1
    # (RandAugment), augmix-m5-w4-d2 (AugMix), original / v0 (AutoAugment), 3a, trivial (TrivialAugmentWide)
    auto: str | None = None
    # auto: the policy's own (hard: random resized crop of 60-100% of the area; light / none: no crop); rrc: random
    # resized crop with scale / ratio; pad_crop: pad, then a random crop back to the size (the re-ID chain); none.
    # rrc and pad_crop shift and zoom themselves: the policy's affine then only rotates (augment.rotate)
    crop: Literal["auto", "rrc", "pad_crop", "none"] = "auto"
    scale: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.08, 1.0]  # rrc: share of the area
    ratio: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.75, 1.3333333]  # rrc: width / height
    pad: PositiveInt = 10  # pad_crop: pixels of black padding on each side before the crop
    # const: the model's mean (0 after normalisation, as the re-ID strong baseline); rand: one random colour per
    # rectangle; pixel: random per pixel (timm's --remode)
    erasing_mode: Literal["const", "rand", "pixel"] = "const"
    erasing_count: PositiveInt = 1  # at most this many rectangles per erased image (timm's --recount)
    # the erased rectangles' share of the area, [min, max]; null: the library's own (torchvision's 0.02-0.33 for one
    # const rectangle, timm's 0.02-1/3 otherwise); the re-ID strong baseline erases 0.02-0.4
    erasing_area: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    repeats: Annotated[int, Field(ge=0)] = 0  # timm RepeatAugSampler: each image repeated N times per epoch (0/1 off)
    splits: Annotated[int, Field(ge=0)] = 0  # AugMix splits with the JSD loss (0 off; 3 = timm's --aug-splits 3)
    # a pipeline file saved with albumentations.save (.yaml / .json), run on the CPU on the preprocessed uint8
    # pixels after the policy's operations, before normalisation (pip install 'vistrain[albumentations]')
    albumentations: Path | None = None

    @field_validator("auto")
    @classmethod
    def _auto(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from vistrain.data.auto_augment import check_auto  # timm, imported only for a config that names a policy

        problem = check_auto(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: list[float]) -> list[float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"[low, high] with 0 < low <= high <= 1 (shares of the image's area); got {v}")
        return v

    @field_validator("erasing_area")
    @classmethod
    def _erasing_area(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not 0 < v[0] <= v[1] < 1:
            raise ValueError(f"[min, max] with 0 < min <= max < 1 (shares of the image's area); got {v}")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: list[float]) -> list[float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"[low, high] with 0 < low <= high (width / height of the crop); got {v}")
        return v

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 split is the clean image alone, with nothing to compare it to; 0 turns the splits "
                             "off, 2 or more gives the clean image and K-1 augmented views (timm's --aug-splits 3)")
        return v


class ResizeCfg(Section):
    # OpenCV interpolation: bilinear (INTER_LINEAR, as seed 003), bicubic, area (best for large shrinks), nearest
    interpolation: Literal["bilinear", "bicubic", "area", "nearest"] = "bilinear"
    # a shrink: reduced_area (a large JPEG decoded at 1/2..1/8 keeping >= 2x the size, then INTER_AREA), area (full
    # decode, INTER_AREA), interpolation (full decode, `interpolation` for shrinks too: runs before this key)
    shrink: Literal["reduced_area", "area", "interpolation"] = "reduced_area"


class ClaheCfg(Section):
    enabled: bool = False  # contrast-limited adaptive histogram equalisation on the L channel (LAB)
    clip_limit: Annotated[float, Field(gt=0)] = 2.0
    grid: PositiveInt = 8  # tiles per side


class PreprocessCfg(Section):
    """The deterministic steps every path applies before any random augmentation (see data/preprocess.py)."""

    crop: Literal["none", "center_square"] = "none"  # center_square: the centred min(H, W) square, then resize
    resize: ResizeCfg = ResizeCfg()  # to train.img_size
    clahe: ClaheCfg = ClaheCfg()
    mean: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None  # the timm model's when empty
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] | None = None


class SamplerCfg(Section):
    name: SamplerName = "random"  # weighted: classes equally often; pk: P ids x K images
    p: PositiveInt | None = 16  # pk: classes or identities per batch; null: all of them
    k: PositiveInt = 4  # pk: images per class or identity


class LossTerm(BaseModel):
    """One term of ``loss.terms``: its name, weight, and the term's own parameters (checked by name)."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: Annotated[float, Field(ge=0)] = 1.0


class LossCfg(Section):
    # task: embedding. Classification uses cross-entropy with train.label_smoothing and train.class_weights.
    # The terms' names and parameters are checked against the loss classes by Config (embedding runs only,
    # so a classification config loads without importing torch).
    terms: list[LossTerm] = [LossTerm(name="ce"), LossTerm(name="triplet", margin=0.3)]


class WandbCfg(Section):
    enabled: bool = False  # needs `pip install vistrain[wandb]`
    project: str = "vistrain"
    entity: str | None = None
    name: str | None = None  # the run id when left empty
    tags: list[str] = []
    mode: Literal["online", "offline"] = "offline"  # offline writes under the run directory; sync later


class TrackingCfg(Section):
    tensorboard: bool = True  # event files under <run>/tensorboard/
    wandb: WandbCfg = WandbCfg()


class EvalCfg(Section):
    failure_threshold: Annotated[float, Field(ge=0, le=1)] = 0.7  # classes with F1 below this go to failures.csv
    top_losses: Annotated[int, Field(ge=0)] = 50  # worst-scored items listed in top_losses.csv
    # views averaged with the plain image by `predict --tta` and `evaluate --tta` (or eval.tta=... on their command
    # line); true means [hflip], false none
    tta: list[Literal["hflip", "vflip"]] = ["hflip"]
    batch_size: PositiveInt | None = None  # inference batch; train.batch_size * 2 when empty
    # evaluate: replicates of the percentile bootstrap behind each figure's 95% interval in metrics.json (0: none)
    bootstrap: Annotated[int, Field(ge=0, le=100_000)] = 1000
    # embedding runs
    feat_norm: bool = True  # L2-normalise embeddings before search (cosine distance)
    flip_feats: bool = False  # average each embedding with the horizontally flipped image's
    knn_k: PositiveInt = 5  # search-based classification: majority class of the k nearest gallery items
    # retrieval runs report knn_recall@K (recall@K with data.split_classes: true) for each K (sorted; monitorable)
    recall_ks: list[PositiveInt] = [1, 5]
    rerank: bool = False  # k-reciprocal re-ranking of the query-gallery distances (re-id and retrieval)
    max_rank: PositiveInt = 50  # CMC length
    memory_budget_mb: PositiveInt = 1024  # largest query x gallery block held at once during search

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_views(cls, v: Any) -> Any:
        """``true`` (any bool word a bool key takes) is the horizontal flip, ``false`` no view, one view name that
        view; anything else that is not a list of the views is one line saying what is valid."""
        if isinstance(v, str) and v in TTA_VIEWS:
            return [v]
        if isinstance(v, bool | str):
            try:
                return ["hflip"] if TypeAdapter(bool).validate_python(v) else []
            except ValidationError:
                pass
        if not isinstance(v, list) or any(view not in TTA_VIEWS for view in v):
            raise ValueError(f"expected a list of the views {', '.join(map(repr, TTA_VIEWS))} (e.g. [hflip, vflip]), "
                             "true for [hflip] or false for none")
        return v

    @field_validator("recall_ks")
    @classmethod
    def _distinct_ks(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one K is needed, e.g. [1, 5]")
        if len(set(v)) != len(v):
            repeated = sorted({k for k in v if v.count(k) > 1})
            raise ValueError(f"Ks must be distinct; repeated: {', '.join(map(str, repeated))}")
        return sorted(v)


class AuditCfg(Section):
    """``vistrain audit``: thresholds of its findings (fractions in [0, 1] unless said otherwise)."""

    # near duplicates: a pair's pixel distance must lie this many robust deviations below what nearest neighbours
    # look like in this data set (see audit/duplicates.py); higher finds fewer
    near_dup_z: Annotated[float, Field(gt=0)] = 7.0
    max_drop_frac: Annotated[float, Field(ge=0, le=1)] = 0.05  # --write-clean refuses to drop more rows (--force)
    outlier_percentile: Annotated[float, Field(ge=0, le=1)] = 0.99  # k-NN distance above this quantile of its class
    knn_k: PositiveInt = 5  # embedding outliers: neighbours per image within its class
    min_size_fraction: Annotated[float, Field(ge=0, le=1)] = 0.25  # shorter side under this x train.img_size: too small
    max_aspect_ratio: Annotated[float, Field(ge=1)] = 4.0  # long side / short side above this: extreme aspect ratio
    constant_std: Annotated[float, Field(ge=0, le=1)] = 0.02  # grey-level std (0..1) under this: near-constant image
    embeddings: bool = True  # search embeddings (the run's model, else the configured backbone); false: hashes only
    thumbnails: PositiveInt = 24  # findings per audit.html section shown with thumbnails


class TuneCfg(Section):
    n_trials: PositiveInt = 20
    epochs: PositiveInt | None = None  # epochs per trial; a third of train.epochs when empty
    folds: list[Annotated[int, Field(ge=0)]] = [0]  # folds each trial trains; the objective is their mean
    space: dict[str, dict[str, Any]] = {}  # "train.lr": {type: float, low: 1e-5, high: 1e-2, log: true}; empty: default
    pruner: Literal["median", "hyperband", "none"] = "median"  # no pruning in the warm-up (tune.py pruner_plan)
    storage: str | None = None  # RDB URL; SQLite in the tune directory when empty
    study_name: str | None = None  # the config's project.name when empty
    heartbeat_s: PositiveInt = 30  # shared storage: a dead worker's trial is failed after 3 missed beats
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds for the whole study
    # What a trial's run directory keeps once the trial ends (each last checkpoint holds the optimiser state too):
    # best: a completed trial its best weights only, others nothing; none: nothing; all: every checkpoint
    keep_checkpoints: Literal["best", "none", "all"] = "best"


class ServeCfg(Section):
    """``vistrain serve`` limits and upload checks; its flags override them, an exported file carries them."""

    max_files: PositiveInt = 32  # images per request; more is refused (HTTP 400)
    max_mb: Annotated[float, Field(gt=0)] = 20.0  # size of one upload; larger is refused (HTTP 413)
    top_k: PositiveInt = 5  # classes in each answer
    min_resolution: Annotated[int, Field(ge=0)] = 512  # a side shorter than this gets a warning (seed 003); 0: none
    formats: list[str] = ["JPEG", "PNG"]  # Pillow format names that get no warning; others are predicted, warned
    max_pixels: PositiveInt = 24_000_000  # decode budget: a larger JPEG is decoded reduced (1/2..1/8), others 400
    max_request_mb: Annotated[float, Field(gt=0)] = 64.0  # a larger request body is refused (413) before it is read
    max_concurrency: PositiveInt = 4  # POST /predict requests in flight (upload to answer); one more: 503 + Retry-After
    timeout_s: Annotated[float, Field(gt=0)] = 30.0  # a prediction taking longer is answered 504; SIGTERM's grace

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        from PIL import Image

        known = set(Image.registered_extensions().values())
        for name in v:
            if name.upper() not in known:
                raise ValueError(f"'{name}' is not an image format Pillow reads; valid: its format names, e.g. JPEG, "
                                 f"PNG, WEBP, BMP, TIFF, GIF{did_you_mean(name.upper(), known)}")
        return [name.upper() for name in v]


class OutputCfg(Section):
    exp_dir: Path = Path("experiments")  # runs go to exp_dir/YYYYMMDD/<run_id>/
    logs_dir: Path | None = Path("logs")  # a copy of each train.log as run_YYYYMMDD-HHMM_<run_id>.log
    snapshots: bool = True  # also keep the original YAML and the command line in the run directory


# What train.monitor may name comes from the metric registry (``monitor``: the runs that report it every epoch).
REID_MONITORS = METRICS.names(monitor="reid")


def retrieval_monitors(recall_ks: list[int], split_classes: bool = False) -> list[str]:
    """What a retrieval run reports for each K of eval.recall_ks. Closed set (validation images against the training
    images of the same classes): knn_recall@K, then the kNN classification metrics. data.split_classes: recall@K
    on unseen classes (leave-one-out among the validation images), the figure retrieval benchmarks publish."""
    names = METRICS.names(monitor="split_classes" if split_classes else "retrieval")
    return [fill(name, K=k) for name in names for k in (recall_ks if "<K>" in name else [None])]


RETRIEVAL_MONITORS = retrieval_monitors(EvalCfg().recall_ks)  # with the default eval.recall_ks
# A classifier's per-domain monitors, "<metric>@<domain>" (what metrics.classification.per_domain_metrics reports)
DOMAIN_MONITORS = domain_metrics()


def domain_monitor(monitor: str) -> tuple[str, str] | None:
    """``(metric, domain)`` of a per-domain monitor such as ``top1@real``; None for any other name."""
    metric, sep, domain = monitor.partition("@")
    return (metric, domain) if sep and domain and metric in DOMAIN_MONITORS else None


def _source_domains(d: DataCfg) -> list[str] | None:
    """The domains a config fixes by itself: the names of ``data.sources`` (every item of a source gets its name
    as its domain); None when they are known only from the data (a csv or manifest ``domain`` column)."""
    return [s.name for s in d.sources] if d.sources else None


MONITORS = {
    "classification": METRICS.names(monitor="classification"),
    # re-id runs (data.source: reid) report the first five; data.split_classes runs the last ones
    "embedding": REID_MONITORS + RETRIEVAL_MONITORS + retrieval_monitors(EvalCfg().recall_ks, split_classes=True),
}
# Keys that only an embedding model reads, with their defaults: a classification config that changes one is a mistake.
EMBEDDING_ONLY = {"model.last_stride": None, "model.embedding_dim": None, "model.head": "linear",
                  "model.arcface_m_warmup": 0.0, "model.arcface_m_finetune": 0.5, "model.margin_ramp_epochs": 0}
REID_DATA_KEYS = ["data.root", "data.train_folder", "data.query_folder", "data.gallery_folder"]
RATIO_KEYS = ["data.train_ratio", "data.val_ratio", "data.test_ratio"]
CROP_KEYS = {"scale": "rrc", "ratio": "rrc", "pad": "pad_crop"}  # augment keys read by one augment.crop only
# Keys (or whole sections) a task never reads: its [CFG] log lines leave them out. config.yaml keeps every key,
# so it re-runs as is.
NOT_READ_BY = {
    "classification": [*EMBEDDING_ONLY, *REID_DATA_KEYS, *RATIO_KEYS, "data.min_image_size", "data.split_classes",
                       "model.neck",
                       "model.arcface_s", "loss", "train.freeze_backbone_epochs", "train.backbone_lr_mult",
                       "eval.feat_norm", "eval.flip_feats", "eval.knn_k", "eval.recall_ks", "eval.rerank",
                       "eval.max_rank", "eval.memory_budget_mb"],
    "embedding": ["data.folds", "data.valid_fold", "data.stratify", "data.split", "data.class_map",
                  "data.min_images_per_class", "model.drop_rate", "train.loss", "train.label_smoothing",
                  "train.class_weights", "augment.mixup_alpha", "augment.cutmix_alpha", "augment.mix_prob",
                  "augment.mix_switch_prob", "augment.splits", "eval.failure_threshold", "eval.top_losses", "eval.tta",
                  "serve.top_k"],
}


class Config(Section):
    task: Literal["classification", "embedding"] = "classification"
    project: ProjectCfg = ProjectCfg()
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    preprocess: PreprocessCfg = PreprocessCfg()
    augment: AugmentCfg = AugmentCfg()
    sampler: SamplerCfg = SamplerCfg()
    loss: LossCfg = LossCfg()
    eval: EvalCfg = EvalCfg()
    audit: AuditCfg = AuditCfg()
    tracking: TrackingCfg = TrackingCfg()
    tune: TuneCfg = TuneCfg()
    serve: ServeCfg = ServeCfg()
    output: OutputCfg = OutputCfg()
    # The --mode preset the config was built on (config.loader.ModeInfo, set by load_config; not a config key).
    _mode: Any = PrivateAttr(default=None)
    _overrides: Any = PrivateAttr(default=())  # dotted keys given as key=value (load_config)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        d = self.data
        if d.valid_fold != "all" and not 0 <= d.valid_fold < d.folds:
            raise ValueError(
                f"data.valid_fold: {d.valid_fold} is not a fold of data.folds={d.folds}; "
                f"valid: 0..{d.folds - 1} or \"all\""
            )
        if self.train.scheduler == "step" and sorted(self.train.step_milestones) != self.train.step_milestones:
            raise ValueError("train.step_milestones: must be increasing")
        reid = self.data.source == "reid"
        if self.task == "classification":
            valid, kind = MONITORS["classification"], "a classification"
        elif reid:
            valid, kind = REID_MONITORS, "a re-id (data.source: reid)"
        elif self.data.split_classes:
            valid, kind = retrieval_monitors(self.eval.recall_ks, True), "a class-disjoint retrieval"
        else:
            valid, kind = retrieval_monitors(self.eval.recall_ks), "a retrieval"
        by_domain = domain_monitor(self.train.monitor or "") if self.task == "classification" else None
        if self.train.monitor is None:
            self.train.monitor = valid[0]
        elif self.train.monitor not in valid and by_domain is None:
            why = ""
            knn_name = f"knn_{self.train.monitor}"
            if kind == "a retrieval" and knn_name in valid:  # the closed-set figure's name before split_classes
                why = (" (recall@K is the recall on unseen classes of data.split_classes: true; this run's "
                       f"validation images query the training images of their own classes: '{knn_name}')")
            elif "retrieval" in kind and "recall@" in self.train.monitor:
                why = f" (recall@K only for K in eval.recall_ks {self.eval.recall_ks}; add it there)"
            shown = valid + METRICS.names(monitor="domain") if self.task == "classification" else valid
            raise ValueError(f"train.monitor: '{self.train.monitor}' is not reported by {kind} run{why}; valid: "
                             f"{', '.join(shown)}{did_you_mean(self.train.monitor, valid)}")
        domains = _source_domains(self.data)
        if by_domain is not None and domains is not None and by_domain[1] not in domains:
            raise ValueError(f"train.monitor: domain '{by_domain[1]}' is not in the data; domains: "
                             f"{', '.join(sorted(domains))}{did_you_mean(by_domain[1], domains)}")
        ratio_split = self.task == "embedding" or self.data.split == "ratio"
        if ratio_split and self.data.train_ratio + self.data.val_ratio + self.data.test_ratio > 1 + 1e-9:
            raise ValueError("data.train_ratio + data.val_ratio + data.test_ratio: must not exceed 1")
        if self.data.source == "reid" and self.task != "embedding":
            raise ValueError("data.source: reid needs task: embedding")
        m = self.model
        if m.init_from is not None and (m.pretrained_path is not None or m.pretrained):
            other = "model.pretrained_path" if m.pretrained_path is not None else "model.pretrained"
            raise ValueError(f"model.init_from and {other}: set one; init_from starts from a vistrain run's weights "
                             f"instead of pretrained ones (set {other}={'null' if 'path' in other else 'false'})")
        if m.use_ema_weights and m.init_from is None and m.pretrained_path is None:
            raise ValueError("model.use_ema_weights: chooses the EMA weights of model.pretrained_path or "
                             "model.init_from, and neither is set; set one or remove model.use_ema_weights")
        if self.task == "embedding":
            self._check_loss_terms()
            self._check_sampler()
        else:
            self._check_classification_keys()
        self._check_data_keys()
        self._check_crop_keys()
        self._check_repeats_splits()
        return self

    def _check_crop_keys(self) -> None:
        """augment.scale / ratio shape the rrc crop and augment.pad the pad_crop one: set for another crop, they
        would change nothing."""
        a = self.augment
        for key, crop in CROP_KEYS.items():
            if getattr(a, key) != AugmentCfg.model_fields[key].default and a.crop != crop:
                raise ValueError(f"augment.{key}: read by augment.crop: {crop} only, and augment.crop is {a.crop}; "
                                 f"set augment.crop: {crop} or remove augment.{key}")

    def _check_data_keys(self) -> None:
        """data.sources, data.class_map and what depends on them."""
        d = self.data
        if d.sources and "source" in d.model_fields_set:  # config_to_dict leaves it out, so config.yaml reloads
            raise ValueError("data.source and data.sources: set one; each entry of data.sources names its own "
                             "(source: csv | folders | manifest), so remove data.source")
        if d.sources:
            top = [k for k in ("train_csv", "image_dir_train", "manifest") if getattr(d, k) is not None]
            if top:
                raise ValueError(f"data.{top[0]}: not read when data.sources is given (each source names its own "
                                 "files); move it into the source entries")
            if d.domain_ratios() and self.sampler.name == "pk":
                raise ValueError("data.sources: ratios need sampler.name random or weighted (P×K batches pick "
                                 "identities, not domains); remove the ratios or change sampler.name")
        if d.class_map is not None:
            if self.task != "classification":
                raise ValueError("data.class_map: fixes a classifier's classes; task: embedding picks its classes "
                                 "with data.class_names")
            if d.class_names is not None:
                raise ValueError("data.class_map and data.class_names: set one (the class map fixes the class order)")
        if d.split_classes:
            self._check_split_classes()
        if self.train.class_weights == "from_class_map" and d.class_map is None:
            raise ValueError("train.class_weights: from_class_map reads metadata.<class>.training_weight of "
                             "data.class_map, which is not set; give data.class_map or use none / balanced")

    def _check_repeats_splits(self) -> None:
        """augment.repeats is timm's RepeatAugSampler, a shuffle of the whole data; augment.splits is timm's AugMix
        splits with its JsdCrossEntropy: the combinations neither defines are refused."""
        a, s = self.augment, self.sampler
        if a.repeats > 1 and s.name != "random":
            why = ("P×K batches choose their identities and images themselves" if s.name == "pk" else
                   "weighted draws with replacement show an image any number of times, not exactly N")
            raise ValueError(f"augment.repeats: {a.repeats} repeats every image of a shuffled epoch (timm's "
                             f"RepeatAugSampler); sampler.name: {s.name} has no such epoch ({why}); use "
                             "sampler.name: random or augment.repeats: 0")
        if a.repeats > 1 and self.data.domain_ratios():
            raise ValueError(f"augment.repeats: {a.repeats} shuffles the whole data (timm's RepeatAugSampler), which "
                             "data.sources ratios would override; remove the ratios or set augment.repeats: 0")
        if not a.splits:
            return
        if self.task != "classification":
            raise ValueError(f"augment.splits: {a.splits} is AugMix's JSD loss on a classifier's logits; task: "
                             "embedding has no such loss (set augment.splits: 0)")
        if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
            raise ValueError(f"augment.splits: {a.splits} and mixup/cutmix: timm's train.py refuses them together "
                             "(its mixing collate cannot keep the clean and augmented views apart); set "
                             "augment.mixup_alpha and augment.cutmix_alpha to 0, or augment.splits: 0")
        if self.train.class_weights != "none":
            raise ValueError(f"train.class_weights: {self.train.class_weights} and augment.splits: timm's "
                             "JsdCrossEntropy has no class weights; set train.class_weights: none or "
                             "augment.splits: 0")
        if a.device == "cuda":
            raise ValueError(f"augment.device: cuda and augment.splits: {a.splits}: each image's views are made "
                             "together on the CPU (timm's AugMixDataset); set augment.device: auto or cpu")

    def _check_split_classes(self) -> None:
        """data.split_classes is the class-disjoint protocol of a retrieval run; elsewhere it would mean nothing."""
        if self.task != "embedding":
            raise ValueError("data.split_classes: a classifier predicts the classes it trained on, so they cannot be "
                             "disjoint from its validation classes; it is for task: embedding (retrieval) runs")
        if self.data.source == "reid" and not self.data.sources:
            raise ValueError("data.split_classes: data.source: reid is already evaluated on identities disjoint from "
                             "training (query_folder against gallery_folder); remove it")
        if self.eval.rerank:
            raise ValueError("data.split_classes: its leave-one-out ranking (each validation image against the others) "
                             "has no separate gallery to re-rank; set eval.rerank: false or data.split_classes: false")

    def _check_classification_keys(self) -> None:
        changed = [key for key, default in EMBEDDING_ONLY.items()
                   if getattr(self.model, key.split(".")[1]) != default]
        if self.loss.model_dump() != LossCfg().model_dump():
            changed.append("loss.terms")
        if changed:
            raise ValueError(f"{', '.join(changed)}: used by task: embedding only (a classifier has a linear head "
                             "and cross-entropy with train.label_smoothing); remove them or set task: embedding")
        if self.sampler.name == "weighted" and self.train.class_weights == "balanced":
            # Either alone makes every class count the same. Together the sampler draws class c in 1/C of the
            # picks and each pick weighs N / (C n_c): class c counts as 1 / n_c, the imbalance turned upside down.
            raise ValueError("sampler.name: weighted and train.class_weights: balanced: both balance the classes, "
                             "so together they over-correct: the sampler already draws every class equally often "
                             "and the balanced weights N/(C·n_c) scale each draw again, so a class counts in the "
                             "loss as 1/n_c (a class of 10 images beside one of 1000 weighs 100× it instead of 1×); "
                             "keep one (sampler.name: random, or train.class_weights: none)")

    def _check_sampler(self) -> None:
        """Batch-hard triplet mining needs positives in every batch: P x K batches with K >= 2."""
        triplet = [i for i, term in enumerate(self.loss.terms) if term.name == "triplet"]
        if not triplet:
            return
        if "name" not in self.sampler.model_fields_set:  # not chosen: the sampler the triplet term needs
            self.sampler.name = "pk"
        if self.sampler.name != "pk":
            raise ValueError(f"sampler.name: {self.sampler.name} batches need not hold two images of a class, which "
                             f"the triplet term (loss.terms[{triplet[0]}]) needs; use sampler.name: pk")
        if self.sampler.k < 2:
            raise ValueError(f"sampler.k: 1 image per class or identity leaves the triplet term "
                             f"(loss.terms[{triplet[0]}]) without positives; use k >= 2 (4 in the strong baseline)")

    def _check_loss_terms(self) -> None:
        from vistrain.models.losses import check_term_params

        problems = []
        for i, term in enumerate(self.loss.terms):
            problems += [f"loss.terms[{i}].{line}" for line in check_term_params(term.name, term.model_extra or {})]
        if not self.loss.terms:
            problems.append("loss.terms: at least one term is needed, e.g. [{name: ce}]")
        if problems:
            raise ValueError("; ".join(problems))

    def keys_not_read(self) -> list[str]:
        """Dotted keys (or sections) this config's task, data source and sampler never read."""
        keys = list(NOT_READ_BY[self.task])
        if self.task == "classification" and self.data.split == "ratio":
            keys = [k for k in keys if k not in RATIO_KEYS] + ["data.folds", "data.valid_fold", "data.stratify"]
        if self.data.sources:
            keys.append("data.source")
        if self.sampler.name != "pk":
            keys += ["sampler.p", "sampler.k"]
        if self.task == "embedding":
            keys += RATIO_KEYS if self.data.source == "reid" else REID_DATA_KEYS
        a = self.augment
        keys += [f"augment.{k}" for k, crop in CROP_KEYS.items() if a.crop != crop]
        if not (a.random_erasing or a.policy == "hard"):  # no erasing (transforms.erasing_p)
            keys += ["augment.erasing_mode", "augment.erasing_count"]
        return keys

    def folds_to_train(self) -> list[int]:
        if self.task == "classification" and self.data.split == "ratio":
            return [0]  # one model: trained on split == train, validated on split == val
        v = self.data.valid_fold
        return list(range(self.data.folds)) if v == "all" else [v]
