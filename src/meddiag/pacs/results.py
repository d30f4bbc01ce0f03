"""A diagnosis as standard DICOM objects a PACS files under the patient's study: a Structured Report and a
Secondary Capture of the heatmap, built with highdicom (typed classes of the IODs' modules, validated as
they are constructed), never a pydicom dataset filled tag by tag.

- **SR** — Comprehensive 3D SR holding a TID 1500 Measurement Report: one TID 1501 measurement group per
  diagnosed image or series, referencing its source SOP Instance(s), with the algorithm (TID 4019: meddiag,
  its version, the model and the checkpoint's sha256), the finding decided at the model's operating point
  (DCM 121071 "Finding"), its certainty (DCM 111012 "Certainty of Finding", %), each class's probability,
  the decision threshold, the uncertainty, and whether the case was referred to a human reader or flagged
  as unlike the training data (SNOMED CT Yes/No). ``VerificationFlag`` UNVERIFIED, completion COMPLETE.
  The research-use note is in its series description and among the algorithm's parameters.
- **SC** — the heatmap over the image at the source's own rows, columns and pixel spacing (single-frame
  sources; for volumes the three planes through the heatmap's peak), the result and the research-use note
  burned in (``BurnedInAnnotation`` YES).

Both are in the source's study (patient and study modules copied from it, so the PACS files them under the
right patient) and in series of their own. Their UIDs are derived from the source's SOP Instance UIDs and
the model's identity, so diagnosing the same image again with the same model makes the same objects: a PACS
keeps one copy, never duplicates. The copied patient data go into these objects only — never into a log,
a CSV, a report or an error message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESEARCH_USE = "RESEARCH USE - NOT FOR DIAGNOSIS"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "meddiag"
PRIVATE_SCHEME = "99MEDDIAG"  # meddiag's own codes: class names and the figures no public code names
# class names with a well-known SNOMED CT concept (lower case, spaces for underscores)
KNOWN_FINDINGS = {
    "pneumonia": ("233604007", "Pneumonia"),
    "normal": ("17621005", "Normal"),
    "malignant": ("363346000", "Malignant neoplastic disease"),
    "benign": ("20376005", "Benign neoplastic disease"),
    "melanoma": ("372244006", "Malignant melanoma"),
}


@dataclass
class DicomResult:
    """The objects made for one diagnosed image or series: the SR, the SC (None when no heatmap could be
    drawn), and the study they belong to."""

    sr: Any  # highdicom Comprehensive3DSR
    sc: Any | None  # highdicom SCImage
    study_instance_uid: str

    def datasets(self) -> list[Any]:
        return [d for d in (self.sr, self.sc) if d is not None]

    def write(self, folder: str | Path) -> list[Path]:
        """``folder/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` for each (UIDs name no one)."""
        paths = []
        for ds in self.datasets():
            path = Path(folder) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(path)
            paths.append(path)
        return paths


# the patient and study attributes every object copies (Type 2: present, empty when unknown); sources that lack one get it empty
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "AccessionNumber", "StudyID")


TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def complete_header(source: Any) -> Any:
    """A copy of the source's header fit to be copied into new objects: the Type 2 patient and study attributes it
    lacks present and empty (as the standard has them when unknown; highdicom copies them and needs them there),
    and a value its VR does not allow (a PatientAge of '75Y' rather than '075Y') emptied, if Type 2, or left out:
    the source's mistakes are not passed on into objects that must validate."""
    import copy

    from pydicom import config
    from pydicom.valuerep import validate_value

    header = copy.deepcopy(source)
    for element in list(header):
        if element.VR not in TEXT_VRS or element.value in (None, "", b""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, str(value), config.RAISE)
        except (ValueError, TypeError):
            if element.keyword in PATIENT_STUDY_TYPE2:
                header[element.tag].value = None
            else:
                del header[element.tag]
    for name in PATIENT_STUDY_TYPE2:
        if name not in header:
            setattr(header, name, None)
    return header


def finding_code(name: str) -> Any:
    """The coded concept of a class: SNOMED CT for the few :data:`KNOWN_FINDINGS`, else meddiag's own scheme."""
    from highdicom.sr import CodedConcept

    known = KNOWN_FINDINGS.get(name.strip().lower().replace("_", " "))
    if known:
        return CodedConcept(known[0], "SCT", known[1])
    return CodedConcept(_code_value(name), PRIVATE_SCHEME, name[:64])


def _code_value(text: str) -> str:
    """A code value of at most 16 characters for ``text`` (a class name), unique enough within one model."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").upper() or "CLASS"
    if len(slug) <= 16:
        return slug
    import hashlib

    return f"{slug[:10]}-{hashlib.sha1(text.encode()).hexdigest()[:5]}"


def _private(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def _yes_no(flag: bool) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept("373066001", "SCT", "Yes") if flag else CodedConcept("373067005", "SCT", "No")


def derived_uid(*parts: str) -> str:
    """A UID that is the same for the same ``parts`` (a source's UIDs, the model's identity, the object's kind)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["meddiag", *parts])


def model_identity(card: Any, checkpoint_sha256: str) -> str:
    return f"{card.model_name}:{checkpoint_sha256[:16]}"


def build_sr(sources: list[Any], prediction: Any, card: Any, checkpoint_sha256: str) -> Any:
    """The SR of ``prediction`` (a :class:`~meddiag.serving.predictor.Prediction`) of the image or series whose
    headers are ``sources`` (pydicom datasets; pixel data not needed)."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                              MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    import meddiag

    identity = model_identity(card, checkpoint_sha256)
    first = sources[0]
    source_uids = sorted(str(s.SOPInstanceUID) for s in sources)
    algorithm = AlgorithmIdentification(
        name=f"meddiag {card.model_name}", version=meddiag.__version__, manufacturer=MANUFACTURER,
        parameters=[RESEARCH_USE, f"model: {card.model_name}", f"checkpoint sha256: {checkpoint_sha256}",
                    f"classes: {', '.join(card.class_names)}", f"trained on: {card.data_name or 'unknown'}"])
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", identity), name="meddiag", manufacturer_name=MANUFACTURER,
            model_name=card.model_name[:64]))
    decided = prediction.predicted.split(";")[0] if prediction.predicted else card.class_names[0]
    evaluations = [QualitativeEvaluation(codes.DCM.Finding, finding_code(decided)),
                   QualitativeEvaluation(_private("REFERRED", "Referred to a human reader"), _yes_no(bool(prediction.abstain))),
                   QualitativeEvaluation(_private("OOD", "Input unlike the training data"), _yes_no(bool(prediction.ood)))]
    unit, percent = CodedConcept("1", "UCUM", "no units"), CodedConcept("%", "UCUM", "percent")
    measurements = [hd.sr.Measurement(CodedConcept("111012", "DCM", "Certainty of Finding"),
                                      round(100.0 * prediction.probabilities.get(decided, 0.0), 4), percent, algorithm_id=algorithm)]
    for i, name in enumerate(card.class_names):
        measurements.append(hd.sr.Measurement(_private(f"P{i}", f"Probability of {name}"[:64]),
                                              float(np.clip(prediction.probabilities[name], 0, 1)), unit, algorithm_id=algorithm))
    if card.threshold is not None and card.task != "multiclass":
        measurements.append(hd.sr.Measurement(_private("THRESHOLD", "Decision threshold"), float(card.threshold), unit,
                                              algorithm_id=algorithm))
    measurements.append(hd.sr.Measurement(_private("UNCERTAINTY", "Normalised predictive entropy"),
                                          float(np.clip(prediction.uncertainty, 0, 1)), unit, algorithm_id=algorithm))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid("tracking", identity, *source_uids),
                                               identifier=f"meddiag {card.model_name}"[:64]),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
        measurements=measurements, qualitative_evaluations=evaluations)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("363679005", "SCT", "Imaging"),
        imaging_measurements=[group])
    return Comprehensive3DSR(
        evidence=sources, content=report[0],
        series_instance_uid=derived_uid("sr-series", identity, str(first.StudyInstanceUID)), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid("sr", identity, *source_uids), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=f"meddiag {card.model_name}: {RESEARCH_USE}"[:64],
        coding_schemes=[CodingSchemeIdentificationItem(PRIVATE_SCHEME, name="meddiag class names and figures",
                                                       responsible_organization="meddiag")])


def build_sc(source: Any, overlay: np.ndarray, prediction: Any, card: Any, checkpoint_sha256: str,
             caption: str, sources: list[Any] | None = None) -> Any:
    """The SC of the heatmap: ``overlay`` RGB uint8 (H, W, 3) — the source's own rows and columns for a single
    frame, so its pixel spacing carries over — with ``caption`` and the research-use note burned in."""
    from highdicom.sc import SCImage

    identity = model_identity(card, checkpoint_sha256)
    source_uids = sorted(str(s.SOPInstanceUID) for s in (sources or [source]))
    pixels = burn_in(overlay, [caption, RESEARCH_USE])
    same_frame = sources is None and int(getattr(source, "Rows", 0)) == pixels.shape[0] and int(getattr(source, "Columns", 0)) == pixels.shape[1]
    spacing = getattr(source, "PixelSpacing", None)
    spacing = tuple(float(v) for v in spacing) if same_frame and spacing and all(float(v) > 0 for v in spacing) else None
    orientation = tuple(getattr(source, "PatientOrientation", None) or ()) if same_frame else ()
    laterality = getattr(source, "Laterality", None) or getattr(source, "ImageLaterality", None)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=derived_uid("sc-series", identity, str(source.StudyInstanceUID)),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=derived_uid("sc", identity, *source_uids), instance_number=1,
        manufacturer=MANUFACTURER, pixel_spacing=spacing, laterality=laterality if laterality in ("R", "L") else None,
        # highdicom takes single-letter orientations only: others (none, or "AL") are set as the source has them below
        patient_orientation=orientation if _single_letters(orientation) else ("L", "F"),
        series_description=f"meddiag {card.model_name} heatmap: {RESEARCH_USE}"[:64])
    if not _single_letters(orientation):  # the source's own (type 2: empty where it gives none, or the planes differ)
        sc.PatientOrientation = list(orientation) if len(orientation) == 2 else None
    body_part = str(getattr(source, "BodyPartExamined", "") or "").strip()
    if body_part:  # what was imaged, as the source says: with it, a validator can tell an unpaired part needs no laterality
        sc.BodyPartExamined = body_part
    elif "Laterality" not in sc:  # type 2C: present and empty when it is not known whether the part is paired
        sc.Laterality = None
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{caption} | {RESEARCH_USE}"[:10240]
    sc.DerivationDescription = f"Grad-CAM heatmap of {card.model_name} over the source image"[:1024]
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    refs = []
    for s in sources or [source]:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
        refs.append(item)
    sc.SourceImageSequence = Sequence(refs)
    return sc


def _single_letters(orientation: tuple) -> bool:
    return len(orientation) == 2 and all(str(v) in ("A", "P", "R", "L", "H", "F") for v in orientation)


def burn_in(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """``lines`` written into the top left of the RGB uint8 ``image`` on a dark band, sized to the image (the
    image keeps its rows and columns)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8), "RGB")
    size = max(10, img.height // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    y = size // 2
    for line in lines:
        box = draw.textbbox((size // 2, y), line, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, min(img.width - 1, box[2] + 2), box[3] + 2), fill=(0, 0, 0))
        draw.text((size // 2, y), line, fill=(255, 255, 0), font=font)
        y = box[3] + size // 3
    return np.asarray(img)


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]] | None:
    """(errors, warnings) of dicom3tools' ``dciodvfy`` on the file ``path``; None where dciodvfy is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        return None
    done = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


class ResultMaker:
    """The SR and SC of each prediction a :class:`~meddiag.serving.predictor.Predictor` made of a DICOM input
    (an image file, a multi-frame file or a series folder); other inputs have none."""

    def __init__(self, predictor: Any, method: str = "gradcam") -> None:
        from meddiag.data.download import file_digest

        self.predictor, self.method = predictor, method
        self.sha256 = file_digest(predictor.checkpoint, "sha256")

    def make(self, prediction: Any, covariates: np.ndarray | None = None) -> DicomResult | None:
        """The objects of ``prediction``; None when its input was no DICOM. Raises ``ImageReadError`` or
        ``DataError`` naming the file when the source can no longer be read."""
        if not (prediction.sop_instance_uid or prediction.series_instance_uid):
            return None
        with warnings.catch_warnings():
            # highdicom and pydicom warn of odd values in the copied patient and study modules by quoting them: PHI
            warnings.filterwarnings("ignore", module="highdicom")
            warnings.filterwarnings("ignore", module="pydicom")
            return self._make(prediction, covariates)

    def _make(self, prediction: Any, covariates: np.ndarray | None) -> DicomResult:
        card = self.predictor.card
        sources, overlay = (self._image(prediction, covariates) if card.spatial_dims == 2
                            else self._volume(prediction, covariates))
        sr = build_sr(sources, prediction, card, self.sha256)
        sc = None
        if overlay is not None:
            lines = caption_lines(prediction, card, self.method)
            sc = build_sc(sources[0], overlay, prediction, card, self.sha256, lines[0],
                          sources=sources if card.spatial_dims == 3 else None)
        return DicomResult(sr, sc, str(sources[0].StudyInstanceUID))

    def _heat(self, array: np.ndarray, covariates: np.ndarray | None) -> np.ndarray | None:
        import torch

        from meddiag.explain.saliency import explained_classes, probabilities, saliency_maps

        card = self.predictor.card
        if card.model_name == "tabular":
            return None
        x = torch.tensor(array[None])
        cov = None
        if card.covariates is not None:
            cov = torch.from_numpy((covariates if covariates is not None else card.covariates.missing_row())[None])
        probs = probabilities(self.predictor.model, x, card, cov)
        target = explained_classes(probs, card)[0]
        return saliency_maps(self.predictor.model, card, x, self.method, [target], covariates=cov)[0]

    def _image(self, prediction: Any, covariates: np.ndarray | None) -> tuple[list[Any], np.ndarray | None]:
        from meddiag.data.dicom import read_dicom_dataset
        from meddiag.explain.render import overlay_image
        from meddiag.models.inputs import read_inputs

        source = complete_header(read_dicom_dataset(Path(prediction.path), stop_before_pixels=True))
        [item] = read_inputs(prediction.path, self.predictor.card)
        heat = self._heat(item.array, covariates)
        overlay = overlay_image(item.original, heat, self.predictor.card.fit) if heat is not None and item.original is not None else None
        return [source], overlay

    def _volume(self, prediction: Any, covariates: np.ndarray | None) -> tuple[list[Any], np.ndarray | None]:
        import io

        from PIL import Image

        from meddiag.data.dicom import is_dicom_file, read_dicom_dataset
        from meddiag.data.volumes import read_volumes, volume_to_model_input
        from meddiag.errors import DataError
        from meddiag.explain.render import volume_figure

        card = self.predictor.card
        volumes = [v for v in read_volumes(prediction.path, card.volume_index)
                   if not prediction.series_instance_uid or v.series_instance_uid == prediction.series_instance_uid]
        if not volumes:
            raise DataError(f"{prediction.path}: the series diagnosed is no longer there")
        volume = volumes[0]
        sources = [complete_header(read_dicom_dataset(Path(s), stop_before_pixels=True)) for s in volume.sources if is_dicom_file(Path(s))]
        array = volume_to_model_input(volume, card.image_size, card.in_channels, card.window, card.fit)
        heat = self._heat(array, covariates)
        overlay = None
        if heat is not None:
            buffer = io.BytesIO()
            volume_figure(array[0], heat, "", buffer)
            overlay = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return sources, overlay


def caption_lines(prediction: Any, card: Any, method: str) -> list[str]:
    """What the SC says in words: the finding and its probability, the referral and OOD flags, the method."""
    from meddiag.explain.saliency import method_label

    decided = prediction.predicted.split(";")[0] if prediction.predicted else card.class_names[0]
    text = f"meddiag {card.model_name}: {decided} {prediction.probabilities.get(decided, 0.0):.2f}"
    if prediction.ood:
        text += " | UNLIKE THE TRAINING DATA"
    elif prediction.abstain:
        text += " | REFER TO A READER"
    return [text, method_label(method, card.model_name)]
