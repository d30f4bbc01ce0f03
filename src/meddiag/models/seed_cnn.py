"""The classic convolutional network: conv -> pool -> conv -> pool -> conv -> dense -> softmax."""

from __future__ import annotations

from torch import Tensor, nn

from meddiag.errors import ModelError
from meddiag.models.registry import register_model


def seed_cnn_feature_size(image_size: int) -> int:
    """Side length of the last feature map for a square input ('valid' convolutions)."""
    size = image_size
    for step in ("conv", "pool", "conv", "pool", "conv"):
        size = size - 2 if step == "conv" else size // 2
    return size


@register_model("seed_cnn", spatial_dims=(2, 3), target_layer="features.7", pooled_head=False, head="classifier.3",
                description="classic Conv32-Pool-Conv64-Pool-Conv128-Dense512 network, 'valid' padding")
def seed_cnn(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224,
             widths: tuple[int, int, int] = (32, 64, 128), dense: int = 512) -> nn.Module:
    """Layer for layer the Keras Sequential classic:

    Conv(32, 3x3, ReLU) -> MaxPool(2) -> Conv(64, 3x3, ReLU) -> MaxPool(2) ->
    Conv(128, 3x3, ReLU) -> Flatten -> Dense(512, ReLU) -> Dense(num_classes).
    Returns logits; softmax is applied at inference. At 224x224x3 with 2 classes it has
    177,304,130 parameters, nearly all in the first dense layer.
    """
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    side = seed_cnn_feature_size(image_size)
    if side < 1:
        raise ModelError(f"seed_cnn needs images of at least 18 px, got {image_size}")
    c1, c2, c3 = widths
    features = nn.Sequential(
        conv(in_channels, c1, 3), nn.ReLU(inplace=True), pool(2),
        conv(c1, c2, 3), nn.ReLU(inplace=True), pool(2),
        conv(c2, c3, 3), nn.ReLU(inplace=True),
    )
    classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(c3 * side**spatial_dims, dense), nn.ReLU(inplace=True), nn.Linear(dense, num_classes)
    )
    return SeedCNN(features, classifier)


class SeedCNN(nn.Module):
    """``features`` (the convolutions) followed by ``classifier`` (the dense layers)."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
