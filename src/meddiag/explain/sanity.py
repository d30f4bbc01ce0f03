"""Do the heatmaps mean anything? Two checks a map must pass before anyone trusts it.

- **Model randomisation** (Adebayo et al. 2018, "Sanity checks for saliency maps"): re-initialise
  the network's weights block by block from the output layer down (cascading) and compare each
  map with the trained model's by Spearman rank correlation. A method that explains the *model*
  gives low correlation once the weights are random; one that merely traces edges of the image
  stays high. Passes when the mean correlation with the fully randomised model is below 0.3.
- **Deletion** (Petsiuk et al. 2018, RISE): remove the most salient pixels first, in steps, and
  follow the explained class's probability; the area under that curve is lower for a faithful
  map. Compared with random maps on the same images; passes when the map's area is lower.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meddiag.explain.saliency import explained_classes, model_input, probabilities, saliency_maps
from meddiag.models.checkpoint import ModelCard
from meddiag.models.inference import logits_to_probs

PASS_CORRELATION = 0.3


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (0 when either is constant: it ranks nothing)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's parameterised blocks from output to input: its top-level children, with
    Sequential containers opened one level (e.g. a classic CNN's individual layers)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.Sequential) else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                out.append((f"{name}.{sub}" if sub else name, module))
    return out[::-1]


def _reinitialise(module: nn.Module) -> None:
    """Back to the layers' own initialisation (random weights; normalisation layers to identity,
    their running statistics reset)."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def randomisation_test(model: nn.Module, card: ModelCard, images: torch.Tensor, method: str = "gradcam",
                       classes: Sequence[int] | None = None, seed: int = 0) -> dict:
    """Cascading model randomisation; mean Spearman correlation with the trained model's maps after
    each block (output first) is re-initialised."""
    torch.manual_seed(seed)
    if classes is None:
        classes = explained_classes(probabilities(model, images, card), card)
    reference = saliency_maps(model, card, images, method, classes)
    randomised = copy.deepcopy(model).float().eval()
    stages = []
    for name, block in blocks(randomised):
        _reinitialise(block)
        maps = saliency_maps(randomised, card, images, method, classes)
        rho = [spearman(r, m) for r, m in zip(reference, maps)]
        stages.append({"randomised_down_to": name, "spearman": float(np.mean(rho))})
    final = stages[-1]["spearman"] if stages else float("nan")
    return {"method": method, "stages": stages, "spearman_fully_random": final,
            "passes": bool(final < PASS_CORRELATION), "n_images": int(len(images))}


@torch.no_grad()
def deletion_curve(model: nn.Module, card: ModelCard, images: torch.Tensor, maps: np.ndarray,
                   classes: Sequence[int], steps: int = 20) -> np.ndarray:
    """(N, steps + 1) probability of each image's explained class as its most salient pixels
    (ties broken at random) are replaced by the image's mean, 0% to 100% in equal steps."""
    x = model_input(images, card)
    n = x.shape[0]
    flat = x.reshape(n, x.shape[1], -1)
    pixels = flat.shape[-1]
    rng = np.random.default_rng(0)
    order = [np.lexsort((rng.random(pixels), -m.ravel())) for m in maps]
    fill = flat.mean(dim=(1, 2), keepdim=True)
    curve = np.zeros((n, steps + 1))
    net = model.float().eval()
    for s in range(steps + 1):
        k = round(pixels * s / steps)
        current = flat.clone()
        for i in range(n):
            idx = torch.from_numpy(order[i][:k])
            current[i][:, idx] = fill[i, 0, 0]
        probs = logits_to_probs(net(current.reshape(x.shape)), card.task, card.temperature)
        curve[:, s] = probs[torch.arange(n), torch.as_tensor(list(classes))].numpy()
    return curve


def deletion_test(model: nn.Module, card: ModelCard, images: torch.Tensor, method: str = "gradcam",
                  classes: Sequence[int] | None = None, random_maps: int = 3, steps: int = 20, seed: int = 0) -> dict:
    """Deletion area (mean over images, trapezoid over the fraction deleted) of the method's maps
    and of random maps; the method passes when its area is the lower."""
    if classes is None:
        classes = explained_classes(probabilities(model, images, card), card)
    maps = saliency_maps(model, card, images, method, classes)
    area = _area(deletion_curve(model, card, images, maps, classes, steps))
    rng = np.random.default_rng(seed)
    random_areas = [_area(deletion_curve(model, card, images, rng.random(maps.shape), classes, steps)) for _ in range(random_maps)]
    random_area = float(np.mean(random_areas))
    return {"method": method, "deletion_auc": area, "random_deletion_auc": random_area,
            "passes": bool(area < random_area), "steps": steps, "n_images": int(len(images))}


def _area(curve: np.ndarray) -> float:
    """Mean over images of the trapezoid area under each curve, on [0, 1]."""
    return float(((curve[:, 1:] + curve[:, :-1]) / 2).mean(axis=1).mean())


def sanity_report(model: nn.Module, card: ModelCard, images: torch.Tensor, method: str = "gradcam",
                  seed: int = 0) -> dict:
    """Both checks on ``images`` (each explained for the model's own decision), as ``sanity.json``
    holds them and the evaluation report shows them."""
    classes = explained_classes(probabilities(model, images, card), card)
    randomisation = randomisation_test(model, card, images, method, classes, seed)
    deletion = deletion_test(model, card, images, method, classes, seed=seed)
    return {"method": method, "n_images": int(len(images)), "randomisation": randomisation, "deletion": deletion,
            "passes": bool(randomisation["passes"] and deletion["passes"]),
            "criteria": {"randomisation": f"mean Spearman correlation with the fully randomised model < {PASS_CORRELATION}",
                         "deletion": "deletion area below that of random maps"}}


def run_sanity_check(run: Path, model: nn.Module, card: ModelCard, method: str = "gradcam", n_images: int = 32,
                     seed: int = 0) -> dict:
    """:func:`sanity_report` on the first ``n_images`` of the run's own test split (half of them of
    the positive class where possible); writes ``RUN/sanity.json`` for the report to show."""
    import json

    from meddiag.evaluation.metrics import json_safe
    from meddiag.runfolder import RunFolder, write_text_atomic
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import load_training_data

    folder = RunFolder.of(run)
    config = TrainConfig.from_file(folder.config)
    if config.positive_class is None and card.task == "binary":  # a run made before the positive class was explicit
        config = config.model_copy(update={"positive_class": card.class_names[1]})
    test = load_training_data(config, progress=False, run=folder.root).splits["test"]
    labels = test.labels.numpy()
    if labels.ndim == 1:  # balanced over classes, in their order in the split
        per_class = [np.flatnonzero(labels == c)[: max(1, n_images // len(card.class_names))] for c in range(len(card.class_names))]
        index = np.sort(np.concatenate(per_class))[:n_images]
    else:
        index = np.arange(min(n_images, len(test)))
    result = sanity_report(model, card, test.images[torch.as_tensor(index)], method, seed)
    write_text_atomic(folder.sanity, json.dumps(json_safe(result), indent=2))
    return result
