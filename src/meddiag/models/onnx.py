"""ONNX export and an ONNX Runtime model that stands in for the PyTorch network.

``export_onnx`` writes one self-contained ``.onnx`` file (weights inside, dynamic batch size): the
network from normalised float32 input to logits, exactly as PyTorch computes it. The model card
(classes, input size, normalisation, threshold, temperature...) travels in the file's metadata
(``meddiag_card``) and beside it as ``<name>.json``, so the file alone is enough to use it. A
fingerprint of the weights (``meddiag_weights_sha256``) tells whether an export is stale.

:class:`OnnxModel` wraps an ONNX Runtime session as a ``torch.nn.Module`` that maps float32
tensors to logits, so prediction, temperature scaling and test-time augmentation run through the
same code for both backends. Only MC-dropout needs PyTorch (dropout is frozen in the export).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meddiag.errors import ModelError
from meddiag.models.checkpoint import ModelCard
from meddiag.models.fusion import call
from meddiag.models.ood import WithFeatures, supports_features
from meddiag.models.registry import get_entry

CARD_KEY = "meddiag_card"
WEIGHTS_KEY = "meddiag_weights_sha256"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
FEATURES_NAME = "features"  # networks with a final linear layer: its (N, D) input too, for the OOD score (meddiag.models.ood)
COVARIATES_NAME = "covariates"  # models with covariates: the second input, (N, F) float32 as the card's schema encodes
TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference an export may have


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_onnx(model: nn.Module, card: ModelCard, path: str | Path, check: bool = True) -> Path:
    """Write ``model`` to ``path`` as a single ONNX file with a dynamic batch dimension, and its
    card to ``path.with_suffix('.json')``. With ``check`` (default), ONNX Runtime's logits on a few
    random inputs must agree with PyTorch's within :data:`TOLERANCE`, else :class:`ModelError`."""
    import onnx

    if card.mc_dropout:
        warnings.warn("the ONNX export freezes dropout: its predictions are the model's plain ones, without "
                      "the card's MC-dropout passes", stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _exportable(model)
    graph: nn.Module = net
    outputs = [OUTPUT_NAME]
    if supports_features(card.model_name):
        graph = WithFeatures(net, get_entry(card.model_name).head).eval()
        outputs.append(FEATURES_NAME)
    spatial = (card.image_size,) * card.spatial_dims
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, card.in_channels, *spatial),)
    names = [INPUT_NAME]
    if card.covariates is not None:
        example += (torch.zeros(2, card.covariates.n_features),)
        names.append(COVARIATES_NAME)
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(graph, example, dynamo=True, input_names=names, output_names=outputs,
                                    dynamic_shapes=tuple({0: batch} for _ in example), verbose=False)
    proto = program.model_proto
    for key, value in ((CARD_KEY, card.model_dump_json()), (WEIGHTS_KEY, weights_fingerprint(net))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "meddiag"
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(card.model_dump(), indent=2))
    if check:
        check_export(net, card, path)
    return path


def check_export(model: nn.Module, card: ModelCard, path: Path, n: int = 3) -> float:
    """Largest |ONNX Runtime - PyTorch| difference of the logits (and of the features, where the export has
    them) on ``n`` random inputs in the model's input range; raises :class:`ModelError` above :data:`TOLERANCE`."""
    onnx_model, _ = load_onnx(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, card.in_channels, *(card.image_size,) * card.spatial_dims, generator=g)
    c = torch.randn(n, card.covariates.n_features, generator=g) if card.covariates is not None else None
    with torch.inference_mode():
        diff = float((call(onnx_model, x, c) - call(model.float().eval(), x, c)).abs().max())
        if onnx_model.gives_features:
            split = WithFeatures(model.float().eval(), get_entry(card.model_name).head).eval()
            expected = split(x, c)[1] if split.takes_covariates else split(x)[1]
            scale = max(1.0, float(expected.abs().max()))  # features are not normalised: compare relative to their size
            diff = max(diff, float((onnx_model.with_features(x, c)[1] - expected).abs().max()) / scale)
    if not diff <= TOLERANCE:
        raise ModelError(f"{path}: ONNX Runtime's output differs from PyTorch's by {diff:.2e} (> {TOLERANCE:.0e})")
    return diff


class OnnxModel(nn.Module):
    """An ONNX Runtime session behaving as an eval-mode network: float32 (N, C, ...) -> logits; for a
    model with covariates ``forward(x, covariates=None)`` (None: the all-missing encoding)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise ModelError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        self.path = Path(path)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.takes_covariates = len(self.session.get_inputs()) > 1
        self.gives_features = len(self.session.get_outputs()) > 1  # exports made before meddiag exported features have one
        self.missing_row: np.ndarray | None = None
        if self.takes_covariates and CARD_KEY in self.metadata:
            schema = ModelCard.model_validate_json(self.metadata[CARD_KEY]).covariates
            self.missing_row = schema.missing_row() if schema is not None else None

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, covariates)[0]

    def with_features(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of one pass, as :class:`~meddiag.models.ood.WithFeatures` gives them
        (only for an export with :data:`FEATURES_NAME`; see ``gives_features``)."""
        logits, features = self._run(x, covariates)
        return logits, features.flatten(1)

    def _run(self, x: torch.Tensor, covariates: torch.Tensor | None) -> list[torch.Tensor]:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        feeds = {self.input_name: array}
        if self.takes_covariates:
            if covariates is None:
                if self.missing_row is None:
                    raise ModelError(f"{self.path} takes covariates, and its card does not say how to encode missing ones")
                c = np.repeat(self.missing_row[None], len(array), axis=0)
            else:
                c = covariates.detach().cpu().float().numpy()
            feeds[COVARIATES_NAME] = np.ascontiguousarray(c, dtype=np.float32)
        return [torch.from_numpy(out) for out in self.session.run(None, feeds)]


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxModel, ModelCard]:
    """An exported model and its card (from the file's own metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} does not exist")
    model = OnnxModel(path, threads)
    if CARD_KEY not in model.metadata:
        raise ModelError(f"{path} is not a meddiag ONNX export (it has no model card in its metadata)")
    return model, ModelCard.model_validate_json(model.metadata[CARD_KEY])


def _exportable(model: nn.Module) -> nn.Module:
    return model.float().eval().cpu()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a line per unavailable torchvision operator and warns about its internals."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
