"""Training speed on a laptop CPU: meddiag's training step against a plain PyTorch reference loop,
the FLOP rate it reaches against the machine's measured peak, and the time to a target AUC.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/training_speed.py [--part speed flops time]

- speed: ResNet-18 (MONAI, the same network), PneumoniaMNIST train split (28 px), batch 128, AdamW,
  cross-entropy, 2 epochs each, the second timed. The reference is what the MedMNIST experiments code
  does: a Dataset returning PIL images, per-sample to-tensor and normalise transforms, a DataLoader,
  fp32. meddiag is the real thing (Lightning Trainer, DiagnosisModule, ImageDataModule) with its
  defaults, then with one of its choices undone at a time, to show what each is worth, and with
  the thread settings a user might reach for (one compute thread; DataLoader worker processes).
- flops: FLOPs of one training step counted with torch.utils.flop_counter, times steps per second,
  against a large matmul on the same threads (fp32, and bf16 for reference).
- time: wall time from the start (data loading included) until the validation AUC first reaches
  0.944 on PneumoniaMNIST, with meddiag's default recipe (ResNet-18) and with seed_cnn.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from datetime import date

import lightning as L
import numpy as np
import torch
from torch import nn

from meddiag.data.sources import load_data
from meddiag.models.registry import create_model
from meddiag.training.config import TrainConfig
from meddiag.training.datamodule import ImageDataModule
from meddiag.training.module import DiagnosisModule
from meddiag.training.run import resolve_precision, train

from _machine import cpu_name

BATCH = 128
TARGET_AUC = 0.944


# ---------------------------------------------------------------- the reference loop

class PILDataset(torch.utils.data.Dataset):
    """As medmnist.dataset does: a PIL image per item, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # noqa: ANN204
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), int(self.labels[i])

    @staticmethod
    def transform(img) -> torch.Tensor:  # noqa: ANN001 - torchvision's ToTensor() then Normalize(mean=[.5], std=[.5])
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div(255)[None]
        return (x - 0.5) / 0.5


def reference_epoch_rate(images: np.ndarray, labels: np.ndarray, epochs: int = 2) -> float:
    torch.manual_seed(0)
    model = create_model("resnet18", 1, 2, 2, 28)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(PILDataset(images, labels), batch_size=BATCH, shuffle=True)
    rate = 0.0
    for _ in range(epochs):
        model.train()
        start, n = time.perf_counter(), 0
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            n += len(x)
        rate = n / (time.perf_counter() - start)
    return rate


# ---------------------------------------------------------------- meddiag

class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start, self.n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.n += len(batch[0])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.rates.append(self.n / (time.perf_counter() - self.start))


class NoChannelsLast(DiagnosisModule):
    def setup(self, stage: str) -> None:
        pass

    def on_after_batch_transfer(self, batch, dataloader_idx):  # noqa: ANN001, ANN201
        x, y = super().on_after_batch_transfer(batch, dataloader_idx)
        return x.contiguous(), y


class Compiled(DiagnosisModule):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.model = torch.compile(self.model)


def meddiag_epoch_rate(data, precision: str = "auto", augment: bool = True, channels_last: bool = True, compile: bool = False,  # noqa: ANN001
                       ema: bool = True, threads: int | None = None, num_workers: int = 0, epochs: int = 2) -> float:
    L.seed_everything(0, verbose=False)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(data="pneumoniamnist", precision=precision)
    card = {"model_name": "resnet18", "class_names": data.class_names, "task": data.task, "image_size": data.image_size,
            "in_channels": data.in_channels}
    module_type = Compiled if compile else DiagnosisModule if channels_last else NoChannelsLast
    module = module_type(card=card, optim=config.model_dump(include={"optimizer", "lr", "weight_decay", "scheduler", "epochs"}),
                         augment={**config.augment.model_dump(), "enabled": augment}, ema_decay=config.ema_decay if ema else 0.0)
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", precision=resolve_precision(precision, "cpu"), callbacks=[timer],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, datamodule=ImageDataModule(data, BATCH, num_workers=num_workers))
        finally:
            torch.set_num_threads(threads_before)
    return timer.rates[-1]


