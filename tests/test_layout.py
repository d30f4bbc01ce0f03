"""The architecture's one rule, checked: each stage imports only earlier stages (data -> models -> training ->
evaluation -> explain -> serving -> pacs), so that a stage can be used, and tested, without the ones after it."""

from __future__ import annotations

import ast
from pathlib import Path

STAGES = ["data", "models", "training", "evaluation", "explain", "serving", "pacs"]
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "meddiag"


def imported_stages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("meddiag.") and n.split(".")[1] in STAGES}


def test_each_stage_imports_only_earlier_stages():
    later = []
    for stage in STAGES:
        for path in sorted((PACKAGE / stage).rglob("*.py")):
            for other in imported_stages(path):
                if STAGES.index(other) > STAGES.index(stage):
                    later.append(f"{path.relative_to(PACKAGE)} imports meddiag.{other}")
    assert not later, "\n".join(later)
    assert imported_stages(PACKAGE / "serving" / "app.py") >= {"serving", "explain", "models"}  # the scan sees imports
