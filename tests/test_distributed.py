"""Real DDP on CPU: two gloo processes through the CLI as subprocesses; launcher checks; SyncBatchNorm conversion.

Data: the digits with 20% val and 20% test, i.e. 359 images each, odd, so two ranks evaluate 179 and 180 images
and, with eval_batch_size 179, even a different number of batches (1 and 2). Train: 1079 images, 16 steps of a
global batch of 64 (1 x 64 or 2 x 32). Model: ResNet-20 with GroupNorm, which normalises per sample, so one
process on 64 images and two on 32 each compute the same loss and gradient (BatchNorm would not: each process
normalises with its own half-batch statistics unless synchronized, and SyncBatchNorm needs GPUs).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from resnet_lit import ResidualBlock, ResNetClassifier, register_block
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.fault_tolerance.cluster import Launch, detect_launch
from resnet_lit.models import BLOCKS, NetworkConfig
from threads import one_intra_op_thread

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
AUDITED_CLI = str(REPO / "tests" / "audited_cli.py")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
EVAL_SIZE = 359
DATA = ["--data.init_args.val_fraction", "0.2", "--data.init_args.test_fraction", "0.2",
        "--data.init_args.eval_batch_size", "179"]  # fmt: skip
COMMON = ["--config", QUICKSTART, "--trainer.precision", "32-true", "--model.net.norm", "groupnorm", *DATA, *QUIET]
FIT = ["--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
       # lr per 64 images: the same lr for 1 x 64 and 2 x 32 only if the world size enters the scaling.
       # 0.02 rather than the quickstart's 0.1 without warmup, whose first steps are chaotic enough to grow
       # float rounding differences 10x per step (measured: 1e-7 at step 1, 1e-2 at step 15).
       "--model.lr_reference_batch", "64", "--model.optimizer.init_args.lr", "0.02"]  # fmt: skip
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
STEPS = 1079 // 64
# Per-step train/loss, 1 process vs 2. Float rounding differs (gradient all-reduce, per-process thread counts) and
# training amplifies it a few-fold per step once it shows, so: the first steps, before any amplification, must
# agree tightly (measured <= 1e-5 relative); that already fails for a world size missing from the lr scaling, a
# loss logged from one process's half batch, or mis-sharded batches (each > 1e-2). The whole 16-step curve must
# agree within 2e-2: measured 1.2e-4 with 1 thread per process (what the tests pin), 8.8e-3 with 2 threads.
TIGHT_STEPS, TIGHT_RTOL = 3, 1e-4
CURVE_RTOL = 2e-2
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def _clean_env() -> dict[str, str]:
    """This environment minus any launcher's variables (CI may itself run under SLURM or torchrun)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """In-process runs on one intra-op thread, as each DDP process has: on a busy 2-core machine a 2-thread OpenMP
    loop waits at every tiny op for its descheduled second thread (measured: 20x slower)."""
    with one_intra_op_thread():
        yield


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in LAUNCHER_VARS:
            monkeypatch.delenv(key)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], *, audit_dir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # One thread per process, as Lightning picks on 2 cores, also when an earlier test left OMP_NUM_THREADS set.
    env = {**_clean_env(), "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "resnet_lit"]
    if audit_dir is not None:
        env["RESNET_LIT_WRITE_AUDIT"] = str(audit_dir)
        command = [sys.executable, AUDITED_CLI]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def metric_rows(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def last_metric(metrics_csv: Path, key: str) -> float:
    rows = metric_rows(metrics_csv, key)
    assert rows, f"{key} never logged in {metrics_csv}"
    return rows[-1][1]


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One epoch on 2 processes x 32 images, each process's file writes recorded: (run root, audit dir, log)."""
    root, audit = tmp_path_factory.mktemp("ddp_fit"), tmp_path_factory.mktemp("ddp_fit_audit")
    result = run_cli(["fit", *COMMON, *FIT, *DDP, "--data.init_args.batch_size", "32",
                      "--trainer.default_root_dir", str(root)], audit_dir=audit)  # fmt: skip
    return root, audit, result.stdout + result.stderr


