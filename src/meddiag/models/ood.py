"""Out-of-distribution scores: how unlike the training data an input is, in the network's own terms.

A trained network is summarised by a compact *reference* of its training split in feature space (the
input of its final linear layer, the penultimate features), stored in the checkpoint beside the weights:

- ``mahalanobis`` (Lee et al. 2018): class-conditional Gaussians with one shared covariance (Ledoit-Wolf
  shrinkage); the score is the smallest squared Mahalanobis distance to a class mean;
- ``knn`` (Sun et al. 2022): the distance of the L2-normalised feature to its k-th nearest training
  feature (a bank of at most ``BANK`` training images);
- output scores that need no reference: ``energy`` (Liu et al. 2020; minus the log-sum-exp of the
  logits) and ``msp`` (Hendrycks & Gimpel 2017; one minus the largest softmax probability);
- ``pixels``: the Mahalanobis distance of a few image statistics (intensity quantiles, contrast, edge and
  second-difference energy, sharpness, saturated shares) to the training images'. Trained features can be
  blind to what the diagnosis does not depend on (a blurred image, a photograph's texture); these are not;
- ``combined``: the larger of ``mahalanobis`` and ``pixels``, each divided by its own threshold, so that
  either flags an input (the threshold of the maximum is then chosen like the others').

Every score is "higher = more unusual". A rule (method + threshold) is chosen on the validation split to
keep a stated share of in-distribution inputs, and lives in the model card.

For a whole batch (dataset shift, :mod:`meddiag.evaluation.drift`), a :class:`ShiftReference` keeps a
sample of the *validation* split's features and logits: held-out images, as a new site's would be (the
training split's own features are tighter than any new data's, so they would make every batch look shifted).
"""

from __future__ import annotations

import math
import copy
import warnings

import numpy as np
import torch
from torch import nn

METHODS = ("mahalanobis", "knn", "energy", "msp", "pixels", "combined")
DEFAULT_METHOD = "combined"  # by measurement: docs/benchmarks.md, "Out-of-distribution inputs"
FEATURE_METHODS = ("mahalanobis", "knn", "pixels", "combined")  # those that need the reference
METHOD_LABELS = {"combined": "combined (features or pixel statistics)", "pixels": "pixel statistics"}  # in a reason
COMBINED = ("mahalanobis", "pixels")  # the scores ``combined`` takes the larger of (each over its threshold)
BANK = 4096  # most training features the kNN score keeps
K_NEIGHBOURS = 10
REFERENCE_PREFIX = "ood."  # checkpoint state-dict keys of the reference (never loaded into the network; = checkpoint.OOD_PREFIX)
SHIFT_SAMPLE = 1000  # most validation images the shift reference keeps


class WithFeatures(nn.Module):
    """``model`` split at its final linear layer: ``forward(x, covariates=None) -> (logits, features)``,
    features being that layer's (N, D) input. It shares the caller's weights (no copy of the network: the
    modules on the way to the head are shallow-copied, the head replaced there by an identity), and is
    traceable (no hooks)."""

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        from meddiag.models.fusion import FusedNet

        path = "head" if isinstance(model, FusedNet) and model.head is not None else (
            f"image.{head_name}" if isinstance(model, FusedNet) else head_name)
        self.head = model.get_submodule(path)
        self.body = _without(model, path)
        self.takes_covariates = isinstance(model, FusedNet)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features = (self.body(x, covariates) if self.takes_covariates else self.body(x)).flatten(1)
        return self.head(features), features


