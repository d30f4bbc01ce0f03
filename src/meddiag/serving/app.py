"""``meddiag serve``: the REST API and the web page, as a FastAPI application.

Routes: ``POST /v1/predict`` (multipart ``files``; ``?explain=gradcam`` adds heatmaps),
``GET /v1/model`` (the model card), ``GET /v1/drift`` (the shift of the last inputs from the model's
validation data), ``GET /healthz``, ``GET /readyz``, ``GET /`` (the page),
``GET /docs`` (interactive API docs, served locally) and ``GET /openapi.json``.

Safe by default: with a token every ``/v1`` route needs ``Authorization: Bearer <token>``; request
bodies over the upload limit get 413 before they are read in full; a file's type is read from its
content and it is stored under a server-chosen name and deleted at once; images declaring more
pixels than the limit are refused before decoding; no file name, header value or image content is
ever logged. Responses carry no DICOM header values: only the object's UIDs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.concurrency import run_in_threadpool

import meddiag
from meddiag.data.covariates import PatientData
from meddiag.errors import DataError, ImageReadError, WrongKindError, failure_reason
from meddiag.explain.render import overlay_image, volume_figure
from meddiag.explain.covariates import covariate_attributions
from meddiag.explain.saliency import METHODS, explained_classes, method_label, model_input, saliency_maps
from meddiag.models.inputs import ModelInput
from meddiag.models.checkpoint import load_ood_state
from meddiag.models.ood import ShiftReference
from meddiag.runfolder import METRICS, REPORT_JSON, RunFolder
from meddiag.serving.batching import MicroBatcher
from meddiag.serving.drift import ShiftMonitor
from meddiag.serving.predictor import Prediction, Predictor, stacked_covariates
from meddiag.serving.uploads import KINDS, SUPPORTED, VOLUME_KINDS, UnsupportedUpload, display_name, sniff, stored_upload

log = logging.getLogger("meddiag.serve")
MB = 1024 * 1024


@dataclass
class ServeOptions:
    token: str | None = None  # None: no authentication (only sensible on 127.0.0.1)
    max_upload_mb: float = 50.0  # per request; larger bodies get 413
    max_pixels: int = 100_000_000  # per file (voxels for volumes), checked on the header before decoding
    max_files: int = 64  # per request
    max_batch: int = 32  # micro-batching: most images in one forward pass (1: no batching)
    batch_wait_ms: float = 5.0  # micro-batching: longest wait for more requests to join a pass
    overlay_size: int = 512  # longest side of returned PNGs
    drift_window: int = 200  # GET /v1/drift tests the last this many inputs for shift (0: off)


class UploadProblem(Exception):
    """One uploaded file cannot be diagnosed: ``status`` 415 (not a format or dimension this model
    reads) or 400 (corrupt, unreadable or refused)."""

    def __init__(self, status: int, index: int, name: str, reason: str) -> None:
        self.status, self.index, self.name, self.reason = status, index, name, reason
        super().__init__(f"file {index} ({name}): {reason}")


def create_app(predictor: Predictor, run: str | Path | None = None, options: ServeOptions | None = None) -> FastAPI:
    """The application serving ``predictor``; ``run`` (its run folder) adds the training data and
    test metrics to the model card."""
    opts = options or ServeOptions()
    predictor.max_pixels = opts.max_pixels
    card = predictor.card
    model_card = describe_model(predictor, Path(run) if run else None)
    def run_model(arrays: np.ndarray, covariates: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return predictor.predict_distribution(torch.from_numpy(arrays), torch.from_numpy(covariates) if covariates is not None else None)

    batcher = MicroBatcher(run_model, opts.max_batch, opts.batch_wait_ms / 1000)
    state = {"ready": False}
    monitor = _shift_monitor(predictor, opts.drift_window)
    model_card["drift"] = {"window": monitor.window, "route": "/v1/drift"} if monitor else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        dummy = np.zeros((1, card.in_channels, *(card.image_size,) * card.spatial_dims), np.uint8)
        await batcher.submit(dummy, *([card.covariates.missing_row()[None]] if card.covariates else []))  # warm-up: the first pass pays one-off costs, not a user
        batcher.stats.__init__()
        state["ready"] = True
        log.info("model %s ready (%s backend)", card.model_name, predictor.backend)
        yield
        state["ready"] = False
        await batcher.close()

    app = FastAPI(title="meddiag", version=meddiag.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Computer-aided diagnosis: class probabilities, uncertainty and heatmaps for medical images. "
                              "A decision aid for qualified readers, not a diagnosis on its own.")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=int(opts.max_upload_mb * MB))
    bearer = HTTPBearer(auto_error=False, description="the token given to `meddiag serve --token`")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if opts.token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), opts.token.encode()):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    # what a later stage (meddiag.pacs: DICOM results) needs to add routes of its own to this service
    app.state.predictor, app.state.authorised, app.state.options = predictor, authorised, opts

    @app.exception_handler(UploadProblem)
    async def _upload_problem(request: Request, exc: UploadProblem) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "index": exc.index, "file": exc.name, "reason": exc.reason}, exc.status)

    @app.get("/healthz", tags=["service"], summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], summary="The model is loaded and warmed up")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": "ready" if state["ready"] else "starting"}, 200 if state["ready"] else 503)

    @app.get("/v1/model", tags=["model"], summary="The model card", dependencies=[Depends(authorised)])
    async def model() -> dict:
        return {**model_card, "batching": batcher.stats.as_dict()}

    @app.get("/v1/drift", tags=["model"], summary="Shift of the latest inputs from the model's validation data",
             dependencies=[Depends(authorised)], responses={404: {"description": "the model has no shift reference"}})
    async def drift() -> dict:
        if monitor is None:
            raise HTTPException(404, "this model has no shift reference (or the server runs with --drift-window 0): "
                                     "`meddiag calibrate-ood RUN` makes one")
        return await asyncio.get_running_loop().run_in_executor(batcher.executor, monitor.status)

    @app.post("/v1/predict", tags=["model"], summary="Diagnose one or more images", dependencies=[Depends(authorised)],
              responses={400: {"description": "a corrupt, unreadable or refused file"},
                         401: {"description": "missing or wrong bearer token"},
                         413: {"description": "request larger than the upload limit"},
                         415: {"description": "not a format (or dimension) this model reads"}})
    async def predict(
        request: Request,
        files: list[UploadFile] = File(..., description=f"{SUPPORTED} files; for a 3D model, NIfTI or multi-frame DICOM"),
        explain: Literal["gradcam", "hirescam", "gradcampp", "occlusion"] | None = Query(
            None, description="add a heatmap of where the model looked (PNG, base64)"),
        image: bool = Query(False, description="add the image as the model read it (PNG, base64; 2D only)"),
        covariates: str | None = Form(None, description="models with covariates: the patients' data as JSON, an object for "
                                      "every file or a list with one per file (e.g. {\"age\": 63, \"sex\": \"female\"}); "
                                      "form fields named after a covariate (age=63) work too; all optional"),
    ) -> dict:
        start = time.perf_counter()
        if len(files) > opts.max_files:
            raise HTTPException(400, f"{len(files)} files in one request; the limit is {opts.max_files}")
        patients = await _request_covariates(request, card, len(files))
        uploads = [(i, display_name(f.filename, i), await f.read()) for i, f in enumerate(files)]
        items: list[tuple[int, str, ModelInput]] = []
        for index, name, data in uploads:
            for item in await run_in_threadpool(_read_upload, predictor, index, name, data):
                item.check(card)
                try:
                    item.covariates = predictor.case_covariates(patients[index] if patients else None, name)
                except DataError as exc:
                    raise UploadProblem(400, index, name, str(exc)) from None
                items.append((index, name, item))
        arrays = np.stack([it.array for _, _, it in items])
        covariates = stacked_covariates([it for _, _, it in items])
        dist = await batcher.submit(arrays, *([covariates.numpy()] if covariates is not None else []))
        predictions = predictor.predictions_from([it for _, _, it in items], dist)
        if monitor is not None:
            monitor.add(dist)
        results = [_result(index, name, p, card) for (index, name, _), p in zip(items, predictions)]
        if explain or image:
            pictures = await asyncio.get_running_loop().run_in_executor(
                batcher.executor, _pictures, predictor, [it for _, _, it in items], dist["mean"], explain, opts.overlay_size)
            for result, extra in zip(results, pictures):
                result.update(extra)
        log.info("predict: %d file(s), %d input(s), explain=%s, %.0f ms", len(uploads), len(items), explain or "none",
                 1000 * (time.perf_counter() - start))
        return {"model": card.model_name, "classes": card.class_names, "results": results}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static_text("index.html"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_static_text("docs.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return _swagger_asset(name)

    return app


def _shift_monitor(predictor: Predictor, window: int) -> ShiftMonitor | None:
    if window <= 0 or predictor.card.ood is None:
        return None
    reference = ShiftReference.from_state(load_ood_state(predictor.checkpoint))
    return ShiftMonitor(reference, predictor.card, window) if reference is not None else None


async def _request_covariates(request: Request, card: Any, n_files: int) -> list[PatientData] | None:
    """The patient data sent with the files, one per file (None: none sent, or an image-only model).

    Form fields named after the model's covariates (``age=63``, ``sex=female``) apply to every file; a
    ``covariates`` field holds JSON: an object (for every file) or a list of objects, one per file."""
    if card.covariates is None:
        return None
    form = await request.form()
    names = set(card.covariates.names)
    fields = {k.lower(): v for k, v in form.items() if isinstance(v, str) and k.lower() in names}
    given = form.get("covariates")
    per_file: list[dict] = [dict(fields) for _ in range(n_files)]
    if isinstance(given, str) and given.strip():
        try:
            parsed = json.loads(given)
        except ValueError as exc:
            raise HTTPException(400, f"the covariates field is not valid JSON: {exc}") from None
        if isinstance(parsed, dict):
            parsed = [parsed] * n_files
        if not isinstance(parsed, list) or len(parsed) != n_files or not all(isinstance(p, dict) for p in parsed):
            raise HTTPException(400, f"covariates must be a JSON object, or a list of {n_files} objects (one per file)")
        per_file = [{**fields, **{str(k).lower(): v for k, v in p.items()}} for p in parsed]
    unknown = sorted({k for p in per_file for k in p} - names)
    if unknown:
        raise HTTPException(400, f"unknown covariate(s) {', '.join(unknown[:10])}; this model knows {', '.join(sorted(names)[:30])}")
    return [PatientData.single(p, "the covariates sent") for p in per_file]


def _read_upload(predictor: Predictor, index: int, name: str, data: bytes) -> list[ModelInput]:
    """The model inputs of one uploaded file, or :class:`UploadProblem`."""
    if not data:
        raise UploadProblem(400, index, name, "the file is empty")
    try:
        kind = sniff(data[:1024])
    except UnsupportedUpload as exc:
        raise UploadProblem(415, index, name, str(exc)) from None
    volume_model = predictor.card.spatial_dims == 3
    if kind in VOLUME_KINDS and not volume_model:
        raise UploadProblem(415, index, name, "a NIfTI volume; this model diagnoses 2D images")
    if kind not in VOLUME_KINDS and kind != "dicom" and volume_model:
        raise UploadProblem(415, index, name, f"a 2D {KINDS[kind][1]} image; this model diagnoses volumes (NIfTI or multi-frame DICOM)")
    with stored_upload(data, kind) as path:
        try:
            return predictor.read(path)
        except ImageReadError as exc:
            raise UploadProblem(415 if isinstance(exc, WrongKindError) else 400, index, name, exc.reason) from None
        except Exception as exc:  # noqa: BLE001 - a bad upload is the client's 400, never the server's 500
            raise UploadProblem(400, index, name, failure_reason(exc, quote=kind != "dicom")) from None


def _result(index: int, name: str, p: Prediction, card: Any) -> dict:
    out: dict[str, Any] = {"index": index, "file": name, "prediction": p.predicted,
                           "probabilities": p.probabilities, "threshold": card.threshold,
                           "uncertainty": round(p.uncertainty, 6)}
    if p.spread is not None:
        out["spread"] = round(p.spread, 6)
    if p.abstain is not None:
        out["abstain"] = p.abstain
    if p.sop_instance_uid:
        out["sop_instance_uid"], out["series_instance_uid"] = p.sop_instance_uid, p.series_instance_uid
    if p.missing_covariates is not None:
        out["missing_covariates"] = p.missing_covariates
    out["ood"], out["ood_reason"] = p.ood, p.ood_reason
    if p.ood_score is not None:
        out["ood_score"] = p.ood_score
    return out


def _pictures(predictor: Predictor, items: list[ModelInput], probs: np.ndarray, method: str | None, size: int) -> list[dict]:
    """Per input: ``image_png`` (2D images: the image as read, DICOM windowed) and, when explaining,
    ``heatmap_png`` of the model's decision (``probs``: the predicted probabilities), base64 PNGs."""
    card, out = predictor.card, []
    for item, explained in zip(items, explained_classes(probs, card)):
        extra: dict[str, Any] = {}
        if item.original is not None:
            picture = Image.fromarray(item.original)
            picture.thumbnail((size, size), Image.Resampling.BILINEAR)
            extra["image_png"] = _png(np.asarray(picture))
        if method and card.model_name != "tabular":
            x = torch.tensor(item.array[None])
            covariates = torch.from_numpy(item.covariates[0][None]) if item.covariates is not None else None
            heat = saliency_maps(predictor.model, card, x, method, [explained], covariates=covariates)[0]
            extra["heatmap"] = {"method": method_label(method, card.model_name), "class": card.class_names[explained]}
            if covariates is not None:
                extra["covariate_attributions"] = covariate_attributions(predictor.model, card, model_input(x, card), covariates, explained)
            if item.original is not None:
                extra["heatmap_png"] = _png(overlay_image(item.original, heat, card.fit, max_side=size))
            else:
                buffer = io.BytesIO()
                volume_figure(item.array[0], heat, f"{extra['heatmap']['method']} of {card.class_names[explained]}", buffer)
                extra["heatmap_png"] = base64.b64encode(buffer.getvalue()).decode()
        out.append(extra)
    return out


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def describe_model(predictor: Predictor, run: Path | None) -> dict:
    """The model card as ``GET /v1/model`` returns it: what the model is, how it decides, what it
    was trained on and how it did on its test split (with 95% CIs), when the run folder has them."""
    c = predictor.card
    card: dict[str, Any] = {
        "name": c.model_name, "task": c.task, "classes": c.class_names,
        "positive_class": c.class_names[1] if c.task == "binary" else None,
        "input": {"size": c.image_size, "spatial_dims": c.spatial_dims, "channels": c.in_channels, "fit": c.fit,
                  "window": c.window, "volume_index": c.volume_index},
        "decision": {"threshold": c.threshold, "operating_point": c.operating_point or "fixed", "temperature": c.temperature,
                     "tta": c.tta, "mc_dropout": c.mc_dropout, "coverage": c.coverage, "abstain_threshold": c.abstain_threshold},
        "explain_methods": list(METHODS), "backend": predictor.backend, "meddiag_version": meddiag.__version__,
        "trained_with_meddiag": c.meddiag_version, "training_data": None, "test_metrics": None,
        "covariates": _covariate_fields(c),
        "ood": c.ood.model_dump() if c.ood else None,
        "intended_use": "decision support for qualified readers; not a stand-alone diagnosis",
    }
    if run is None or not run.is_dir():
        return card
    folder = RunFolder(run)
    data = _json(folder.data_record)
    if data:
        card["training_data"] = {"name": Path(str(data.get("name", ""))).name,
                                 "splits": {k: {"n_images": v.get("n_images"), "per_class": v.get("per_class")}
                                            for k, v in data.get("splits", {}).items()},
                                 "excluded_files": len(data.get("excluded", []))}
    metrics, report = _json(run / METRICS), _json(run / REPORT_JSON)
    if metrics:
        test = {k: metrics.get(k) for k in ("n_images", "auc", "auc_ci", "acc", "balanced_acc", "ci_method")}
        if report:
            test["per_class"] = report.get("discrimination", {}).get("per_class")
            test["at_threshold"] = {k: v.get("checkpoint") for k, v in (report.get("operating_points") or {}).items()}
            test["calibration"] = {k: v for k, v in (report.get("calibration") or {}).get("model", {}).items() if k != "bins"}
        card["test_metrics"] = test
    return card


