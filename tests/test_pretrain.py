"""``meddiag pretrain``: self-supervised pretraining on unlabelled images — the loss, what it reads (training
images only, bad files named and skipped), resuming a killed run, volumes, and fine-tuning from its folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from meddiag.errors import ConfigError, DataError
from meddiag.models.checkpoint import load_checkpoint
from meddiag.training.pretrain import PretrainConfig, global_batch, nt_xent, pretrain

from conftest import make_image_folder, make_volume_folder, run_meddiag, synthetic_image, write_csv, write_dicom


def history_epochs(folder) -> list[int]:
    path = folder / "history.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_nt_xent_is_low_when_each_view_finds_its_twin_and_chance_level_otherwise():
    torch.manual_seed(0)
    n, d = 32, 64
    z = torch.randn(n, d)
    loss, twin = nt_xent(z, z + 0.01 * torch.randn(n, d), temperature=0.1)
    assert twin == 1.0 and loss < 0.1
    # views that share nothing: every other view is as likely, the loss is about log(2N - 1)
    loss, twin = nt_xent(torch.randn(n, d), torch.randn(n, d), temperature=1.0)
    assert abs(loss.item() - torch.log(torch.tensor(2.0 * n - 1)).item()) < 0.15 and twin < 0.2
    # the loss pulls twins together: its gradient raises the similarity of a pair
    z1, z2 = torch.randn(n, d, requires_grad=True), torch.randn(n, d)
    nt_xent(z1, z2, 0.2)[0].backward()
    step = z1.detach() - 0.5 * z1.grad
    before = torch.nn.functional.cosine_similarity(z1.detach(), z2).mean()
    assert torch.nn.functional.cosine_similarity(step, z2).mean() > before


def _contrast_one_share(rank: int, world: int, init: str, out: str) -> None:
    """One of ``world`` processes (gloo): its share of a batch of projections, contrasted with every process's."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        z1, z2 = torch.randn(12, 16), torch.randn(12, 16)
        share = slice(rank * 12 // world, (rank + 1) * 12 // world)
        a, b = z1[share].clone().requires_grad_(), z2[share].clone().requires_grad_()
        loss, twin = nt_xent(global_batch(a), global_batch(b), 0.2)
        loss.backward()
        torch.save({"loss": loss.item(), "twin": twin.item(), "grad1": a.grad, "grad2": b.grad}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_processes_contrast_the_whole_batch_and_learn_as_one_process_would(tmp_path):
    """Under DDP each process holds a share of the batch: its views are contrasted with every process's (the
    negatives of the whole batch, not of its share), and the gradients it gets, once DDP has averaged them over
    the processes, are those of one process holding the whole batch."""
    world = 2
    torch.multiprocessing.spawn(_contrast_one_share, args=(world, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "share")),
                                nprocs=world, join=True)
    torch.manual_seed(0)
    z1, z2 = torch.randn(12, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    loss, twin = nt_xent(z1, z2, 0.2)
    loss.backward()
    shares = [torch.load(tmp_path / f"share.{r}", weights_only=True) for r in range(world)]
    for r, share in enumerate(shares):
        assert abs(share["loss"] - loss.item()) < 1e-5 and share["twin"] == twin.item()  # the whole batch's loss
        rows = slice(r * 6, (r + 1) * 6)
        # each process's loss is the whole batch's, so its share's gradient comes back summed over the processes:
        # DDP's average over the processes then gives exactly the one-process gradient
        assert torch.allclose(share["grad1"] / world, z1.grad[rows], atol=1e-6)
        assert torch.allclose(share["grad2"] / world, z2.grad[rows], atol=1e-6)
    # against contrasting each share alone (what a process would do without the gather): another loss
    alone = nt_xent(z1[:6].detach(), z2[:6].detach(), 0.2)[0].item()
    assert abs(alone - shares[0]["loss"]) > 0.1


def test_two_processes_pretrain_one_folder(tmp_path):
    """``--devices 2`` on a CPU (Lightning's DDP, gloo): the second process joins the folder the first made
    instead of refusing it; one start line names the batch per process and in all, one history, one weights file."""
    data = make_image_folder(tmp_path / "images", per_class=24, splits=("train",))
    out = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "meddiag", "pretrain", str(data), "--model", "seed_cnn", "--epochs", "2",
                           "--image-size", "24", "--batch-size", "8", "--accelerator", "cpu", "--devices", "2",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("pretraining seed_cnn with simclr") == 1, proc.stderr[-3000:]
    assert "2 epochs of 3 steps (batch 16: 8 on each of 2 processes)" in proc.stderr, proc.stderr[-3000:]
    assert history_epochs(out) == [1, 2]
    assert torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"]["epochs"] == 2
    assert json.loads((out / "pretrain.json").read_text())["finished"]
    # a batch larger than a process's share of the images is refused, naming the per-process batch (before any
    # process is started)
    with pytest.raises(ConfigError, match="48 images fill no batch of 32 on each of 2 processes"):
        pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=24, batch_size=32, accelerator="cpu",
                                devices=2, out=str(tmp_path / "big")), progress=False)