def part_speed(data) -> list[tuple[str, float]]:  # noqa: ANN001
    train = data.splits["train"]
    images = train.images[:, 0].numpy()
    labels = train.labels.numpy()
    rows = [("reference loop (PIL dataset, per-sample transforms, fp32)", reference_epoch_rate(images, labels))]
    rows.append(("meddiag defaults (uint8 in memory, batch augmentation, channels_last, bf16 where native)", meddiag_epoch_rate(data)))
    rows.append(("meddiag, fp32 instead of bf16", meddiag_epoch_rate(data, precision="32-true")))
    rows.append(("meddiag, without channels_last", meddiag_epoch_rate(data, channels_last=False)))
    rows.append(("meddiag, without augmentation", meddiag_epoch_rate(data, augment=False)))
    rows.append(("meddiag, without weight averaging (EMA)", meddiag_epoch_rate(data, ema=False)))
    rows.append(("meddiag, 1 compute thread instead of 2", meddiag_epoch_rate(data, threads=1)))
    rows.append(("meddiag, 2 DataLoader worker processes (num_workers=2) instead of none", meddiag_epoch_rate(data, num_workers=2)))
    rows.append(("meddiag, with torch.compile (second epoch; compiling happens in the first)", meddiag_epoch_rate(data, compile=True)))
    return rows


# ---------------------------------------------------------------- FLOP rate

def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_flops() -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("resnet18", 1, 2, 2, 28)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 2, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------- time to AUC

class StopAtAUC(L.Callback):
    def __init__(self, start: float, target: float) -> None:
        self.start, self.target, self.reached, self.epochs = start, target, None, 0

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after the epoch's validation: the module logs val_auc only after callbacks' on_validation_epoch_end
        auc = trainer.callback_metrics.get("val_auc")
        self.epochs += 1
        if auc is not None and float(auc) >= self.target and self.reached is None:
            self.reached = (time.perf_counter() - self.start, float(auc), self.epochs)
            trainer.should_stop = True


def time_to_auc(model: str, out: str) -> tuple[float, float, int] | None:
    start = time.perf_counter()
    stop = StopAtAUC(start, TARGET_AUC)
    train(TrainConfig(data="pneumoniamnist", model=model, out=out), progress=False, callbacks=[stop])
    return stop.reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["speed", "flops", "time"], default=["speed", "flops", "time"])
    parser.add_argument("--runs", default="runs/benchmarks/speed")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"{date.today()}, {cpu_name()}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}")
    data = load_data("pneumoniamnist", progress=False)
    rows = []
    if "speed" in args.part or "flops" in args.part:
        rows = part_speed(data)
        reference = rows[0][1]
        print("\n| training loop (ResNet-18, PneumoniaMNIST 28 px, batch 128) | img/s | vs reference |")
        print("|---|---|---|")
        for name, rate in rows:
            print(f"| {name} | {rate:.0f} | {rate / reference:.2f}x |")
    if "flops" in args.part:
        flops = step_flops()
        fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
        print(f"\none training step (forward + backward, batch {BATCH}): {flops / 1e9:.2f} GFLOP; "
              f"peak matmul 4096x4096: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s\n")
        print("| training loop | achieved GFLOP/s | of fp32 peak | of bf16 peak |")
        print("|---|---|---|---|")
        for name, rate in rows:
            achieved = flops * rate / BATCH / 1e9
            print(f"| {name} | {achieved:.1f} | {achieved / fp32:.0%} | {achieved / bf16:.0%} |")
    if "time" in args.part:
        print(f"\n| model | wall time to val AUC >= {TARGET_AUC} (data loading included) | val AUC then | epochs |")
        print("|---|---|---|---|")
        for model in ("resnet18", "seed_cnn"):
            out = os.path.join(args.runs, f"time-to-auc-{model}-{int(time.time())}")
            reached = time_to_auc(model, out)
            if reached:
                print(f"| {model} | {reached[0]:.0f} s | {reached[1]:.4f} | {reached[2]} |")
            else:
                print(f"| {model} | not reached in the default epochs | | |")


if __name__ == "__main__":
    main()