def _covariate_fields(card: Any) -> dict | None:
    """What a client may send beside the image: each manifest covariate with its type and, for a
    category, the values the model knows; a joined table's columns are counted, not listed."""
    schema = card.covariates
    if schema is None:
        return None
    fields = [{"name": c.name, "type": "number", "median": c.median} for c in schema.numeric if c.block != schema.tabular_block]
    fields += [{"name": c.name, "type": "category", "levels": c.levels} for c in schema.categorical if c.block != schema.tabular_block]
    table = [n for n, b in schema.name_blocks() if b == schema.tabular_block] if schema.tabular_block else []
    return {"fields": fields, "fusion": card.fusion, "joined_table": {"columns": len(table), "key": schema.join} if table else None,
            "missing_values": schema.missing_values, "all_optional": True}


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _static_text(name: str) -> str:
    return resources.files("meddiag.serving").joinpath("static", name).read_text(encoding="utf-8")


SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}


def _swagger_asset(name: str) -> Response:
    """Swagger UI's script and style sheet, from the installed ``swagger-ui-py`` package: the docs
    page never needs the internet."""
    if name not in SWAGGER_ASSETS:
        raise HTTPException(404, "not found")
    try:
        import swagger_ui
    except ImportError:
        raise HTTPException(404, "the interactive docs need the swagger-ui-py package (pip install 'meddiag[serve]')") from None
    path = Path(swagger_ui.__file__).parent / "static" / name
    return Response(path.read_bytes(), media_type=SWAGGER_ASSETS[name], headers={"Cache-Control": "max-age=86400"})


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, whether it declares its length
    or streams it (chunked), before the rest of it is read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen, started = 0, False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        body = json.dumps({"detail": _TooLarge(self.max_bytes).detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException, so FastAPI's body parsing passes it on."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request larger than the upload limit of {max_bytes / MB:g} MB")
