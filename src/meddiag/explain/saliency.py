"""Where the model looked: saliency maps from ``monai.visualize``.

- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) at the layer each registered model names. Grad-CAM
  averages the gradients over space, which is exact for networks ending in global average pooling
  (the ResNets, DenseNet, EfficientNet); for a network with a flatten -> dense head (``seed_cnn``)
  the average can cancel out and leave an empty map, so there meddiag keeps the gradients per
  position (HiResCAM, Draelos & Carin 2020: the form Grad-CAM reduces to for pooled heads);
- ``hirescam``: that element-wise form, for any network;
- ``gradcampp``: Grad-CAM++ (Chattopadhyay et al. 2018), same layer;
- ``occlusion``: occlusion sensitivity (Zeiler & Fergus 2014): how much the explained class's
  probability falls when a patch around each pixel is hidden. Model-agnostic, slower.

Single-label models are explained through their centred logits (logit of the class minus the mean
logit): evidence *for* the class against the others, which is what its probability depends on.
Maps come back at the model's input resolution, scaled to [0, 1] per image.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from meddiag.data.transforms import normalize, to_unit_float
from meddiag.errors import ModelError
from meddiag.evaluation.metrics import predict_labels
from meddiag.models.checkpoint import ModelCard
from meddiag.models.fusion import WithCovariates, call, image_part, takes_covariates
from meddiag.models.inference import logits_to_probs
from meddiag.models.registry import get_entry

METHODS = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion sensitivity"}


class _Centred(nn.Module):
    """Logits minus their mean over classes (single-label tasks; see the module docstring)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z - z.mean(dim=1, keepdim=True)


def method_label(method: str, model_name: str) -> str:
    """How a figure names the method actually used."""
    if method == "gradcam" and not get_entry(model_name).pooled_head:
        return "Grad-CAM (element-wise: HiResCAM, for a dense head)"
    return METHODS[method]


