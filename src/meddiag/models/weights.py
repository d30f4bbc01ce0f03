"""Initial weights for a registered network: from a file, a URL, another meddiag run, or published weights.

``--init-weights`` takes

- a weights file: ``.pt``/``.pth``/``.bin`` (a state dict, or a dict holding one under ``state_dict``,
  ``model`` or ``module``), ``.safetensors``, a Lightning ``.ckpt``, a meddiag checkpoint;
- a meddiag run folder (its ``checkpoints/best.ckpt``) or a ``meddiag pretrain`` folder (its ``weights.pt``);
- an ``http(s)://`` URL, downloaded once into ``$MEDDIAG_CACHE/weights`` (default ``~/.cache/meddiag``)
  with a progress bar; ``URL#sha256=<hex>`` (the whole digest, or its first 8+ digits) is verified and a
  mismatch refused.

``--pretrained NAME`` takes the published weights of :data:`PUBLISHED` (the URLs MONAI's own
``pretrained=True`` fetches: torchvision's ImageNet weights for 2D ResNets and DenseNet, the
EfficientNet-PyTorch ImageNet weights, Tencent's MedicalNet for 3D ResNets), fetched the same way.
``MEDDIAG_WEIGHTS_MIRROR=https://host/path`` fetches them from a mirror holding the same file names
(a hospital's proxy, or a test's local server).

Loading only ever unpickles tensors and plain containers (``torch.load(weights_only=True)``): a
file that would run code is refused. Then the keys are mapped onto the network:

1. wrapper prefixes are stripped: ``module.`` (DataParallel, MedicalNet), ``model.`` (Lightning,
   meddiag), ``net.``, ``backbone.``, ``encoder.``, ``_orig_mod.`` (torch.compile), ``image.``
   (a meddiag model fused with patient data);
2. torchvision's DenseNet names are renamed to MONAI's (ResNet, MedicalNet and EfficientNet-PyTorch
   names are MONAI's already);
3. the first convolution is adapted to the input's channels: 3 -> 1 by **summing** the colour
   kernels (a grayscale image then gets exactly the response its 3-channel copy got), 1 -> 3 by
   **averaging** (each channel gets a third of the kernel, so a grayscale image copied into three
   channels again gets the original response); a kernel of another size (ImageNet's 7x7 stem on
   meddiag's 3x3 small-image stem) is resized bilinearly, its sum kept;
4. with ``inflate``, 2D kernels are inflated into 3D ones (I3D: repeated along depth, divided by it);
5. the head (the final linear layer) is left at its fresh initialisation whenever its shape differs
   (another class count) — a source's own classifier is never forced onto the task.

Another meddiag run's out-of-distribution reference (its ``ood.*`` tensors) is set aside: it describes
that run's data, and the new run fits its own. The :class:`LoadReport` says which tensors were loaded,
adapted, left missing (kept at initialisation) or unexpected (in the file, unused), and notes what the
network becomes when the weights were made at another image size (a small-image stem); a load that fills less than :data:`MIN_BACKBONE_FRACTION` of the
backbone's tensors is refused with it, unless ``allow_partial``.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meddiag.errors import ConfigError, ModelError
from meddiag.models.registry import ModelEntry

MIN_BACKBONE_FRACTION = 0.9
WRAPPER_PREFIXES = ("module.", "model.", "net.", "backbone.", "encoder.", "_orig_mod.", "image.")
PRETRAIN_META = "meddiag_pretrain"  # the entry of a ``meddiag pretrain`` weights file describing it
_STATE_KEYS = ("state_dict", "model", "module", "weights")


class WeightsError(ModelError):
    """Initial weights that cannot be found, read, verified or fitted to the network."""


@dataclass(frozen=True)
class PublishedWeights:
    name: str  # what --pretrained takes
    model: str
    spatial_dims: int
    url: str
    sha256: str  # whole digest or a prefix ('' when its publisher gives none)
    description: str
    model_kwargs: dict = field(default_factory=dict)  # architecture options the weights need
    in_channels: int = 3


PUBLISHED: tuple[PublishedWeights, ...] = (
    PublishedWeights("imagenet", "resnet18", 2, "https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd",
                     "torchvision ResNet-18, ImageNet-1k (IMAGENET1K_V1)", {}),
    PublishedWeights("imagenet", "resnet50", 2, "https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61",
                     "torchvision ResNet-50, ImageNet-1k (IMAGENET1K_V1)", {}),
    PublishedWeights("imagenet", "densenet121", 2, "https://download.pytorch.org/models/densenet121-a639ec97.pth", "a639ec97",
                     "torchvision DenseNet-121, ImageNet-1k (the weights MONAI's DenseNet121(pretrained=True) loads)", {}),
    PublishedWeights("imagenet", "efficientnet_b0", 2,
                     "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth", "",
                     "EfficientNet-PyTorch B0, ImageNet-1k (the weights MONAI's EfficientNetBN(pretrained=True) loads)", {}),
    PublishedWeights("medicalnet", "resnet18", 3,
                     "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet18/resolve/main/resnet_18_23dataset.pth", "",
                     "MedicalNet ResNet-18 (Chen et al. 2019, 23 CT/MR data sets; MONAI's resnet18(pretrained=True))",
                     {"shortcut": "A"}, in_channels=1),
    PublishedWeights("medicalnet", "resnet50", 3,
                     "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet50/resolve/main/resnet_50_23dataset.pth", "",
                     "MedicalNet ResNet-50 (Chen et al. 2019, 23 CT/MR data sets; MONAI's resnet50(pretrained=True))",
                     {"downsample_bias": False}, in_channels=1),
)


def published_weights(name: str, model: str, spatial_dims: int) -> PublishedWeights:
    """The published weights ``name`` for ``model`` in ``spatial_dims``; :class:`ConfigError` listing what exists."""
    for entry in PUBLISHED:
        if entry.name == name.lower() and entry.model == model and entry.spatial_dims == spatial_dims:
            return entry
    offered = ", ".join(f"{e.name} ({e.model} {e.spatial_dims}D)" for e in PUBLISHED)
    raise ConfigError(f"no published '{name}' weights for {model} in {spatial_dims}D; published weights: {offered}. "
                      "Any other weights file or URL goes to --init-weights")


@dataclass
class WeightsFile:
    """Where initial weights came from and the local file holding them."""

    source: str  # as the user gave it (a URL without its checksum fragment)
    kind: str  # file, url, run, pretrain or published
    path: Path
    sha256: str = ""  # of the file as read

    def record(self) -> dict:
        return {"source": self.source, "kind": self.kind, "file": str(self.path), "sha256": self.sha256}


def cache_dir() -> Path:
    from meddiag.data.cache import cache_root

    return cache_root() / "weights"


def resolve_weights(spec: str, *, progress: bool = True) -> WeightsFile:
    """The local weights file that ``spec`` (a file, a run or pretraining folder, or a URL) names;
    URLs are downloaded into :func:`cache_dir` first. :class:`WeightsError` naming ``spec`` otherwise."""
    from meddiag.data.download import file_digest

    if re.match(r"^https?://", spec, flags=re.I):
        found = fetch_url(spec, progress=progress)
    else:
        found = _local_weights(Path(spec).expanduser())
    if not found.sha256:
        found.sha256 = file_digest(found.path, "sha256")
    return found


def _local_weights(path: Path) -> WeightsFile:
    from meddiag.runfolder import RunFolder

    if path.is_dir():
        run = RunFolder(path)
        if run.model_checkpoint.is_file():
            return WeightsFile(str(path), "run", run.model_checkpoint)
        if run.pretrained_weights.is_file():
            return WeightsFile(str(path), "pretrain", run.pretrained_weights)
        raise WeightsError(f"{path} is a folder but neither a meddiag run (no {run.model_checkpoint.relative_to(path)}) "
                           f"nor a 'meddiag pretrain' folder (no {run.pretrained_weights.name}): did its training finish an epoch?")
    if path.is_file():
        return WeightsFile(str(path), "file", path)
    raise WeightsError(f"initial weights {path}: no such file or folder (give a weights file, a run folder or an http(s) URL)")


def fetch_url(spec: str, *, progress: bool = True, expected: str | None = None) -> WeightsFile:
    """Download ``spec`` (``URL`` or ``URL#sha256=<hex>``) into the cache once; a cached file is reused
    after its checksum (when one is given) is verified again."""
    from meddiag.data.download import checksum_matches, download_file, file_digest

    url, _, fragment = spec.partition("#")
    if fragment:
        match = re.fullmatch(r"sha256=([0-9a-fA-F]{8,64})", fragment.strip())
        if not match:
            raise WeightsError(f"{spec}: the part after '#' must be sha256=<hex digest> (8 to 64 hex digits), not {fragment!r}")
        expected = match.group(1).lower()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "weights"
    dest = cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if dest.is_file():
        digest = file_digest(dest, "sha256")
        if expected is None or checksum_matches(expected, digest):
            return WeightsFile(url, "url", dest, digest)
        dest.unlink()  # a stale or damaged copy: fetch it again
    download_file(url, dest, sha256=expected, progress=progress)
    return WeightsFile(url, "url", dest)


def fetch_published(entry: PublishedWeights, *, progress: bool = True) -> WeightsFile:
    """Published weights from their URL, or from ``$MEDDIAG_WEIGHTS_MIRROR`` (the same file name under it)."""
    mirror = os.environ.get("MEDDIAG_WEIGHTS_MIRROR", "").strip()
    url = f"{mirror.rstrip('/')}/{entry.url.rsplit('/', 1)[-1]}" if mirror else entry.url
    found = fetch_url(url, progress=progress, expected=entry.sha256 or None)
    return WeightsFile(f"{entry.name}: {entry.description}", "published", found.path, found.sha256)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a weights file, and its meddiag description (a pretraining or model card; {} if none).

    Nested containers are unwrapped (``state_dict``, ``model``, ``module``); entries that are not
    tensors are ignored. :class:`WeightsError` naming the file when it cannot be read safely."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a declared dependency
            raise WeightsError("reading .safetensors files needs the safetensors package: pip install safetensors") from None
        try:
            return dict(load_file(str(path), device="cpu")), {}
        except Exception as exc:  # noqa: BLE001 - a damaged file of any kind
            raise WeightsError(f"cannot read {path} as safetensors: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise WeightsError(f"{path} holds Python objects beyond tensors, which could run code when loaded; meddiag "
                               "only loads weights files of tensors (save it with torch.save(model.state_dict(), ...))") from None
        raise WeightsError(f"cannot read weights file {path}: {exc.__class__.__name__}: {first}") from None
    from meddiag.models.checkpoint import META_KEY

    meta: dict = {}
    for _ in range(3):  # unwrap {"state_dict": {...}}, {"model": {"state_dict": ...}}...
        if not isinstance(obj, dict):
            break
        for key in (PRETRAIN_META, META_KEY):
            if isinstance(obj.get(key), dict):
                meta = obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):  # a state dict already
            break
        inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} holds no named tensors (keys: {', '.join(map(str, list(obj)[:6]))})")
    return tensors, meta


def strip_wrappers(state: dict[str, torch.Tensor], target: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with wrapper prefixes removed (of :data:`WRAPPER_PREFIXES`, one after another, each only
    when it makes more names match ``target``'s), and the prefixes removed."""
    def matches(candidate: dict[str, torch.Tensor]) -> int:
        return len(set(rename_to_monai(candidate, target)[0]) & target)

    stripped: list[str] = []
    while True:
        best, best_score = None, matches(state)
        for prefix in WRAPPER_PREFIXES:
            if not any(k.startswith(prefix) for k in state):
                continue
            candidate = {k: v for k, v in state.items() if not k.startswith(prefix)}
            candidate.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            score = matches(candidate)
            if score > best_score:
                best, best_score = (prefix, candidate), score
        if best is None:
            return state, stripped
        stripped.append(best[0])
        state = best[1]


_DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def rename_to_monai(state: dict[str, torch.Tensor], target: set[str]) -> tuple[dict[str, torch.Tensor], int]:
    """torchvision DenseNet names onto MONAI's (``denselayer1.norm1`` / ``norm.1`` -> ``denselayer1.layers.norm1``,
    ``classifier`` -> ``class_layers.out``); a key is renamed only when the new name is one of ``target``'s."""
    out, renamed = {}, 0
    for key, value in state.items():
        new = key
        match = _DENSE_LAYER.match(key)
        if match:
            new = f"{match.group(1)}.layers.{match.group(2)}{match.group(3)}.{match.group(4)}"
        elif key.startswith("classifier."):
            new = "class_layers.out." + key[len("classifier."):]
        if new != key and new in target:
            out[new], renamed = value, renamed + 1
        else:
            out[key] = value
    return out, renamed


@dataclass
class LoadReport:
    """What an initial-weights load did, tensor by tensor (batch-norm counters are not counted)."""

    source: dict
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacked: kept at initialisation
    mismatched: dict[str, str] = field(default_factory=dict)  # backbone tensors of another shape: kept at initialisation
    unexpected: list[str] = field(default_factory=list)  # tensors of the file the network has no place for
    head: list[str] = field(default_factory=list)  # the head's tensors, freshly initialised
    head_loaded: bool = False  # the source's head fitted (same class count) and was loaded
    prefixes_stripped: list[str] = field(default_factory=list)
    renamed: int = 0
    backbone_total: int = 0
    notes: list[str] = field(default_factory=list)
    backbone_parameters: list[str] = field(default_factory=list)  # names (in the whole model) of the parameters filled

    @property
    def fraction(self) -> float:
        """The share of the backbone's tensors that were loaded or adapted."""
        return (len(self.loaded) + len(self.adapted)) / max(1, self.backbone_total)

    def to_dict(self) -> dict:
        return {"source": self.source, "backbone_fraction": round(self.fraction, 4), "backbone_tensors": self.backbone_total,
                "loaded": self.loaded, "adapted": self.adapted, "missing": self.missing, "mismatched": self.mismatched,
                "unexpected": self.unexpected, "head": self.head, "head_loaded": self.head_loaded,
                "prefixes_stripped": self.prefixes_stripped, "renamed": self.renamed, "notes": self.notes,
                "backbone_parameters": self.backbone_parameters}

    def summary(self) -> dict:
        """The short form the model card keeps."""
        return {**self.source, "backbone_fraction": round(self.fraction, 4), "loaded": len(self.loaded),
                "adapted": self.adapted, "missing": len(self.missing) + len(self.mismatched), "unexpected": len(self.unexpected),
                "head": "loaded" if self.head_loaded else "new" if self.head else "none"}

    def text(self, limit: int = 6) -> str:
        """The report as a user reads it: one line of counts, then what was adapted, missing and unused."""
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

        where = self.source.get("source", "?")
        digest = self.source.get("sha256", "")
        lines = [f"initial weights {where}{f' (sha256 {digest[:12]})' if digest else ''}: "
                 f"{len(self.loaded) + len(self.adapted)} of {self.backbone_total} backbone tensors loaded ({self.fraction:.1%}), "
                 f"{len(self.adapted)} adapted, {len(self.missing) + len(self.mismatched)} missing, {len(self.unexpected)} unexpected; "
                 f"head: {'loaded' if self.head_loaded else 'new (' + some(self.head) + ')' if self.head else 'none'}"]
        for key, how in list(self.adapted.items())[:limit]:
            lines.append(f"  adapted   {key}: {how}")
        if self.missing:
            lines.append(f"  missing   (kept at initialisation): {some(self.missing)}")
        for key, how in list(self.mismatched.items())[:limit]:
            lines.append(f"  mismatch  {key}: {how} (kept at initialisation)")
        if self.unexpected:
            lines.append(f"  unexpected (in the file, unused): {some(self.unexpected)}")
        if self.prefixes_stripped or self.renamed:
            lines.append(f"  mapped    prefixes stripped: {', '.join(self.prefixes_stripped) or 'none'}; names renamed to MONAI's: {self.renamed}")
        lines += [f"  note      {n}" for n in self.notes]
        return "\n".join(lines)


def adapt_first_conv(weight: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str] | None:
    """The first convolution's kernel (O, I, *k) fitted to ``shape``: input channels summed (3 -> 1) or
    averaged (1 -> 3), kernel resized bilinearly with its sum kept; None when it cannot be."""
    if weight.ndim != len(shape) or weight.shape[0] != shape[0]:
        return None
    how = []
    w = weight.float()
    src_in, dst_in = w.shape[1], shape[1]
    if src_in != dst_in:
        if dst_in == 1:
            w, _ = w.sum(dim=1, keepdim=True), how.append(f"{src_in} -> 1 input channels (summed)")
        elif src_in == 1:
            w, _ = w.repeat(1, dst_in, *([1] * (w.ndim - 2))) / dst_in, how.append(f"1 -> {dst_in} input channels (averaged)")
        else:
            return None
    if tuple(w.shape[2:]) != tuple(shape[2:]):
        if w.ndim not in (4, 5):
            return None
        total = w.sum(dim=tuple(range(2, w.ndim)), keepdim=True)
        mode = "bilinear" if w.ndim == 4 else "trilinear"
        resized = F.interpolate(w, size=tuple(shape[2:]), mode=mode, align_corners=False)
        new_total = resized.sum(dim=tuple(range(2, w.ndim)), keepdim=True)
        w = resized * torch.where(new_total.abs() > 1e-12, total / new_total, torch.ones_like(total))
        how.append(f"kernel {'x'.join(map(str, weight.shape[2:]))} -> {'x'.join(map(str, shape[2:]))} (resized, sum kept)")
    return w.to(weight.dtype), "; ".join(how)


def inflate_kernel(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A 2D kernel (O, I, kh, kw) inflated to the 3D ``shape`` (O, I, kd, kh', kw'): repeated kd times along
    depth and divided by kd, so a volume of identical slices gets the 2D response (Carreira & Zisserman 2017)."""
    if weight.ndim != 4 or len(shape) != 5 or tuple(weight.shape[:2]) != tuple(shape[:2]):
        return None
    w = weight.float()
    if tuple(w.shape[2:]) != tuple(shape[3:]):
        w = F.interpolate(w, size=tuple(shape[3:]), mode="bilinear", align_corners=False)
    depth = shape[2]
    return (w.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth).to(weight.dtype)


def load_into(net: nn.Module, head: str, state: dict[str, torch.Tensor], source: dict, *, inflate: bool = False,
              prefix: str = "") -> LoadReport:
    """Fill the network ``net`` (whose final linear layer is ``head``) from ``state`` as far as it fits, and
    say how in a :class:`LoadReport`. ``prefix``: the name of ``net`` inside the whole model (for
    ``backbone_parameters``). The network is changed in place; nothing is refused here."""
    target = net.state_dict()
    state, stripped = strip_wrappers(dict(state), set(target))
    state, renamed = rename_to_monai(state, set(target))
    report = LoadReport(source=source, prefixes_stripped=stripped, renamed=renamed)
    head_prefix = f"{head}." if head else None
    first_conv = next((k for k, v in target.items() if k.endswith("weight") and v.ndim >= 4), None)
    new_state = dict(target)
    used: set[str] = set()
    filled: set[str] = set()
    head_keys = [k for k in target if head_prefix and k.startswith(head_prefix)]
    for key, value in target.items():
        counter = key.endswith("num_batches_tracked")
        in_head = key in head_keys
        if not counter and not in_head:
            report.backbone_total += 1
        if key not in state:
            if not counter and not in_head:
                report.missing.append(key)
            continue
        used.add(key)
        src = state[key]
        if counter:
            new_state[key] = src.to(value.dtype).reshape(value.shape) if src.numel() == value.numel() else value
            continue
        if src.shape == value.shape:
            new_state[key] = src.to(value.dtype)
            filled.add(key)
            if not in_head:
                report.loaded.append(key)
            continue
        if in_head:
            continue  # another class count: the head stays new
        fitted = None
        if key == first_conv and src.ndim == value.ndim:
            fitted = adapt_first_conv(src, value.shape)
        elif inflate and src.ndim == 4 and value.ndim == 5:
            kernel = inflate_kernel(src, value.shape)
            fitted = (kernel, f"2D {'x'.join(map(str, src.shape[2:]))} -> 3D {'x'.join(map(str, value.shape[2:]))} (inflated)") if kernel is not None else None
        if fitted is not None:
            new_state[key] = fitted[0].to(value.dtype)
            report.adapted[key] = fitted[1]
            filled.add(key)
        else:
            report.mismatched[key] = f"file {tuple(src.shape)}, network {tuple(value.shape)}"
    if inflate and first_conv and first_conv in report.mismatched and state.get(first_conv) is not None:
        # the stem needs both inflation and a channel change: inflate, then adapt the channels
        src, value = state[first_conv], target[first_conv]
        shape3 = torch.Size((value.shape[0], src.shape[1], *value.shape[2:]))
        kernel = inflate_kernel(src, shape3)
        fitted = adapt_first_conv(kernel, value.shape) if kernel is not None else None
        if fitted is not None:
            new_state[first_conv] = fitted[0].to(value.dtype)
            report.adapted[first_conv] = f"2D -> 3D (inflated); {fitted[1]}".rstrip("; ")
            filled.add(first_conv)
            del report.mismatched[first_conv]
    for key in list(report.missing):
        # a layer the file has without a bias (torchvision's shortcut convolutions; MONAI's have one): zero is its bias
        weight = key[: -len("bias")] + "weight"
        if key.endswith(".bias") and weight in filled:
            new_state[key] = torch.zeros_like(target[key])
            report.missing.remove(key)
            report.adapted[key] = "absent from the file (a layer without bias there): zero"
            filled.add(key)
    report.head = [k for k in head_keys if not k.endswith("num_batches_tracked")]
    report.head_loaded = bool(report.head) and all(k in filled for k in report.head)
    if report.head_loaded:
        report.head = []
    report.unexpected = sorted(set(state) - used)
    net.load_state_dict(new_state)
    params = {name for name, _ in net.named_parameters()}
    report.backbone_parameters = sorted(prefix + k for k in filled if k in params and k not in head_keys)
    return report


def check_report(report: LoadReport, allow_partial: bool) -> None:
    """:class:`WeightsError` with the report when less than :data:`MIN_BACKBONE_FRACTION` of the backbone was filled."""
    if report.fraction >= MIN_BACKBONE_FRACTION:
        return
    if allow_partial:
        warnings.warn(f"only {report.fraction:.1%} of the backbone's tensors came from the initial weights (--allow-partial)", stacklevel=2)
        return
    hint = ""
    dims = [how for how in report.mismatched.values() if how.count(",", 0, how.index(")")) != how.count(",", how.index("network"))]
    if dims:
        hint = " The kernels have another number of dimensions: are these 2D weights for a 3D network (2D vs 3D: --inflate)?"
    elif any(k.endswith("downsample.0.weight") for k in report.missing) and all("downsample" in k for k in report.missing):
        hint = (" The file has no shortcut (downsample) convolutions: MedicalNet's ResNet-18 has parameter-free shortcuts, "
                "so use --pretrained medicalnet, or set model_kwargs: {shortcut: A} in a --config file.")
    elif report.mismatched and not report.loaded:
        hint = " The shapes differ throughout: are these weights of another architecture?"
    elif len(report.missing) > len(report.loaded):
        hint = " Most names are absent from the file: are these weights of another architecture?"
    raise WeightsError(f"refused: the initial weights fill only {report.fraction:.1%} of the backbone (at least "
                       f"{MIN_BACKBONE_FRACTION:.0%} is required; --allow-partial loads them anyway).{hint}\n{report.text()}")


def kept_stem(weights: WeightsFile, model_name: str, spatial_dims: int, image_size: int) -> str | None:
    """The stem (``small`` or ``strided``) a network of ``model_name`` at ``image_size`` must have to keep the
    one the weights were learned with, when its automatic choice would differ; None when it would not, or
    when the file does not say (weights from outside meddiag: ImageNet's 7x7 stem is resized instead).

    A meddiag model trained at 128 px and fine-tuned at 64 px would otherwise switch to the small-image stem
    and its later layers see the image at another scale: on PneumoniaMNIST (200 images, 64 px) from a 128 px
    chest X-ray model, test AUC 0.948 with the switched stem and 0.957 with the source's, against 0.952 from
    scratch (3 seeds; docs/benchmarks.md)."""
    from meddiag.models import monai_nets
    from meddiag.models.registry import get_entry, model_options

    if "stem" not in model_options(model_name) or get_entry(model_name).builder.__module__ != monai_nets.__name__:
        return None
    _, meta = read_state_dict(weights.path)
    source_size = meta.get("image_size")
    if not isinstance(source_size, int) or meta.get("spatial_dims", 2) != spatial_dims:
        return None
    source_small = monai_nets.cifar_stem(spatial_dims, source_size, (meta.get("model_kwargs") or {}).get("stem", "auto"))
    if source_small == monai_nets.cifar_stem(spatial_dims, image_size):
        return None
    return "small" if source_small else "strided"


def initialise(model: nn.Module, model_name: str, weights: WeightsFile, *, allow_partial: bool = False,
               inflate: bool = False, image_size: int | None = None, model_kwargs: dict | None = None) -> LoadReport:
    """Load ``weights`` into the image network of ``model`` (a registered network, or one fused with patient
    data), refusing a partial load as :func:`check_report` says. Returns the report."""
    from meddiag.models.checkpoint import OOD_PREFIX
    from meddiag.models.fusion import image_part
    from meddiag.models.registry import get_entry

    state, meta = read_state_dict(weights.path)
    net, prefix = image_part(model)
    entry = get_entry(model_name)
    head = entry.head if _has_module(net, entry.head) else ""
    pre = meta if meta.get("method") else {}
    # another meddiag run's out-of-distribution reference describes that run's data, not weights to learn from
    ood = [k for k in state if not pre and meta and k.startswith(OOD_PREFIX)]
    state = {k: v for k, v in state.items() if k not in ood}
    report = load_into(net, head, state, weights.record(), inflate=inflate, prefix=prefix)
    if ood:
        report.notes.append(f"the source run's out-of-distribution reference ({len(ood)} tensor{'s' if len(ood) != 1 else ''}) is not carried over: "
                            "this run fits its own")
    if pre:
        report.source["pretraining"] = {k: pre.get(k) for k in ("method", "model", "epochs", "images", "image_size", "data")}
        if pre.get("epochs_before"):  # a pretraining continued from another: the epochs of both
            report.source["pretraining"]["epochs_before"] = pre["epochs_before"]
    source_model, source_size = (pre.get("model"), pre.get("image_size")) if pre else (meta.get("model_name"), meta.get("image_size"))
    done = "pretrained" if pre else "trained"
    if source_model and source_model != model_name:
        report.notes.append(f"{done} as {source_model}, loaded into {model_name}")
    if image_size is not None and source_size not in (None, image_size):
        report.notes.append(f"{done} at {source_size} px, trained here at {image_size} px{_stem_note(entry, meta, source_size, image_size, model_kwargs or {})}")
    check_report(report, allow_partial)
    return report


def _stem_note(entry: ModelEntry, meta: dict, source_size: int, image_size: int, model_kwargs: dict) -> str:
    """What the change of image size did to the stem of one of MONAI's networks, which keeps small 2D images
    at full resolution (see :func:`meddiag.models.monai_nets.cifar_stem`); '' when it has the source's stem."""
    from meddiag.models import monai_nets

    if entry.builder.__module__ != monai_nets.__name__:
        return ""
    dims = meta.get("spatial_dims", 2)
    stems = {False: "a strided stem that downsamples the image", True: "the small-image stem (stride 1, no downsampling)"}
    before = monai_nets.cifar_stem(dims, source_size, (meta.get("model_kwargs") or {}).get("stem", "auto"))
    after = monai_nets.cifar_stem(dims, image_size, model_kwargs.get("stem", "auto"))
    if before == after:
        return f"; the network keeps the source's stem, {stems[after]}" if monai_nets.cifar_stem(dims, image_size) != after else ""
    return (f"; at this size the network has {stems[after]}, where the source had {stems[before]}: the later "
            "layers see the image at another scale than they learned it on")


def _has_module(net: nn.Module, name: str) -> bool:
    if not name:
        return False
    try:
        return not isinstance(net.get_submodule(name), nn.Identity)
    except AttributeError:
        return False
