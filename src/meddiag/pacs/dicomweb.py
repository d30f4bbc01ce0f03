"""A PACS over DICOMweb: find studies (QIDO-RS), fetch their series (WADO-RS), diagnose them, and store the SR and
SC back (STOW-RS) — ``meddiag pacs predict``.

- Credentials never travel on the command line: ``MEDDIAG_PACS_USER`` / ``MEDDIAG_PACS_PASSWORD`` (HTTP basic),
  ``MEDDIAG_PACS_TOKEN`` (a bearer token), or ``--credentials FILE`` holding ``{"username": ..., "password": ...}``
  or ``{"token": ...}``; none of them is ever printed.
- A PACS that is down, slow or answers 5xx is retried with exponential back-off (the DICOMweb client retries
  429/408/503/504 itself; meddiag retries refused connections and time-outs too), then reported by its URL
  and the status; a 401/403 is reported at once (credentials).
- Nothing is lost: every result is written to the outbox (``--outbox``, default ``~/.cache/meddiag/outbox``)
  before it is sent and removed once the PACS has accepted it; what could not be sent stays there and is sent
  first on the next run. A series whose SR (its UID is derived from the source and the model) the PACS already
  holds is not diagnosed again, and storing the same objects twice makes no duplicate.
- meddiag's own results (SR and SC series it made) are never taken for images to diagnose.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meddiag.errors import MeddiagError
from meddiag.pacs.results import MANUFACTURER, ResultMaker, derived_uid, model_identity

T = TypeVar("T")


class PacsError(MeddiagError):
    """A PACS that cannot be reached, refuses the credentials, or answers an error."""


def pacs_session(credentials: str | Path | None = None) -> Any:
    """A requests session carrying the credentials of the environment or of the file ``credentials``."""
    import requests

    session = requests.Session()
    secret: dict[str, str] = {}
    if credentials is not None:
        path = Path(credentials)
        try:
            secret = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PacsError(f"credentials file {path} cannot be read as JSON ({exc.__class__.__name__}); it should hold "
                            '{"username": ..., "password": ...} or {"token": ...}') from None
        if not isinstance(secret, dict) or not ({"username", "password"} <= set(secret) or "token" in secret):
            raise PacsError(f'credentials file {path} should hold {{"username": ..., "password": ...}} or {{"token": ...}}')
    token = secret.get("token") or os.environ.get("MEDDIAG_PACS_TOKEN")
    user = secret.get("username") or os.environ.get("MEDDIAG_PACS_USER")
    password = secret.get("password") or os.environ.get("MEDDIAG_PACS_PASSWORD")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return session


def with_retries(what: str, call: Callable[[], T], attempts: int = 4, first_wait: float = 1.0) -> T:
    """``call()``, again after 1, 2, 4 ... s when the PACS is unreachable, times out or answers 5xx; a
    :class:`PacsError` saying ``what`` failed and why (never with credentials) when it keeps failing."""
    import requests

    wait = first_wait
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise PacsError(f"{what}: the PACS refused the credentials (HTTP {status}); set MEDDIAG_PACS_USER and "
                                "MEDDIAG_PACS_PASSWORD (or MEDDIAG_PACS_TOKEN), or give --credentials FILE") from None
            if status < 500 or attempt == attempts:
                raise PacsError(f"{what}: the PACS answered HTTP {status}" + (f" after {attempts} attempts" if status >= 500 else "")) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt == attempts:
                raise PacsError(f"{what}: the PACS cannot be reached ({exc.__class__.__name__}) after {attempts} attempts") from None
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


@dataclass
class PacsRun:
    """What one ``pacs predict`` did: series diagnosed, skipped (diagnosed before; meddiag's own results), result
    objects stored, objects left in the outbox, and each problem (series UID and what went wrong: never PHI)."""

    diagnosed: int = 0
    already_done: int = 0
    own: int = 0
    stored: int = 0
    pending: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.diagnosed} series diagnosed, {self.stored} result objects stored in the PACS; skipped: "
                f"{self.already_done} series diagnosed before by this model, {self.own} series of meddiag's own results")
        if self.pending:
            text += f"; {self.pending} objects could not be stored and wait in the outbox for the next run"
        return text


class Outbox:
    """Results not yet accepted by a PACS: ``DIR/<SOPInstanceUID>.dcm``, written before sending, removed after."""

    def __init__(self, folder: str | Path | None = None) -> None:
        from meddiag.data.cache import cache_root

        self.folder = Path(folder) if folder is not None else cache_root() / "outbox"
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, dataset: Any) -> Path:
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        tmp = path.with_name(f".{path.name}.tmp")
        dataset.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        return path

    def waiting(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.dcm") if not p.name.startswith("."))


def pacs_predict(predictor: Any, url: str, *, studies: list[str] | None = None, modality: str | None = None,
                 since: str | None = None, credentials: str | Path | None = None, outbox: str | Path | None = None,
                 attempts: int = 4, echo: Callable[[str], None] = print) -> PacsRun:
    """Find the series to diagnose (``studies`` by Study Instance UID, or every study since ``since`` —
    YYYY-MM-DD — with ``modality``), diagnose each, and store its SR and SC back (see the module's docstring)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url, session=pacs_session(credentials), timeout=60)
    client.set_http_retry_params(max_attempts=attempts)
    box = Outbox(outbox)
    report = PacsRun()
    _send_waiting(client, box, report, attempts, echo)
    maker = ResultMaker(predictor)
    identity = model_identity(predictor.card, maker.sha256)
    for study, series in _series_to_diagnose(client, studies, modality, since, attempts):
        uid = _uid(series, "0020000E")
        if _is_own(series):
            report.own += 1
            continue
        try:
            instances = with_retries(f"searching series {uid}", lambda: client.search_for_instances(
                study, uid, fields=["00080018"]), attempts)
            source_uids = sorted(_uid(i, "00080018") for i in instances)
            wanted = derived_uid("sr", identity, *source_uids) if predictor.card.spatial_dims == 3 else None
            done = [derived_uid("sr", identity, s) for s in source_uids] if wanted is None else [wanted]
            if done and all(_held(client, study, sop, attempts) for sop in done):
                report.already_done += 1
                continue
            datasets = with_retries(f"fetching series {uid}", lambda: client.retrieve_series(study, uid), attempts)
        except PacsError as exc:
            report.problems.append(str(exc))
            echo(f"error: {exc}")
            continue
        with tempfile.TemporaryDirectory(prefix="meddiag-pacs-") as tmp:
            folder = Path(tmp) / uid
            folder.mkdir()
            for ds in datasets:
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            targets = [folder] if predictor.card.spatial_dims == 3 else sorted(folder.iterdir())
            predictions, failures = predictor.predict([str(t) for t in targets])
            for failure in failures:
                report.problems.append(f"series {uid}: {Path(failure.path).name}: {failure.reason}")
            results = []
            for prediction in predictions:
                try:
                    made = maker.make(prediction)
                except Exception as exc:  # noqa: BLE001 - one image's result failing never costs the others theirs
                    report.problems.append(f"series {uid}: no DICOM result for {Path(prediction.path).name} ({exc.__class__.__name__})")
                    continue
                if made is not None:
                    results += made.datasets()
            report.diagnosed += 1
        files = [box.put(ds) for ds in results]
        _send(client, files, report, attempts, echo)
    report.pending = len(box.waiting())
    return report


def _send_waiting(client: Any, box: Outbox, report: PacsRun, attempts: int, echo: Callable[[str], None]) -> None:
    """Results an earlier run could not store: sent first."""
    waiting = box.waiting()
    if waiting:
        echo(f"sending {len(waiting)} result object(s) left in the outbox {box.folder} by an earlier run")
        _send(client, waiting, report, attempts, echo)


def _send(client: Any, files: list[Path], report: PacsRun, attempts: int, echo: Callable[[str], None]) -> None:
    import pydicom

    for path in files:
        dataset = pydicom.dcmread(path)
        try:
            with_retries(f"storing {dataset.SOPClassUID.name} {dataset.SOPInstanceUID}",
                         lambda: client.store_instances([dataset], study_instance_uid=dataset.StudyInstanceUID), attempts)
        except PacsError as exc:
            report.problems.append(f"{exc} (kept in {path.parent})")
            echo(f"error: {exc}; kept in {path.parent} for the next run")
            continue
        path.unlink(missing_ok=True)
        report.stored += 1


def _series_to_diagnose(client: Any, studies: list[str] | None, modality: str | None, since: str | None,
                        attempts: int) -> list[tuple[str, dict]]:
    """(Study Instance UID, QIDO series record) of each series to look at."""
    if not studies:
        if not (modality or since):
            raise PacsError("say what to diagnose: --study UID, or --modality and/or --since YYYY-MM-DD")
        filters: dict[str, str] = {}
        if since:
            filters["StudyDate"] = f"{_dicom_date(since)}-"
        if modality:
            filters["ModalitiesInStudy"] = modality
        found = _every_page("searching studies", lambda offset: client.search_for_studies(
            search_filters=filters, offset=offset, limit=PAGE), "0020000D", attempts)
        studies = [_uid(s, "0020000D") for s in found]
    out = []
    for study in studies:
        series_filters = {"Modality": modality} if modality else None
        series = _every_page(f"searching the series of study {study}", lambda offset: client.search_for_series(
            study, search_filters=series_filters, offset=offset, limit=PAGE), "0020000E", attempts)
        out += [(study, s) for s in series]
    return out


PAGE = 200


def _every_page(what: str, search: Callable[[int], list[dict]], key: str, attempts: int) -> list[dict]:
    """Every record of a paged QIDO search. Pages until one is short or brings nothing new: some servers (Orthanc's
    DICOMweb plugin with ModalitiesInStudy, for one) answer every offset with the first page, and the client's own
    paging (``get_remaining``) then never ends."""
    seen: dict[str, dict] = {}
    offset = 0
    while True:
        page = with_retries(what, lambda: search(offset), attempts)
        new = [r for r in page if _value(r, key) not in seen]
        seen.update({str(_value(r, key)): r for r in new})
        if not new or len(page) < PAGE:
            return list(seen.values())
        offset += len(page)


def _held(client: Any, study: str, sop: str, attempts: int) -> bool:
    found = with_retries("searching the results already stored",
                         lambda: client.search_for_instances(study, search_filters={"SOPInstanceUID": sop}), attempts)
    return bool(found)


def _is_own(series: dict) -> bool:
    """A series meddiag made: an SR or SC whose description names meddiag (see results.py)."""
    description = str(_value(series, "0008103E") or "")
    return _value(series, "00080060") in ("SR", "OT") and description.startswith(MANUFACTURER)


def _value(record: dict, tag: str) -> Any:
    values = record.get(tag, {}).get("Value") or [None]
    return values[0]


def _uid(record: dict, tag: str) -> str:
    value = _value(record, tag)
    if not value:
        raise PacsError(f"the PACS answered a search without the UID {tag}")
    return str(value)


def _dicom_date(text: str) -> str:
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise PacsError(f"--since {text}: give a date as YYYY-MM-DD")
    return digits
