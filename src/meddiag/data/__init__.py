"""Stage 1: data sources, image reading, splits and transforms."""

from meddiag.data.dataset import SPLITS, ImageData, Split, Task
from meddiag.data.dicom import WINDOW_PRESETS, DicomImage, parse_window, read_dicom
from meddiag.data.download import download_file, md5sum
from meddiag.data.images import IMAGE_EXTENSIONS, read_image, to_model_input
from meddiag.data.medmnist import fetch_medmnist, load_medmnist, medmnist_names, parse_medmnist
from meddiag.data.sources import load_data
from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float
from meddiag.data.volumes import Volume, read_dicom_series, read_dicom_volume, read_nifti, read_volumes

__all__ = [
    "SPLITS", "ImageData", "Split", "Task", "download_file", "md5sum", "IMAGE_EXTENSIONS",
    "read_image", "to_model_input", "fetch_medmnist", "load_medmnist", "medmnist_names",
    "parse_medmnist", "load_data", "AugmentConfig", "augment_batch", "normalize", "to_unit_float",
    "WINDOW_PRESETS", "DicomImage", "parse_window", "read_dicom", "Volume", "read_dicom_series", "read_dicom_volume", "read_nifti", "read_volumes",
]