def explainable_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` in eval mode without in-place activations (Grad-CAM's backward
    hooks cannot see through them). A copy, so hooks never pile up on the caller's model."""
    clone = copy.deepcopy(model).float().eval()
    for module in clone.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return clone


def model_input(images: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """uint8 images as the network sees them: scaled, normalised, float32."""
    return normalize(to_unit_float(images), card.mean, card.std).float()


def explained_classes(probs: np.ndarray, card: ModelCard, requested: int | None = None) -> list[int]:
    """The class to explain per image: ``requested``, else the model's decision (binary: at the
    checkpoint's threshold; multi-label: the most probable finding)."""
    if requested is not None:
        return [requested] * len(probs)
    if card.task == "multilabel":
        return [int(i) for i in probs.argmax(axis=1)]
    return [int(i) for i in predict_labels(probs, card.task, card.threshold)]


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, card: ModelCard, covariates: torch.Tensor | None = None) -> np.ndarray:
    """(N, K) probabilities of uint8 ``images`` (with the (N, F) encoded ``covariates`` of a fused model)."""
    model.eval()
    return logits_to_probs(call(model, model_input(images, card), covariates), card.task, card.temperature).numpy()


def saliency_maps(model: nn.Module, card: ModelCard, images: torch.Tensor, method: str = "gradcam",
                  classes: Sequence[int] | None = None, target_layer: str | None = None,
                  covariates: torch.Tensor | None = None) -> np.ndarray:
    """Maps (N, *spatial) float32 in [0, 1] for uint8 ``images`` (N, C, *spatial), each for its
    entry of ``classes`` (default: the model's decision). A model fused with covariates is explained
    with each image's (N, F) encoded ``covariates`` held fixed (None: none known)."""
    if method not in METHODS:
        raise ModelError(f"unknown explanation method '{method}'; choose {', '.join(METHODS)}")
    if card.model_name == "tabular":
        raise ModelError("the tabular model does not look at the image, so it has no heatmap (its covariate "
                         "attributions say what it used)")
    net = explainable_copy(model)
    if classes is None:
        classes = explained_classes(probabilities(net, images, card, covariates), card)
    if card.model_name == "ensemble" and method != "occlusion":  # the members' maps, averaged
        members = [ModelCard.model_validate(m) for m in card.model_kwargs["members"]]
        maps = [saliency_maps(m, c, images, method, classes, covariates=covariates if c.covariates else None)
                for m, c in zip(net.members, members)]
        return np.mean(maps, axis=0).astype(np.float32)

    def bound(i: int | None) -> nn.Module:  # a one-input network: the image, with case i's covariates
        if not takes_covariates(net):
            return net
        return WithCovariates(net, covariates[i : i + 1] if covariates is not None and i is not None else None).eval()

    maps = []
    if method == "occlusion":
        maps = [_occlusion(bound(i), card, images[i : i + 1], int(c)) for i, c in enumerate(classes)]
    else:
        from monai.visualize import GradCAM, GradCAMpp

        entry = get_entry(card.model_name)
        if method == "gradcam" and not entry.pooled_head:
            method = "hirescam"
        cam_type = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "hirescam": _hirescam_type()}[method]
        layer = target_layer or entry.target_layer
        if takes_covariates(net):
            layer = "model." + image_part(net)[1] + layer
        centred = card.task != "multilabel"
        if centred:
            layer = f"net.{layer}"

        def network(i: int | None) -> nn.Module:
            return _Centred(bound(i)).eval() if centred else bound(i)

        mapping = receptive_field_centres(network(None), layer, tuple(images.shape[1:]))
        for i, c in enumerate(classes):  # one at a time: MONAI's Grad-CAM++ mis-broadcasts batches
            cam = cam_type(nn_module=network(i), target_layers=layer, postprocessing=unit_scale,
                           upsampler=lambda size: (lambda m: place_on_input(m, mapping, size)))
            maps.append(cam(model_input(images[i : i + 1], card), class_idx=int(c))[0, 0].detach().numpy())
    return np.nan_to_num(np.stack(maps).astype(np.float32))


def receptive_field_centres(net: nn.Module, layer: str, input_shape: tuple[int, ...]) -> list[tuple[float, float]]:
    """Where each feature-map cell of ``layer`` looks in the input, per spatial axis: cell n is
    centred on input index a n + b. Measured, not assumed: the centre of mass of the input
    gradient of the first and the last cell along each axis (for a random input). Networks with
    'valid' convolutions (seed_cnn) see a centred sub-region; padded ones nearly the whole input."""
    module = dict(net.named_modules())[layer]
    captured: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    try:
        with torch.enable_grad():
            net(x)
            features = captured["f"]
            spatial = features.shape[2:]
            middle = [s // 2 for s in spatial]
            out = []
            for axis, size in enumerate(spatial):
                centres = []
                for cell in (0, size - 1):
                    index = list(middle)
                    index[axis] = cell
                    (grad,) = torch.autograd.grad(features[(0, slice(None), *index)].sum(), x, retain_graph=True)
                    weight = grad.abs().sum(dim=(0, 1))
                    other = tuple(d for d in range(weight.ndim) if d != axis)
                    profile = weight.sum(dim=other) if other else weight
                    positions = torch.arange(profile.numel(), dtype=profile.dtype)
                    centres.append(float((profile * positions).sum() / profile.sum().clamp(min=1e-12)))
                a = (centres[1] - centres[0]) / (size - 1) if size > 1 else 1.0
                out.append((a, centres[0]))
    finally:
        handle.remove()
    return out


def place_on_input(maps: torch.Tensor, mapping: list[tuple[float, float]], size: tuple[int, ...]) -> torch.Tensor:
    """Resample feature-resolution maps (B, 1, *f) onto the input grid ``size`` using the cell
    centres of :func:`receptive_field_centres` (linear between centres, edge values beyond)."""
    import torch.nn.functional as F

    fsize = maps.shape[2:]
    axes = []
    for (a, b), n_in, n_f in zip(mapping, size, fsize):
        f = (torch.arange(n_in, dtype=torch.float32) - b) / a if n_f > 1 else torch.zeros(n_in)
        axes.append(2 * f / max(n_f - 1, 1) - 1)
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1)[None].expand(maps.shape[0], *size, len(size))  # (x, y[, z]) = last axis first
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)


def unit_scale(maps: torch.Tensor) -> torch.Tensor:
    """Each map's (min, max) to (0, 1); a constant map becomes zeros. (MONAI's default normaliser
    maps (min, max) to (1, 0), flipping the map: not what a heatmap should show.)"""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scaled = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def _hirescam_type() -> type:
    from monai.visualize import GradCAM

    class HiResCAM(GradCAM):
        """Grad-CAM without averaging the gradients over space: ReLU(sum_k dS/dA_k * A_k)."""

        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):  # noqa: ANN001, ANN201
            _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            return torch.relu((grad[layer_idx] * acti[layer_idx]).sum(1, keepdim=True))

    return HiResCAM


def _occlusion(net: nn.Module, card: ModelCard, image: torch.Tensor, c: int) -> np.ndarray:
    from monai.visualize import OcclusionSensitivity

    size = image.shape[-1]
    x = model_input(image, card)
    activate = torch.sigmoid if card.task == "multilabel" else True
    occ = OcclusionSensitivity(nn_module=net, mask_size=max(3, size // 6), n_batch=32 if x.ndim == 4 else 4,
                               verbose=False, activate=activate)
    with torch.no_grad():
        base = logits_to_probs(net(x), card.task)[0, c]
        occluded, _ = occ(x)
    drop = (base - occluded[0, c]).clamp(min=0).numpy()
    top = drop.max()
    return drop / top if top > 0 else drop
