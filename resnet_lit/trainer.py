"""`ResNetLitTrainer`: Lightning's Trainer with one more entry point, :meth:`export`, so that `resnet-lit export` is a
LightningCLI subcommand like `validate`, with the same `--config` and `--ckpt_path` handling; and one more
``precision`` value, ``auto``: bf16-mixed where the training device runs bfloat16 natively, else 32-true."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from resnet_lit.export.exporter import ExportFormat, ExportResult, RunRecord

AutoPrecision = Literal["auto"]


class ResNetLitTrainer(Trainer):
    """The Trainer of the `resnet-lit` CLI."""

    def __init__(self, *, precision: _PRECISION_INPUT | AutoPrecision | None = None, **kwargs: Any) -> None:
        """Lightning's Trainer; every other argument is Lightning's.

        Args:
            precision: Lightning's precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...; default ``32-true``),
                or ``auto``: ``bf16-mixed`` on a GPU with native bfloat16 (Ampere or newer) and on a CPU with
                bfloat16 instructions, ``32-true`` elsewhere (emulated bfloat16 is slower than float32). The
                choice is logged.
        """
        if precision == "auto":
            precision = resolve_auto_precision(_accelerator_setting(kwargs))
        super().__init__(precision=precision, **kwargs)

    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        format: ExportFormat = "onnx",
        output: str | None = None,
        image_size: PositiveInt | None = None,
        dynamic_batch: bool = True,
        batch_size: PositiveInt = 1,
        opset: PositiveInt | None = None,
        parity_samples: PositiveInt = 7,
        parity_tolerance: PositiveFloat = 1e-4,
        run: RunRecord | None = None,
    ) -> ExportResult:
        """Export the checkpoint's network for deployment (ONNX, torch.export program or safetensors), refused
        unless the artefact reproduces the checkpoint's logits.

        Args:
            model: the module the config builds; the checkpoint's weights are loaded into it.
            datamodule: the data config: its eval preprocessing goes into the model, its val split feeds the check.
            ckpt_path: a checkpoint file, ``last`` or ``best`` of the run; None exports the network as configured
                (e.g. ``model.init_from`` weights).
            weights_only: load the checkpoint with ``torch.load(weights_only=...)``.
            format: ``onnx`` (onnxruntime), ``exported_program`` (``torch.export``, ``.pt2``) or ``safetensors``
                (weights in the zoo layout).
            output: the file to write (default ``<default_root_dir>/export/<arch>.<suffix>``); the metadata goes to
                ``<output>.json`` (not for ONNX, which holds it) and the model card to ``<output>.md``.
            image_size: side of the square input (default: the data config's crop size).
            dynamic_batch: any batch size; false fixes it to ``batch_size``.
            batch_size: the fixed batch size when ``dynamic_batch`` is false.
            opset: ONNX opset version (default: the exporter's).
            parity_samples: images of the parity check.
            parity_tolerance: largest allowed logit difference, relative to the largest logit magnitude.
            run: set by the CLI: the config files and data section, for the model card.
        """
        from resnet_lit.export.checkpoint import load_weights, resolve_checkpoint, run_dir_of
        from resnet_lit.export.exporter import default_output, export_classifier

        weights_only = weights_only is not False
        checkpoint_dir = getattr(self.checkpoint_callback, "dirpath", None) or os.path.join(
            self.default_root_dir, "checkpoints"
        )
        path = resolve_checkpoint(ckpt_path, checkpoint_dir, weights_only)
        if path is not None:
            load_weights(model, path, weights_only)
        elif self.is_global_zero:
            print("resnet-lit export: no --ckpt_path: exporting the network as the config builds it "
                  "(model.init_from weights, or a fresh initialisation)")  # fmt: skip
        run = run or RunRecord()
        run = RunRecord(run.recipe, run.data, run.run_dir or run_dir_of(path, self.default_root_dir))
        output = output or default_output(self.default_root_dir, model.hparams["arch"], format)
        result = export_classifier(
            model,
            datamodule,
            export_format=format,
            output=output,
            checkpoint=path,
            image_size=image_size,
            dynamic_batch=dynamic_batch,
            batch_size=batch_size,
            opset=opset,
            parity_samples=parity_samples,
            tolerance=parity_tolerance,
            run=run,
        )
        if self.is_global_zero:
            print(f"resnet-lit export: wrote {result.output} (parity check passed: {result.parity.describe()})")
            for extra in (result.metadata_file, result.model_card):
                if extra:
                    print(f"resnet-lit export: wrote {extra}")
        return result


def resolve_auto_precision(accelerator: str | Accelerator) -> Literal["bf16-mixed", "32-true"]:
    """``precision: auto`` for ``accelerator`` (as ``trainer.accelerator`` says it), logged on rank 0."""
    device = _device_kind(accelerator)
    if device == "gpu":
        # including_emulation=False: pre-Ampere GPUs can run bfloat16, but emulated, slower than float32
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        reason = "this GPU runs bfloat16 natively" if native else "this GPU has no native bfloat16 (before Ampere)"
    elif device == "cpu":
        known = cpu_has_bf16()
        native = known is True
        reason = f"this CPU has {'' if native else 'no '}bfloat16 instructions"
        if known is None:
            reason = "whether this CPU has bfloat16 instructions is unknown"
    else:
        native, reason = False, f"bfloat16 speed on the {device} accelerator is unknown"
    precision: Literal["bf16-mixed", "32-true"] = "bf16-mixed" if native else "32-true"
    rank_zero_info(f"resnet-lit: trainer.precision auto -> {precision} ({reason})")
    return precision


def cpu_has_bf16() -> bool | None:
    """Whether oneDNN runs bfloat16 natively on this CPU; None, with a warning, if the probe fails (it is private
    torch API, pinned by tests/test_precision_auto.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception as error:  # any failure of a private op means "unknown"
        rank_zero_warn(
            f"resnet-lit: cannot tell whether this CPU has bfloat16 instructions "
            f"(torch.ops.mkldnn._is_mkldnn_bf16_supported: {type(error).__name__}: {error}); "
            "trainer.precision auto uses 32-true"
        )
        return None


def _accelerator_setting(trainer_kwargs: dict[str, Any]) -> str | Accelerator:
    # not ``kwargs.get`` in ``__init__``: jsonargparse would read that as an untyped ``accelerator`` parameter
    return trainer_kwargs.get("accelerator", "auto")


def _device_kind(accelerator: str | Accelerator) -> str:
    """``gpu``, ``cpu`` or another accelerator's name for ``trainer.accelerator``; ``auto`` as Lightning picks it."""
    if isinstance(accelerator, CUDAAccelerator):
        return "gpu"
    if isinstance(accelerator, CPUAccelerator):
        return "cpu"
    if isinstance(accelerator, Accelerator):
        return type(accelerator).__name__
    name = str(accelerator).lower()
    if name == "auto":  # Lightning's order of preference
        for kind, candidate in (("tpu", XLAAccelerator), ("mps", MPSAccelerator), ("gpu", CUDAAccelerator)):
            if candidate.is_available():
                return kind
        return "cpu"
    if name == "gpu" and MPSAccelerator.is_available():
        return "mps"
    return "gpu" if name in ("gpu", "cuda") else name
