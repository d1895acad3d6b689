"""`trainer.precision: auto`: bf16-mixed where the training device runs bfloat16 natively (a GPU with it, a CPU with
bfloat16 instructions), 32-true elsewhere; the choice is logged, and the config keeps `auto`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.accelerators import CUDAAccelerator

import resnet_lit.trainer as trainer_module
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.trainer import resolve_auto_precision

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    messages: list[str] = []
    monkeypatch.setattr(trainer_module, "rank_zero_info", messages.append)
    return messages


def cpu_bf16(monkeypatch: pytest.MonkeyPatch, capable: bool) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: capable)


def gpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """A CUDA device as `auto` sees it; ``native_bf16``: what `is_bf16_supported(including_emulation=False)` says."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation  # a pre-Ampere GPU emulates bfloat16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_the_private_cpu_bf16_probe_still_exists() -> None:
    """`auto` asks oneDNN through a private torch op; when a torch release drops it, this fails first (and `auto`
    falls back to 32-true with a warning, see below)."""
    assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)


@pytest.mark.parametrize(("capable", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_follows_the_cpu_and_is_logged(
    capable: bool, expected: str, monkeypatch: pytest.MonkeyPatch, logged: list[str], tmp_path: Path
) -> None:
    cpu_bf16(monkeypatch, capable)
    cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.precision", "auto",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.trainer.precision == expected
    no = "" if capable else "no "
    assert logged == [f"resnet-lit: trainer.precision auto -> {expected} (this CPU has {no}bfloat16 instructions)"]


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_auto_follows_the_gpu_the_run_uses(
    accelerator: str, native: bool, expected: str, monkeypatch: pytest.MonkeyPatch, logged: list[str]
) -> None:
    gpu(monkeypatch, native)
    cpu_bf16(monkeypatch, not native)  # the CPU would say the opposite: it must not be asked
    assert resolve_auto_precision(accelerator) == expected
    assert logged and "GPU" in logged[0]


def test_auto_on_the_cpu_of_a_gpu_machine_asks_the_cpu(monkeypatch: pytest.MonkeyPatch, logged: list[str]) -> None:
    gpu(monkeypatch, native_bf16=True)
    cpu_bf16(monkeypatch, False)
    assert resolve_auto_precision("cpu") == "32-true"
    assert logged == ["resnet-lit: trainer.precision auto -> 32-true (this CPU has no bfloat16 instructions)"]


def test_auto_falls_back_to_32_true_when_the_probe_fails(monkeypatch: pytest.MonkeyPatch, logged: list[str]) -> None:
    def gone() -> bool:
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_is_mkldnn_bf16_supported'")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", gone)
    with pytest.warns(UserWarning, match="cannot tell whether this CPU has bfloat16 instructions"):
        assert resolve_auto_precision("cpu") == "32-true"
    assert logged == ["resnet-lit: trainer.precision auto -> 32-true (whether this CPU has bfloat16 instructions is "
                      "unknown)"]  # fmt: skip


def test_print_config_keeps_auto(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_bf16(monkeypatch, True)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--trainer.precision", "auto", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["precision"] == "auto"


def test_other_precisions_pass_through_unchanged(tmp_path: Path, logged: list[str]) -> None:
    cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.precision", "bf16-mixed",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"
    assert logged == []
    default = ResNetLitCLI(args=["--model.arch", "resnet20", "--data", "resnet_lit.data.SyntheticDataModule",
                                 "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert default.trainer.precision == "32-true"  # without a config saying auto, the default stays full precision
    assert logged == []
