"""Stage 3: training with Lightning (module, data module, configuration, run folder)."""

from meddiag.training.config import TrainConfig
from meddiag.training.module import DiagnosisModule
from meddiag.training.run import TrainResult, load_training_data, train

__all__ = ["TrainConfig", "DiagnosisModule", "TrainResult", "load_training_data", "train"]
