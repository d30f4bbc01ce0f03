"""Stage 3: training with Lightning (module, data module, configuration, run folder)."""

from meddiag.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "meddiag.training.config",
    "DiagnosisModule": "meddiag.training.module",
    "TrainResult": "meddiag.training.run",
    "load_training_data": "meddiag.training.run",
    "train": "meddiag.training.run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
