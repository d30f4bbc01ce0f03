"""The ``meddiag`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from meddiag import __version__
from meddiag.errors import MeddiagError

app = typer.Typer(
    name="meddiag", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Computer-aided diagnosis from medical images: train, evaluate and apply CNN classifiers.",
)


def _plain_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn meddiag's errors into one 'error: ...' line and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.showwarning = _plain_warning
        try:
            return func(*args, **kwargs)
        except MeddiagError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"meddiag {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None) -> None:
    """meddiag: train, evaluate and apply diagnostic CNNs on medical images."""


DataArg = Annotated[Optional[str], typer.Argument(help="MedMNIST name (pneumoniamnist, pneumoniamnist@64), image folder, or CSV manifest")]


@app.command()
@friendly_errors
def train(
    data: DataArg = None,
    model: Annotated[Optional[str], typer.Option(help="Model name (see 'meddiag models'). [default: resnet18]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs. [default: 20]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch. [default: 128; 32 for volumes; smaller for small training sets]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. [default: 0.001]")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels. [default: MedMNIST file's size; 128 for image files]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (splits, initialisation, augmentation). [default: 0]")] = None,
    fit: Annotated[Optional[str], typer.Option(help="Resize keeping the aspect ratio (pad) or not (stretch). [default: pad]")] = None,
    window: Annotated[Optional[str], typer.Option(help="DICOM window: lung, mediastinum, bone, brain, abdomen, soft_tissue or C,W. [default: each file's own]")] = None,
    volume_index: Annotated[Optional[int], typer.Option(help="4D NIfTI files: which 3D volume to use, counting from 0. [default: 4D files are refused]")] = None,
    class_weights: Annotated[Optional[str], typer.Option(help="auto: weight classes by inverse frequency. [default: none]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce (cross-entropy) or focal. [default: ce]")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="shuffle, or balanced (classes drawn equally often). [default: shuffle]")] = None,
    select: Annotated[Optional[str], typer.Option(help="The weights kept as the model: last (the final, averaged ones) or best (the epoch with the best validation AUC). [default: last]")] = None,
    early_stopping_patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better validation AUC; 0 = never. [default: 0]")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="Keep an exponential moving average of the weights (per step, warmed up) and use it to validate and predict; 0 = off. [default: 0.99]")] = None,
    operating_point: Annotated[Optional[str], typer.Option(help="Choose the decision threshold on validation: youden, sens90, sens95, spec90 (binary tasks). [default: none, threshold 0.5]")] = None,
    positive_class: Annotated[Optional[str], typer.Option(help="Two-class data: the class that is the finding (sensitivity, PPV and thresholds are about it). [default: MedMNIST's; else the class that is not normal/benign/negative...]")] = None,
    calibrate: Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help="Fit temperature scaling on validation; stored in the checkpoint. [default: no]")] = None,
    subgroups: Annotated[Optional[str], typer.Option(help="Manifest columns to report every metric by, e.g. sex,age_group,site.")] = None,
    tta: Annotated[Optional[int], typer.Option(help="Test-time augmentation: also predict this many augmented copies of each image. [default: 0]")] = None,
    mc_dropout: Annotated[Optional[int], typer.Option(help="MC-dropout passes at prediction (networks with dropout). [default: 0]")] = None,
    coverage: Annotated[Optional[float], typer.Option(help="Abstain on the most uncertain cases, answering this share (e.g. 0.9; chosen on validation).")] = None,
    ood_keep: Annotated[Optional[float], typer.Option(help="Flag inputs unlike the training data, keeping this share of validation images. [default: 0.95]")] = None,
    ood_method: Annotated[Optional[str], typer.Option(help="The OOD score: mahalanobis, knn, energy, msp, pixels or combined (mahalanobis or pixels). [default: see docs/benchmarks.md; energy for networks without a final linear layer]")] = None,
    modalities: Annotated[Optional[str], typer.Option(help="DICOM modalities the model is for, e.g. CR,DX: a DICOM input of another is flagged as unlike the training data. [default: those of the training DICOM files]")] = None,
    covariates: Annotated[Optional[str], typer.Option(help="Manifest columns of patient data the model takes beside the image, e.g. age,sex,localization; force a type with age:num or site:cat. Missing values are allowed.")] = None,
    tabular: Annotated[Optional[Path], typer.Option(help="A second CSV of patient data (e.g. genomic markers), joined by --join; patients it lacks have that block missing.")] = None,
    join: Annotated[Optional[str], typer.Option(help="The column joining --tabular to the manifest: patient_id, path, or any manifest column. [default: patient_id]")] = None,
    tabular_columns: Annotated[Optional[str], typer.Option(help="Columns of --tabular to use, as glob patterns, e.g. 'gene_*,mut_*'. [default: all but the join key]")] = None,
    fusion: Annotated[Optional[str], typer.Option(help="How image and covariates are joined: late (CNN features + covariate encoder -> head) or film (covariates scale and shift the last convolutional block). [default: late]")] = None,
    covariate_dropout: Annotated[Optional[float], typer.Option(help="Training: probability that a case loses all its covariates, and each block, so the model also works without them. [default: 0.25]")] = None,
    missing_values: Annotated[Optional[str], typer.Option(help="Covariate values that mean missing, comma-separated. [default: blank, nan, na, n/a, unknown]")] = None,
    init_weights: Annotated[Optional[str], typer.Option(help="Start from these weights: a .pt/.pth/.bin/.safetensors/.ckpt file, a meddiag run or 'meddiag pretrain' folder, or an http(s) URL (URL#sha256=HEX is verified). A load report says what was loaded; under 90% of the backbone is refused.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Start from published weights: imagenet (2D resnet18, resnet50, densenet121, efficientnet_b0) or medicalnet (3D resnet18, resnet50); downloaded once.")] = None,
    allow_partial: Annotated[Optional[bool], typer.Option("--allow-partial/--no-allow-partial", help="Accept initial weights that fill under 90% of the backbone. [default: no]")] = None,
    inflate: Annotated[Optional[bool], typer.Option("--inflate/--no-inflate", help="A 3D model from 2D weights: inflate the 2D kernels along depth. [default: no]")] = None,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone/--no-freeze-backbone", help="Train only the head on the frozen initial weights (a linear probe).")] = None,
    freeze_epochs: Annotated[Optional[int], typer.Option(help="Train only the head for the first N epochs, then everything. [default: 0]")] = None,
    backbone_lr_mult: Annotated[Optional[float], typer.Option(help="The backbone's learning rate as a multiple of --lr. [default: 0.1 with initial weights, else 1]")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="Linear learning-rate warm-up over these epochs. [default: 1 with initial weights, else 0]")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Keep files, once decoded and prepared, for later runs: auto ($MEDDIAG_CACHE/prepared, by default ~/.cache/meddiag/prepared), off, or a folder. [default: auto]")] = None,
    memory_mb: Annotated[Optional[int], typer.Option(help="Prepared images up to this many MiB are held in memory; a larger data set is read from the cache as training uses it. [default: 1024]")] = None,
    loggers: Annotated[Optional[str], typer.Option("--logger", help="Experiment loggers, comma-separated: csv (RUN/logs/csv), tensorboard (RUN/logs/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else <runs>/mlflow.db). [default: none]")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder. [default: runs/<data>-<model>]")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML configuration (e.g. a run's config.yaml); options given here override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    folds: Annotated[Optional[int], typer.Option(help="K-fold cross-validation over train+val (patients kept whole).")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="cpu, gpu or auto. [default: auto]")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Devices per node (GPUs, or processes on a CPU), or auto. [default: auto]")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="Machines the run spans (under torchrun or SLURM, as they say). [default: 1]")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="ddp (a model copy per device) or fsdp (parameters sharded); auto: ddp when there are several devices. [default: auto]")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar. [default: when in a terminal]")] = None,
) -> None:
    """Train a model on DATA, evaluate it on the test split, and write a run folder."""
    from meddiag import api

    # Lightning announces its hardware probe and tips at INFO; meddiag prints its own summary.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run = api.train(
        data, config=config, resume=resume, progress=progress,
        model=model, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
        seed=seed, fit=fit, window=window, volume_index=volume_index, class_weights=class_weights, loss=loss, sampler=sampler, select=select, early_stopping_patience=early_stopping_patience, ema_decay=ema_decay, operating_point=operating_point, calibrate=calibrate,
        positive_class=positive_class,
        subgroups=_columns(subgroups), tta=tta, mc_dropout=mc_dropout, coverage=coverage, out=out, folds=folds, accelerator=accelerator, devices=int(devices) if devices and devices.isdigit() else devices,
        covariates=_list(covariates), tabular=str(tabular) if tabular else None, join=join, tabular_columns=_list(tabular_columns),
        fusion=fusion, covariate_dropout=covariate_dropout, ood_keep=ood_keep, ood_method=ood_method,
        modalities=_list(modalities), missing_values=[v.strip() for v in missing_values.split(",")] if missing_values is not None else None,
        init_weights=init_weights, pretrained=pretrained.lower() if pretrained else None, allow_partial=allow_partial, inflate=inflate,
        freeze_backbone=freeze_backbone, freeze_epochs=freeze_epochs, backbone_lr_mult=backbone_lr_mult, warmup_epochs=warmup_epochs,
        cache=cache, memory_mb=memory_mb, num_nodes=num_nodes, strategy=strategy, loggers=_list(loggers),
    )
    if run.summary:
        print(run.summary)


@app.command()
@friendly_errors
def pretrain(
    data: DataArg = None,
    model: Annotated[Optional[str], typer.Option(help="Model name (see 'meddiag models'). [default: resnet18]")] = None,
    method: Annotated[Optional[str], typer.Option(help="Self-supervised method: simclr. [default: simclr]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs. [default: 50]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch; more gives SimCLR more negatives. [default: 128; 32 for volumes]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. [default: 0.001]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="NT-Xent temperature. [default: 0.2]")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels: the size you will fine-tune at. [default: MedMNIST file's size; 128 for image files]")] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Also flip views left-right (only where anatomy is not lateral). [default: no]")] = None,
    fit: Annotated[Optional[str], typer.Option(help="Resize keeping the aspect ratio (pad) or not (stretch): as you will fine-tune. [default: pad]")] = None,
    volumes: Annotated[Optional[bool], typer.Option("--volumes/--no-volumes", help="DATA is a folder of volumes (NIfTI, DICOM series): pretrain a 3D network. [default: no]")] = None,
    window: Annotated[Optional[str], typer.Option(help="DICOM window: lung, mediastinum, bone, brain, abdomen, soft_tissue or C,W. [default: each file's own]")] = None,
    volume_index: Annotated[Optional[int], typer.Option(help="4D NIfTI files: which 3D volume to use, counting from 0. [default: 4D files are refused]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Keep files, once decoded and prepared, for later runs: auto, off, or a folder. [default: auto]")] = None,
    memory_mb: Annotated[Optional[int], typer.Option(help="Prepared images up to this many MiB are held in memory; more are read from the cache as they are used. [default: 1024]")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder. [default: runs/pretrain-<data>-<model>]")] = None,
    init_weights: Annotated[Optional[str], typer.Option(help="Start from these weights: another 'meddiag pretrain' folder (to pretrain for longer), a run, a .pt/.pth/.bin/.safetensors/.ckpt file, or an http(s) URL (URL#sha256=HEX is verified). A load report says what was loaded; under 90% is refused.")] = None,
    allow_partial: Annotated[Optional[bool], typer.Option("--allow-partial/--no-allow-partial", help="Accept initial weights that fill under 90% of the network. [default: no]")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML configuration (e.g. a pretraining folder's config.yaml); options given here override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the pretraining in --out from its last epoch.")] = False,
    accelerator: Annotated[Optional[str], typer.Option(help="cpu, gpu or auto. [default: auto]")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Devices per node (GPUs, or processes on a CPU), or auto; several share one batch of --batch-size each, contrasted as one. [default: auto]")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="Machines the pretraining spans (torchrun, SLURM or Lightning's launcher). [default: 1]")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar. [default: when in a terminal]")] = None,
) -> None:
    """Pretrain a network on unlabelled images of DATA (self-supervised, SimCLR); 'train --init-weights OUT' fine-tunes it."""
    from meddiag import api

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    api.pretrain(
        data, config=config, resume=resume, progress=progress, hflip=hflip,
        model=model, method=method, epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature,
        image_size=image_size, fit=fit, volumes=volumes, window=window, volume_index=volume_index, seed=seed, out=out,
        accelerator=accelerator, devices=int(devices) if devices and devices.isdigit() else devices, cache=cache,
        memory_mb=memory_mb, init_weights=init_weights, allow_partial=allow_partial, num_nodes=num_nodes,
    )


@app.command()
@friendly_errors
def tune(
    data: DataArg = None,
    trials: Annotated[int, typer.Option(help="Trials to run (more are added to an existing study in --out).", min=1)] = 20,
    timeout: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many seconds.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Study folder (study.db, trials.csv, best.yaml). [default: runs/tune-<data>]")] = None,
    models: Annotated[str, typer.Option(help="Models to choose from, comma-separated.")] = "seed_cnn,resnet18",
    image_sizes: Annotated[Optional[str], typer.Option(help="Image sizes to choose from, comma-separated (e.g. 28,64). [default: the data's own]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs per trial. [default: the configuration's]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler (and of each trial's training).")] = 0,
    config: Annotated[Optional[Path], typer.Option(help="Base YAML configuration the search starts from.")] = None,
    keep_runs: Annotated[bool, typer.Option(help="Keep every trial's checkpoints (default: configurations and histories only).")] = False,
) -> None:
    """Search model, width (seed_cnn's filters and dense units), learning rate, weight decay,
    augmentation strength and image size on the validation split (Optuna: seeded TPE, median
    pruning, SQLite; run again to resume). Writes best.yaml for 'meddiag train --config'."""
    from meddiag.extras import require
    from meddiag.training.config import TrainConfig
    from meddiag.training.tune import SearchSpace, tune as run_tune

    require("tune", "meddiag tune")

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if not (data or config):
        raise MeddiagError("give the DATA to tune on (or a --config file that names it)")
    base = TrainConfig.from_sources(config, data=data, epochs=epochs, seed=seed)
    sizes = [int(s) for s in image_sizes.split(",")] if image_sizes else []
    name = Path(base.data.rstrip("/")).name or base.data
    result = run_tune(base, out or Path("runs") / f"tune-{name}", trials, timeout,
                      SearchSpace(models=[m.strip() for m in models.split(",") if m.strip()], image_sizes=sizes), seed, keep_runs)
    print(f"{result.n_trials} trials ({result.n_pruned} pruned); best val AUC {result.best_value:.4f}: {result.best_params}")
    print(f"train it: meddiag train --config {result.best_config}")


@app.command()
@friendly_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    data: Annotated[Optional[str], typer.Option(help="Evaluate on other data. [default: the run's own data]")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="Where to write metrics.json, the report and plots.")] = None,
    subgroups: Annotated[Optional[str], typer.Option(help="Manifest columns to report every metric by, e.g. sex,site. [default: the run's]")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for confidence intervals.", min=200)] = 1000,
    compare: Annotated[Optional[list[Path]], typer.Option(help="Another run on the same data and split (e.g. the image-only model) for the report's patient-data section; repeatable.")] = None,
) -> None:
    """Evaluate a trained run: metrics.json, predictions.csv, plots and report.html/report.json
    (CIs, operating points, calibration, decision curve, patient data, subgroups, failure gallery)."""
    from meddiag import api
    from meddiag.evaluation.evaluate import summary_line

    report = api.evaluate(run, data=data, split=split, out=out, progress=sys.stderr.isatty(), subgroups=_columns(subgroups),
                          resamples=resamples, compare=compare or [])
    print(summary_line(report.metrics))


@app.command()
@friendly_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run folder (or an evaluation folder inside one, e.g. RUN/eval-val).")],
    subgroups: Annotated[Optional[str], typer.Option(help="Manifest columns to report every metric by, e.g. sex,site. [default: the run's]")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for confidence intervals.", min=200)] = 1000,
) -> None:
    """Write report.html and report.json for an evaluated run, from its saved predictions (the run is
    evaluated first when they are missing or lack a subgroup column)."""
    from meddiag.evaluation.evaluate import rebuild_report

    html_path = rebuild_report(run, subgroups=_columns(subgroups), n_resamples=resamples, progress=sys.stderr.isatty())
    print(f"report -> {html_path}")


def _patient_data(card: Any, covariates: Path | None, tabular: Path | None) -> Any:
    """The --covariates (and --tabular) of predict and explain, checked against the model."""
    from meddiag.data.covariates import PatientData

    if covariates is None and tabular is None:
        return None
    if card.covariates is None:
        raise MeddiagError("this model takes no covariates (it was trained on images alone); leave out --covariates/--tabular")
    if covariates is None:
        raise MeddiagError("--tabular needs --covariates: a CSV with a 'path' column and the join key of each image")
    return PatientData.from_csv(covariates, tabular, card.covariates.join if tabular else None)


def _columns(text: str | None) -> list[str] | None:
    return [c.strip().lower() for c in text.split(",") if c.strip()] if text else None


def _list(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@app.command()
@friendly_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    output: Annotated[Optional[Path], typer.Option(help="Write predictions to this CSV instead of the screen.")] = None,
    explain: Annotated[Optional[Path], typer.Option(help="Also write a Grad-CAM heatmap figure per image into this folder.")] = None,
    backend: Annotated[str, typer.Option(help="torch, or onnx (ONNX Runtime; exports the run on first use).")] = "torch",
    covariates: Annotated[Optional[Path], typer.Option(help="CSV of the cases' patient data: a 'path' column naming each image and the model's covariate columns; missing rows and values are allowed.")] = None,
    tabular: Annotated[Optional[Path], typer.Option(help="The joined table (e.g. genomics.csv) for a model trained with --tabular; rows found by the model's join key in --covariates.")] = None,
    dicom_out: Annotated[Optional[Path], typer.Option(help="Also write each DICOM input's result as DICOM into this folder: a Structured Report and a Secondary Capture of the heatmap, in the source's study.")] = None,
) -> None:
    """Diagnose images: the predicted class and each class's probability, per file.

    Unreadable files are reported by name and skipped; the exit code is 1 if any failed.
    """
    from meddiag.extras import require
    from meddiag.serving.predictor import Predictor, write_predictions_csv

    if backend == "onnx":
        require("serve", "--backend onnx", ("onnx", "onnxruntime", "onnxscript"))
    predictor = Predictor.from_run(run, backend=backend)
    patients = _patient_data(predictor.card, covariates, tabular)
    predictions, failures = predictor.predict(list(paths), patients)
    if patients is not None and patients.unused_rows():
        unused = patients.unused_rows()
        warnings.warn(f"{len(unused)} row(s) of {covariates} match no predicted image (e.g. {unused[0]}); their data was not used",
                      stacklevel=1)
    names = predictor.card.class_names
    if output:
        write_predictions_csv(output, predictions, names)
        print(f"{len(predictions)} predictions -> {output}")
    else:
        write_predictions_csv(sys.stdout, predictions, names)
    if explain:
        from meddiag.explain import explain_files

        explained, _ = explain_files(predictor.model, predictor.card, [p.path for p in predictions], explain, patients=patients)
        print(f"{len(explained)} heatmaps -> {explain}", file=sys.stderr if not output else sys.stdout)
    if dicom_out:
        require("pacs", "--dicom-out", ("highdicom",))
        from meddiag.pacs.store import write_results

        written, skipped, failed = write_results(predictor, predictions, dicom_out)
        failures += failed
        print(f"{written} DICOM result(s) (SR + heatmap SC) -> {dicom_out}"
              + (f"; {skipped} input(s) were not DICOM, so have none" if skipped else ""), file=sys.stderr if not output else sys.stdout)
    for f in failures:
        print(f"error: {f.path}: {f.reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) could not be predicted", file=sys.stderr)
        raise typer.Exit(1)


@app.command("calibrate-ood")
@friendly_errors
def calibrate_ood(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    keep: Annotated[float, typer.Option(help="The share of validation images the flag threshold keeps.")] = 0.95,
    method: Annotated[Optional[str], typer.Option(help="mahalanobis, knn, energy, msp, pixels or combined. [default: as train's]")] = None,
) -> None:
    """Fit (or refit) a run's out-of-distribution rule from its own training and validation data, without
    retraining: for runs made before the rule existed, or to change its method or share kept."""
    from meddiag.runfolder import RunFolder, model_checkpoint
    from meddiag.training.config import TrainConfig
    from meddiag.training.ood import fit_ood
    from meddiag.training.run import load_training_data

    folder = RunFolder.of(run)
    if not folder.config.exists():
        raise MeddiagError(f"{folder.config} not found: calibrate-ood needs a run folder (its training data defines the reference)")
    data = load_training_data(TrainConfig.from_file(folder.config), sys.stderr.isatty(), folder.root)
    rule = fit_ood(model_checkpoint(folder.root), data, keep, method)
    print(f"OOD rule: {rule.method} score above {rule.threshold:.4g} is flagged (keeps {rule.keep:.0%} of validation; "
          f"flagged {rule.val_flagged:.1%} of its {rule.validation_images} images); reference: {rule.reference_images} training images")


@app.command()
@friendly_errors
def drift(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    data: Annotated[list[Path], typer.Argument(help="The new data: image files, folders, DICOM series folders and/or CSV manifests (their 'path' column).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for drift.json, drift.html, drift_scores.csv. [default: RUN/drift]")] = None,
    alpha: Annotated[float, typer.Option(help="Report a shift when the batch's p-value is below this.")] = 0.05,
    permutations: Annotated[int, typer.Option(help="Permutations of each test (the smallest p-value is 1/(1+this)).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the permutations.")] = 0,
    covariates: Annotated[Optional[Path], typer.Option(help="Models with covariates: the cases' patient data (a 'path' column); a manifest's own columns by default.")] = None,
    tabular: Annotated[Optional[Path], typer.Option(help="The joined table, for a model trained with --tabular.")] = None,
) -> None:
    """Has the data shifted? Test a batch of new images, without labels, against the model's validation
    data: their features (MMD), predicted-class frequencies and the share flagged as unfamiliar.

    Exit code 0 whether or not a shift is found (read drift.json's "shift"); 1 if files could not be read.
    """
    from meddiag.serving.drift import drift_report
    from meddiag.serving.predictor import Predictor

    if not 0 < alpha < 1:
        raise MeddiagError(f"--alpha must be between 0 and 1, not {alpha}")
    if permutations < 99:
        raise MeddiagError(f"--permutations must be at least 99 (p-values below 0.01 need them), not {permutations}")
    predictor = Predictor.from_run(run)
    patients = _patient_data(predictor.card, covariates, tabular)
    record, folder = drift_report(run, list(data), out, permutations, alpha, seed, predictor, patients)
    print(f"{record['sentence']}; report -> {folder / 'drift.html'}")
    for f in record["failures"]:
        print(f"error: {f['path']}: {f['reason']}", file=sys.stderr)
    if record["failures"]:
        print(f"{len(record['failures'])} file(s) could not be read", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
@friendly_errors
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more trained run folders (same data and splits).")],
    out: Annotated[Path, typer.Option(help="The ensemble's run folder.")],
    operating_point: Annotated[Optional[str], typer.Option(help="Choose the threshold on validation: youden, sens90, ...")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Fit temperature scaling on validation.")] = False,
    coverage: Annotated[Optional[float], typer.Option(help="Abstain on the most uncertain cases, answering this share.")] = None,
    tta: Annotated[int, typer.Option(help="Test-time augmentation copies per image.")] = 0,
) -> None:
    """Make a deep ensemble (the members' probabilities averaged) as a run folder that evaluate,
    report, predict and explain take like any other; evaluates it on the test split."""
    from meddiag.workflow import make_ensemble

    metrics = make_ensemble(list(runs), out, operating_point=operating_point, calibrate=calibrate, coverage=coverage,
                            tta=tta, progress=sys.stderr.isatty())
    lo, hi = metrics.get("auc_ci") or (float("nan"), float("nan"))
    print(f"ensemble of {len(runs)}: test AUC {metrics['auc']:.4f} (95% CI {lo:.3f}-{hi:.3f})  ACC {metrics['acc']:.4f}  -> {out}")


@app.command()
@friendly_errors
def explain(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Image files, volumes and/or folders.")] = None,
    method: Annotated[str, typer.Option(help="gradcam, hirescam, gradcampp or occlusion.")] = "gradcam",
    sanity: Annotated[bool, typer.Option("--sanity", help="Check the maps on the run's test images (model randomisation, deletion); writes RUN/sanity.json.")] = False,
    images: Annotated[int, typer.Option(help="Test images the sanity check uses.", min=2)] = 32,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Explain this class. [default: the predicted one]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the heatmap figures. [default: RUN/explanations]")] = None,
    covariates: Annotated[Optional[Path], typer.Option(help="CSV of the cases' patient data ('path' column + covariates), for a model that takes them.")] = None,
    tabular: Annotated[Optional[Path], typer.Option(help="The joined table, for a model trained with --tabular.")] = None,
) -> None:
    """Show where the model looked: for each image a PNG of the original beside its heatmap, captioned
    with the prediction (volumes: the three planes through the map's peak)."""
    from meddiag.explain import explain_files
    from meddiag.models.checkpoint import load_checkpoint
    from meddiag.runfolder import RunFolder, model_checkpoint

    model, card = load_checkpoint(model_checkpoint(run))
    if sanity:
        from meddiag.explain.sanity import run_sanity_check

        result = run_sanity_check(run, model, card, method, images)
        r, d = result["randomisation"], result["deletion"]
        print(f"model randomisation: Spearman {r['spearman_fully_random']:.3f} with the fully randomised model "
              f"({'passes' if r['passes'] else 'FAILS'}: < 0.3)")
        print(f"deletion: area {d['deletion_auc']:.3f} against {d['random_deletion_auc']:.3f} for random maps "
              f"({'passes' if d['passes'] else 'FAILS'}: lower is better)  -> {run / 'sanity.json'}")
    if not paths:
        if not sanity:
            raise MeddiagError("give images to explain (or --sanity to check the maps on the run's test images)")
        return
    out = out or (RunFolder(run).explanations if run.is_dir() else run.parent / "explanations")
    results, failures = explain_files(model, card, list(paths), out, method, class_name, _patient_data(card, covariates, tabular))
    for r in results:
        print(f"{r.source}: predicted {r.predicted}; {r.explained} {r.probability:.3f} -> {r.figure}")
        if r.attributions:
            print("  covariates: " + ", ".join(f"{a['covariate']} {a['attribution']:+.3f}" for a in r.attributions[:8]))
    for f in failures:
        print(f"error: {f.path}: {f.reason}", file=sys.stderr)
    if failures:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    format: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="Output file. [default: RUN/export/model.onnx]")] = None,
) -> None:
    """Export the model for deployment: one ONNX file (weights inside, any batch size) with the model
    card in its metadata and beside it as JSON; checked against PyTorch (logits within 1e-4)."""
    from meddiag.extras import require
    from meddiag.serving.export import export_run

    require("serve", "meddiag export", ("onnx", "onnxruntime", "onnxscript"))
    from meddiag.models.onnx import TOLERANCE

    path, difference = export_run(run, out, format)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MB), model card {path.with_suffix('.json')}")
    print(f"parity check passed: ONNX Runtime's logits are within {difference:.1e} of PyTorch's (tolerance {TOLERANCE:.0e})")


