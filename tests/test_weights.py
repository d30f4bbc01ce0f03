"""Initial weights: files of the formats users have (torchvision, MedicalNet, Lightning, safetensors, meddiag
runs, URLs on a local HTTP server), the load report, refusals, fine-tuning and self-supervised pretraining."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from meddiag.errors import ConfigError
from meddiag.models.checkpoint import load_checkpoint, load_ood_state
from meddiag.models.registry import create_model
from meddiag.models.weights import WeightsError, fetch_url, initialise, resolve_weights
from meddiag.training.finetune import FineTuning, lr_factors

from conftest import make_image_folder


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet-18 names and shapes: 3 channels, 7x7 stem, 1000 classes, no
    shortcut-convolution bias, no batch-norm counters (as resnet18-f37072fd.pth)."""
    torch.manual_seed(0)  # the same tensors at every call
    net = create_model("resnet18", 3, 1000, 2, 224)
    return {k: v for k, v in net.state_dict().items() if "downsample.0.bias" not in k and "num_batches_tracked" not in k}


def medicalnet_resnet18() -> dict:
    """MedicalNet's file layout: {"state_dict": {"module.<name>": ...}}, parameter-free shortcuts, a
    segmentation head (conv_seg) instead of fc."""
    net = create_model("resnet18", 1, 2, 3, 32, shortcut="A")
    state = {"module." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 512, 2, 2, 2)
    return {"state_dict": state}


def test_torchvision_resnet18_into_a_grayscale_small_image_network(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"model": torchvision_resnet18(), "epoch": 90}, path)
    model = create_model("resnet18", 1, 2, 2, 28)  # 1 channel, 3x3 stem, 2 classes
    report = initialise(model, "resnet18", resolve_weights(str(path), progress=False))
    assert report.fraction == 1.0 and not report.missing and not report.unexpected
    assert "3 -> 1 input channels (summed)" in report.adapted["conv1.weight"]
    assert "7x7 -> 3x3" in report.adapted["conv1.weight"]
    assert report.head == ["fc.weight", "fc.bias"]  # 1000 classes: a new head
    source = torchvision_resnet18()
    assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert torch.equal(model.state_dict()["layer2.0.downsample.0.bias"], torch.zeros(128))
    # the summed kernel responds to a gray image as the 3-channel one did to its copy (before resizing)
    assert torch.allclose(model.conv1.weight.sum(), source["conv1.weight"].sum(), atol=1e-3)
    assert "conv1.weight" in report.backbone_parameters and "fc.weight" not in report.backbone_parameters


def test_medicalnet_resnet18_with_its_shortcuts_and_refused_without(tmp_path):
    path = tmp_path / "resnet_18_23dataset.pth"
    torch.save(medicalnet_resnet18(), path)
    weights = resolve_weights(str(path), progress=False)
    report = initialise(create_model("resnet18", 1, 3, 3, 32, shortcut="A"), "resnet18", weights)
    assert report.fraction == 1.0 and report.prefixes_stripped == ["module."]
    assert report.unexpected == ["conv_seg.0.weight"] and report.head == ["fc.weight", "fc.bias"]
    # the default (1x1-convolution) shortcuts are not in the file: 85 of 103 tensors, refused with the report and a hint
    with pytest.raises(WeightsError, match=r"82\.5% of the backbone.*--pretrained medicalnet(?s:.*)missing"):
        initialise(create_model("resnet18", 1, 3, 3, 32), "resnet18", weights)
    report = initialise(create_model("resnet18", 1, 3, 3, 32), "resnet18", weights, allow_partial=True)
    assert len(report.missing) == 18


def test_2d_weights_inflated_into_a_3d_network(tmp_path):
    path = tmp_path / "r.safetensors"
    from safetensors.torch import save_file

    save_file(torchvision_resnet18(), str(path))
    with pytest.raises(WeightsError, match="2D vs 3D: --inflate"):
        initialise(create_model("resnet18", 1, 2, 3, 32), "resnet18", resolve_weights(str(path), progress=False))
    model = create_model("resnet18", 1, 2, 3, 32)
    report = initialise(model, "resnet18", resolve_weights(str(path), progress=False), inflate=True)
    assert report.fraction == 1.0
    assert "inflated" in report.adapted["layer1.0.conv1.weight"] and "3 -> 1" in report.adapted["conv1.weight"]
    # a volume of identical slices gets the 2D kernel's response: depth-summed 3D kernel == 2D kernel
    src = torchvision_resnet18()["layer1.0.conv1.weight"]
    assert torch.allclose(model.layer1[0].conv1.weight.sum(dim=2), src, atol=1e-6)


