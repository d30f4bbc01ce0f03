"""ResNet, DenseNet and EfficientNet from MONAI, 2D and 3D through one code path.

2D inputs of 64 px or less get a CIFAR-style stem (3x3 stride-1 first convolution, no
max-pool), as the MedMNIST baselines do; larger inputs keep the ImageNet stem. Volumes always
keep the strided stem: measured on 2 CPU cores, ResNet-18 on 28^3 volumes trains at 3 volumes/s
with a CIFAR stem and at 95 volumes/s with the strided one. The option ``stem`` (``auto``, ``small``,
``strided``; a ``model_kwargs`` entry, kept in the model card) overrides the choice: fine-tuning from a
meddiag model keeps the stem its weights were learned with (see :mod:`meddiag.training.run`).
"""

from __future__ import annotations

from monai.networks.nets import DenseNet121, EfficientNetBN, ResNet
from torch import nn

from meddiag.errors import ModelError
from meddiag.models.registry import register_model

SMALL_INPUT = 64


STEMS = ("auto", "small", "strided")


def cifar_stem(spatial_dims: int, image_size: int, stem: str = "auto") -> bool:
    """Whether a network gets the stride-1, no-max-pool stem: with ``stem="auto"`` small 2D images only."""
    if stem not in STEMS:
        raise ModelError(f"stem must be one of {', '.join(STEMS)}, not {stem!r}")
    if stem != "auto":
        return stem == "small"
    return spatial_dims == 2 and image_size <= SMALL_INPUT


def _resnet(block: str, layers: list[int], in_channels: int, num_classes: int, spatial_dims: int, image_size: int,
            shortcut: str, downsample_bias: bool, stem: str) -> nn.Module:
    if shortcut not in ("A", "B"):
        raise ModelError(f"resnet shortcut must be A (parameter-free, as MedicalNet's ResNet-18) or B (1x1 convolution), not {shortcut!r}")
    small = cifar_stem(spatial_dims, image_size, stem)
    return ResNet(
        block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
        n_input_channels=in_channels, num_classes=num_classes,
        conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2, no_max_pool=small,
        shortcut_type=shortcut, bias_downsample=downsample_bias,
    )


# shortcut and downsample_bias exist for published weights: MedicalNet's ResNet-18 has parameter-free
# ('A') shortcuts, its ResNet-50 1x1 shortcut convolutions without bias (``--pretrained medicalnet`` sets them).
@register_model("resnet18", spatial_dims=(2, 3), target_layer="layer4", head="fc", description="ResNet-18 (MONAI), 11M parameters")
def resnet18(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224,
             shortcut: str = "B", downsample_bias: bool = True, stem: str = "auto") -> nn.Module:
    return _resnet("basic", [2, 2, 2, 2], in_channels, num_classes, spatial_dims, image_size, shortcut, downsample_bias, stem)


@register_model("resnet50", spatial_dims=(2, 3), target_layer="layer4", head="fc", description="ResNet-50 (MONAI), 23M parameters")
def resnet50(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224,
             shortcut: str = "B", downsample_bias: bool = True, stem: str = "auto") -> nn.Module:
    return _resnet("bottleneck", [3, 4, 6, 3], in_channels, num_classes, spatial_dims, image_size, shortcut, downsample_bias, stem)


@register_model("densenet121", spatial_dims=(2, 3), target_layer="features.norm5", head="class_layers.out", description="DenseNet-121 (MONAI), 7M parameters")
def densenet121(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224, stem: str = "auto") -> nn.Module:
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    if cifar_stem(spatial_dims, image_size, stem):
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        net.features.conv0 = conv(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.features.pool0 = nn.Identity()
    return net


@register_model("efficientnet_b0", spatial_dims=(2, 3), target_layer="_bn1", head="_fc", description="EfficientNet-B0 (MONAI), 4M parameters")
def efficientnet_b0(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224, stem: str = "auto") -> nn.Module:
    net = EfficientNetBN("efficientnet-b0", pretrained=False, progress=False, spatial_dims=spatial_dims,
                         in_channels=in_channels, num_classes=num_classes)
    if cifar_stem(spatial_dims, image_size, stem):
        # stride 1 and 'same' padding in the stem: small images keep their resolution.
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        net._conv_stem = conv(in_channels, net._conv_stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net._conv_stem_padding = nn.Identity()
    return net
