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
