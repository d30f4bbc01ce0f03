"""Batch augmentation: shapes, ranges, randomness, and 'off at evaluation'."""

import torch

from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float


def test_augmentation_keeps_shape_and_range_2d_and_3d():
    for shape in [(8, 1, 28, 28), (4, 3, 32, 32), (2, 1, 12, 12, 12)]:
        x = torch.rand(shape)
        out = augment_batch(x, AugmentConfig())
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert not torch.allclose(out, x)


def test_disabled_or_zero_augmentation_is_identity():
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(augment_batch(x, AugmentConfig(enabled=False)), x)
    zero = AugmentConfig(rotation=0, scale=0, translate=0, brightness=0, contrast=0)
    assert torch.allclose(augment_batch(x, zero), x, atol=1e-5)


def test_each_image_gets_its_own_transform():
    x = torch.zeros(6, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    out = augment_batch(x, AugmentConfig(brightness=0, contrast=0, rotation=0, scale=0, translate=0.3))
    peaks = {int(o.flatten().argmax()) for o in out}
    assert len(peaks) > 1


def test_hflip_is_off_by_default_and_mirrors_when_on():
    assert AugmentConfig().hflip is False
    x = torch.zeros(64, 1, 8, 8)
    x[..., 0] = 1.0  # a bright left column
    cfg = AugmentConfig(rotation=0, scale=0, translate=0, brightness=0, contrast=0, hflip=True)
    out = augment_batch(x, cfg)
    flipped = out[..., -1].mean(dim=(1, 2)) > 0.5
    assert 0 < flipped.sum() < 64


def test_scaling_and_normalisation():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert normalize(to_unit_float(x), 0.5, 0.5).flatten().tolist() == [-1.0, 1.0]