def test_pretrain_reads_only_a_manifests_training_rows_and_names_bad_files(tmp_path):
    images = make_image_folder(tmp_path / "img", per_class=20)
    files = sorted(images.rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"path": str(f), "split": "train"} for f in files[:30]] + [{"path": "broken.png", "split": "train"}]
    rows += [{"path": str(f), "split": "test"} for f in files[30:]]  # held out: never seen by pretraining
    manifest = write_csv(tmp_path / "unlabelled.csv", rows)  # no label column at all
    with pytest.warns(UserWarning, match="broken.png"):
        out = pretrain(PretrainConfig(data=str(manifest), model="seed_cnn", epochs=1, image_size=32, batch_size=8,
                                      out=str(tmp_path / "pre")), progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["images"] == 30 and [e["path"] for e in info["excluded"]] == [str(tmp_path / "broken.png")]
    assert "decode" in info["excluded"][0]["reason"]  # why, in words
    config = (out / "config.yaml").read_text()
    assert "image_size: 32" in config and "batch_size: 8" in config  # resolved, so the run can be repeated


def test_pretrain_reads_a_dicom_tree_of_patients_studies_and_series(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(24):  # PATIENT/STUDY/SERIES/IMAGE.dcm, 16-bit CT slices, no labels anywhere
        pixels = (synthetic_image(i % 2, rng, size=48).astype(np.uint16) * 8)
        write_dicom(tmp_path / "pacs" / f"P{i % 4}" / f"study{i % 3}" / "series1" / f"IM{i:04d}.dcm", pixels,
                    PatientID=f"P{i % 4}", WindowCenter=1000, WindowWidth=2000)
    (tmp_path / "pacs" / "P0" / "notes.txt").write_text("not an image")  # named too: nothing is left out unseen
    (tmp_path / "pacs" / "P1" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # named and skipped
    with pytest.warns(UserWarning, match="broken.dcm"):
        out = pretrain(PretrainConfig(data=str(tmp_path / "pacs"), model="seed_cnn", epochs=1, image_size=32, batch_size=8,
                                      out=str(tmp_path / "pre")), progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["images"] == 24
    assert sorted(e["path"] for e in info["excluded"]) == [str(tmp_path / "pacs" / "P0" / "notes.txt"),
                                                          str(tmp_path / "pacs" / "P1" / "broken.dcm")]


def test_pretrain_refuses_what_it_cannot_use_with_a_clear_message(tmp_path):
    few = make_image_folder(tmp_path / "few", per_class=3)
    with pytest.raises(ConfigError, match="too few to pretrain"):
        pretrain(PretrainConfig(data=str(few), model="seed_cnn", epochs=1, image_size=32, out=str(tmp_path / "a")), progress=False)
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        pretrain(PretrainConfig(data=str(tmp_path / "nowhere"), model="seed_cnn", out=str(tmp_path / "b")), progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        pretrain(PretrainConfig(data=str(few), model="seed_cnn", out=str(tmp_path / "used")), progress=False)
    with pytest.raises(ConfigError, match="method"):
        PretrainConfig.from_sources(data=str(few), method="byol")
    # through the command line: exit code 2 and the message, no traceback
    done = run_meddiag("pretrain", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"))
    assert done.returncode == 2 and "no such file or folder" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("continued", [False, True], ids=["plain", "continued-from-another"])
def test_a_killed_pretraining_resumes_from_its_last_epoch(tmp_path, continued):
    data = make_image_folder(tmp_path / "images", per_class=64)
    out = tmp_path / "pre"
    command = [sys.executable, "-m", "meddiag", "pretrain", str(data), "--model", "seed_cnn", "--epochs", "4",
               "--image-size", "32", "--batch-size", "16", "--out", str(out), "--no-progress"]
    if continued:  # a pretraining that started from another keeps saying so after its resume
        first = pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=16,
                                        out=str(tmp_path / "first")), progress=False)
        command += ["--init-weights", str(first)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while len(history_epochs(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pretraining finished before it could be killed"
    done_epochs = history_epochs(out)
    assert 2 <= len(done_epochs) < 4
    # whatever the moment of the kill, the weights on disk load and say how far they got
    meta = torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"]
    assert meta["epochs"] >= done_epochs[-1] - 1 and not (out / "pretrain.json").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming seed_cnn" in resumed.stderr
    assert history_epochs(out) == [1, 2, 3, 4]
    assert json.loads((out / "pretrain.json").read_text())["epochs"] == 4
    assert torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"]["epochs"] == 4
    assert not (out / "checkpoints" / "last.ckpt").exists()
    before = torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"].get("epochs_before", 0)
    assert before == json.loads((out / "pretrain.json").read_text())["epochs_before"] == (1 if continued else 0)
    assert "initial weights" not in resumed.stderr  # the resume loads its checkpoint, not the weights again


def test_pretrain_then_fine_tune_from_its_folder(tmp_path, capsys):
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "images", per_class=24, splits=("train", "test"))
    out = pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=2, image_size=32, batch_size=16,
                                  out=str(tmp_path / "pre")), progress=False)
    history = (out / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,twin_acc,lr,time_s" and len(history) == 3
    meta = torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"]
    assert meta["images"] == 48 and meta["method"] == "simclr"  # the train split only: test images stay unseen
    assert not (out / "checkpoints" / "last.ckpt").exists() and json.loads((out / "pretrain.json").read_text())["finished"]
    with pytest.raises(ConfigError, match="has finished"):
        pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=3, out=str(out)), resume=True, progress=False)
    result = train(TrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=8, init_weights=str(out),
                               out=str(tmp_path / "ft"), ood_keep=None), progress=False)
    _, card = load_checkpoint(result.best_checkpoint)
    assert card.init_weights["kind"] == "pretrain" and card.init_weights["pretraining"]["method"] == "simclr"
    assert "initial weights" in capsys.readouterr().err


def test_pretrain_a_3d_network_on_volumes_and_fine_tune_it(tmp_path):
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    vols = make_volume_folder(tmp_path / "vols", per_class=8, size=16)
    out = pretrain(PretrainConfig(data=str(vols), model="resnet18", volumes=True, epochs=1, image_size=16, batch_size=8,
                                  out=str(tmp_path / "pre3d")), progress=False)
    meta = torch.load(out / "weights.pt", weights_only=True)["meddiag_pretrain"]
    assert meta["spatial_dims"] == 3 and meta["images"] == 16
    result = train(TrainConfig(data=str(vols), model="resnet18", epochs=1, image_size=16, batch_size=4, init_weights=str(out),
                               out=str(tmp_path / "ft3d"), ood_keep=None), progress=False)
    report = json.loads((result.run_dir / "init_weights.json").read_text())
    assert report["backbone_fraction"] == 1.0 and report["head"] == ["fc.weight", "fc.bias"]


def test_a_pretraining_continues_from_another_for_more_epochs(tmp_path, capsys):
    """``init_weights`` in a pretraining: the network starts where the other left off (its load report kept), the
    epochs of both are recorded, and a fine-tuned model's card says how long its weights were pretrained."""
    from meddiag.models.registry import create_model
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "images", per_class=16)
    first = pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=2, image_size=32, batch_size=16,
                                    out=str(tmp_path / "first")), progress=False)
    source = torch.load(first / "weights.pt", weights_only=True)["state_dict"]
    # a learning rate too small to move the weights: what the continued run saves is what it loaded
    more = pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=16, lr=1e-12,
                                   init_weights=str(first), out=str(tmp_path / "more")), progress=False)
    err = capsys.readouterr().err
    assert "100.0%" in err and "continuing a simclr pretraining of 2 epochs: 1 more" in err
    report = json.loads((more / "init_weights.json").read_text())
    assert report["backbone_fraction"] == 1.0 and report["epochs_before"] == 2 and report["source"]["kind"] == "pretrain"
    saved = torch.load(more / "weights.pt", weights_only=True)
    assert saved["meddiag_pretrain"]["epochs"] == 1 and saved["meddiag_pretrain"]["epochs_before"] == 2
    assert json.loads((more / "pretrain.json").read_text())["epochs_before"] == 2
    fresh = create_model("seed_cnn", 1, 2, 2, 32).state_dict()
    weights = [k for k, v in source.items() if v.ndim >= 2]
    assert weights and all(torch.allclose(saved["state_dict"][k], source[k], atol=1e-6) for k in weights)
    assert not all(torch.allclose(fresh[k], source[k]) for k in weights)
    result = train(TrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=8, init_weights=str(more),
                               out=str(tmp_path / "ft"), ood_keep=None), progress=False)
    _, card = load_checkpoint(result.best_checkpoint)
    assert card.init_weights["pretraining"]["epochs"] == 1 and card.init_weights["pretraining"]["epochs_before"] == 2


