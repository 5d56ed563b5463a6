"""The typed configuration: one section per concern, every default with the reason for it.

Validation is pydantic v2 with ``extra="forbid"``: an unknown key, a wrong type or an impossible
value becomes a problem naming its dotted key (``train.lr``), collected with every other problem
before anything is built (see ``config.loader``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
ImgSize = int | tuple[int, int]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectCfg(Section):
    name: str = "vistrain"  # prefix of the run id; the config file's stem when left as is
    seed: int = 42  # seeds Python, NumPy and torch; also fixes the fold assignment


class DataCfg(Section):
    source: Literal["csv", "folders"] = "csv"  # csv: ID,target + image folder; folders: one folder per class
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


class ModelCfg(Section):
    name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # load ImageNet weights (from pretrained_path when given)
    pretrained_path: Path | None = None  # local .pth/.safetensors file; nothing is downloaded when set
    pooling: Literal["avg", "max", "avgmax", "catavgmax", "gem"] = "avg"  # timm global_pool
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout before the classifier
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0  # stochastic depth, where the model has it


class TrainCfg(Section):
    img_size: ImgSize = 224  # int or [H, W]
    batch_size: PositiveInt = 32
    epochs: PositiveInt = 10
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr: Annotated[float, Field(ge=0)] = 1e-6  # floor of cosine schedules
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    scheduler: Literal["cosine", "step", "plateau", "cosine_restarts", "none"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] = 1  # linear warm-up from warmup_lr_factor * lr
    warmup_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.01
    step_milestones: list[PositiveInt] = [30, 60]  # step: epochs at which lr *= step_gamma
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    restart_epochs: PositiveInt = 10  # cosine_restarts: length of the first cycle
    restart_mult: Annotated[float, Field(ge=1)] = 1.0  # cosine_restarts: cycle length multiplier
    plateau_patience: Annotated[int, Field(ge=0)] = 2  # plateau: epochs without improvement before lr *= step_gamma
    amp: Literal["auto", "bf16", "fp16", "fp32"] | bool = "auto"  # auto: bf16 on Ampere+, fp16 older, fp32 CPU
    channels_last: bool = False  # NHWC memory format (faster convolutions on tensor cores)
    grad_clip_norm: Annotated[float, Field(gt=0)] | None = None
    grad_accum_steps: PositiveInt = 1
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    class_weights: Literal["none", "balanced"] = "none"  # balanced: CE weights inverse to class frequency
    early_stopping_patience: Annotated[int, Field(ge=0)] = 5  # epochs without improvement; 0 disables
    monitor: Literal["macro_f1", "accuracy", "valid_loss"] = "macro_f1"
    log_interval: Annotated[int, Field(ge=0)] = 50  # steps between progress lines in train.log; 0: none
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # DataLoader workers
    device: Literal["auto", "cpu", "cuda"] = "auto"

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
    random_erasing: Annotated[float, Field(ge=0, le=1)] = 0.0  # probability (hard policy defaults to 0.25)
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables mixup
    cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables cutmix
    mix_prob: Annotated[float, Field(ge=0, le=1)] = 1.0  # probability a batch is mixed at all
    mix_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5  # cutmix instead of mixup when both are on


class SamplerCfg(Section):
    name: Literal["random", "weighted"] = "random"  # weighted: draws classes equally often


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
    tta: list[Literal["hflip", "vflip"]] = ["hflip"]  # views averaged by `predict --tta`
    batch_size: PositiveInt | None = None  # inference batch; train.batch_size * 2 when empty


class OutputCfg(Section):
    exp_dir: Path = Path("experiments")  # runs go to exp_dir/YYYYMMDD/<run_id>/
    logs_dir: Path | None = Path("logs")  # a copy of each train.log as run_YYYYMMDD-HHMM_<run_id>.log
    snapshots: bool = True  # also keep the original YAML and the command line in the run directory


class Config(Section):
    task: Literal["classification"] = "classification"
    project: ProjectCfg = ProjectCfg()
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    augment: AugmentCfg = AugmentCfg()
    sampler: SamplerCfg = SamplerCfg()
    eval: EvalCfg = EvalCfg()
    tracking: TrackingCfg = TrackingCfg()
    output: OutputCfg = OutputCfg()

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
        return self

    def folds_to_train(self) -> list[int]:
        v = self.data.valid_fold
        return list(range(self.data.folds)) if v == "all" else [v]
