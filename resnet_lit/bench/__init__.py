"""Benchmarks: training images/s and peak memory of `resnet-lit fit` beside a hand-written PyTorch loop, and the
input pipeline alone. Only `resnet-lit benchmark` imports this package; nothing of `fit` imports it.

    resnet-lit benchmark --model resnet20 --image-size 32 --batch-size 128 --runners loop,fit
    python -m resnet_lit.bench --data .data/cifar10 --runners pipeline --num-workers 1,2

How the runs stay comparable on a shared machine is described in docs/performance.md.
"""

from resnet_lit.bench.command import build_parser, main
from resnet_lit.bench.config import BenchConfig, Measurement, RunResult
from resnet_lit.bench.measure import measure, quiet_rate
from resnet_lit.bench.report import Summary, format_table, machine_info, summarize
from resnet_lit.bench.timing import PhaseClock, StepTimer, TimeToAccuracy

__all__ = [
    "BenchConfig",
    "Measurement",
    "PhaseClock",
    "RunResult",
    "StepTimer",
    "Summary",
    "TimeToAccuracy",
    "build_parser",
    "format_table",
    "machine_info",
    "main",
    "measure",
    "quiet_rate",
    "summarize",
]
