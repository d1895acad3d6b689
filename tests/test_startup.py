"""Fast start by default: `import resnet_lit`, building a model and the zoo commands import neither Lightning nor
the data stack (the public names still resolve, on demand), and `resnet-lit benchmark quickstart` reports the
wall times of whole processes as JSON. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_lit.bench import quickstart
from resnet_lit.bench.quickstart import ProcessRun, fit_parts
from resnet_lit.bench.quickstart_probe import clock_argument
from resnet_lit.cli import main
from threads import one_intra_op_thread

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "torchmetrics", "jsonargparse", "matplotlib", "resnet_lit.data", "resnet_lit.module")

# Which heavy modules each step has loaded, in a fresh interpreter (one process for all steps, to stay fast).
CHECK_IMPORTS = f"""
import contextlib, io, json, sys
HEAVY = {HEAVY!r}
loaded = {{}}
def record(step):
    loaded[step] = sorted(m for m in sys.modules if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY)))
import resnet_lit
record("import resnet_lit")
resnet_lit.create_model("resnet18")
record("create_model")
from resnet_lit.cli import main
for argv in (["models"], ["blocks"], ["describe", "resnet20"]):
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    record(" ".join(argv))
print(json.dumps(loaded))
"""


def test_the_zoo_starts_without_lightning_jsonargparse_or_the_data_stack() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK_IMPORTS], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert list(loaded) == ["import resnet_lit", "create_model", "models", "blocks", "describe resnet20"]
    assert loaded == {step: [] for step in loaded}


def test_public_names_resolve_on_demand() -> None:
    import resnet_lit
    from resnet_lit import NetworkConfig, ResNetClassifier
    from resnet_lit.cli import ResNetLitCLI
    from resnet_lit.models.config import NetworkConfig as DefinedNetworkConfig
    from resnet_lit.module import ResNetClassifier as DefinedClassifier
    from resnet_lit.training_cli import ResNetLitCLI as DefinedCLI

    assert ResNetClassifier is DefinedClassifier and NetworkConfig is DefinedNetworkConfig
    assert resnet_lit.models.NetworkConfig is DefinedNetworkConfig and ResNetLitCLI is DefinedCLI
    assert all(getattr(resnet_lit, name) is not None for name in resnet_lit.__all__)
    assert set(resnet_lit.__all__) <= set(dir(resnet_lit))
    with pytest.raises(AttributeError, match="no attribute 'ResNetClassifer'"):
        resnet_lit.ResNetClassifer  # noqa: B018


def test_fit_parts_add_up_to_the_wall_time() -> None:
    clock = {
        "marks": {"started": 100.05, "imported": 103.0, "train_start": 105.0, "first_step": 105.1, "train_end": 125.0},
        "validations": [[104.0, 104.5], [110.0, 111.0], [124.0, 124.5]],  # sanity check, then two epochs
    }
    parts = fit_parts(clock, started=100.0, ended=126.0)
    expected = {"interpreter": 0.05, "imports": 2.95, "setup": 1.5, "validation": 2.0, "training": 18.5, "finish": 1.0}
    assert parts == pytest.approx(expected)
    assert sum(parts.values()) == pytest.approx(26.0)


def test_phase_clock_records_a_fit(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "trainer: {accelerator: cpu, devices: 1, max_epochs: 1, limit_train_batches: 3, limit_val_batches: 2,"
        " log_every_n_steps: 1, enable_progress_bar: false}\n"
        "model: {arch: resnet20, net: {strides: [1, 2, 2], widths: [4, 8, 8], stem_width: 4}}\n"
        "data: {class_path: resnet_lit.data.DigitsDataModule, init_args: {batch_size: 16}}\n"
    )
    output = tmp_path / "phases.json"
    argv = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")]
    with one_intra_op_thread():
        main([*argv, clock_argument(str(output), {"started": 1.0, "imported": 2.0})])
    clock = json.loads(output.read_text())
    marks = clock["marks"]
    assert list(marks) == ["started", "imported", "train_start", "first_step", "train_end"]
    assert marks["imported"] < marks["train_start"] <= marks["first_step"] < marks["train_end"]
    (_, sanity_end), (val_start, val_end) = clock["validations"]  # sanity check, end of the epoch
    assert sanity_end <= marks["train_start"] < val_start < val_end <= marks["train_end"]
    assert 0.0 <= clock["val_acc"] <= 1.0 and (clock["epochs"], clock["steps"]) == (1, 3)


def fake_run(name: str, argv: list[str], repeat: int, clock_output: str | None) -> ProcessRun:
    """Each command takes (its index + 1) seconds plus 0.1 s per repeat; `fit` also reports parts."""
    index = list(quickstart.commands("cfg", "root", "clock")).index(name)
    run = ProcessRun(name, repeat, index + 1 + 0.1 * repeat)
    FAKE_CALLS.append((name, argv, clock_output))
    if name == quickstart.FIT:
        run.parts = {part: run.seconds / len(quickstart.PARTS) for part in quickstart.PARTS}
        run.time_to_first_step, run.val_acc, run.epochs = 2.0 + repeat, 0.98 - 0.01 * repeat, 15
    return run


FAKE_CALLS: list[tuple[str, list[str], str | None]] = []


def test_quickstart_benchmark_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FAKE_CALLS.clear()
    monkeypatch.setattr(quickstart, "run_process", fake_run)
    out = tmp_path / "quickstart.json"
    main(["benchmark", "quickstart", "--repeats", "3", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["scenario"] == "quickstart" and data["complete"] and data["repeats"] == 3
    assert data["config"] == str(REPO / "configs" / "quickstart.yaml") and data["machine"]["cpu_count"] >= 1
    names = ["import torch", "models", "blocks", "describe resnet50", "fit"]
    assert list(data["results"]) == names and list(data["commands"]) == names
    assert [(r["name"], r["repeat"]) for r in data["runs"]] == [(n, i) for i in range(3) for n in names]

    results = data["results"]
    assert results["import torch"] == {"seconds": pytest.approx(1.1), "samples": pytest.approx([1.0, 1.1, 1.2])}
    models = results["models"]
    assert models["seconds"] == pytest.approx(2.1) and models["over_import_torch_s"] == pytest.approx(1.0)
    assert models["ratio_to_import_torch"] == pytest.approx(2.1 / 1.1)  # median of 2/1, 2.1/1.1, 2.2/1.2
    fit = results["fit"]
    assert fit["seconds"] == pytest.approx(5.1) and "ratio_to_import_torch" not in fit
    assert fit["parts"] == {part: pytest.approx(5.1 / 6) for part in quickstart.PARTS}
    assert fit["time_to_first_step"] == 3.0 and fit["val_acc"] == pytest.approx(0.97)

    # Real processes: the zoo as `python -m resnet_lit`, fit with its clock and a fresh temporary root each time.
    argvs = {name: argv for name, argv, _ in FAKE_CALLS}
    assert argvs["describe resnet50"][1:] == ["-m", "resnet_lit", "describe", "resnet50"]
    roots = [argv[argv.index("--trainer.default_root_dir") + 1] for name, argv, _ in FAKE_CALLS if name == "fit"]
    assert len(set(roots)) == 3 and not any(Path(root).is_relative_to(REPO) for root in roots)
    assert all((clock is not None) == (name == "fit") for name, _, clock in FAKE_CALLS)

    table = capsys.readouterr().out
    assert "resnet-lit models" in table and "1.91x (+1.00 s)" in table and "final val/acc 0.9700" in table


@pytest.mark.parametrize(("name", "image_size"), [("resnet20", 32), ("seresnet20", 32), ("resnet50d", 64)])
def test_describe_on_the_meta_device_counts_what_a_real_forward_counts(name: str, image_size: int) -> None:
    from resnet_lit.commands import _summarize_on_meta
    from resnet_lit.models import create_model, summarize

    real = summarize(create_model(name), image_size, 3)
    assert _summarize_on_meta(create_model(name), image_size, 3) == real


def test_describe_falls_back_to_a_real_forward_when_the_meta_device_cannot_run_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import resnet_lit.commands as commands

    main(["describe", "resnet20"])
    on_meta = capsys.readouterr().out

    def needs_values(*args: object) -> None:
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(commands, "_summarize_on_meta", needs_values)
    main(["describe", "resnet20"])
    assert capsys.readouterr().out == on_meta and "MACs: 40.6 M" in on_meta
