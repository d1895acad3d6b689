"""Summarise the JSON files of benchmarks/gpu_suite.sh (or any `resnet-lit benchmark --json` files) as Markdown.

python benchmarks/summarize.py /tmp/resnet-lit-gpu-bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    rows = []
    for result in data["results"]:
        c = result["config"]
        ratio = result.get("ratio_to_loop")
        rows.append(
            f"| {path.stem} | {result['runner']} | {c['model']} | {c['image_size']} | {c['batch_size']} | "
            f"{c['precision']} | {c['memory_format']} | {'yes' if c['compile'] else 'no'} | "
            f"{result['images_per_s']:,.0f} | {', '.join(f'{s:,.0f}' for s in result['samples'])} | "
            f"{result['peak_memory_mb'] or 0:,.0f} | {'' if ratio is None else f'{ratio:.3f}'} |"
        )
    machine = data.get("machine", {})
    rows.append(f"|  | {machine.get('gpu', machine.get('cpu', ''))}; torch {machine.get('torch')} |" + " |" * 10)
    return rows


def suite_lines(root: Path) -> list[str]:
    """The steps of gpu_suite.sh (suite.json) against their budget, and what the environment check found."""
    lines = []
    suite = root / "suite.json"
    if suite.is_file():
        data = json.loads(suite.read_text())
        lines += [f"Steps of benchmarks/gpu_suite.sh{' (SMOKE)' if data.get('smoke') else ''}, budget "
                  f"{data['budget_total_s']} s of {data['limit_s']} s:", "",
                  "| step | budget s | seconds | exit | note |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for step in data["steps"]:
            code = step["exit"]
            note = step["skipped"] or {0: "", 124: "ran out of time", 137: "killed at its budget"}.get(code, "failed")
            code = "-" if code is None else code
            lines.append(f"| {step['step']} | {step['budget_s']} | {step['seconds']} | {code} | {note} |")
        lines.append("")
    environment = root / "environment.json"
    if environment.is_file():
        data = json.loads(environment.read_text())
        lines += [f"Environment problem: {problem}" for problem in data["fatal"] + data["compile_problems"]]
        if lines[-1:] != [""]:
            lines.append("")
    return lines


def speedrun_lines(data: dict) -> list[str]:
    """benchmarks/cifar10_speedrun.py's runs: held-out accuracy against training time, compile time apart."""
    lines = [f"CIFAR-10 speedrun ({data['config']}; held out: {data['held_out']}):", "",
             "| epochs | held-out acc (flip TTA) | training s | one-off (compile) s | steps x batch | set-up s | "
             "scoring s | device |", "|" + " --- |" * 8]  # fmt: skip
    for run in data["runs"]:
        lines.append(
            f"| {run['epochs']} | {run['accuracy']:.4f} | {run['train_seconds']:.2f} | {run['compile_seconds']:.1f} | "
            f"{run['steps']} x {run['batch_size']} | {run['setup_seconds']:.1f} | {run['eval_seconds']:.1f} | "
            f"{run['device']}, {run['precision']}{', compiled' if run['compile'] else ''} |"
        )
    lines += [f"| {skipped['epochs']} | skipped: about {skipped['projected_seconds']:.0f} s, past the deadline |"
              + " |" * 6 for skipped in data.get("skipped", [])]  # fmt: skip
    return lines


def main(folder: str) -> int:
    root = Path(folder)
    for line in suite_lines(root):
        print(line)
    print(
        "| run | runner | model | px | batch | precision | format | compile | images/s (median) | all runs | "
        "peak MiB | fit/loop |"
    )
    print("|" + " --- |" * 12)
    for path in sorted(root.glob("*.json")):
        data = json.loads(path.read_text())
        if "results" in data:
            print("\n".join(bench_rows(path)))
    eager, compiled = root / "r50_eager.json", root / "r50_compiled.json"
    if eager.is_file() and compiled.is_file():
        rates = {}
        for name, path in (("eager", eager), ("compiled", compiled)):
            for result in json.loads(path.read_text())["results"]:
                rates[(name, result["runner"])] = result["images_per_s"]
        for runner in ("loop", "fit"):
            if (("eager", runner) in rates) and (("compiled", runner) in rates):
                speedup = rates[("compiled", runner)] / rates[("eager", runner)]
                print(f"\nResNet-50 torch.compile speedup ({runner}): {speedup:.2f}x")
    speedrun = root / "cifar10_speedrun.json"
    if speedrun.is_file():
        print("\n".join(["", *speedrun_lines(json.loads(speedrun.read_text()))]))
    tta = root / "cifar10_time_to_accuracy.json"
    if tta.is_file():
        data = json.loads(tta.read_text())
        history = data.get("history", [])
        reached = data.get("reached_seconds")
        target = data.get("target", 0.94)
        print(
            f"\nCIFAR-10 ResNet-18 recipe (loader: {data.get('loader')}): "
            + (f"val/acc >= {target} after {reached:.1f} s of training" if reached else f"{target} not reached")
            + f", best val/acc {data.get('best', float('nan')):.4f} after {len(history)} epochs"
            + (f" ({history[-1]['seconds']:.1f} s)" if history else "")
            + f"; whole process {data.get('process_seconds', float('nan')):.1f} s"
        )
        if history:
            points = (f"{h['epoch']}:{h['seconds']:.1f}s/{h['val/acc']:.3f}" for h in history)
            print("epoch:seconds/val acc: " + ", ".join(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
