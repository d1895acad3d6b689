"""Gradient flow: `GradientNormMonitor` logs each part's gradient norm at the logging steps only, and
`resnet-lit describe NAME --gradients` prints (and plots) the gradient norms of a network at initialisation.

The fit: the quickstart (ResNet-20, 3 stages, on the digits) for 6 optimizer steps of 2 accumulated batches of
16, logging every 2 steps, with the monitor configured in YAML next to the CLI's default callbacks.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from faultinject import fault_env
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

import resnet_lit.callbacks.gradient_norms as gradient_norms_module
from resnet_lit import ResNetClassifier
from resnet_lit.callbacks import GradientNormMonitor, PerClassReport, ThrottledProgressBar
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance import PreemptionHandler, ResumableCheckpoint
from resnet_lit.models import create_model
from threads import one_intra_op_thread

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
STEPS, ACCUMULATE, LOG_EVERY = 6, 2, 2
PARTS = ("stem", "stage1", "stage2", "stage3", "head")
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__")
CONFIG = """\
trainer:
  callbacks:
    - class_path: resnet_lit.callbacks.GradientNormMonitor
      init_args:
        norm_type: 2.0
    - class_path: test_gradient_norms.HandNorms
"""


def hand_norms(net: nn.Module) -> dict[str, float]:
    """The L2 norm of each part's gradients, in float64 on the host."""
    parts = {"stem": net.stem, "head": net.head} | {f"stage{i}": s for i, s in enumerate(net.stages, start=1)}
    norms = {
        name: math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in part.parameters() if p.grad is not None))
        for name, part in parts.items()
    }
    return norms | {"total": math.sqrt(sum(v * v for v in norms.values()))}


class HandNorms(Callback):
    """Records, at every optimizer step, the step and the part norms computed by hand (after the monitor, on the
    same gradients), and the Trainer's callbacks at train start."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}
        self.callback_types: list[type] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.callback_types = [type(cb) for cb in trainer.callbacks]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.norms[trainer.global_step + 1] = hand_norms(pl_module.net)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast, and does not stall when another process holds a core."""
    with one_intra_op_thread():
        yield


@contextmanager
def host_syncs_recorded(calls: list[str]) -> Iterator[None]:
    """Appends the name of every host read of a tensor and every collective made inside to `calls`."""
    with pytest.MonkeyPatch.context() as patch:
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name, lambda *a, _n=name, _o=original, **k: calls.append(_n) or _o(*a, **k))
        for name in ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object"):
            original = getattr(dist, name)
            patch.setattr(dist, name, lambda *a, _n=name, _o=original, **k: calls.append(_n) or _o(*a, **k))
        yield


