"""`ResNetLitTrainer`: Lightning's Trainer with one more entry point, :meth:`export`, so that `resnet-lit export` is a
LightningCLI subcommand like `validate`, with the same `--config` and `--ckpt_path` handling."""

from __future__ import annotations

import os

from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from resnet_lit.export.exporter import ExportFormat, ExportResult, RunRecord


class ResNetLitTrainer(Trainer):
    """The Trainer of the `resnet-lit` CLI."""

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