def _without(model: nn.Module, path: str) -> nn.Module:
    """A view of ``model`` whose submodule ``path`` is an identity: the modules along the path are shallow
    copies (their own child lists), everything else, weights included, is shared with ``model``."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent, parts = root, path.split(".")
    for name in parts[:-1]:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[parts[-1]] = nn.Identity()
    return root


def supports_features(model_name: str) -> bool:
    from meddiag.models.registry import get_entry

    return model_name == "tabular" or bool(get_entry(model_name).head)


def output_scores(logits: torch.Tensor, task: str, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """``energy`` and ``msp`` of (N, K) logits (multi-label: per finding, the most confident one's)."""
    z = logits.double() / temperature
    if task == "multilabel":
        p = torch.sigmoid(z)
        confidence = torch.maximum(p, 1 - p).min(dim=1).values  # the least settled finding
        energy = -torch.nn.functional.softplus(z.abs()).min(dim=1).values
        return {"energy": energy.numpy(), "msp": (1 - confidence).numpy()}
    return {"energy": (-torch.logsumexp(z, dim=1)).numpy(), "msp": (1 - torch.softmax(z, dim=1).max(dim=1).values).numpy()}


def pixel_statistics(images: torch.Tensor, elements: int = 1 << 22) -> torch.Tensor:
    """(N, 12) statistics of uint8 model inputs (N, C, *spatial), channels averaged: intensity quantiles (5, 25,
    50, 75, 95%), mean, and on a log scale spread, mean absolute first and second differences (edges, fine
    texture) and sharpness (edges over spread); the shares of nearly black and nearly white pixels. Intensity
    statistics come from each image's 256-level histogram (one pass, no sorting)."""
    out = []
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    grey = torch.arange(256, dtype=torch.float64)
    chunk = max(1, elements // max(1, images[0].numel() if len(images) else 1))  # volumes: a few at a time
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        x = part[:, 0] if part.shape[1] == 1 else part.float().mean(1).round().to(torch.uint8)  # (n, *spatial)
        n, size = len(x), x[0].numel()
        flat = x.reshape(n, size).long()
        counts = torch.bincount((flat + 256 * torch.arange(n)[:, None]).reshape(-1), minlength=256 * n).view(n, 256).double()
        cdf = counts.cumsum(1)
        quantiles = torch.searchsorted(cdf, (levels * size)[None].expand(n, -1).contiguous()).double().clamp(max=255) / 255
        mean = (counts @ grey) / size / 255
        spread = ((counts @ grey**2) / size / 255**2 - mean**2).clamp(min=0).sqrt()
        unit = x.float() / 255
        dims = [d for d in range(1, unit.ndim) if unit.shape[d] > 2]
        zeros = torch.zeros(n, dtype=torch.float64)
        first = torch.stack([_difference(unit, d, 1) for d in dims], 1).mean(1).double() if dims else zeros
        second = torch.stack([_difference(unit, d, 2) for d in dims], 1).mean(1).double() if dims else zeros
        energies = torch.stack([spread, first, second, first / (spread + 0.01)], 1)
        out.append(torch.cat([quantiles, mean[:, None],
                              torch.log(energies + 1e-3),  # on a log scale: a blurred image's edges are near 0, not just lower
                              counts[:, :6].sum(1, keepdim=True) / size, counts[:, 250:].sum(1, keepdim=True) / size], 1))
    return torch.cat(out) if out else torch.empty(0, 12, dtype=torch.float64)


def _difference(x: torch.Tensor, dim: int, order: int) -> torch.Tensor:
    """Per image (N,), the mean absolute first (order 1) or second (order 2) difference along ``dim``
    (by slicing: several times faster than ``torch.diff`` here)."""
    n = x.shape[dim] - order

    def shifted(k: int) -> torch.Tensor:
        return x.narrow(dim, k, n)

    d = shifted(1) - shifted(0) if order == 1 else shifted(2) - 2 * shifted(1) + shifted(0)
    return d.abs().mean(tuple(range(1, d.ndim)))  # no flattening copy of the sliced view


def _mahalanobis_fit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    mean = values.mean(0)
    return mean, np.linalg.pinv(LedoitWolf(assume_centered=True).fit(values - mean).covariance_)


class FeatureReference:
    """Class means, shared precision and a kNN bank of training features; the mean and precision of the
    training images' :func:`pixel_statistics` (None in references made before there were any)."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, bank: torch.Tensor,
                 pixel_mean: torch.Tensor | None = None, pixel_precision: torch.Tensor | None = None) -> None:
        self.means, self.precision, self.bank = means.double(), precision.double(), bank.float()
        self.pixel_mean = pixel_mean.double() if pixel_mean is not None else None
        self.pixel_precision = pixel_precision.double() if pixel_precision is not None else None
        # (f - m)' P (f - m) = f'Pf - 2 f'Pm + m'Pm: one (N, D) x (D, D) product for every class at once, in
        # float32 (twice as fast as float64; the scores' relative error stays near 1e-6)
        self._p32 = self.precision.float()
        self._pm = (self.precision @ self.means.T).float()  # (D, K)
        self._mpm = (self.means * (self.precision @ self.means.T).T).sum(1).float()  # (K,)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0,
            images: torch.Tensor | None = None) -> FeatureReference:
        """From the training split's (N, D) ``features``, labels and (for the ``pixels`` score) uint8 ``images``."""
        from sklearn.covariance import LedoitWolf

        f = np.asarray(features, dtype=np.float64)
        if labels.ndim == 2 or num_classes < 2:  # multi-label: one Gaussian for all
            groups = np.zeros(len(f), dtype=np.int64)
            k = 1
        else:
            groups, k = labels.astype(np.int64), num_classes
        means = np.stack([f[groups == c].mean(0) if (groups == c).any() else f.mean(0) for c in range(k)])
        centred = f - means[groups]
        precision = np.linalg.pinv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(f), size=min(BANK, len(f)), replace=False)
        bank = f[chosen] / np.maximum(np.linalg.norm(f[chosen], axis=1, keepdims=True), 1e-12)
        pixels = _mahalanobis_fit(pixel_statistics(images).numpy()) if images is not None and len(images) > 1 else None
        return cls(torch.from_numpy(means), torch.from_numpy(precision), torch.from_numpy(bank).float(),
                   *((torch.from_numpy(pixels[0]), torch.from_numpy(pixels[1])) if pixels else ()))

    def state(self) -> dict[str, torch.Tensor]:
        out = {REFERENCE_PREFIX + "means": self.means, REFERENCE_PREFIX + "precision": self.precision,
               REFERENCE_PREFIX + "bank": self.bank}
        if self.pixel_mean is not None:
            out[REFERENCE_PREFIX + "pixel_mean"], out[REFERENCE_PREFIX + "pixel_precision"] = self.pixel_mean, self.pixel_precision
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> FeatureReference | None:
        keys = [REFERENCE_PREFIX + k for k in ("means", "precision", "bank")]
        if not all(k in state for k in keys):
            return None
        return cls(*(state[k] for k in keys), state.get(REFERENCE_PREFIX + "pixel_mean"), state.get(REFERENCE_PREFIX + "pixel_precision"))

    def pixel_scores(self, images: torch.Tensor) -> np.ndarray:
        """The ``pixels`` score (N,) of uint8 images (NaN where the reference has no pixel statistics)."""
        if self.pixel_mean is None:
            return np.full(len(images), np.nan)
        d = pixel_statistics(images) - self.pixel_mean
        return ((d @ self.pixel_precision) * d).sum(1).clamp(min=0).numpy()

    def scores(self, features: torch.Tensor, methods: tuple[str, ...] = FEATURE_METHODS) -> dict[str, np.ndarray]:
        """Each of ``methods``' (N,) score of (N, D) features."""
        out = {}
        if "mahalanobis" in methods:
            f = features.float()
            quadratic = ((f @ self._p32) * f).sum(1, keepdim=True)
            out["mahalanobis"] = (quadratic - 2 * f @ self._pm + self._mpm).clamp(min=0).min(dim=1).values.double().numpy()
        if "knn" in methods:
            unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
            k = min(K_NEIGHBOURS, len(self.bank))
            out["knn"] = (1 - unit @ self.bank.T).clamp(min=0).topk(k, dim=1, largest=False).values[:, -1].double().numpy()
        return out


class ShiftReference:
    """A sample of the validation split as the network sees it: (n, K) logits, (n, D) penultimate features
    (None for a network without them, e.g. an ensemble) and each input's score under the card's OOD rule."""

    KEYS = ("shift_logits", "shift_features", "shift_scores")

    def __init__(self, logits: torch.Tensor, features: torch.Tensor | None, scores: torch.Tensor | None) -> None:
        self.logits = logits.float()
        self.features = features.float() if features is not None else None
        self.scores = scores.double() if scores is not None else None

    @classmethod
    def sample(cls, logits: torch.Tensor, features: torch.Tensor | None, scores: np.ndarray | None,
               seed: int = 0) -> ShiftReference:
        """At most :data:`SHIFT_SAMPLE` of the validation inputs, drawn at random."""
        n = len(logits)
        chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, size=min(n, SHIFT_SAMPLE), replace=False)))
        return cls(logits[chosen], features[chosen] if features is not None else None,
                   torch.from_numpy(np.asarray(scores, dtype=np.float64))[chosen] if scores is not None else None)

    def state(self) -> dict[str, torch.Tensor]:
        out = {REFERENCE_PREFIX + "shift_logits": self.logits}
        if self.features is not None:  # half precision: a two-sample test needs no more, and it halves the file's growth
            out[REFERENCE_PREFIX + "shift_features"] = self.features.half()
        if self.scores is not None:
            out[REFERENCE_PREFIX + "shift_scores"] = self.scores
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ShiftReference | None:
        if REFERENCE_PREFIX + "shift_logits" not in state:
            return None
        return cls(*(state.get(REFERENCE_PREFIX + k) for k in cls.KEYS))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.logits)