@app.command()
@friendly_errors
def serve(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the service to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="MEDDIAG_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every /v1 route (or set MEDDIAG_TOKEN).")] = None,
    backend: Annotated[str, typer.Option(help="torch, or onnx (ONNX Runtime).")] = "torch",
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB (larger: 413).")] = 50.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image (pixels; voxels for volumes) accepted, checked before decoding.")] = 100_000_000,
    max_batch: Annotated[int, typer.Option(help="Micro-batching: most images in one forward pass (1 turns it off).")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="Micro-batching: longest wait for other requests to join a pass.")] = 5.0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the model. [default: all cores]")] = None,
    drift_window: Annotated[int, typer.Option(help="GET /v1/drift tests the last this many inputs for shift from the validation data (0: off).")] = 200,
) -> None:
    """Serve the model: REST API (POST /v1/predict, GET /v1/model, /v1/drift, /healthz, /readyz), a web page at /
    and API docs at /docs, all working offline."""
    from meddiag.extras import require

    require("serve", "meddiag serve", ("fastapi", "uvicorn", "multipart") + (("onnxruntime",) if backend == "onnx" else ()))
    import torch
    import uvicorn

    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        warnings.warn(f"serving on {host} without --token: anyone who can reach this machine can use the model", stacklevel=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor = Predictor.from_run(run, backend=backend)
    options = ServeOptions(token=token, max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_batch=max_batch,
                           batch_wait_ms=batch_wait_ms, drift_window=drift_window)
    application = create_app(predictor, run if run.is_dir() else None, options)
    if importlib.util.find_spec("highdicom") is not None:  # the pacs extra: DICOM results over HTTP too
        from meddiag.pacs.http import add_dicom_routes

        add_dicom_routes(application)
    print(f"meddiag serving {predictor.card.model_name} on http://{host}:{port}/ (API docs /docs)"
          f"{'; bearer token required' if token else ''}", file=sys.stderr)
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=True)