@pytest.fixture(scope="module")
def single_fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same epoch on 1 process x 64 images (in-process: one Python start less)."""
    root = tmp_path_factory.mktemp("single_fit")
    main(["fit", *COMMON, *FIT, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--data.init_args.batch_size", "64", "--trainer.default_root_dir", str(root)])  # fmt: skip
    return root


@pytest.mark.slow
def test_ddp_fit_only_rank_zero_writes_the_run(ddp_fit: tuple[Path, Path, str]) -> None:
    root, audit, log = ddp_fit
    writes: dict[str, set[str]] = {}
    for record in audit.glob("rank*.txt"):
        rank = record.name.split(".")[0]
        assert rank not in writes, "two processes claim the same rank"
        writes[rank] = {p for p in record.read_text().splitlines() if Path(p).is_relative_to(root)}
    assert set(writes) == {"rank0", "rank1"}, "expected exactly two processes"
    # Rank 0 wrote the run (this also shows the audit sees these writes) ...
    assert {str(root / "config.yaml"), str(root / "metrics.csv")} <= writes["rank0"]
    assert any(p.endswith("last.ckpt") for p in writes["rank0"])
    # ... and rank 1 wrote nothing under the run folder.
    assert writes["rank1"] == set()

    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == STEPS  # each rank took 16 steps on its own half of each global batch
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == pytest.approx([0.02, 0.02])  # 0.02 x (2 x 32) / 64
    assert "global batch 64 / 64 = 1" in log
    assert "Lightning starts 2 processes per node" in log
    steps = [step for step, _ in metric_rows(root / "metrics.csv", "train/loss")]
    assert len(steps) == len(set(steps)) == STEPS  # one row per step: a single writer


@pytest.mark.slow
def test_ddp_loss_curve_matches_single_process_with_the_same_global_batch(
    ddp_fit: tuple[Path, Path, str], single_fit: Path
) -> None:
    ddp = metric_rows(ddp_fit[0] / "metrics.csv", "train/loss")
    single = metric_rows(single_fit / "metrics.csv", "train/loss")
    assert [s for s, _ in ddp] == [s for s, _ in single] == list(range(STEPS))
    ddp_losses, single_losses = [v for _, v in ddp], [v for _, v in single]
    assert single_losses[-1] < 0.8 * single_losses[0]  # it trained
    assert ddp_losses[:TIGHT_STEPS] == pytest.approx(single_losses[:TIGHT_STEPS], rel=TIGHT_RTOL)
    assert ddp_losses == pytest.approx(single_losses, rel=CURVE_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_ddp_evaluation_equals_single_process_exactly(
    ddp_fit: tuple[Path, Path, str], stage: str, tmp_path: Path
) -> None:
    ckpt = str(ddp_fit[0] / "checkpoints" / "last.ckpt")
    prefix = "val" if stage == "validate" else "test"
    two = tmp_path / "ddp"
    report = ["--trainer.callbacks+=resnet_lit.callbacks.PerClassReport"]
    run_cli([stage, *COMMON, *DDP, *report, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(two)])
    one = ResNetLitCLI(args=[stage, *COMMON, *report, "--ckpt_path", ckpt, "--trainer.accelerator", "cpu",
                             "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    single = {k: v.item() for k, v in one.trainer.callback_metrics.items()}

    acc = last_metric(two / "metrics.csv", f"{prefix}/acc")
    assert 0.2 < acc < 1.0, "a model this far from trivial makes the comparison meaningful"
    # Counts over 359 images, not over 360 (Lightning's padded sampler would repeat one image).
    assert acc * EVAL_SIZE == pytest.approx(round(acc * EVAL_SIZE), abs=1e-3)
    assert acc == single[f"{prefix}/acc"]
    assert last_metric(two / "metrics.csv", f"{prefix}/acc_top5") == single[f"{prefix}/acc_top5"]
    assert last_metric(two / "metrics.csv", f"{prefix}/loss") == pytest.approx(single[f"{prefix}/loss"], rel=1e-5)
    if stage == "validate":  # last.ckpt is saved after the fit's (2-process) validation of the same weights
        assert last_metric(ddp_fit[0] / "metrics.csv", "val/acc") == single["val/acc"]
    # The per-class files come from the confusion matrix summed over the ranks: byte-identical, and consistent.
    for name in ("per_class.csv", "confusion_matrix.csv"):
        assert (two / f"{prefix}_{name}").read_bytes() == (tmp_path / f"{prefix}_{name}").read_bytes()
    with open(two / f"{prefix}_confusion_matrix.csv") as f:
        counts = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    assert sum(map(sum, counts)) == EVAL_SIZE
    assert sum(row[i] for i, row in enumerate(counts)) == round(acc * EVAL_SIZE)
    assert last_metric(two / "metrics.csv", f"{prefix}/acc_macro") == single[f"{prefix}/acc_macro"]


@pytest.mark.slow
def test_torchrun_example_launches_two_processes(tmp_path: Path) -> None:
    env = {**_clean_env(), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "torchrun_cpu.sh"), "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path), *QUIET],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "launched by torchrun: 2 processes" in log
    assert "All distributed processes registered. Starting with 2 processes" in log
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 3
    data_state = checkpoint["DigitsDataModule"]
    assert (data_state["world_size"], data_state["batch_size"]) == (2, 32)  # global batch 64, as the quickstart


# --- launchers: SLURM and torchrun layouts that do not match the Trainer ------------------------------------

SLURM_JOB = {"SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "node[01-02]",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
TORCHRUN = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0",
            "LOCAL_RANK": "0", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}  # fmt: skip


@pytest.mark.timeout(120)  # a check that let a mismatch through would hang waiting for the missing process
@pytest.mark.parametrize(
    ("env", "args", "needles"),
    [
        pytest.param({**SLURM_JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"},
                     ["--trainer.devices", "1", "--trainer.strategy", "ddp"],
                     ["`--ntasks-per-node=2` does not match", "--trainer.devices 2 --trainer.num_nodes 1"],
                     id="slurm-devices"),
        pytest.param({**SLURM_JOB, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2"},
                     ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
                     ["`--nodes=2` does not match", "--trainer.devices 2 --trainer.num_nodes 2"],
                     id="slurm-nodes"),
        pytest.param({**SLURM_JOB, "SLURM_NTASKS": "2"},
                     ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
                     ["Use `--ntasks-per-node=2` instead", "trainer.devices must equal --ntasks-per-node"],
                     id="slurm-ntasks"),
        pytest.param({**SLURM_JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"},
                     ["--trainer.devices", "1"],  # strategy auto: one device; Lightning checks nothing
                     ["SLURM srun started 2 processes, but the Trainer expects", "--trainer.devices 2"],
                     id="slurm-single-device"),
        pytest.param(TORCHRUN, ["--trainer.devices", "1", "--trainer.strategy", "ddp"],
                     ["does not match the world size (2)", "--nproc_per_node", "--trainer.devices 2"],
                     id="torchrun-devices"),
        pytest.param(TORCHRUN, ["--trainer.devices", "1"],
                     ["torchrun started 2 processes", "--trainer.devices 2"],
                     id="torchrun-single-device"),
    ],
)  # fmt: skip
def test_launcher_mismatch_gives_lightnings_error_plus_our_hint(
    env: dict[str, str], args: list[str], needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--trainer.accelerator", "cpu", *args])
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: ")
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Launch("lightning")),
        ({**SLURM_JOB, "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"},
         Launch("slurm", 8, 4, 2)),
        ({**SLURM_JOB, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "1"}, Launch("lightning")),  # salloc shell
        ({**SLURM_JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", **TORCHRUN},
         Launch("torchrun", 2, 2, 1)),  # torchrun inside a SLURM allocation: torchrun wins, as in Lightning
    ],
)  # fmt: skip
def test_detect_launch(env: dict[str, str], expected: Launch) -> None:
    assert detect_launch(env) == expected


def test_torchrun_inside_slurm_uses_torchruns_environment_so_no_slurm_requeue(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**SLURM_JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
                       **TORCHRUN}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)  # not SLURMEnvironment


def test_matching_slurm_layout_is_accepted_and_logged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in {**SLURM_JOB, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    messages: list[str] = []
    monkeypatch.setattr("resnet_lit.fault_tolerance.cluster.rank_zero_info", messages.append)
    cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.accelerator", "cpu",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.trainer.world_size == 1
    assert messages == ["resnet-lit: launched by SLURM srun, job 4242: 1 tasks "
                        "(trainer.devices=1 x trainer.num_nodes=1)"]  # fmt: skip


def test_use_distributed_sampler_is_forced_off_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="use_distributed_sampler is ignored"):
        cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.use_distributed_sampler", "true",
                                 "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.trainer._accelerator_connector.use_distributed_sampler is False


# --- sync_batchnorm: conversion of every BatchNorm, user blocks included --------------------------------------


class TwoNormBlock(ResidualBlock):
    """A user block with one norm from the `norm_layer` it is given and one hard-coded BatchNorm2d."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm_layer=nn.BatchNorm2d, **kwargs):
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn_last = nn.BatchNorm2d(channels)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_last(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


@pytest.fixture
def user_block(monkeypatch: pytest.MonkeyPatch) -> str:
    BLOCKS.names()  # load plugins before the snapshot
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))
    monkeypatch.setattr(BLOCKS, "_origins", dict(BLOCKS._origins))
    register_block("two_norm_test_block")(TwoNormBlock)
    return "two_norm_test_block"


def test_sync_batchnorm_converts_every_batchnorm_including_user_blocks(user_block: str) -> None:
    # What `trainer.sync_batchnorm: true` (r50.yaml) makes Lightning's DDP strategy do to the module at fit start.
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False)
    layer_sync = trainer.strategy._layer_sync
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    for model in (ResNetClassifier(arch="resnet50", num_classes=10),
                  ResNetClassifier(arch="resnet20", net=NetworkConfig(block=user_block), num_classes=10)):  # fmt: skip
        batchnorms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert batchnorms
        if model.hparams.net:
            assert any(name.endswith("bn_last") for name in batchnorms)  # the hard-coded one is in there
        converted = layer_sync.apply(model)
        sync = {name for name, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)}
        assert sync == set(batchnorms)
        assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
