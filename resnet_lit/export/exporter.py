"""`export_classifier`: a trained `ResNetClassifier` into a deployable file, refused unless it passes the parity check.

Order of work: the network of validation (the EMA average when the run kept one) in fp32 on the CPU, wrapped with the
data's normalisation; sample images; the artefact written to a temporary file beside the output; the artefact loaded
back and run as a deployer would run it; compared with the checkpoint's logits; only then moved to ``output``, with
its metadata JSON (formats other than ONNX, which holds it inside) and its model card ``<output>.md``.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import resnet_lit
from resnet_lit.export.dependencies import require_packages
from resnet_lit.export.deployable import DeployableClassifier
from resnet_lit.export.errors import ExportError, ParityError
from resnet_lit.export.metadata import export_metadata, input_spec, preprocessing_spec
from resnet_lit.export.model_card import ModelCardInputs, read_final_metrics, write_model_card
from resnet_lit.export.onnx_file import onnx_runner, write_onnx
from resnet_lit.export.parity import ParityReport, Runner, check_parity, reference_logits, sample_images
from resnet_lit.export.program_file import program_runner, write_program
from resnet_lit.export.safetensors_file import safetensors_runner, write_safetensors
from resnet_lit.models import ResNet, summarize

ExportFormat = Literal["onnx", "exported_program", "safetensors"]
Writer = Callable[[nn.Module, Tensor, str, bool, "int | None", dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class FileFormat:
    """How one format is written and run back; ``sidecar``: its metadata also goes to ``<output>.json``."""

    suffix: str
    write: Writer
    runner: Callable[[str, dict[str, Any]], Runner]
    sidecar: bool


FORMATS: dict[str, FileFormat] = {
    "onnx": FileFormat(".onnx", write_onnx, onnx_runner, sidecar=False),
    "exported_program": FileFormat(".pt2", write_program, program_runner, sidecar=True),
    "safetensors": FileFormat(".safetensors", write_safetensors, safetensors_runner, sidecar=True),
}


@dataclass(frozen=True)
class RunRecord:
    """Where the checkpoint came from, for the model card: the config files, the data section, the run folder."""

    recipe: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None


@dataclass(frozen=True)
class ExportResult:
    """The files written and the parity check they passed."""

    output: str
    metadata_file: str | None
    model_card: str
    parity: ParityReport
    metadata: dict[str, Any]


def default_output(root: str, arch: str, export_format: str) -> str:
    """``<root>/export/<arch><suffix>``."""
    return os.path.join(root, "export", f"{arch}{FORMATS[export_format].suffix}")


def export_classifier(
    module: Any,
    datamodule: Any,
    *,
    export_format: ExportFormat = "onnx",
    output: str,
    checkpoint: str | None = None,
    image_size: int | None = None,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    opset: int | None = None,
    parity_samples: int = 7,
    tolerance: float = 1e-4,
    run: RunRecord | None = None,
) -> ExportResult:
    """Export ``module`` (a :class:`~resnet_lit.ResNetClassifier` holding the weights to ship) for images preprocessed
    as ``datamodule``'s eval pipeline; raise :class:`ParityError`, writing nothing, if the artefact disagrees."""
    if export_format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    require_packages(export_format)
    if opset is not None and export_format != "onnx":
        raise ExportError(f"--opset applies to --format onnx only, not {export_format}")
    pipeline = getattr(datamodule, "pipeline", None)
    if pipeline is None:
        raise ExportError("export needs a resnet_lit ImageDataModule as data (its preprocessing goes into the model)")
    file_format = FORMATS[export_format]
    hparams = module.hparams
    in_channels = int(hparams["in_channels"])
    net = _deployable_network(module.inference_network())

    count = parity_samples if dynamic_batch else batch_size * math.ceil(parity_samples / batch_size)
    samples = sample_images(datamodule, count, image_size or pipeline.crop_size, in_channels)
    side = int(samples.images.shape[-1])
    reference = reference_logits(net, samples.images, pipeline.mean, pipeline.std)
    model = DeployableClassifier(net, pipeline.mean, pipeline.std, in_channels).eval()
    if hparams.get("tta", "none") != "none":
        print(f"resnet-lit export: model.tta ({hparams['tta']}) is not part of the exported model: it returns the "
              "logits of each image as given")  # fmt: skip

    metadata = export_metadata(
        export_format=export_format,
        hparams=hparams,
        class_names=list(module.class_names),
        preprocessing=preprocessing_spec(pipeline, side, in_channels, export_format != "safetensors"),
        inputs=input_spec(side, in_channels, dynamic_batch, batch_size),
        checkpoint=checkpoint,
        ema=getattr(module, "ema", None) is not None,
    )
    example = samples.images[: 2 if dynamic_batch else batch_size]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial-{os.getpid()}{file_format.suffix}"  # torch.export.load wants the .pt2 suffix
    try:
        with torch.no_grad():
            details = file_format.write(model, example, partial, dynamic_batch, opset, metadata)
        metadata.update(details)
        batch_sizes = (1, count) if dynamic_batch else (batch_size,)
        report = check_parity(
            reference, file_format.runner(partial, metadata), samples.images, batch_sizes, tolerance, samples.source
        )
        if not report.passed:
            raise ParityError(
                f"parity check failed: the exported {export_format} model's logits differ from the checkpoint's by "
                f"{report.describe()}; nothing written to {output}"
            )
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)

    metadata_file = None
    if file_format.sidecar:
        metadata_file = f"{output}.json"
        _write_text(metadata_file, json.dumps({**metadata, "parity": report.as_dict()}, indent=2) + "\n")
    card = f"{output}.md"
    write_model_card(card, _card_inputs(module, net, metadata, output, report, side, run or RunRecord()))
    return ExportResult(output, metadata_file, card, report, metadata)


def _deployable_network(net: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``net`` in eval mode and the default memory format, safe to trace."""
    net = copy.deepcopy(net).float().cpu().eval()
    return net.to(memory_format=torch.contiguous_format)


def _card_inputs(
    module: Any, net: nn.Module, metadata: dict[str, Any], output: str, report: ParityReport, side: int, run: RunRecord
) -> ModelCardInputs:
    in_channels = metadata["in_channels"]
    rows = summarize(net, side, in_channels) if isinstance(net, ResNet) else None
    run_dir = run.run_dir
    metrics = read_final_metrics(os.path.join(run_dir, "metrics.csv")) if run_dir else None
    run_config = os.path.join(run_dir, "config.yaml") if run_dir else None
    return ModelCardInputs(
        title=os.path.basename(output),
        arch=metadata["arch"],
        net_overrides=metadata["net"],
        num_classes=metadata["num_classes"],
        class_names=metadata["class_names"],
        in_channels=in_channels,
        image_size=side,
        format=metadata["format"],
        artefact=output,
        preprocessing=metadata["preprocessing"],
        input_spec=metadata["input"],
        summary_rows=rows,
        data=run.data,
        recipe=list(run.recipe),
        run_config=run_config if run_config and os.path.isfile(run_config) else None,
        checkpoint=metadata["source"]["checkpoint"],
        ema=metadata["source"]["weights"] == "ema average",
        metrics=metrics.metrics if metrics else {},
        metrics_note=metrics.note if metrics else "no run folder is known for this export",
        parity=report.as_dict(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        resnet_lit_version=resnet_lit.__version__,
        torch_version=torch.__version__,
    )


def _write_text(path: str, text: str) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)
