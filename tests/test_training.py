"""Training settings a user relies on without seeing them."""

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
