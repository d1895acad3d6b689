"""The results of the runs as figures: medians, paired ratios (fit vs loop, every configuration vs the
first), the printed table, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import torch

from resnet_lit.bench.config import RUNNERS, BenchConfig, Measurement


@dataclass
class Summary:
    """The median figures of one (runner, configuration) pair over the repeats."""

    runner: str
    config: BenchConfig
    images_per_s: float
    samples: list[float]
    peak_memory_mb: float | None
    ratio_to_loop: float | None = None
    ratio_to_baseline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(measurements: Sequence[Measurement]) -> list[Summary]:
    """Medians per (runner, config); `fit` vs `loop` and every config vs the first, as medians of paired ratios.

    Every figure exists twice: from the total time of the timed steps, and (CPU) from the faster half of the
    steps (:func:`quiet_rate`), which is robust to neighbours' load on a shared machine.
    """
    groups: dict[tuple[str, BenchConfig], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.runner, m.config), []).append(m)
    first_config = measurements[0].config if measurements else None
    summaries = []
    for (runner, cfg), items in groups.items():
        rates = [m.images_per_s for m in items]
        peaks = [m.peak_memory_mb for m in items if m.peak_memory_mb is not None]
        summary = Summary(runner, cfg, statistics.median(rates), rates, max(peaks) if peaks else None)
        quiet = [m.quiet_images_per_s for m in items if m.quiet_images_per_s is not None]
        if quiet:
            summary.extra.update(quiet_images_per_s=statistics.median(quiet), quiet_samples=quiet)
        if runner == "fit" and ("loop", cfg) in groups:
            summary.ratio_to_loop = _paired_ratio(items, groups[("loop", cfg)])
            summary.extra["ratio_to_loop_quiet"] = _paired_ratio(items, groups[("loop", cfg)], quiet=True)
        baseline = _baseline_config(cfg, first_config)
        if baseline is not None and baseline != cfg and (runner, baseline) in groups:
            summary.ratio_to_baseline = _paired_ratio(items, groups[(runner, baseline)])
            summary.extra["ratio_to_baseline_quiet"] = _paired_ratio(items, groups[(runner, baseline)], quiet=True)
        summaries.append(summary)
    config_order = {cfg: i for i, cfg in enumerate(dict.fromkeys(m.config for m in measurements))}
    return sorted(summaries, key=lambda s: (config_order[s.config], RUNNERS.index(s.runner)))


def _baseline_config(cfg: BenchConfig, first: BenchConfig | None) -> BenchConfig | None:
    """The reference of a speedup: the same config with the first precision, memory format and compile flag."""
    if first is None:
        return None
    return replace(cfg, precision=first.precision, memory_format=first.memory_format, compile=first.compile)


def _paired_ratio(items: Sequence[Measurement], reference: Sequence[Measurement], quiet: bool = False) -> float | None:
    """Median over repeats of ``items[repeat] / reference[repeat]`` (runs next to each other in time)."""

    def rate(m: Measurement) -> float | None:
        return m.quiet_images_per_s if quiet else m.images_per_s

    by_repeat = {m.repeat: rate(m) for m in reference}
    ratios = [a / b for m in items if (a := rate(m)) and (b := by_repeat.get(m.repeat))]
    return statistics.median(ratios) if ratios else None


def format_table(summaries: Sequence[Summary]) -> str:
    """The summaries as an aligned plain-text table, one row per (runner, configuration)."""
    header = (
        "runner",
        "model",
        "px",
        "batch",
        "precision",
        "format",
        "compile",
        "data",
        "images/s",
        "quiet",
        "min-max",
        "peak MB",
        "fit/loop",
        "quiet",
        "vs base",
        "quiet",
    )
    rows = [header]
    for s in summaries:
        c = s.config
        per_worker = ""
        if s.runner == "pipeline" and c.loader == "dataloader" and c.num_workers > 1:
            per_worker = f" ({s.images_per_s / c.num_workers:,.0f}/worker)"
        rows.append(
            (
                s.runner,
                c.model if s.runner != "pipeline" else "-",
                str(c.image_size),
                str(c.batch_size),
                c.precision if s.runner != "pipeline" else "-",
                c.memory_format if s.runner != "pipeline" else "-",
                "yes" if c.compile else "no",
                c.data_label(),
                f"{s.images_per_s:,.1f}{per_worker}",
                _fmt(s.extra.get("quiet_images_per_s"), "{:,.1f}"),
                f"{min(s.samples):,.0f}-{max(s.samples):,.0f}",
                f"{s.peak_memory_mb:,.0f}" if s.peak_memory_mb is not None else "-",
                f"{s.ratio_to_loop:.3f}" if s.ratio_to_loop is not None else "",
                _fmt(s.extra.get("ratio_to_loop_quiet"), "{:.3f}"),
                f"{s.ratio_to_baseline:.2f}x" if s.ratio_to_baseline is not None else "",
                _fmt(s.extra.get("ratio_to_baseline_quiet"), "{:.2f}x"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def machine_info(device: str) -> dict[str, Any]:
    """CPU, threads, load average, GPU and versions: what a reader needs to judge the figures."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
