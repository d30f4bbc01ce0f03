"""What the classic seed_cnn's dense layer costs against convolutional networks.

    python benchmarks/model_costs.py

For each model and input size: parameters, the share in the largest Linear layer, fp32 weight size,
and forward GFLOPs for one image (torch.utils.flop_counter).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from meddiag.models import count_parameters, create_model

warnings.filterwarnings("ignore", category=UserWarning)


def costs(name: str, channels: int, size: int, classes: int = 2) -> dict:
    model = create_model(name, channels, classes, image_size=size).eval()
    params = count_parameters(model)
    largest_linear = max((count_parameters(m) for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size))
    return {"name": name, "size": size, "channels": channels, "params": params, "dense_share": largest_linear / params,
            "mb": params * 4 / 2**20, "gflops": counter.get_total_flops() / 1e9}


def main() -> None:
    print("| model | input | parameters | in largest dense layer | fp32 weights | GFLOPs / image |")
    print("|---|---|---|---|---|---|")
    for size, channels in [(224, 3), (128, 1), (28, 1)]:
        for name in ["seed_cnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0"]:
            c = costs(name, channels, size)
            print(f"| {c['name']} | {size}x{size}x{channels} | {c['params']:,} | {c['dense_share']:.1%} | "
                  f"{c['mb']:.0f} MB | {c['gflops']:.2f} |")


if __name__ == "__main__":
    main()
