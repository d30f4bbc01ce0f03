"""What each kind of bad file gets: the hostile-input corpus of the tests (tests/hostile.py) through
``predict`` and ``serve``, tabulated for docs/benchmarks.md ("Reliability").

    python benchmarks/hostile_corpus.py [--work /tmp/meddiag-hostile]

Trains a small seed_cnn on a synthetic folder first (seconds), then reads every corpus file.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/meddiag-hostile"))
    args = parser.parse_args()
    import shutil

    from fastapi.testclient import TestClient

    from conftest import make_image_folder
    from hostile import make_corpus
    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    shutil.rmtree(args.work, ignore_errors=True)
    data = make_image_folder(args.work / "images", per_class=30)
    run = args.work / "run"
    train_and_evaluate(TrainConfig(data=str(data), model="seed_cnn", epochs=3, image_size=32, out=str(run)), progress=False)
    corpus = make_corpus(args.work / "corpus")
    predictor = Predictor.from_run(run)

    start = time.perf_counter()
    predictions, failures = predictor.predict([args.work / "corpus"])
    seconds = time.perf_counter() - start
    predicted = {p.path for p in predictions}
    reasons = {f.path: f.reason for f in failures}
    app = create_app(predictor, run, ServeOptions(max_upload_mb=5, max_pixels=50_000_000))
    statuses: dict[Path, int] = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in corpus:
            r = client.post("/v1/predict", files=[("files", (path.name, path.read_bytes(), "application/octet-stream"))])
            statuses[path] = r.status_code

    print(f"corpus: {len(corpus)} files; predict took {seconds:.1f} s; peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("\n| kind | files | predicted | refused with a reason | serve status codes |\n|---|---|---|---|---|")
    for kind in ("bad", "nonfinite", "bad_or_valid", "valid"):
        paths = [p for p, k in corpus.items() if k == kind]
        codes = collections.Counter(statuses[p] for p in paths)
        print(f"| {kind} | {len(paths)} | {sum(str(p) in predicted for p in paths)} | {sum(str(p) in reasons for p in paths)} | "
              + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + " |")
    print("\n| file | kind | predict | serve |\n|---|---|---|---|")
    for path, kind in corpus.items():
        outcome = "predicted" if str(path) in predicted else reasons.get(str(path), "neither (a defect)")
        print(f"| {path.name} | {kind} | {outcome} | {statuses[path]} |")


if __name__ == "__main__":
    main()
