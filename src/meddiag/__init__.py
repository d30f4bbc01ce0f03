"""meddiag: computer-aided diagnosis from medical images with convolutional neural networks.

    import meddiag
    run = meddiag.train("pneumoniamnist", model="resnet18", epochs=5)
    model = meddiag.load(run)
    model.predict(["a.png", "b.dcm"])

The package follows the data's journey, one sub-package per stage, each importing only
the stages before it: ``data`` -> ``models`` -> ``training`` -> ``evaluation`` -> ``explain`` ->
``serving``; :mod:`meddiag.api` (the names below) and the command line sit on top. Importing
``meddiag`` loads none of them: each name loads its module when first used.
"""

from meddiag.lazy import lazy_exports

__version__ = "0.1.0"

_API = ("train", "pretrain", "evaluate", "load", "training_config", "Run", "Model", "Report", "Predictions", "Heatmap")
__all__ = [*_API, "__version__"]
__getattr__ = lazy_exports(__name__, {name: "meddiag.api" for name in _API})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
