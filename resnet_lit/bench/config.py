"""What a benchmark run measures (`BenchConfig`), what a runner returns (`RunResult`) and what is recorded of
it (`Measurement`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

RUNNERS = ("loop", "fit", "pipeline")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MEMORY_FORMATS = ("channels_last", "contiguous")


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration (everything but the runner)."""

    model: str = "resnet20"
    image_size: int = 32
    batch_size: int = 128
    precision: str = "32-true"
    memory_format: str = "channels_last"
    compile: bool = False
    data: str = "synthetic"
    loader: str = "device"
    num_workers: int = 0
    num_classes: int = 10
    device: str = "cpu"
    cudnn_benchmark: bool = True

    def label(self) -> str:
        return (
            f"{self.model} {self.image_size}px b{self.batch_size} {self.precision} {self.memory_format}"
            f"{' compiled' if self.compile else ''} {self.data_label()}"
        )

    def data_label(self) -> str:
        data = "synthetic" if self.data == "synthetic" else os.path.basename(os.path.normpath(self.data))
        return f"{data}/{self.loader}" + (f"/w{self.num_workers}" if self.loader == "dataloader" else "")


@dataclass
class RunResult:
    """What a runner returns: total time of the timed steps, their count, peak memory and (CPU) per-step times."""

    seconds: float
    steps: int
    peak_memory_mb: float | None
    step_seconds: list[float] = field(default_factory=list)


@dataclass
class Measurement:
    """One run of one runner on one configuration."""

    runner: str
    config: BenchConfig
    images_per_s: float
    steps: int
    seconds: float
    peak_memory_mb: float | None
    repeat: int
    quiet_images_per_s: float | None = None  # from the faster half of the steps (CPU), see `quiet_rate`
