"""Explaining image files and volumes: one heatmap figure per input, named after it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meddiag.data.collect import Failure, collect_sources
from meddiag.data.images import IMAGE_EXTENSIONS
from meddiag.data.volumes import NIFTI_SUFFIXES
from meddiag.errors import DataError, source_failure
from meddiag.explain.render import overlay_figure, volume_figure
from meddiag.data.covariates import PatientData
from meddiag.explain.covariates import attribution_text, covariate_attributions
from meddiag.explain.saliency import explained_classes, method_label, model_input, probabilities, saliency_maps
from meddiag.models.checkpoint import ModelCard
from meddiag.models.inputs import read_inputs


@dataclass
class Explanation:
    source: str
    figure: Path
    explained: str
    predicted: str
    probability: float  # of the explained class
    attributions: list[dict] | None = None  # models with covariates: each one's integrated gradient, largest first


def caption(card: ModelCard, probs: np.ndarray, explained: int, method: str) -> tuple[str, str]:
    """('predicted P 0.93 | Grad-CAM of P', the predicted class name)."""
    decided = explained_classes(probs[None], card)[0]
    predicted = card.class_names[decided]
    text = f"predicted {predicted} ({probs[decided]:.3f})"
    if explained != decided:
        text += f"  |  explaining {card.class_names[explained]} ({probs[explained]:.3f})"
    return text + f"  |  {method_label(method, card.model_name)}", predicted


def figure_name(source: Path, method: str, used: set[str]) -> str:
    """``<file stem>_<method>.png``, made unique when two inputs share a stem."""
    stem = source.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_EXTENSIONS):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name, k = f"{stem}_{method}.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}_{method}.png"
    used.add(name)
    return name


def explain_files(model: nn.Module, card: ModelCard, paths: list[str | Path], out_dir: Path, method: str = "gradcam",
                  class_name: str | None = None, patients: PatientData | None = None) -> tuple[list[Explanation], list[Failure]]:
    """Write a heatmap figure for every image (or, for 3D models, every volume) under ``paths``; for a
    model with covariates (``patients``: the cases' data) also each covariate's attribution."""
    if class_name is not None and class_name not in card.class_names:
        raise DataError(f"--class {class_name}: the model's classes are {', '.join(card.class_names)}")
    requested = card.class_names.index(class_name) if class_name is not None else None
    out_dir = Path(out_dir)
    used: set[str] = set()
    results: list[Explanation] = []
    sources, failures = collect_sources(paths, card.spatial_dims)
    taken = {str(s) for s in sources}  # a series folder's NIfTI and multi-frame files are volumes of their own
    for source in sources:
        try:
            items = read_inputs(source, card)
        except Exception as exc:  # noqa: BLE001 - whatever one file raises, it alone fails
            failures.append(Failure(str(source), source_failure(exc, source)))
            continue
        failures += [Failure(p, r) for item in items for p, r in item.excluded if p not in taken]
        for item in items:
            x = torch.tensor(item.array[None])
            covariates = None
            if card.covariates is not None:
                try:
                    table = patients.table_for(card.covariates, source) if patients is not None else card.covariates.empty_table(1)
                except DataError as exc:
                    failures.append(Failure(str(source), str(exc)))
                    continue
                covariates = torch.from_numpy(card.covariates.encode(table, patients.source if patients else None))
            probs = probabilities(model, x, card, covariates)[0]
            explained = requested if requested is not None else explained_classes(probs[None], card)[0]
            attributions = None
            if covariates is not None:
                attributions = covariate_attributions(model, card, model_input(x, card), covariates, explained)
            text, predicted = caption(card, probs, explained, method)
            if attributions:
                text += f"\ncovariates: {attribution_text(attributions)}"
            if card.model_name == "tabular":  # no image branch: the figure shows the image and the attributions
                heat = np.zeros(item.array.shape[1:], dtype=np.float32)
            else:
                heat = saliency_maps(model, card, x, method, [explained], covariates=covariates)[0]
            path = out_dir / figure_name(source, method, used)
            if item.original is None:
                volume_figure(item.array[0], heat, f"{source.name}: {text}", path)
            else:
                overlay_figure(item.original, heat, f"{source.name}: {text}", path, card.fit)
            results.append(Explanation(str(source), path, card.class_names[explained], predicted, float(probs[explained]),
                                       attributions))
    return results, failures
