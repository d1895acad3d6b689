"""The `fit` process of the quickstart benchmark: `resnet-lit fit ...` with a `PhaseClock` that writes where its
wall time went. The benchmark starts it as ``python -c BOOTSTRAP MARKS.json fit --config ...``, so that its first
mark is taken before anything of resnet-lit (or Lightning) is imported."""

from __future__ import annotations

import json
import sys
import time

BOOTSTRAP = "import time; started = time.time(); from resnet_lit.bench.quickstart_probe import main; main(started)"


def main(started: float) -> None:
    """Run `resnet-lit` with ``sys.argv[2:]`` and a `PhaseClock` writing to ``sys.argv[1]``; ``started`` is the
    wall-clock time of the process's first statement."""
    output, *args = sys.argv[1:]
    # The imports end here: importing this module (through the bench package) brought in most of what `fit`
    # imports; these two make sure of the rest (jsonargparse, the data stack). The bench package adds ~0.01 s.
    import resnet_lit.cli
    import resnet_lit.training_cli

    marks = {"started": started, "imported": time.time()}
    sys.argv = ["resnet-lit", *args, clock_argument(output, marks)]
    resnet_lit.cli.main()  # as the `resnet-lit` command calls it (no arguments: it exits the way that does)


def clock_argument(output: str, marks: dict[str, float] | None = None) -> str:
    """The command-line argument that adds a `PhaseClock` (writing to ``output``) to the run's callbacks."""
    clock = {"class_path": "resnet_lit.bench.PhaseClock", "init_args": {"output": output, "marks": marks or {}}}
    return f"--trainer.callbacks+={json.dumps(clock)}"