@app.command()
@friendly_errors
def inspect(
    data: Annotated[str, typer.Argument(help="MedMNIST name, image folder, or CSV manifest")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Describe a data set: images per class and split, modalities, sizes, bit depth, spacing,
    unreadable files, and leakage (identical images or one patient in two splits)."""
    import json

    from meddiag.data.inspection import inspect_data, render

    report = inspect_data(data, progress=sys.stderr.isatty())
    print(render(report))
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


pacs_app = typer.Typer(help="The hospital's PACS: diagnose its studies and store the results back (DICOMweb).",
                       no_args_is_help=True, add_completion=False)
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("predict")
@friendly_errors
def pacs_predict_command(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    url: Annotated[str, typer.Option(help="The PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web.")],
    study: Annotated[Optional[list[str]], typer.Option(help="A Study Instance UID to diagnose; repeatable.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Only series of this modality, e.g. CR (with --since: studies that hold it).")] = None,
    since: Annotated[Optional[str], typer.Option(help="Studies from this date on, YYYY-MM-DD.")] = None,
    credentials: Annotated[Optional[Path], typer.Option(help='A JSON file: {"username": ..., "password": ...} or {"token": ...}. [default: MEDDIAG_PACS_USER/MEDDIAG_PACS_PASSWORD or MEDDIAG_PACS_TOKEN]')] = None,
    outbox: Annotated[Optional[Path], typer.Option(help="Where results wait until the PACS has them. [default: $MEDDIAG_CACHE/outbox]")] = None,
    attempts: Annotated[int, typer.Option(help="Tries per PACS request before giving up (waits 1, 2, 4 ... s between).", min=1)] = 4,
) -> None:
    """Find studies in a PACS (QIDO-RS), fetch their images (WADO-RS), diagnose them and store each result back as a
    DICOM SR and heatmap SC in the same study (STOW-RS). Exit code 1 if anything could not be done."""
    from meddiag.extras import require

    require("pacs", "meddiag pacs")
    from meddiag.pacs.dicomweb import pacs_predict
    from meddiag.serving.predictor import Predictor

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its debug lines would show request headers
    report = pacs_predict(Predictor.from_run(run), url, studies=study, modality=modality, since=since, credentials=credentials,
                          outbox=outbox, attempts=attempts, echo=lambda text: print(text, file=sys.stderr))
    print(report.summary())
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.problems or report.pending:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def listen(
    run: Annotated[Path, typer.Argument(help="Run folder (or a checkpoint file).")],
    port: Annotated[int, typer.Option(help="The DICOM port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This node's AE title (what the PACS or modality sends to).")] = "MEDDIAG",
    host: Annotated[str, typer.Option(help="The address to listen on; 0.0.0.0 for every network interface.")] = "127.0.0.1",
    send_to: Annotated[Optional[str], typer.Option(help="Where the results go by C-STORE: HOST:PORT:AET (the PACS). [default: none, kept in the outbox]")] = None,
    series_timeout: Annotated[float, typer.Option(help="A series is complete when no image of it has come for this many seconds.")] = 5.0,
    max_series: Annotated[int, typer.Option(help="Series waiting at most; past it a C-STORE is answered 'out of resources' (the sender retries).", min=1)] = 64,
    spool: Annotated[Optional[Path], typer.Option(help="Where received images wait until their series is diagnosed. [default: $MEDDIAG_CACHE/listen-spool]")] = None,
    outbox: Annotated[Optional[Path], typer.Option(help="Where results wait until the PACS has them. [default: $MEDDIAG_CACHE/listen-outbox]")] = None,
) -> None:
    """A DICOM node: receive images by C-STORE (from a modality or a PACS routing rule), diagnose each series when it is
    complete, and send its SR and heatmap SC to the PACS by C-STORE. Runs until stopped (Ctrl-C)."""
    import signal
    import threading

    from meddiag.extras import require

    require("pacs", "meddiag listen")
    from meddiag.pacs.listener import Destination, Listener
    from meddiag.serving.predictor import Predictor

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("meddiag.listen").setLevel(logging.INFO)
    destination = Destination.parse(send_to) if send_to else None
    node = Listener(Predictor.from_run(run), ae_title=ae_title, host=host, port=port, send_to=destination, spool=spool,
                    outbox=outbox, series_timeout=series_timeout, max_series=max_series)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    node.start()
    if destination is not None and node.outbox.waiting():
        node.send(node.outbox.waiting())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    node.stop()
    print(f"stopped: {node.diagnosed} series diagnosed", file=sys.stderr)


@app.command("cache")
@friendly_errors
def cache_command(
    action: Annotated[str, typer.Argument(help="info: what the cache holds; clear: remove it all.")] = "info",
    cache: Annotated[Optional[str], typer.Option(help="The cache folder. [default: $MEDDIAG_CACHE/prepared, by default ~/.cache/meddiag/prepared]")] = None,
) -> None:
    """The prepared-image cache: files decoded and prepared once, read by every later run instead of decoding them again."""
    from meddiag.data.cache import PreparedCache

    if action not in ("info", "clear"):
        raise MeddiagError(f"meddiag cache {action}: choose info or clear")
    store = PreparedCache(Path(cache).expanduser() if cache else None)
    if action == "clear":
        freed = store.clear()
        print(f"cleared {store.root}: {freed / 2**20:.1f} MiB freed")
        return
    info = store.info()
    print(f"{info['root']}: {info['entries']} prepared files, {info['bytes_held'] / 2**20:.1f} MiB "
          f"({info['bytes_on_disk'] / 2**20:.1f} MiB on disk)")
    for key, held in sorted(info["preparations"].items()):
        print(f"  {key:<40} {held['entries']:>8} files  {held['bytes'] / 2**20:>9.1f} MiB")


@app.command("models")
def list_models_command() -> None:
    """List the available models."""
    from meddiag.models import list_models

    for entry in list_models():
        dims = "/".join(f"{d}D" for d in entry.spatial_dims)
        print(f"{entry.name:<16} {dims:<6} {entry.description}")
