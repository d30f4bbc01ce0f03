"""The prepared-image cache: a second run decodes nothing, changed and new files are decoded again, a damaged
or half-written entry is rebuilt (never trained on), DICOM facts survive it, and it never costs a run."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import meddiag.data.files as files
from meddiag.data.cache import PreparedCache, Preparation, file_identity
from meddiag.data.sources import load_data

from conftest import make_image_folder, run_meddiag, synthetic_image, write_dicom


@pytest.fixture
def count_decodes(monkeypatch):
    """How many files were decoded (read_image calls) since the last reset."""
    calls: list[str] = []
    real = files.read_image

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "read_image", counting)
    return calls


def same_data(a, b) -> bool:
    return all(torch.equal(a.splits[s].images, b.splits[s].images) and torch.equal(a.splits[s].labels, b.splits[s].labels)
               and a.splits[s].paths == b.splits[s].paths for s in a.splits)


def test_a_second_run_decodes_nothing_and_gets_the_same_data(tmp_path, count_decodes):
    data = make_image_folder(tmp_path / "images", per_class=20)
    first = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 40
    count_decodes.clear()
    again = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert count_decodes == [] and same_data(first, again)
    # another preparation (size, fit) is another entry: decoded once more, then held too
    load_data(str(data), image_size=24, cache=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 40
    info = PreparedCache(tmp_path / "cache").info()
    assert info["entries"] == 80 and info["bytes_held"] == 40 * 32 * 32 + 40 * 24 * 24
    # without the cache: decoded every time, the same data
    count_decodes.clear()
    plain = load_data(str(data), image_size=32, cache="off", progress=False)
    assert len(count_decodes) == 40 and same_data(first, plain)


def test_changed_and_new_files_are_decoded_and_their_old_entries_never_used(tmp_path, count_decodes):
    data = make_image_folder(tmp_path / "images", per_class=10)
    load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    changed = sorted((data / "normal").glob("*.png"))[0]
    bright = np.full((40, 40), 250, np.uint8)
    Image.fromarray(bright).save(changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))  # a new modification time
    Image.fromarray(synthetic_image(1, np.random.default_rng(7))).save(data / "pneumonia" / "new.png")
    count_decodes.clear()
    again = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert sorted(count_decodes) == sorted([str(changed), str(data / "pneumonia" / "new.png")])
    where = {p: (s, i) for s, part in again.splits.items() for i, p in enumerate(part.paths)}
    split, i = where[str(changed)]
    assert int(again.splits[split].images[i].min()) >= 240  # the file as it is now, not as it was


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated shard"])
def test_a_damaged_entry_is_decoded_again_never_trained_on(tmp_path, count_decodes, damage):
    data = make_image_folder(tmp_path / "images", per_class=10)
    first = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    cache = PreparedCache(tmp_path / "cache")
    victim = sorted(data.rglob("*.png"))[3]
    entry = cache.lookup(Preparation(False, 32, "pad", None, None), [file_identity(victim)])[file_identity(victim)]
    if damage == "flipped bytes":
        with open(entry.shard, "r+b") as fh:
            fh.seek(entry.slot * entry.nbytes + 100)
            fh.write(bytes(255 - b for b in fh.read(8)))
    else:  # as if the disk lost the shard's end
        os.truncate(entry.shard, entry.slot * entry.nbytes + 10)
    count_decodes.clear()
    with pytest.warns(UserWarning, match="damaged"):
        again = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert str(victim) in count_decodes
    assert same_data(first, again)  # rebuilt from the file: nothing of the damaged bytes was used
    count_decodes.clear()
    load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert count_decodes == []  # and held again


def test_a_write_killed_before_its_entries_were_recorded_leaves_no_entry(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "images", per_class=10)

    def killed(fd):
        raise KeyboardInterrupt  # the process dies after writing the bytes, before recording them

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert PreparedCache(tmp_path / "cache").info()["entries"] == 0
    decoded: list[str] = []
    real = files.read_image
    monkeypatch.setattr(files, "read_image", lambda path, *a, **k: (decoded.append(str(path)), real(path, *a, **k))[1])
    load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert len(decoded) == 20  # everything decoded again, nothing read from the unrecorded slots
    assert PreparedCache(tmp_path / "cache").info()["entries"] == 20


def test_dicom_facts_and_patients_survive_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(24):
        label = "normal" if i % 2 else "pneumonia"
        write_dicom(tmp_path / "dcm" / label / f"im{i}.dcm", synthetic_image(i % 2, rng).astype(np.uint16) * 4,
                    PatientID=f"PAT{i // 4}", Modality="CR", BodyPartExamined="CHEST")
    first = load_data(str(tmp_path / "dcm"), image_size=32, cache=tmp_path / "cache", progress=False)
    again = load_data(str(tmp_path / "dcm"), image_size=32, cache=tmp_path / "cache", progress=False)
    assert same_data(first, again)
    assert again.acquisition == first.acquisition == {"modality": {"CR": 24}, "body_part": {"CHEST": 24}}
    assert [again.splits[s].groups for s in again.splits] == [first.splits[s].groups for s in first.splits]
    assert first.splits["train"].groups and not any("PAT" in g for g in first.splits["train"].groups)  # one-way keys


def test_a_cache_that_cannot_be_used_costs_a_warning_not_the_run(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=10)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot be used"):
        got = load_data(str(data), image_size=32, cache=tmp_path / "a-file" / "cache", progress=False)
    assert len(got.splits["train"]) + len(got.splits["val"]) + len(got.splits["test"]) == 20


def test_processes_filling_one_cache_at_once_leave_every_entry_sound(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=40)
    script = textwrap.dedent(f"""
        from meddiag.data.sources import load_data
        load_data({str(data)!r}, image_size=32, cache={str(tmp_path / 'cache')!r}, progress=False)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    cache = PreparedCache(tmp_path / "cache")
    preparation = Preparation(False, 32, "pad", None, None)
    paths = sorted(data.rglob("*.png"))
    entries = cache.lookup(preparation, [file_identity(p) for p in paths])
    assert len(entries) == 80
    fresh = load_data(str(data), image_size=32, cache="off", progress=False)
    arrays = {p: a for part in fresh.splits.values() for p, a in zip(part.paths, part.images)}
    for path in paths:
        assert np.array_equal(cache.read(entries[file_identity(path)]), arrays[str(path)].numpy())


