"""A DICOM node (DIMSE, pynetdicom): ``meddiag listen`` receives images by C-STORE — from a modality, or from a
PACS routing rule — diagnoses each series once it is complete, and sends its SR and heatmap SC by C-STORE to
the PACS (``--send-to HOST:PORT:AET``).

- A series is complete when no image of it has arrived for ``series_timeout`` seconds.
- Images wait on disk (``spool/<SeriesInstanceUID>/``), never in memory; at most ``max_series`` series wait at
  once: past that a C-STORE is answered 0xA700 (out of resources), and the sender retries later. A series
  spooled when the listener stopped is diagnosed when it starts again.
- An object that cannot be decoded is answered 0xC210 (cannot understand) and the listener keeps running; an
  object that is no image (a report, a presentation state) is accepted and left alone; meddiag's own results
  coming back are never diagnosed.
- Results go to the outbox first and leave it when the PACS has accepted them (C-STORE status 0x0000 or a
  warning); a PACS that is down is retried with back-off, and what it would not take waits in the outbox and is
  sent again with the next results (or at the next start).
- Logs name series by UID, the calling AE title and what happened: never a patient's name, id or date.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meddiag.errors import MeddiagError
from meddiag.pacs.dicomweb import Outbox
from meddiag.pacs.results import MANUFACTURER, ResultMaker

log = logging.getLogger("meddiag.listen")
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].strip():
            raise MeddiagError(f"--send-to {text}: give HOST:PORT:AET, e.g. pacs.hospital.org:104:PACS")
        return cls(parts[0], int(parts[1]), parts[2].strip())


class Listener:
    """The node; :meth:`start` serves in the background, :meth:`stop` ends it (spooled series stay on disk)."""

    def __init__(self, predictor: Any, *, ae_title: str = "MEDDIAG", host: str = "127.0.0.1", port: int = 11112,
                 send_to: Destination | None = None, spool: str | Path | None = None, outbox: str | Path | None = None,
                 series_timeout: float = 5.0, max_series: int = 64, attempts: int = 4) -> None:
        from meddiag.data.cache import cache_root

        self.predictor, self.ae_title, self.host, self.port, self.send_to = predictor, ae_title, host, port, send_to
        self.spool = Path(spool) if spool is not None else cache_root() / "listen-spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(outbox if outbox is not None else cache_root() / "listen-outbox")
        self.series_timeout, self.max_series, self.attempts = series_timeout, max_series, attempts
        self.maker = ResultMaker(predictor)
        self._last: dict[str, float] = {p.name: 0.0 for p in self.spool.iterdir() if p.is_dir()}  # left by a stop
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._worker: threading.Thread | None = None
        self.diagnosed = 0

    # -- receiving ------------------------------------------------------------------------------------------

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        from meddiag.data.dicom import quiet_value_validation

        quiet_value_validation()  # pydicom's warnings of odd values quote them: never in this node's log
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 8
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._worker = threading.Thread(target=self._work, name="meddiag-listen", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d%s", self.ae_title, self.host, self.port,
                 f"; results to {self.send_to.ae_title} at {self.send_to.host}:{self.send_to.port}" if self.send_to else "")

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=60)

    def _on_store(self, event: Any) -> int:
        caller = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - whatever a malformed object raises: answered, and the node goes on
            log.warning("an object from %s could not be decoded (%s): answered 0xC210", caller, exc.__class__.__name__)
            return CANNOT_UNDERSTAND
        if str(getattr(ds, "Manufacturer", "")) == MANUFACTURER or "PixelData" not in ds and "FloatPixelData" not in ds:
            log.info("an object of series %s from %s is no image to diagnose (or meddiag's own result): accepted, left alone",
                     series, caller)
            return SUCCESS
        with self._lock:
            if series not in self._last and len(self._last) >= self.max_series:
                log.warning("%d series wait already: series %s from %s answered 0xA700 (out of resources), to be sent again",
                            len(self._last), series, caller)
                return OUT_OF_RESOURCES
            folder = self.spool / series
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{sop}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(folder / f"{sop}.dcm")
            self._last[series] = time.monotonic()
        return SUCCESS

    # -- diagnosing and sending -------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                ready = [s for s, t in self._last.items() if now - t >= self.series_timeout]
            for series in ready:
                try:
                    self._diagnose(series)
                except Exception as exc:  # noqa: BLE001 - one series failing never stops the node
                    log.error("series %s could not be diagnosed (%s: %s); its images stay in %s",
                              series, exc.__class__.__name__, str(exc)[:200], self.spool / series)
                with self._lock:
                    self._last.pop(series, None)
            self._stop.wait(0.5)

    def _diagnose(self, series: str) -> None:
        folder = self.spool / series
        files = sorted(p for p in folder.glob("*.dcm"))
        if not files:
            shutil.rmtree(folder, ignore_errors=True)
            return
        targets = [folder] if self.predictor.card.spatial_dims == 3 else files
        predictions, failures = self.predictor.predict([str(t) for t in targets])
        for failure in failures:
            log.warning("series %s: %s: %s", series, Path(failure.path).name, failure.reason)
        waiting = []
        for prediction in predictions:
            result = self.maker.make(prediction)
            if result is not None:
                waiting += [self.outbox.put(ds) for ds in result.datasets()]
                log.info("series %s: %s (%.3f)%s", series, prediction.predicted, max(prediction.probabilities.values()),
                         " flagged: unlike the training data" if prediction.ood else "")
        self.diagnosed += 1
        shutil.rmtree(folder, ignore_errors=True)
        if self.send_to is not None:
            self.send(self.outbox.waiting())

    def send(self, files: list[Path]) -> int:
        """C-STORE ``files`` to the destination, each removed once stored; returns how many were stored. Retries
        an unreachable PACS with back-off (1, 2, 4 ... s); what it will not take stays in the outbox."""
        import pydicom
        from pynetdicom import AE

        if not files or self.send_to is None:
            return 0
        datasets = [pydicom.dcmread(p) for p in files]
        ae = AE(ae_title=self.ae_title)
        for uid in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        wait, stored = 1.0, 0
        for attempt in range(1, self.attempts + 1):
            assoc = ae.associate(self.send_to.host, self.send_to.port, ae_title=self.send_to.ae_title)
            if assoc.is_established:
                for path, ds in zip(files, datasets):
                    if not path.exists():
                        continue
                    status = assoc.send_c_store(ds)
                    code = int(getattr(status, "Status", 0xFFFF)) if status else 0xFFFF
                    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:  # success, or a warning: stored
                        path.unlink(missing_ok=True)
                        stored += 1
                    else:
                        log.error("%s refused %s %s (status 0x%04X); it stays in the outbox %s", self.send_to.ae_title,
                                  ds.SOPClassUID.name, ds.SOPInstanceUID, code, self.outbox.folder)
                assoc.release()
                break
            log.warning("%s at %s:%d cannot be reached (attempt %d of %d)", self.send_to.ae_title, self.send_to.host,
                        self.send_to.port, attempt, self.attempts)
            if attempt < self.attempts and not self._stop.wait(wait):
                wait *= 2
        if stored:
            log.info("%d result object(s) stored at %s", stored, self.send_to.ae_title)
        return stored
