"""Stage 5: where the model looked (saliency maps, heatmap figures) and whether the maps mean anything."""

from meddiag.explain.files import Explanation, explain_files
from meddiag.explain.saliency import METHODS, saliency_maps

__all__ = ["METHODS", "Explanation", "explain_files", "saliency_maps"]