def test_a_pretrainings_initial_weights_are_checked_before_the_images_are_read(tmp_path):
    from meddiag.models.weights import WeightsError

    data = make_image_folder(tmp_path / "images", per_class=8)
    # a missing file is named at once, before the (here also missing) images are read
    with pytest.raises(WeightsError, match="missing.pt: no such file or folder"):
        pretrain(PretrainConfig(data=str(tmp_path / "nowhere"), model="seed_cnn", init_weights=str(tmp_path / "missing.pt"),
                                out=str(tmp_path / "a")), progress=False)
    # weights of something else: refused with the report, unless a partial load is allowed
    other = tmp_path / "other.pt"
    torch.save({"encoder.block.weight": torch.randn(8, 3, 3, 3)}, other)
    with pytest.raises(WeightsError, match="fill only 0.0% of the backbone(?s:.*)unexpected"):
        pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=8,
                                init_weights=str(other), out=str(tmp_path / "b")), progress=False)
    with pytest.warns(UserWarning, match="only 0.0%"):
        out = pretrain(PretrainConfig(data=str(data), model="seed_cnn", epochs=1, image_size=32, batch_size=8,
                                      init_weights=str(other), allow_partial=True, out=str(tmp_path / "c")), progress=False)
    assert json.loads((out / "init_weights.json").read_text())["epochs_before"] == 0
    # a damaged file: named, no traceback, through the command line
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a weights file")
    done = run_meddiag("pretrain", str(data), "--model", "seed_cnn", "--epochs", "1", "--image-size", "32",
                       "--init-weights", str(bad), "--out", str(tmp_path / "d"), "--no-progress")
    assert done.returncode != 0 and "bad.pt" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
