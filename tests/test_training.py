"""Training settings a user relies on without seeing them."""

import pytest
import torch

from meddiag.training.run import resolve_precision


def test_explicit_precision_is_kept():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu", 3) == "bf16-mixed"


def test_auto_precision_keeps_volumes_in_fp32_on_cpu():
    assert resolve_precision("auto", "cpu", spatial_dims=3) == "32-true"
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", "cpu", spatial_dims=2) == ("bf16-mixed" if cpu_bf16 else "32-true")


def test_default_batch_size_keeps_about_16_steps_per_epoch_on_small_sets():
    from meddiag.training.run import default_batch_size

    assert default_batch_size(4708) == 128 and default_batch_size(1188, spatial_dims=3) == 32  # full-size sets: unchanged
    assert default_batch_size(546) == 32  # BreastMNIST: 17 steps an epoch instead of 4
    assert default_batch_size(60) == 8 and default_batch_size(100_000) == 128
    for n in (300, 546, 1000, 1500):
        b = default_batch_size(n)
        assert b & (b - 1) == 0 and n // b >= 16


def _module(ema_decay: float):
    from meddiag.models.checkpoint import ModelCard
    from meddiag.training.module import DiagnosisModule

    card = ModelCard(model_name="seed_cnn", class_names=["benign", "malignant"], task="binary", image_size=28, in_channels=1, spatial_dims=2)
    optim = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "none", "epochs": 1}
    return DiagnosisModule(card=card.model_dump(), optim=optim, augment={}, ema_decay=ema_decay)


def test_weight_average_warms_up_then_follows_the_stated_decay():
    from meddiag.training.module import ema_decay_at

    assert ema_decay_at(0, 0.99) == 0.1  # the first step barely remembers the random start
    assert abs(ema_decay_at(90, 0.99) - 0.91) < 1e-12
    assert ema_decay_at(10_000, 0.99) == 0.99

    module = _module(0.99)
    param = next(module.model.parameters())
    with torch.no_grad():
        param.fill_(1.0)
        module.ema.update_parameters(module.model)  # first update: a copy
        param.fill_(2.0)
        module.ema.update_parameters(module.model)  # one average taken: decay (1 + 1) / (10 + 1)
    averaged = next(module.ema.module.parameters())
    d = 2 / 11
    torch.testing.assert_close(averaged, torch.full_like(averaged, d * 1.0 + (1 - d) * 2.0))


def test_checkpoints_hold_the_averaged_weights_as_the_model_and_resume_restores_both():
    module = _module(0.5)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    module.ema.update_parameters(module.model)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)  # now the trained weights differ from the average
    raw = {k: v.clone() for k, v in module.model.state_dict().items()}
    averaged = {k: v.clone() for k, v in module.ema.module.state_dict().items()}

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    for key, value in averaged.items():  # what best.ckpt gives a predictor: the average
        torch.testing.assert_close(state["model." + key], value)
        torch.testing.assert_close(state["ema.module." + key], raw[key])

    resumed = _module(0.5)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    for key in raw:
        torch.testing.assert_close(resumed.model.state_dict()[key], raw[key])
        torch.testing.assert_close(resumed.ema.module.state_dict()[key], averaged[key])

    # a run from before weight averaging resumes: the average starts from its weights
    old = {"state_dict": {k: v for k, v in _module(0.0).state_dict().items()}}
    upgraded = _module(0.5)
    upgraded.on_load_checkpoint(old)
    upgraded.load_state_dict(old["state_dict"])  # strict: every key accounted for
    for key, value in upgraded.model.state_dict().items():
        torch.testing.assert_close(upgraded.ema.module.state_dict()[key], value)


def test_validation_judges_the_averaged_weights():
    module = _module(0.9)
    assert module.eval_model is module.ema.module
    assert _module(0.0).ema is None and _module(0.0).eval_model is not None


def test_the_model_kept_is_the_final_average_unless_the_best_epoch_is_asked_for(tmp_path):
    import csv

    from conftest import make_image_folder
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "images", per_class=20)
    for select in ("last", "best"):
        config = TrainConfig(data=str(data), model="seed_cnn", epochs=4, image_size=28, select=select, out=str(tmp_path / select),
                             keep_resume_state=True)
        result = train(config, progress=False)
        val_auc = [float(r["val_auc"]) for r in csv.DictReader(open(result.run_dir / "history.csv"))]
        assert len(val_auc) == 4  # no early stopping by default
        kept = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
        final = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        same = all(torch.equal(kept[k], final[k]) for k in kept if k.startswith("model."))
        if select == "last":
            assert same and result.val_auc == pytest.approx(val_auc[-1])
        else:
            assert result.val_auc == pytest.approx(max(val_auc))
            assert same == (val_auc.index(max(val_auc)) == 3)


def test_resuming_a_run_that_stopped_early_evaluates_it_rather_than_refusing(tmp_path):
    import json

    from conftest import make_image_folder
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "images", per_class=20)
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=12, image_size=28, early_stopping_patience=1,
                         select="best", out=str(tmp_path / "run"))
    first = train(config, progress=False)
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["epochs"] < 12 and record["max_epochs"] == 12  # the validation AUC saturates on this easy set
    again = train(config, resume=True, progress=False)
    assert again.best_checkpoint == first.best_checkpoint and again.val_auc == pytest.approx(first.val_auc)
