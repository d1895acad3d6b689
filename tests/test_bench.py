"""The benchmark suite runs at tiny sizes: every runner, synthetic and real (ImageFolder) data, the table, the
JSON, `resnet-lit benchmark`, and the timing callbacks. No timing assertions."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from fakedata import write_image_folder
from resnet_lit.bench import BenchConfig, StepTimer, TimeToAccuracy, main
from resnet_lit.bench.fit import fit_config, run_fit
from resnet_lit.cli import main as cli_main
from resnet_lit.data import SyntheticDataModule
from resnet_lit.models import NetworkConfig
from resnet_lit.module import ResNetClassifier

REPO = Path(__file__).resolve().parents[1]
measure_module = importlib.import_module("resnet_lit.bench.measure")  # the package exports a function `measure`
TINY = ["--model", "resnet20", "--image-size", "8", "--batch-size", "4", "--warmup", "1", "--steps", "2"]


def test_loop_fit_and_pipeline_on_synthetic_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main([*TINY, "--runners", "loop,fit,pipeline", "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fit/loop" in table and "images/s" in table
    data = json.loads(out.read_text())
    assert {r["runner"] for r in data["results"]} == {"loop", "fit", "pipeline"}
    assert len(data["measurements"]) == 6 and data["machine"]["torch_threads"] >= 1
    for result in data["results"]:
        assert result["images_per_s"] > 0 and len(result["samples"]) == 2
        assert result["config"]["loader"] == "device" and result["config"]["device"] == "cpu"
    fit = next(r for r in data["results"] if r["runner"] == "fit")
    assert fit["ratio_to_loop"] > 0 and "ratio_to_loop_quiet" in fit["extra"]


def test_configuration_lists_multiply_and_give_speedups(tmp_path: Path) -> None:
    out = tmp_path / "formats.json"
    argv = [*TINY, "--runners", "loop", "--precision", "32-true,bf16-mixed", "--memory-format",
            "contiguous,channels_last", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4
    base = [r for r in results if r["ratio_to_baseline"] is None]
    assert [(r["config"]["precision"], r["config"]["memory_format"]) for r in base] == [("32-true", "contiguous")]
    assert all(r["ratio_to_baseline"] > 0 for r in results if r not in base)


def test_real_image_folder_data(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=8, size=10)
    out = tmp_path / "real.json"
    argv = ["--data", str(root), "--image-size", "8", "--batch-size", "4", "--warmup", "1", "--steps", "2",
            "--runners", "pipeline,loop,fit", "--num-workers", "0,1", "--num-classes", "2", "--repeats", "1",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["runner"], r["config"]["num_workers"]) for r in results} == {
        (runner, workers) for runner in ("pipeline", "loop", "fit") for workers in (0, 1)
    }
    assert all(r["config"]["loader"] == "dataloader" for r in results)


def test_resnet_lit_benchmark_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["benchmark", *TINY, "--runners", "loop", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    assert "loop" in capsys.readouterr().out and (tmp_path / "b.json").is_file()
    summary = subprocess.run([sys.executable, str(REPO / "benchmarks" / "summarize.py"), str(tmp_path)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert "| b | loop | resnet20 |" in summary.stdout


def test_fit_never_imports_the_benchmarks_and_the_package_runs_as_a_module() -> None:
    check = ("import sys, resnet_lit.cli, resnet_lit.training_cli; "
             "assert not [m for m in sys.modules if m.startswith('resnet_lit.bench')], 'fit imports the benchmarks'")
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO)
    usage = subprocess.run([sys.executable, "-m", "resnet_lit.bench", "--help"], capture_output=True, text=True,
                           check=True, cwd=REPO)  # fmt: skip
    assert usage.stdout.startswith("usage: resnet-lit benchmark")


def test_bad_arguments_exit_with_a_message() -> None:
    with pytest.raises(SystemExit, match="neither 'synthetic' nor a folder"):
        main(["--data", "/no/such/folder"])
    with pytest.raises(SystemExit):
        main(["--precision", "fp8"])


def _tiny_fit(
    tmp_path: Path, callback: L.Callback, num_samples: int = 12, max_epochs: int = -1, **trainer_args: Any
) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, max_steps=100, default_root_dir=tmp_path,
                        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                        logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                        **trainer_args)  # fmt: skip
    model = ResNetClassifier(net=NetworkConfig(layers=[1], widths=[4], strides=[1], stem_width=4))
    data = SyntheticDataModule(image_size=8, num_samples=num_samples, num_val_samples=8, batch_size=4,
                               loader="device")  # fmt: skip
    trainer.fit(model, datamodule=data)
    return trainer


def test_step_timer_leaves_out_steps_across_epoch_boundaries(tmp_path: Path) -> None:
    timer = StepTimer(warmup=1, steps=5)
    trainer = _tiny_fit(tmp_path, timer)  # 3 batches per epoch
    assert timer.done and timer.timed_steps == 5 and timer.seconds > 0
    # warm-up 1 step, then 1 timed step in epoch 0; the first step of every epoch only restarts the clock.
    assert trainer.current_epoch >= 3 and trainer.global_step < 5 + 1 + 2 * trainer.current_epoch + 1


def test_time_to_accuracy_records_validations_and_stops_at_the_target(tmp_path: Path) -> None:
    output = tmp_path / "tta.json"
    callback = TimeToAccuracy(target=0.0, output=str(output))
    trainer = _tiny_fit(tmp_path, callback, max_epochs=5)
    data = json.loads(output.read_text())
    assert trainer.current_epoch == 1  # stopped after the first validation
    assert data["reached_seconds"] is not None and len(data["history"]) == 1 and data["target"] == 0.0


@pytest.mark.parametrize("interleave", [True, False])
def test_interleaved_and_sequential_runs_time_the_same_steps(tmp_path: Path, interleave: bool) -> None:
    out = tmp_path / "runs.json"
    argv = [*TINY, "--runners", "loop,fit", "--repeats", "1", "--json", str(out)]
    assert main(argv if interleave else [*argv, "--no-interleave"]) == 0
    measurements = json.loads(out.read_text())["measurements"]
    assert sorted(m["runner"] for m in measurements) == ["fit", "loop"]
    assert all(m["steps"] == 2 and m["quiet_images_per_s"] > 0 for m in measurements)


def test_training_step_keeps_per_step_work_off_the_host_device_path(tmp_path: Path) -> None:
    """train/loss at logging steps without a progress-bar sync, the bar's `loss` a CPU copy, train/acc once per
    epoch."""
    timer = StepTimer(warmup=1, steps=2)
    trainer = _tiny_fit(tmp_path, timer, log_every_n_steps=1)
    assert "train/loss" not in trainer.progress_bar_metrics and "loss" in trainer.progress_bar_metrics
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)
    model = trainer.lightning_module
    assert model.train_metrics["acc"].update_count == 0  # logged at the epoch end, then reset


# --- issue 11: results survive a time limit; nothing but training steps in the timed windows ----------------


def test_json_is_rewritten_after_every_run_so_a_killed_benchmark_keeps_the_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`timeout` sends SIGTERM, which `fit` turns into a preemption exit (143): the loop run before it is kept."""

    def preempted_fit(cfg: BenchConfig, warmup: int, steps: int) -> None:
        raise SystemExit(143)

    monkeypatch.setitem(measure_module.RUN, "fit", preempted_fit)
    out = tmp_path / "partial.json"
    with pytest.raises(SystemExit):
        main([*TINY, "--runners", "loop,fit", "--repeats", "1", "--no-interleave", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False
    assert [m["runner"] for m in data["measurements"]] == ["loop"] and data["results"][0]["images_per_s"] > 0


def test_fit_runner_validates_nothing_and_saves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"validation_step": 0, "save_checkpoint": 0}

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    validation_step = counting("validation_step", ResNetClassifier.validation_step)
    monkeypatch.setattr(ResNetClassifier, "validation_step", validation_step)
    monkeypatch.setattr(L.Trainer, "save_checkpoint", counting("save_checkpoint", L.Trainer.save_checkpoint))
    result = run_fit(BenchConfig(model="resnet20", image_size=8, batch_size=4), warmup=1, steps=2)
    assert result.steps == 2 and result.seconds > 0
    assert calls == {"validation_step": 0, "save_checkpoint": 0}


def test_gpu_suite_resnet50_window_fits_in_one_epoch(tmp_path: Path) -> None:
    """The suite's ResNet-50 runs (224 px, batch 256, 6 warm-up + 20 timed steps) never cross an epoch end."""
    cfg = BenchConfig(model="resnet50", image_size=224, batch_size=256, precision="bf16-mixed", device="cuda")
    data = fit_config(cfg, warmup=6, steps=20, root=str(tmp_path))["data"]["init_args"]
    assert data["num_samples"] // data["batch_size"] >= 6 + 20


def test_time_to_accuracy_stops_when_its_schedule_cannot_fit_the_time_cap(tmp_path: Path) -> None:
    output = tmp_path / "tta.json"
    callback = TimeToAccuracy(target=2.0, output=str(output), max_seconds=1e-3)  # 2.0: never reached
    trainer = _tiny_fit(tmp_path, callback, max_epochs=30)
    data = json.loads(output.read_text())
    assert trainer.current_epoch == 2 and len(data["history"]) == 2  # stopped at the second validation
    assert data["schedule_fits"] is False and data["projected_seconds"] > data["max_seconds"]
    assert data["stopped"].startswith("the schedule of 90 steps would end after about")
    assert "beyond the time cap of 0 s" in data["stopped"]

    fits = TimeToAccuracy(target=2.0, output=str(output), max_seconds=1e6)
    _tiny_fit(tmp_path, fits, max_epochs=2)
    data = json.loads(output.read_text())
    assert len(data["history"]) == 2 and data["schedule_fits"] is True and data["stopped"] is None