@pytest.fixture(scope="module")
def fit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The fit: its run folder, the hand-computed norms, the callbacks, and for each optimizer step whether the
    monitor computed norms and the host syncs and collectives its hook made."""
    root = tmp_path_factory.mktemp("gradient_norms")
    config = root / "callbacks.yaml"
    config.write_text(CONFIG)
    computed: list[int] = []
    syncs: dict[int, list[str]] = {}
    hook = GradientNormMonitor.on_before_optimizer_step
    compute = gradient_norms_module.part_gradient_norms

    def audited_hook(self: GradientNormMonitor, trainer: pl.Trainer, *args: Any) -> None:
        with host_syncs_recorded(syncs.setdefault(trainer.global_step + 1, [])):
            hook(self, trainer, *args)

    def recorded_compute(pl_module: Any, *args: Any) -> dict[str, Tensor]:
        computed.append(pl_module.trainer.global_step + 1)
        return compute(pl_module, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GradientNormMonitor, "on_before_optimizer_step", audited_hook)
        patch.setattr(gradient_norms_module, "part_gradient_norms", recorded_compute)
        cli = ResNetLitCLI(args=[
            "fit", "--config", QUICKSTART, "--config", str(config), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(STEPS), "--trainer.accumulate_grad_batches", str(ACCUMULATE),
            "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "16",
        ])  # fmt: skip
    hand = next(cb for cb in cli.trainer.callbacks if isinstance(cb, HandNorms))
    yield {"root": root, "hand": hand, "computed": computed, "syncs": syncs}


def logged_rows(metrics_csv: Path) -> dict[int, dict[str, str]]:
    """step -> the grad_norm/* values of the metrics.csv rows that have them."""
    with open(metrics_csv) as f:
        rows = [row for row in csv.DictReader(f) if row.get("grad_norm/total")]
    return {int(row["step"]): {k: v for k, v in row.items() if k.startswith("grad_norm/") and v} for row in rows}


def test_fit_with_the_monitor_logs_stem_three_stages_and_head_to_metrics_csv(fit: dict[str, Any]) -> None:
    """ACCEPTANCE: a `fit` with `GradientNormMonitor` logs at least the stem, three stages and the head to
    `metrics.csv`."""
    rows = logged_rows(fit["root"] / "metrics.csv")
    assert rows, "no grad_norm/* column in metrics.csv"
    for step, row in rows.items():
        assert set(row) == {f"grad_norm/{part}" for part in (*PARTS, "total")}, step
        assert all(0 < float(value) < math.inf for value in row.values()), row


def test_logged_norms_equal_the_norms_by_hand_at_the_logging_steps_only(fit: dict[str, Any]) -> None:
    rows = logged_rows(fit["root"] / "metrics.csv")
    hand: dict[int, dict[str, float]] = fit["hand"].norms
    assert sorted(hand) == list(range(1, STEPS + 1))  # one hook call per optimizer step, not per batch
    # Lightning's `step` column: the optimizer steps done before the logging one.
    assert sorted(rows) == [step - 1 for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    for step, row in rows.items():
        expected = hand[step + 1]
        for key, value in row.items():
            assert float(value) == pytest.approx(expected[key.removeprefix("grad_norm/")], rel=1e-5), (step, key)


def test_the_monitor_syncs_nothing_and_computes_nothing_between_logging_steps(fit: dict[str, Any]) -> None:
    logging_steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert fit["computed"] == logging_steps
    # Not even at the logging steps: the norms are logged as device tensors, converted by the logger later.
    assert fit["syncs"] == {step: [] for step in range(1, STEPS + 1)}


def test_a_configured_monitor_runs_alongside_the_default_callbacks(fit: dict[str, Any]) -> None:
    types = fit["hand"].callback_types
    for default in (ThrottledProgressBar, PerClassReport, PreemptionHandler, ResumableCheckpoint):
        assert default in types, f"{default.__name__} missing: {types}"
    assert types.count(GradientNormMonitor) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_whole_fit_with_the_monitor_makes_no_host_sync_on_ordinary_steps(tmp_path: Path) -> None:
    """tests/sync_audit.py in one process: every host read and collective of each training step, not only the
    monitor's (e.g. none from the logged norms at the steps after a logging step)."""
    steps, log_every = 8, 4
    command = [sys.executable, str(REPO / "tests" / "sync_audit.py"), "fit", "--config", QUICKSTART,
               "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", str(steps),
               "--trainer.log_every_n_steps", str(log_every), "--trainer.limit_val_batches", "1",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
               "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "16",
               "--trainer.callbacks+=resnet_lit.callbacks.GradientNormMonitor"]  # fmt: skip
    env = fault_env(RESNET_LIT_SYNC_AUDIT=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert set(logged_rows(tmp_path / "metrics.csv")) == {3, 7}  # the monitor did log
    report = json.loads((tmp_path / "rank0.json").read_text())
    kinds = {int(step): entry["kind"] for step, entry in report["steps"].items()}
    # The last step reaches max_steps mid-epoch, so last.ckpt is saved in it.
    expected = {step: "logging" if (step + 1) % log_every == 0 else "ordinary" for step in range(steps - 1)}
    assert kinds == {**expected, steps - 1: "checkpoint"}
    for step, entry in report["steps"].items():
        sites = [f"{c['what']} {c['site']}" for c in entry["calls"] if not c["excluded"]]
        if entry["kind"] == "ordinary":
            assert not sites, f"step {step}: {sites}"
        assert not [s for s in sites if "gradient_norms.py" in s or "gradient_flow.py" in s], f"step {step}: {sites}"


# --- the callback on a bare network -------------------------------------------------------------------------
class Logged:
    """Stands in for a LightningModule: the network `net` and a `log_dict` that records."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.logged = net, []

    def log_dict(self, metrics: dict[str, Tensor], **kwargs: Any) -> None:
        assert kwargs == {"on_step": True, "on_epoch": False}
        self.logged.append({k: v.item() for k, v in metrics.items()})


def step_on(monitor: GradientNormMonitor, module: Any, step: int, log_every: int = 5) -> None:
    """The monitor's hook before optimizer step `step` (1-based)."""
    trainer = SimpleNamespace(global_step=step - 1, log_every_n_steps=log_every)
    monitor.on_before_optimizer_step(trainer, module, None)  # type: ignore[arg-type]


def constant_gradients(net: nn.Module) -> dict[str, float]:
    """Gives every parameter of part k (stem, stage1, ...) the gradient k + 1 everywhere; their L2 and max norms."""
    parts = [net.stem, *net.stages, net.head]
    l2 = {}
    for k, (name, part) in enumerate(zip(PARTS, parts, strict=True)):
        numel = 0
        for p in part.parameters():
            p.grad = torch.full_like(p, k + 1.0)
            numel += p.numel()
        l2[name] = (k + 1.0) * math.sqrt(numel)
    return l2


def test_norms_of_known_gradients_l2_and_max() -> None:
    net = create_model("resnet20")
    expected = constant_gradients(net)
    module = Logged(net)
    step_on(GradientNormMonitor(), module, step=5)
    step_on(GradientNormMonitor(norm_type=math.inf), module, step=5)
    l2, largest = module.logged
    total = math.sqrt(sum(v * v for v in expected.values()))
    assert l2 == pytest.approx({f"grad_norm/{k}": v for k, v in expected.items()} | {"grad_norm/total": total})
    assert largest == {f"grad_norm/{name}": k + 1.0 for k, name in enumerate(PARTS)} | {"grad_norm/total": 5.0}


def test_between_logging_steps_the_monitor_reads_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    net = create_model("resnet20")
    constant_gradients(net)
    module = Logged(net)
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: pytest.fail("computed a norm"))
    for step in (1, 4, 6, 9, 11):
        step_on(GradientNormMonitor(), module, step=step, log_every=5)
    step_on(GradientNormMonitor(), module, step=50, log_every=0)  # no step logs at all
    assert module.logged == []


def test_parameters_without_gradients_and_frozen_stages_are_left_out() -> None:
    model = ResNetClassifier(num_classes=10, freeze_stages=1)
    expected = constant_gradients(model.net)
    model.net.stages[2].requires_grad_(False)
    for p in model.net.stages[2].parameters():
        p.grad = None
    logged: list[dict[str, float]] = []
    model.log_dict = lambda metrics, **kwargs: logged.append({k: v.item() for k, v in metrics.items()})  # type: ignore[method-assign]
    step_on(GradientNormMonitor(), model, step=5)
    model.freezer.start_epoch(0, training=True)  # frozen from now on: stem and stage1 are dropped before the step
    step_on(GradientNormMonitor(), model, step=5)
    unfrozen, frozen = logged
    assert set(unfrozen) == {"grad_norm/stem", "grad_norm/stage1", "grad_norm/stage2", "grad_norm/head",
                             "grad_norm/total"}  # fmt: skip
    assert frozen == pytest.approx({"grad_norm/stage2": expected["stage2"], "grad_norm/head": expected["head"],
                                    "grad_norm/total": math.hypot(expected["stage2"], expected["head"])})  # fmt: skip


def test_a_network_without_resnet_layout_is_grouped_by_its_top_level_modules() -> None:
    net = nn.Module()
    net.features, net.classifier = nn.Conv2d(1, 2, 3), nn.Linear(2, 3)
    net.scale = nn.Parameter(torch.ones(()))
    net.features.weight.grad = torch.full_like(net.features.weight, 2.0)  # 18 values
    net.classifier.weight.grad = torch.full_like(net.classifier.weight, 1.0)  # 6 values; the biases have none
    net.scale.grad = torch.tensor(-3.0)
    module = Logged(net)
    step_on(GradientNormMonitor(), module, step=5)
    expected = {"grad_norm/features": math.sqrt(18 * 4), "grad_norm/classifier": math.sqrt(6), "grad_norm/own": 3.0,
                "grad_norm/total": math.sqrt(18 * 4 + 6 + 9)}  # fmt: skip
    assert module.logged == [pytest.approx(expected)]


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -math.inf, math.nan])
def test_a_bad_norm_type_is_a_one_line_error(norm_type: float) -> None:
    with pytest.raises(ResNetLitError, match=r"GradientNormMonitor norm_type must be a positive number or inf"):
        GradientNormMonitor(norm_type=norm_type)


# --- describe --gradients -------------------------------------------------------------------------------------
def describe_rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}


def test_describe_gradients_prints_the_norm_of_each_part_and_block(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "resnet20", "--gradients", "--batch-size", "4", "--seed", "3"])
    out = capsys.readouterr().out
    assert out.startswith("resnet20 gradient norms at initialisation (L2 norm")
    assert "4 random 3x32x32 images" in out and "seed 3" in out
    rows = describe_rows(out)
    for name in (*PARTS, "total"):
        assert name in rows, f"no {name!r} row in:\n{out}"
    assert "stage4" not in rows
    assert rows["total"][1] == "269,722"
    blocks = [line.split() for line in out.split("\nblock")[1].splitlines()[1:]]
    assert [b[:2] for b in blocks] == [["0", "stem"]] + [[str(3 * s + b + 1), f"stage{s + 1}.{b}"]
                                                        for s in range(3) for b in range(3)]  # fmt: skip
    # The documented protocol: the network built after seeding, then the images, then the labels.
    torch.manual_seed(3)
    net = create_model("resnet20")
    images = torch.randn(4, 3, 32, 32)
    F.cross_entropy(net(images), torch.randint(0, 10, (4,))).backward()
    for name, value in hand_norms(net).items():
        assert float(rows[name][0]) == pytest.approx(value, rel=1e-3), name
    assert float(blocks[0][2]) == pytest.approx(hand_norms(net)["stem"], rel=1e-3)


def test_describe_gradients_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "flow.png"
    main(["describe", "resnet20", "--gradients", "--plot", str(path), "--batch-size", "2"])
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"plot: {path}" in capsys.readouterr().out


def test_describe_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as excinfo:
        main(["describe", "resnet20", "--gradients", "--plot", str(tmp_path / "flow.png"), "--batch-size", "2"])
    message = str(excinfo.value.code)
    assert message.startswith("resnet-lit describe: error: plotting gradient norms needs matplotlib")
    assert "pip install 'resnet-lit[plots]'" in message and "\n" not in message
    assert not (tmp_path / "flow.png").exists()


def test_describe_gradient_options_need_gradients(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["describe", "resnet20", "--plot", "flow.png"])
    assert excinfo.value.code == 2
    assert "--plot needs --gradients" in capsys.readouterr().err
