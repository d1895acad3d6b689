"""What Lightning adds to each training step of a shipped recipe: after every `fit` step, a callback runs a bare
PyTorch step (a copy of the same network and optimizer, the same batch, the same autocast) and times the two apart.

    python benchmarks/step_overhead.py --config configs/quickstart.yaml --repeats 3 --json step_overhead.json

The ratio per run is median(Lightning step interval) / median(bare step) over the steady-state steps: the first
epoch and every epoch's first step (iterator start-up, validation before it) are left out. The Lightning step
interval runs from the end of the previous bare step to the end of this step's `on_train_batch_end`, so it holds
the data loading, the transfer, the loop, logging and the progress bar, and the optimizer step; the bare step holds
forward, backward and optimizer step only. Both run in one process, alternating, so a neighbour's load hits both.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from resnet_lit.cli import ResNetLitCLI


class BareStepComparison(L.Callback):
    """Times each Lightning step interval and a bare step on the same batch right after it."""

    def __init__(self) -> None:
        self.lightning: list[float] = []
        self.bare: list[float] = []
        self._mark: float | None = None
        self._net: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._net = copy.deepcopy(pl_module.net)
        source = trainer.optimizers[0]
        self._optimizer = type(source)(self._net.parameters(), **source.defaults)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0:
            self._mark = None  # an epoch's first step holds the iterator start-up and the validation before it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:  # fmt: skip
        now = time.perf_counter()
        steady = self._mark is not None and trainer.current_epoch > 0
        if steady:
            self.lightning.append(now - self._mark)
        images, targets = batch
        start = time.perf_counter()
        self._bare_step(trainer, images, targets)
        if steady:
            self.bare.append(time.perf_counter() - start)
        self._mark = time.perf_counter()

    def _bare_step(self, trainer: L.Trainer, images: torch.Tensor, targets: torch.Tensor) -> None:
        assert self._net is not None and self._optimizer is not None
        with trainer.precision_plugin.forward_context():
            loss = F.cross_entropy(self._net(images), targets)
        loss.backward()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)


def measure(config: str, extra: list[str]) -> dict[str, Any]:
    comparison = BareStepComparison()
    with tempfile.TemporaryDirectory() as root:
        args = ["--config", config, "--trainer.default_root_dir", root, "--trainer.enable_model_summary",
                "false", *extra]  # fmt: skip
        cli = ResNetLitCLI(args=args, run=False)
        cli.trainer.callbacks.append(comparison)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall = time.perf_counter() - start
        val_acc = float(cli.trainer.callback_metrics.get("val/acc", float("nan")))
    lightning, bare = statistics.median(comparison.lightning), statistics.median(comparison.bare)
    return {
        "steps": len(comparison.lightning),
        "lightning_step_ms": 1e3 * lightning,
        "bare_step_ms": 1e3 * bare,
        "ratio": lightning / bare,
        "fit_seconds_with_bare_steps": wall,
        "val_acc": val_acc,
        "precision": str(cli.trainer.precision),
        "loader": type(cli.datamodule.backend).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the runs and the median ratio here")
    args, extra = parser.parse_known_args(argv)
    runs = []
    for repeat in range(args.repeats):
        run = measure(args.config, extra)
        runs.append(run)
        print(
            f"run {repeat + 1}: {run['steps']} steps, Lightning {run['lightning_step_ms']:.2f} ms, bare "
            f"{run['bare_step_ms']:.2f} ms, ratio {run['ratio']:.3f} ({run['precision']}, {run['loader']})"
        )
    result = {
        "config": args.config,
        "extra_args": extra,
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    print(f"median ratio over {len(runs)} runs: {result['median_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
