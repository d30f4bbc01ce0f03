"""The training configuration: defaults, a YAML file, and command-line overrides, in that order."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meddiag.data.covariates import DEFAULT_MISSING, TabularSpec, parse_columns
from meddiag.data.dicom import parse_window
from meddiag.data.transforms import AugmentConfig
from meddiag.errors import ConfigError


class TrainConfig(BaseModel):
    """Everything that defines a training run. ``config.yaml`` in a run folder is this, resolved."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: str = Field(description="MedMNIST name (pneumoniamnist, pneumoniamnist@64), image folder or CSV manifest")
    model: str = "resnet18"
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="the model's own options, e.g. seed_cnn: {widths: [16, 32, 64], dense: 128}")
    epochs: int = Field(20, ge=1)
    batch_size: int | None = Field(None, ge=1, description="None: 128 for images, 32 for volumes, smaller for small training sets (about 16 steps per epoch)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    scheduler: Literal["cosine", "step", "none"] = Field("cosine", description="step: lr x0.1 at 50% and 75% of the epochs")
    image_size: int | None = Field(None, ge=8, description="None: a MedMNIST file's own size, 128 for image files")
    fit: Literal["pad", "stretch"] = "pad"
    window: str | None = Field(None, description="DICOM VOI window: lung, mediastinum, bone, brain, abdomen, soft_tissue, or 'C,W'; None = each file's own")
    volume_index: int | None = Field(None, ge=0, description="4D NIfTI files: which 3D volume to use (0-based)")
    positive_class: str | None = Field(None, description="two-class tasks: the class that is the finding (disease); None: the MedMNIST catalog's, or the class that is not 'normal'/'benign'/..., else the second alphabetically (with a warning)")
    mean: float = 0.5
    std: float = Field(0.5, gt=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    seed: int = 0
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    folds: int = Field(1, ge=1, description="K >= 2: K-fold cross-validation over train+val, patients kept whole")
    class_weights: Literal["none", "auto"] = Field("none", description="auto: weight classes by inverse frequency (multi-label: positives by neg/pos)")
    loss: Literal["ce", "focal"] = Field("ce", description="ce: cross-entropy (BCE for multi-label); focal: focal loss")
    focal_gamma: float = Field(2.0, ge=0, description="focusing parameter of the focal loss")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="balanced: draw training images inversely to their class frequency")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="exponential moving average of the weights, per step (warmed up); validation, checkpoint selection and the saved model use the average; 0 = off")
    select: Literal["last", "best"] = Field("last", description="the weights kept as the model: last (the final, averaged weights) or best (the epoch with the best val AUC)")
    early_stopping_patience: int = Field(0, ge=0, description="epochs without a better val AUC before stopping; 0 = never")
    threshold: float = Field(0.5, gt=0, lt=1, description="decision threshold, unless operating_point chooses one")
    operating_point: str | None = Field(None, description="choose the threshold on validation: youden, sens90, sens95, spec90 (any sensNN/specNN); binary tasks")
    calibrate: bool = Field(False, description="fit temperature scaling on validation and store it in the checkpoint")
    tta: int = Field(0, ge=0, description="test-time augmentation: predict each image with this many augmented copies too")
    mc_dropout: int = Field(0, ge=0, description="MC-dropout passes at prediction (networks with dropout)")
    coverage: float | None = Field(None, gt=0, le=1, description="abstain on the most uncertain cases: answer this share (threshold chosen on validation)")
    ood_keep: float | None = Field(0.95, ge=0.5, lt=1, description="flag inputs unlike the training data, keeping this share of validation images (None: no OOD rule)")
    ood_method: Literal["mahalanobis", "knn", "energy", "msp", "pixels", "combined"] | None = Field(None, description="the OOD score; None: combined (mahalanobis or pixels) where the network has penultimate features, else energy")
    modalities: list[str] = Field(default_factory=list, description="DICOM modalities the model is for (e.g. CR, DX): a DICOM input of another is flagged as unlike the training data; empty: those of the training files (DICOM ones), else no check")
    subgroups: list[str] = Field(default_factory=list, description="manifest columns to report every metric by (e.g. sex, site)")
    covariates: list[str] = Field(default_factory=list, description="manifest columns the model takes beside the image (e.g. age, sex:cat, site); a type after ':' (num or cat) overrides the inferred one")
    tabular: str | None = Field(None, description="a second CSV of patient data (e.g. genomic markers) joined to the manifest by `join`; images whose key it lacks have its block missing")
    join: str = Field("patient_id", description="the column joining `tabular` to the manifest (patient_id, path, or any manifest column)")
    tabular_columns: list[str] = Field(default_factory=list, description="columns of `tabular` to use, as glob patterns (e.g. 'gene_*'); empty: all but the join key")
    fusion: Literal["late", "film"] = Field("late", description="late: CNN features and encoded covariates concatenated before the head; film: covariates scale and shift the last convolutional block's channels")
    covariate_dropout: float = Field(0.25, ge=0, lt=1, description="training: the probability that a case loses all its covariates, and that it loses each block, so that the model also works without them")
    missing_values: list[str] = Field(default_factory=lambda: list(DEFAULT_MISSING), description="covariate values that mean missing (compared case-insensitively)")
    init_weights: str | None = Field(None, description="start from these weights: a file (.pt/.pth/.bin/.safetensors/.ckpt), a meddiag run or pretrain folder, or an http(s) URL (URL#sha256=<hex> is verified)")
    pretrained: Literal["imagenet", "medicalnet"] | None = Field(None, description="start from published weights: imagenet (2D resnet18/50, densenet121, efficientnet_b0), medicalnet (3D resnet18/50)")
    allow_partial: bool = Field(False, description="accept initial weights that fill less than 90% of the backbone's tensors")
    inflate: bool = Field(False, description="3D models from 2D weights: inflate each 2D kernel along depth (I3D)")
    freeze_backbone: bool = Field(False, description="train only the head on a frozen backbone (a linear probe); needs initial weights")
    freeze_epochs: int = Field(0, ge=0, description="train only the head for the first N epochs, then everything; needs initial weights")
    backbone_lr_mult: float | None = Field(None, gt=0, le=10, description="the backbone's learning rate as a multiple of lr; None: 0.1 with initial weights, else 1")
    warmup_epochs: int | None = Field(None, ge=0, description="linear learning-rate warm-up (per step) over these epochs; None: 1 with initial weights, else 0")
    loggers: list[Literal["csv", "tensorboard", "mlflow"]] = Field(default_factory=list, description="experiment loggers (Lightning's): csv, tensorboard, mlflow; the config, every epoch's metrics and the test figures")
    cache: str = Field("auto", description="where files, once decoded and prepared, are kept for later runs: auto ($MEDDIAG_CACHE/prepared), off, or a folder")
    memory_mb: int = Field(1024, ge=0, description="prepared images up to this many MiB are held in memory; a larger data set is read from the cache as training uses it (needs the cache)")
    accelerator: str = "auto"
    devices: int | str = Field("auto", description="devices per node (GPUs, or CPU processes): a number, or auto")
    num_nodes: int = Field(1, ge=1, description="machines the run spans (Lightning: torchrun, SLURM or its own launcher)")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="how several devices share the work: ddp (a copy of the model each), fsdp (the model's parameters sharded); auto: ddp where there are several")
    precision: str = Field("auto", description="auto: bf16-mixed where the hardware computes bf16 natively, else 32-true")
    num_workers: int = Field(0, ge=0)
    keep_resume_state: bool = Field(False, description="keep checkpoints/last.ckpt (optimizer state, for --resume) after training has finished; by default it is removed")
    out: str | None = Field(None, description="run folder; default runs/<data>-<model>[-N]")

    @field_validator("operating_point")
    @classmethod
    def _known_rule(cls, value: str | None) -> str | None:
        if value is not None and value != "youden" and not (value[:4] in ("sens", "spec") and value[4:].isdigit() and 0 < int(value[4:]) < 100):
            raise ValueError(f"operating point must be youden, sensNN or specNN (e.g. sens90, spec95), not '{value}'")
        return value

    @field_validator("window")
    @classmethod
    def _known_window(cls, value: str | None) -> str | None:
        parse_window(value)  # raises ValueError with the accepted forms
        return value

    @field_validator("covariates")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        try:
            parse_columns(value)
        except Exception as exc:  # noqa: BLE001 - ConfigError's message is the reason
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _weights_options(self) -> TrainConfig:
        if self.init_weights and self.pretrained:
            raise ValueError("give --init-weights or --pretrained, not both")
        if not self.starts_from_weights and (self.freeze_backbone or self.freeze_epochs):
            raise ValueError("--freeze-backbone and --freeze-epochs need initial weights (--init-weights or --pretrained)")
        if self.freeze_epochs and self.freeze_epochs >= self.epochs:
            raise ValueError(f"--freeze-epochs {self.freeze_epochs} leaves no epoch of the {self.epochs} to train the backbone; "
                             "use --freeze-backbone for a frozen backbone throughout")
        return self

    @property
    def starts_from_weights(self) -> bool:
        return bool(self.init_weights or self.pretrained)

    def fine_tuning(self) -> dict[str, Any] | None:
        """The fine-tuning plan (see :mod:`meddiag.training.finetune`) for runs from initial weights or with a
        warm-up; None otherwise (the plain per-epoch schedule)."""
        if not self.starts_from_weights and not self.warmup_epochs:
            return None
        return {"freeze_epochs": self.epochs if self.freeze_backbone else self.freeze_epochs,
                "backbone_lr_mult": 0.1 if self.backbone_lr_mult is None else self.backbone_lr_mult,
                "warmup_epochs": 1 if self.warmup_epochs is None else self.warmup_epochs,
                "frozen_for_good": self.freeze_backbone}

    @property
    def uses_covariates(self) -> bool:
        return bool(self.covariates or self.tabular)

    def tabular_spec(self) -> TabularSpec | None:
        """Where the run's covariates come from (None: the model sees images only)."""
        if not self.uses_covariates:
            return None
        return TabularSpec(columns=parse_columns(self.covariates), tabular=Path(self.tabular) if self.tabular else None,
                           join=self.join.strip().lower(), tabular_columns=self.tabular_columns,
                           missing=tuple(v.strip().lower() for v in self.missing_values))

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, then ``config_file`` (YAML), then the non-None ``overrides``."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(read_yaml(config_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            where = f" in {config_file}" if config_file else ""
            raise ConfigError(f"invalid training configuration{where}: {problems}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A configuration file (e.g. a run's ``config.yaml``) as it is; :class:`ConfigError` naming
        the file and each invalid setting."""
        return cls.from_sources(path)

    def to_yaml(self, path: str | Path) -> None:
        from meddiag.runfolder import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, e.g. 'model: resnet18'")
    return values