def test_hostile_and_malformed_weights_files_are_refused_by_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(WeightsError, match="evil.pth.*Python objects beyond tensors"):
        initialise(create_model("resnet18", 1, 2, 2, 28), "resnet18", resolve_weights(str(evil), progress=False))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        initialise(create_model("resnet18", 1, 2, 2, 28), "resnet18", resolve_weights(str(junk), progress=False))
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(WeightsError, match="empty.pt holds no named tensors"):
        initialise(create_model("resnet18", 1, 2, 2, 28), "resnet18", resolve_weights(str(empty), progress=False))
    with pytest.raises(WeightsError, match="absent.pt: no such file"):
        resolve_weights(str(tmp_path / "absent.pt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="neither a meddiag run"):
        resolve_weights(str(tmp_path / "folder"))
    seed = tmp_path / "seed.pt"
    torch.save(create_model("seed_cnn", 1, 2, 2, 28).state_dict(), seed)
    with pytest.raises(WeightsError, match="another architecture"):
        initialise(create_model("resnet18", 1, 2, 2, 28), "resnet18", resolve_weights(str(seed), progress=False))


def test_url_weights_downloaded_once_verified_and_refused_on_mismatch(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    monkeypatch.setenv("MEDDIAG_CACHE", str(tmp_path / "cache"))
    torch.save(torchvision_resnet18(), root / "resnet18-abc.pth")
    digest = hashlib.sha256((root / "resnet18-abc.pth").read_bytes()).hexdigest()
    with pytest.raises(Exception, match="checksum mismatch.*sha256 0000000000"):
        fetch_url(f"{url}/resnet18-abc.pth#sha256={'0' * 64}", progress=False)
    assert not list((tmp_path / "cache").rglob("*.pth"))
    with pytest.raises(WeightsError, match="sha256=<hex digest>"):
        fetch_url(f"{url}/resnet18-abc.pth#md5=xyz", progress=False)
    first = resolve_weights(f"{url}/resnet18-abc.pth#sha256={digest[:10]}", progress=False)
    assert first.kind == "url" and first.sha256 == digest and first.path.parent == tmp_path / "cache" / "weights"
    (root / "resnet18-abc.pth").unlink()  # the cached copy serves from now on
    again = resolve_weights(f"{url}/resnet18-abc.pth#sha256={digest}", progress=False)
    assert again.path == first.path
    report = initialise(create_model("resnet18", 1, 2, 2, 28), "resnet18", again)
    assert report.source["sha256"] == digest and report.fraction == 1.0


def test_published_weights_fetched_from_a_mirror_into_a_run(http_dir, tmp_path, monkeypatch):
    """--pretrained medicalnet: the catalogue's file name under $MEDDIAG_WEIGHTS_MIRROR, the architecture
    options the weights need (parameter-free shortcuts) set, the source in the card."""
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    root, url = http_dir
    monkeypatch.setenv("MEDDIAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDDIAG_WEIGHTS_MIRROR", url)
    torch.save(medicalnet_resnet18(), root / "resnet_18_23dataset.pth")
    from conftest import make_volume_folder

    data = make_volume_folder(tmp_path / "vols")
    config = TrainConfig(data=str(data), model="resnet18", epochs=1, image_size=32, batch_size=4, pretrained="medicalnet",
                         out=str(tmp_path / "run"), ood_keep=None)
    result = train(config, progress=False)
    report = json.loads((result.run_dir / "init_weights.json").read_text())
    assert report["backbone_fraction"] == 1.0 and report["unexpected"] == ["conv_seg.0.weight"]
    _, card = load_checkpoint(result.best_checkpoint)
    assert card.model_kwargs["shortcut"] == "A" and card.init_weights["kind"] == "published"
    assert "MedicalNet" in card.init_weights["source"]


def test_lr_schedule_freezes_then_warms_the_backbone():
    head, body = lr_factors(FineTuning(freeze_epochs=2, backbone_lr_mult=0.1, warmup_epochs=1), epochs=10,
                            steps_per_epoch=10, scheduler="none")
    assert head(0) == pytest.approx(0.1) and head(9) == 1.0 and head(50) == 1.0
    assert body(0) == body(19) == 0.0  # frozen for 2 epochs
    assert body(20) == pytest.approx(0.01) and body(29) == pytest.approx(0.1)  # then its own warm-up, at 0.1x
    cosine_head, _ = lr_factors(FineTuning(), epochs=10, steps_per_epoch=10, scheduler="cosine")
    assert cosine_head(0) == 1.0 and cosine_head(50) == pytest.approx(0.5) and cosine_head(99) < 0.01


def test_fine_tune_from_another_run_with_a_frozen_backbone(tmp_path, small_run):
    """--init-weights RUN --freeze-backbone: the backbone in the new model is exactly the first run's; the
    head learned; the report and the card say where the weights came from."""
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "other", per_class=20, classes=("benign", "malignant", "normal"), seed=3)
    with pytest.raises(ConfigError, match="need initial weights"):
        TrainConfig.from_sources(data=str(data), freeze_backbone=True)
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=2, image_size=32, batch_size=8, init_weights=str(small_run),
                         freeze_backbone=True, out=str(tmp_path / "probe"), ood_keep=None)
    result = train(config, progress=False)
    source, _ = load_checkpoint(small_run / "checkpoints" / "best.ckpt")
    model, card = load_checkpoint(result.best_checkpoint)
    assert torch.equal(model.state_dict()["features.6.weight"], source.state_dict()["features.6.weight"])
    assert torch.equal(model.state_dict()["classifier.1.weight"], source.state_dict()["classifier.1.weight"])
    assert model.state_dict()["classifier.3.weight"].shape[0] == 3  # a new 3-class head
    assert card.init_weights["kind"] == "run" and card.init_weights["head"] == "new" and card.init_weights["backbone_fraction"] == 1.0
    report = json.loads((result.run_dir / "init_weights.json").read_text())
    assert "classifier.3.weight" not in report["backbone_parameters"] and "features.0.weight" in report["backbone_parameters"]
    # the first run's out-of-distribution reference is its data's, not weights: set aside, said so, not "unexpected"
    ood = load_ood_state(small_run / "checkpoints" / "best.ckpt")
    assert ood and report["unexpected"] == []
    assert any(f"out-of-distribution reference ({len(ood)} tensors) is not carried over" in n for n in report["notes"])


def resnet18_run_checkpoint(path, image_size: int = 128):
    """A meddiag checkpoint of ResNet-18 trained at ``image_size`` (its card and an OOD tensor included), and the
    network it holds."""
    from meddiag.models.checkpoint import META_KEY

    torch.manual_seed(0)
    source = create_model("resnet18", 1, 2, 2, image_size)
    state = {"model." + k: v for k, v in source.state_dict().items()}
    state["ood.means"] = torch.zeros(2, 512)
    torch.save({"state_dict": state, META_KEY: {"model_name": "resnet18", "image_size": image_size, "spatial_dims": 2}}, path)
    return source


def test_a_run_trained_at_another_size_keeps_its_stem_or_says_it_changed(tmp_path):
    """A ResNet-18 trained at 128 px (strided stem) fine-tuned at 64 px: kept_stem asks for the strided stem and
    then everything loads unchanged; with the small-image stem the 7x7 kernel is resized and the report says
    the network's scale changed. Files from outside meddiag say nothing and keep the automatic stem."""
    from meddiag.models.weights import WeightsFile, kept_stem

    path = tmp_path / "best.ckpt"
    source = resnet18_run_checkpoint(path)
    weights = WeightsFile(str(path), "run", path)
    assert kept_stem(weights, "resnet18", 2, 64) == "strided"
    assert kept_stem(weights, "resnet18", 2, 128) is None and kept_stem(weights, "resnet18", 2, 224) is None
    assert kept_stem(weights, "seed_cnn", 2, 64) is None  # no stem to keep
    outside = tmp_path / "torchvision.pth"
    torch.save(torchvision_resnet18(), outside)
    assert kept_stem(WeightsFile(str(outside), "file", outside), "resnet18", 2, 28) is None

    kept = create_model("resnet18", 1, 2, 2, 64, stem="strided")
    report = initialise(kept, "resnet18", weights, image_size=64, model_kwargs={"stem": "strided"})
    assert report.fraction == 1.0 and report.adapted == {} and report.head_loaded and report.unexpected == []
    assert torch.equal(kept.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    notes = " | ".join(report.notes)
    assert "trained at 128 px, trained here at 64 px; the network keeps the source's stem" in notes
    assert "out-of-distribution reference (1 tensor) is not carried over" in notes

    switched = create_model("resnet18", 1, 2, 2, 64)
    report = initialise(switched, "resnet18", weights, image_size=64, model_kwargs={"stem": "auto"})
    assert report.fraction == 1.0 and report.adapted["conv1.weight"].startswith("kernel 7x7 -> 3x3")
    assert torch.equal(switched.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    assert any("the small-image stem (stride 1, no downsampling), where the source had a strided stem" in n for n in report.notes)
    same = initialise(create_model("resnet18", 1, 2, 2, 128), "resnet18", weights, image_size=128)
    assert not any("px" in n for n in same.notes)


def test_fine_tuning_a_128px_model_at_32px_keeps_its_stem_in_the_run_and_its_card(tmp_path):
    """train --init-weights (a 128 px ResNet-18) on 32 px images: the run's network has the source's strided stem,
    the config and the model card say so, and the saved model predicts with that network."""
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    path = tmp_path / "source.ckpt"
    source = resnet18_run_checkpoint(path)
    data = make_image_folder(tmp_path / "images", per_class=12)
    config = TrainConfig(data=str(data), model="resnet18", epochs=1, image_size=32, batch_size=8, init_weights=str(path),
                         out=str(tmp_path / "run"), ood_keep=None, freeze_backbone=True)
    result = train(config, progress=False)
    model, card = load_checkpoint(result.best_checkpoint)
    assert card.model_kwargs == {"stem": "strided"} and "stem: strided" in (result.run_dir / "config.yaml").read_text()
    assert model.state_dict()["conv1.weight"].shape[-1] == 7
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], source.state_dict()["layer3.0.conv1.weight"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_torchvision_densenet121_names_are_mapped_onto_monais(tmp_path):
    """torchvision's DenseNet names (``denselayer1.norm1``; before 0.3 ``norm.1``) and ``classifier`` map onto
    MONAI's ``denselayer1.layers.norm1`` and ``class_layers.out``."""
    import re

    torch.manual_seed(0)
    monai_names = create_model("densenet121", 3, 1000, 2, 224).state_dict()

    def torchvision_name(key: str, old: bool) -> str:
        key = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        return re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", key) if old else key

    for old in (False, True):
        path = tmp_path / f"densenet121-{'old' if old else 'new'}.pth"
        saved = {torchvision_name(k, old): v for k, v in monai_names.items() if "num_batches_tracked" not in k}
        torch.save(saved, path)
        model = create_model("densenet121", 1, 2, 2, 28)  # grayscale, small-image stem, 2 classes
        report = initialise(model, "densenet121", resolve_weights(str(path), progress=False))
        assert report.fraction == 1.0 and not report.unexpected, report.text()
        # every dense layer's tensors and the classifier's were renamed (58 layers x 10 tensors + 2)
        assert report.renamed == sum(k not in monai_names for k in saved) == 58 * 10 + 2
        assert report.head == ["class_layers.out.weight", "class_layers.out.bias"]  # 1000 classes: a new head
        assert "3 -> 1 input channels (summed)" in report.adapted["features.conv0.weight"]
        key = "features.denseblock2.denselayer3.layers.conv2.weight"
        assert torch.equal(model.state_dict()[key], monai_names[key])


def test_a_lightning_checkpoint_of_another_project_loads_its_model(tmp_path):
    """A Lightning .ckpt: the weights under ``state_dict`` with the module's attribute as prefix (``model.``),
    beside optimiser states and hyper-parameters of plain types."""
    source = create_model("resnet18", 1, 5, 2, 64)
    path = tmp_path / "epoch=9-step=100.ckpt"
    torch.save({"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001}]}],
                "hyper_parameters": {"lr": 0.001, "classes": 5}}, path)
    model = create_model("resnet18", 1, 5, 2, 64)
    report = initialise(model, "resnet18", resolve_weights(str(path), progress=False))
    assert report.fraction == 1.0 and report.prefixes_stripped == ["model."] and report.head_loaded
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
