"""DICOM results from the REST service: ``POST /v1/dicom-results`` takes DICOM files and answers their SR and
heatmap SC as DICOMweb does, ``multipart/related; type="application/dicom"`` (one part per object), ready for a
STOW-RS to the PACS or a viewer. Added to ``meddiag serve`` when the ``pacs`` extra is installed."""

import tempfile
import uuid
from pathlib import Path
from typing import Any

# at module level, not in the function: FastAPI reads the route's parameter annotations (no postponed evaluation here)
from fastapi import Depends, File, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from meddiag.pacs.results import ResultMaker
from meddiag.serving.uploads import display_name


def add_dicom_routes(app: Any) -> None:
    """Add ``POST /v1/dicom-results`` to an application of :func:`meddiag.serving.app.create_app`."""
    predictor = app.state.predictor
    maker = ResultMaker(predictor)

    @app.post("/v1/dicom-results", tags=["model"], summary="Diagnose DICOM files; answer their SR and heatmap SC as DICOM",
              dependencies=[Depends(app.state.authorised)],
              response_class=Response,
              responses={200: {"content": {"multipart/related": {}}, "description": "one application/dicom part per object"},
                         400: {"description": "a file that cannot be diagnosed"}, 415: {"description": "not DICOM"}})
    async def dicom_results(files: list[UploadFile] = File(..., description="DICOM files (for a 3D model: all the files of one series)")) -> Response:
        if len(files) > app.state.options.max_files:
            raise HTTPException(400, f"{len(files)} files in one request; the limit is {app.state.options.max_files}")
        uploads = [(display_name(f.filename, i), await f.read()) for i, f in enumerate(files)]
        for name, data in uploads:
            if data[128:132] != b"DICM":
                raise HTTPException(415, f"{name}: not a DICOM file (no DICM marker after the 128-byte preamble)")
        parts = await run_in_threadpool(_results, predictor, maker, uploads)
        boundary = uuid.uuid4().hex
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts)
        body += b"--" + boundary.encode() + b"--\r\n"
        return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _results(predictor: Any, maker: ResultMaker, uploads: "list[tuple[str, bytes]]") -> "list[bytes]":
    from io import BytesIO

    with tempfile.TemporaryDirectory(prefix="meddiag-upload-") as tmp:
        paths = []
        for k, (_, data) in enumerate(uploads):
            path = Path(tmp) / f"{k:04d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        targets = [Path(tmp)] if predictor.card.spatial_dims == 3 else paths
        predictions, failures = predictor.predict([str(t) for t in targets])
        if failures:
            name = uploads[paths.index(Path(failures[0].path))][0] if Path(failures[0].path) in paths else "the series"
            raise HTTPException(400, f"{name}: {failures[0].reason}")
        parts = []
        for prediction in predictions:
            result = maker.make(prediction)
            for ds in result.datasets() if result else []:
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                parts.append(buffer.getvalue())
        return parts
