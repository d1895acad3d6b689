"""benchmarks/gpu_suite.sh cannot rot: its budget fits 8 minutes, it stops in seconds where it cannot run, its
environment check names what is missing, and its SMOKE=1 mode runs every step on the CPU and leaves parseable
JSON for each of them (with no checkpoint written anywhere)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fakedata import write_image_folder

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = ["environment", "data", "r50_eager", "r18_overhead", "speedrun", "r50_compiled", "summary"]


def _budget() -> dict[str, int]:
    """The script's own budget table: `step seconds` rows of its BUDGET block."""
    block = re.search(r'^BUDGET="\n(.*?)^"', SUITE.read_text(), re.S | re.M)
    assert block, "gpu_suite.sh has no BUDGET table"
    rows = [line.split("#")[0].split() for line in block.group(1).splitlines()]
    return {row[0]: int(row[1]) for row in rows if row}


def _run_suite(env: dict[str, str], timeout: float) -> tuple[int, str]:
    """The suite in its own process group, killed whole if it overruns ``timeout``."""
    process = subprocess.Popen(["bash", str(SUITE)], env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"gpu_suite.sh still running after {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def _check_environment() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_environment", REPO / "benchmarks" / "check_environment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_budget_table_sums_to_at_most_8_minutes_and_covers_every_step() -> None:
    budget = _budget()
    assert list(budget) == STEPS
    assert sum(budget.values()) <= 480
    grace = int(re.search(r"^GRACE=(\d+)", SUITE.read_text(), re.M).group(1))
    assert all(seconds > grace for seconds in budget.values())
    run = set(re.findall(r"(?:run_step|skip) (\w+)", SUITE.read_text())) - {"STEP"}
    assert run == set(STEPS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without CUDA")
def test_without_cuda_the_suite_stops_in_seconds_naming_the_problem(tmp_path: Path) -> None:
    code, output = _run_suite({"OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "logs")}, timeout=120)
    assert code == 2, output
    assert "environment: error: no CUDA device: torch.cuda.is_available() is False" in output
    suite = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [step["step"] for step in suite["steps"]] == ["environment"]  # nothing measured
    assert json.loads((tmp_path / "out" / "environment.json").read_text())["exit_code"] == 2


def test_environment_check_names_a_missing_compiler_headers_and_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = _check_environment()
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    monkeypatch.setattr(check, "python_include_dir", lambda: str(tmp_path))
    env = check.check_environment(require_cuda=True)
    assert env.exit_code == check.FATAL
    assert len(env.fatal) == 1 and env.fatal[0].startswith("no CUDA device: torch.cuda.is_available() is False")
    assert env.compile_problems == [
        f"no C compiler for torch.compile: CC='{tmp_path / 'no-cc'}' is not an executable",
        f"no Python headers for torch.compile: {tmp_path / 'Python.h'} does not exist "
        f"(install them, e.g. apt-get install python{sys.version_info.major}.{sys.version_info.minor}-dev)",
    ]
    # without a CUDA requirement (SMOKE), only the compile steps are skipped
    assert check.check_environment(require_cuda=False).exit_code == check.COMPILE_UNAVAILABLE
    monkeypatch.delenv("CC")
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    assert "neither gcc nor clang is on PATH" in check.compile_toolchain_problems(need_triton=False)[0][0]


@pytest.mark.slow
def test_smoke_run_completes_every_step_and_writes_json(tmp_path: Path) -> None:
    """SMOKE=1 on the CPU: every step runs and exits 0, every result parses, and no step writes a checkpoint."""
    cifar = write_image_folder(tmp_path / "cifar", classes=tuple("abcdefghij"), per_class=4, size=32)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    env = {"SMOKE": "1", "OUT": str(out), "LOGS": str(tmp_path / "logs"), "CIFAR_ROOT": str(cifar),
           "TMPDIR": str(scratch), "PYTHON": sys.executable}  # fmt: skip
    code, output = _run_suite(env, timeout=300)
    problems = []  # all of them, so that one run shows every defect
    if code != 0:
        problems.append(f"exit status {code}")
    suite = json.loads((out / "suite.json").read_text()) if (out / "suite.json").is_file() else {"steps": []}
    if [step["step"] for step in suite["steps"]] != STEPS:
        problems.append(f"suite.json steps: {suite['steps']}")
    problems += [f"step {s['step']} exit {s['exit']}" for s in suite["steps"] if s["exit"] != 0]
    for name in ("environment", "r50_eager", "r18_cifar", "r50_compiled", "cifar10_speedrun"):
        path = out / f"{name}.json"
        if not path.is_file():
            problems.append(f"no {path.name}")
            continue
        data = json.loads(path.read_text())
        runners = {r["runner"] for r in data.get("results", [])}
        if "results" in data and not (data.get("complete") and runners == {"loop", "fit"}):
            problems.append(f"{path.name}: complete {data.get('complete')}, runners {sorted(runners)}")
    speedrun = out / "cifar10_speedrun.json"
    runs = json.loads(speedrun.read_text()).get("runs", []) if speedrun.is_file() else []
    if [(run["epochs"], run["held_out_images"], run["train_images"]) for run in runs] != [(1, 10, 30)]:
        problems.append(f"the speedrun step's runs: {runs}")  # one run; 1 of the 4 images per class held out
    elif not 0 <= runs[0]["accuracy"] <= 1 or runs[0]["steps"] != 2:
        problems.append(f"the speedrun run: {runs[0]}")
    checkpoints = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*.ckpt"))
    if checkpoints:
        problems.append(f"checkpoints written: {checkpoints}")
    if not (out / "summary.md").is_file():
        problems.append("no summary.md")
    elif "CIFAR-10 speedrun" not in (out / "summary.md").read_text():
        problems.append("summary.md has no speedrun table")
    assert not problems, "\n".join(problems) + "\n" + output[-4000:]
