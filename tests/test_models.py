"""The model registry, the classic seed_cnn, and self-sufficient checkpoints."""

import pickle

import pytest
import torch

from meddiag.errors import ModelError
from meddiag.models import ModelCard, count_parameters, create_model, get_entry, list_models, load_checkpoint, save_checkpoint


def test_registry_lists_the_models():
    assert {e.name for e in list_models()} >= {"seed_cnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0"}


def test_unknown_model_names_the_alternatives():
    with pytest.raises(ModelError, match="unknown model 'resnet19'.*resnet18"):
        create_model("resnet19", 1, 2)


def test_seed_cnn_matches_the_keras_parameter_count():
    # Keras: Conv2D(32,3)->MaxPool->Conv2D(64,3)->MaxPool->Conv2D(128,3)->Flatten->Dense(512)->Dense(2), 224x224x3.
    model = create_model("seed_cnn", in_channels=3, num_classes=2, image_size=224)
    assert count_parameters(model) == 177_304_130
    dense = model.classifier[1]
    assert dense.in_features == 128 * 52 * 52 and dense.out_features == 512
    assert count_parameters(dense) / count_parameters(model) > 0.99


def test_seed_cnn_layer_order():
    model = create_model("seed_cnn", 1, 3, image_size=28)
    kinds = [type(m).__name__ for m in model.features] + [type(m).__name__ for m in model.classifier]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                     "Flatten", "Linear", "ReLU", "Linear"]
    assert all(c.padding == (0, 0) for c in model.features if isinstance(c, torch.nn.Conv2d))


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0"])
@pytest.mark.parametrize("size", [28, 96])
def test_every_model_maps_images_to_logits(name, size):
    model = create_model(name, in_channels=1, num_classes=3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)
    layer = dict(model.named_modules()).get(get_entry(name).target_layer)
    assert layer is not None, "the registered explanation layer must exist"


def _layer1_size(model, size):
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape

    model.layer1.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    return seen["shape"][-1]


def test_small_inputs_get_a_cifar_stem():
    small, large = create_model("resnet18", 1, 2, image_size=28), create_model("resnet18", 1, 2, image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert _layer1_size(small, 28) == 28, "a CIFAR stem keeps full resolution into layer1"
    assert large.conv1.kernel_size == (7, 7) and _layer1_size(large, 224) == 56


def test_the_stem_option_overrides_the_choice_by_size():
    """stem: strided keeps a 64 px network downsampling as at 128 px (what fine-tuning from a 128 px model
    needs); small gives a large image the small-image stem; anything else is refused by name."""
    kept = create_model("resnet18", 1, 2, image_size=64, stem="strided")
    assert kept.conv1.kernel_size == (7, 7) and _layer1_size(kept, 64) == 16
    assert create_model("resnet18", 1, 2, image_size=128, stem="small").conv1.stride == (1, 1)
    assert create_model("densenet121", 1, 2, image_size=64, stem="strided").features.conv0.kernel_size == (7, 7)
    with pytest.raises(ModelError, match="stem must be one of auto, small, strided, not 'cifar'"):
        create_model("resnet18", 1, 2, image_size=64, stem="cifar")


def test_3d_resnet():
    model = create_model("resnet18", 1, 2, spatial_dims=3, image_size=16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2)


def test_checkpoint_round_trip(tmp_path):
    card = ModelCard(model_name="resnet18", class_names=["normal", "pneumonia"], task="binary",
                     image_size=28, in_channels=1, mean=0.4, std=0.3, threshold=0.3, data_name="x")
    model = card.build_model().eval()
    path = save_checkpoint(tmp_path / "m.ckpt", model, card)
    loaded, loaded_card = load_checkpoint(path)
    assert loaded_card == card
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "meddiag": Payload()}, fh)
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_non_meddiag_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a meddiag checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.ckpt")