def test_cache_info_and_clear_from_the_command_line(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=10)
    load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    run = lambda *a: run_meddiag("cache", *a, "--cache", str(tmp_path / "cache"))  # noqa: E731
    info = run("info")
    assert info.returncode == 0 and "20 prepared files" in info.stdout and "v1-image-32-pad-own" in info.stdout
    cleared = run("clear")
    assert cleared.returncode == 0 and "MiB freed" in cleared.stdout
    assert "0 prepared files" in run("info").stdout
    bad = run("shred")
    assert bad.returncode == 2 and "choose info or clear" in bad.stderr


def test_disk_images_answer_as_the_in_memory_tensor_does(tmp_path):
    from meddiag.data.cache import DiskImages
    from meddiag.data.channels import match_channels

    data = make_image_folder(tmp_path / "images", per_class=12)
    Image.fromarray(np.stack([synthetic_image(0, np.random.default_rng(1))] * 3, -1) + np.uint8(1)).save(
        data / "normal" / "colour.png")  # one colour image: every image is given as 3 channels
    memory = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    disk = load_data(str(data), image_size=32, cache=tmp_path / "cache", memory_mb=0, progress=False)
    for name, part in disk.splits.items():
        held, lazy = memory.splits[name].images, part.images
        assert isinstance(lazy, DiskImages) and isinstance(held, torch.Tensor)
        assert lazy.shape == held.shape and len(lazy) == len(held) and lazy.dtype == torch.uint8 and lazy.ndim == 4
        assert torch.equal(lazy[0], held[0]) and torch.equal(lazy[-1], held[-1])
        n = len(held)
        pick = torch.tensor([n - 1, 0, n // 2])
        assert torch.equal(lazy[1:5], held[1:5]) and torch.equal(lazy[pick], held[pick])
        assert torch.equal(lazy[[1, 1]], held[[1, 1]]) and torch.equal(lazy[np.array([n - 1])], held[np.array([n - 1])])
        assert torch.equal(match_channels(lazy, 1)[:], match_channels(held, 1))
    train = disk.splits["train"]
    sub = train.subset([4, 0, 3])
    assert isinstance(sub.images, DiskImages) and torch.equal(sub.images[:], memory.splits["train"].subset([4, 0, 3]).images)
    joined = type(train).concat([disk.splits["train"], disk.splits["val"]])
    assert isinstance(joined.images, DiskImages)
    assert torch.equal(joined.images[:], torch.cat([memory.splits["train"].images, memory.splits["val"].images]))


def test_a_damaged_entry_found_while_training_reads_is_prepared_again(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=10)
    memory = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    disk = load_data(str(data), image_size=32, cache=tmp_path / "cache", memory_mb=0, progress=False)
    lazy = disk.splits["train"].images
    entry = lazy.entries[2]
    with open(entry.shard, "r+b") as fh:
        fh.seek(entry.slot * entry.nbytes)
        fh.write(b"\xff" * 16)
    assert torch.equal(lazy[:], memory.splits["train"].images)  # the damaged image came from its file, not the bytes
    fresh = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert torch.equal(fresh.splits["train"].images, memory.splits["train"].images)  # and the cache holds it whole again


def test_training_from_disk_gives_the_model_training_in_memory_gives(tmp_path):
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    data = make_image_folder(tmp_path / "images", per_class=24)
    results = []
    for name, memory_mb in (("memory", 1024), ("disk", 0)):
        config = TrainConfig(data=str(data), model="seed_cnn", epochs=2, image_size=32, batch_size=8, precision="32-true",
                             out=str(tmp_path / name), cache=str(tmp_path / "cache"), memory_mb=memory_mb)
        results.append(train_and_evaluate(config, progress=False))
    a, b = (r.test_metrics for r in results)
    assert a["auc"] == b["auc"] and a["acc"] == b["acc"]
    assert (tmp_path / "memory" / "predictions.csv").read_text() == (tmp_path / "disk" / "predictions.csv").read_text()


def test_disk_images_travel_to_loader_worker_processes(tmp_path):
    import pickle

    data = make_image_folder(tmp_path / "images", per_class=10)
    memory = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    disk = load_data(str(data), image_size=32, cache=tmp_path / "cache", memory_mb=0, progress=False)
    copy = pickle.loads(pickle.dumps(disk.splits["train"].images))
    assert torch.equal(copy[:], memory.splits["train"].images)


class DyingPreparer(files.Preparer):
    """Prepares as meddiag does, but a decoding process given ``die.png`` dies (as one killed for memory would)."""

    def prepare(self, rec):
        if rec.path.name == "die.png" and multiprocessing.parent_process() is not None:
            os._exit(1)
        return super().prepare(rec)


@pytest.fixture
def pools(monkeypatch):
    """Decode in processes from the first file on; the pools used, in order."""
    used = []
    real = files._decode_pool

    def recording(n, processes=True):
        used.append(real(n, processes))
        return used[-1]

    monkeypatch.setattr(files, "PROCESS_MIN_FILES", 1)
    monkeypatch.setattr(files, "_decode_pool", recording)
    return used


def test_a_large_first_pass_decodes_in_processes_with_the_threads_result(tmp_path, pools):
    data = make_image_folder(tmp_path / "images", per_class=20)
    (data / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest")
    with pytest.MonkeyPatch.context() as threads_only:
        threads_only.setattr(files, "PROCESS_MIN_FILES", 10**9)
        in_threads = load_data(str(data), image_size=32, cache="off", progress=False)
    in_processes = load_data(str(data), image_size=32, cache=tmp_path / "cache", progress=False)
    assert [type(p).__name__ for p in pools] == ["ThreadPoolExecutor", "ProcessPoolExecutor"]
    assert same_data(in_threads, in_processes)
    assert [p for p, _ in in_processes.excluded] == [str(data / "normal" / "broken.png")] == [p for p, _ in in_threads.excluded]
    assert PreparedCache(tmp_path / "cache").info()["entries"] == 40  # the processes' arrays were kept


def test_a_decoding_process_that_dies_costs_a_warning_and_the_rest_are_read_in_threads(tmp_path, pools, monkeypatch):
    data = make_image_folder(tmp_path / "images", per_class=20)
    Image.fromarray(synthetic_image(0, np.random.default_rng(1))).save(data / "normal" / "die.png")
    monkeypatch.setattr(files, "Preparer", DyingPreparer)
    with pytest.warns(UserWarning, match="a process decoding images stopped.*read in threads"):
        got = load_data(str(data), image_size=32, cache="off", progress=False)
    assert [type(p).__name__ for p in pools] == ["ProcessPoolExecutor", "ThreadPoolExecutor"]
    assert sum(len(s) for s in got.splits.values()) + len(got.excluded) == 41