def all_scores(logits: torch.Tensor, features: torch.Tensor | None, reference: FeatureReference | None, task: str,
               temperature: float = 1.0, methods: tuple[str, ...] = METHODS, images: torch.Tensor | None = None,
               scales: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Each of ``methods``' score (N,) the model supports: feature scores need features and a reference,
    ``pixels`` the uint8 ``images``, ``combined`` also the ``scales`` (the thresholds of :data:`COMBINED`; its
    parts come back too, so that a reason can say which one flagged)."""
    out = {k: v for k, v in output_scores(logits, task, temperature).items() if k in methods} if {"energy", "msp"} & set(methods) else {}
    wanted = set(methods) | (set(COMBINED) if "combined" in methods else set())
    if features is not None and reference is not None:
        out.update(reference.scores(features, tuple(m for m in ("mahalanobis", "knn") if m in wanted)))
        if "pixels" in wanted and images is not None and reference.pixel_mean is not None:
            out["pixels"] = reference.pixel_scores(images)
    if "combined" in methods and scales and all(m in out and scales.get(m) for m in COMBINED):
        out["combined"] = combined_score(out, scales)
    return {k: v for k, v in out.items() if k in methods or ("combined" in out and k in COMBINED)}


def combined_score(scores: dict[str, np.ndarray], scales: dict[str, float]) -> np.ndarray:
    """The larger of the :data:`COMBINED` scores, each over its own threshold (> 1: that score alone would flag)."""
    return np.maximum.reduce([np.asarray(scores[m], dtype=np.float64) / max(scales[m], 1e-12) for m in COMBINED])


def rule_in_force(card, reference: FeatureReference | None, where: str) -> bool:  # noqa: ANN001 - ModelCard
    """Whether ``card``'s OOD rule can be applied: a feature score needs the reference stored beside the
    weights (a checkpoint rewritten without it, e.g. by ``save_checkpoint``, has lost it: warned, not applied)."""
    rule = card.ood
    if rule is None:
        return False
    if rule.method in FEATURE_METHODS and reference is None:
        warnings.warn(f"{where}: the model card's OOD rule ({rule.method}) has no reference stored with the weights, so "
                      "inputs are not checked against the training data; `meddiag calibrate-ood RUN` makes it again", stacklevel=2)
        return False
    return True


def keep_threshold(scores: np.ndarray, keep: float) -> float:
    """The threshold above which inputs are flagged, from n in-distribution (validation) scores: the
    ceil((n + 1) keep)-th smallest, so that a new in-distribution input scores at most this with probability
    at least ``keep`` whatever n (split conformal, Vovk et al. 2005); the largest when n is too small for that."""
    finite = np.sort(np.asarray(scores, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return math.inf
    k = min(math.ceil((finite.size + 1) * keep), finite.size)
    return float(finite[k - 1])


@torch.inference_mode()
def logits_and_features(model: nn.Module, card, images: torch.Tensor, covariates: torch.Tensor | None = None,  # noqa: ANN001 - ModelCard
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, K) logits and (N, D) penultimate features (None when the network has no final linear layer to
    split at, e.g. an ensemble) of uint8 ``images``, one plain pass. ``model``: a network, or one already
    split by :class:`WithFeatures`."""
    from meddiag.data.transforms import normalize, to_unit_float
    from meddiag.models.fusion import call
    from meddiag.models.inference import model_device
    from meddiag.models.registry import get_entry

    if isinstance(model, WithFeatures) or getattr(model, "gives_features", False):  # already split (a predictor keeps one; an ONNX export with features)
        split: WithFeatures | None = model
    else:
        split = WithFeatures(model, get_entry(card.model_name).head).eval() if supports_features(card.model_name) else None
    device = model_device(model)
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(to_unit_float(images[start : start + batch_size].to(device)), card.mean, card.std)
        c = covariates[start : start + batch_size].to(device) if covariates is not None else None
        if split is not None and not isinstance(split, WithFeatures):  # ONNX Runtime
            z, f = split.with_features(x, c)  # type: ignore[operator]
            features.append(f.float().cpu())
        elif split is not None:
            z, f = split(x, c) if split.takes_covariates else split(x)
            features.append(f.float().cpu())
        else:
            z = call(model.eval(), x, c)
        logits.append(z.float().cpu())
    if not logits:
        return torch.empty(0, card.num_classes), None
    return torch.cat(logits), torch.cat(features) if features else None


def input_problems(array: np.ndarray, original: np.ndarray | None, card, modality: str = "", body_part: str = "") -> list[str]:  # noqa: ANN001 - ModelCard
    """Cheap checks of an input's contract with the model, before the network: each failed one's reason.

    ``array``: the model input (C, *spatial) uint8; ``original``: the 2D image as read (None for volumes);
    ``modality``, ``body_part``: a DICOM input's Modality and BodyPartExamined ("" when not DICOM or absent)."""
    reasons = []
    if modality and card.modalities and modality.upper() not in card.modalities:
        reasons.append(f"a DICOM {modality} image; this model is for {', '.join(card.modalities)}")
    if body_part and card.body_parts and body_part.upper() not in card.body_parts:
        reasons.append(f"the DICOM states body part {body_part}; this model was trained on {', '.join(card.body_parts[:5])}")
    if int(array.max()) - int(array.min()) <= 2:
        reasons.append("the image is (nearly) constant: there is nothing to diagnose")
    if original is None:
        return reasons
    h, w = original.shape[:2]
    if max(h, w) > ASPECT_LIMIT * max(1, min(h, w)):
        reasons.append(f"an extreme aspect ratio ({w}x{h} pixels)")
    if max(h, w) * TINY_FACTOR < card.image_size:
        reasons.append(f"only {w}x{h} pixels, far smaller than the model's {card.image_size} px input")
    colour = original.ndim == 3 and original.shape[2] >= 3 and _is_colour(original)
    if colour and card.in_channels == 1:
        reasons.append("a colour image; this model was trained on grayscale images")
    elif not colour and card.in_channels == 3:
        reasons.append("a grayscale image; this model was trained on colour images")
    return reasons


ASPECT_LIMIT = 4.0  # longer side more than this many times the shorter
TINY_FACTOR = 4  # an image whose longer side is under a quarter of the model's input size


def _is_colour(image: np.ndarray, tolerance: float = 8.0) -> bool:
    """Whether an (H, W, 3+) image's channels differ (by more than ``tolerance`` grey levels on average)."""
    rgb = image[..., :3].astype(np.float32)
    return float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()) > tolerance
