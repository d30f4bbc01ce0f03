"""Training on several machines with Lightning: two processes started by torchrun as two *nodes* on 127.0.0.1
(gloo) train one run, and it is the run one process makes with their two batches as one."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import make_image_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(run) -> list[dict]:  # noqa: ANN001
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


def predictions(run) -> dict[str, float]:  # noqa: ANN001
    with open(run / "predictions.csv") as fh:
        return {r["image"]: float(r["prob_pneumonia"]) for r in csv.DictReader(fh)}


def test_two_nodes_under_torchrun_train_the_run_one_process_trains(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=30)
    # no augmentation, fp32, a network without batch norm or dropout: two halves of a batch on two processes then
    # give exactly the gradient of the whole batch on one, and the runs can be compared closely
    (tmp_path / "exact.yaml").write_text("augment: {enabled: false}\nprecision: 32-true\nema_decay: 0\n")
    common = ["train", str(data), "--model", "seed_cnn", "--image-size", "24", "--epochs", "3", "--config", str(tmp_path / "exact.yaml"),
              "--accelerator", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "meddiag", *common, "--batch-size", "16", "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr

    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "meddiag", *common, "--batch-size", "8", "--devices", "1", "--num-nodes", "2",
                               "--strategy", "ddp", "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "cpu x1 on each of 2 nodes (2 processes, 8 images per batch each)" in outputs[0][1], outputs[0][1][-2000:]

    one, two = tmp_path / "one", tmp_path / "two"
    h1, h2 = history(one), history(two)
    assert [r["epoch"] for r in h2] == ["1", "2", "3"]  # one history, written once (by the first process)
    for a, b in zip(h1, h2):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-3, (a, b)
        assert abs(float(a["val_auc"]) - float(b["val_auc"])) < 1e-3, (a, b)  # every validation image counted once
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m2["n_images"] == m1["n_images"]  # the whole test split, each image once, evaluated by the first process
    assert abs(m1["auc"] - m2["auc"]) < 1e-3 and abs(m1["acc"] - m2["acc"]) < 1e-9
    p1, p2 = predictions(one), predictions(two)
    assert p1.keys() == p2.keys() and max(abs(p1[k] - p2[k]) for k in p1) < 1e-3


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (5, 1)])
def test_every_process_takes_its_share_once(n, world):
    from meddiag.training.datamodule import EpochSampler, ShardSampler

    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # evaluation: each image exactly once
    single = list(EpochSampler(n, seed=3, epoch=lambda: 2))
    parts = [list(EpochSampler(n, seed=3, epoch=lambda: 2, rank=r, world=world)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # as many steps on every process
    steps = len(parts[0])
    merged = [parts[r][k] for k in range(steps) for r in range(world)]
    assert merged == single[: steps * world]  # together, the single process's order
