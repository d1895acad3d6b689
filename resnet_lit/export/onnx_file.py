"""ONNX files: written by torch's dynamo-based exporter (which needs onnxscript), with the export metadata as the
model's ``metadata_props``, and run in onnxruntime on the CPU for the parity check."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from resnet_lit.export.errors import ExportError
from resnet_lit.export.parity import Runner

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def write_onnx(
    model: nn.Module, example: Tensor, path: str, dynamic_batch: bool, opset: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Export ``model`` at ``example``'s shape into the single file ``path``; returns ``{"opset": N}``.

    Every metadata entry becomes a ``metadata_props`` entry holding its value as JSON (read them back with
    ``json.loads(session.get_modelmeta().custom_metadata_map[key])``).
    """
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"torch.onnx.export failed for this network: {type(error).__name__}: {first}") from error
    if program is None:  # only the legacy exporter returns None
        raise ExportError("torch.onnx.export returned no program")
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.save(path, external_data=False)
    return {"opset": onnx_opset(path)}


def onnx_opset(path: str) -> int:
    """The default-domain opset version of the ONNX file ``path``."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def onnx_runner(path: str, _metadata: dict[str, Any]) -> Runner:
    """The ONNX file run by onnxruntime on the CPU, as a deployer would run it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(
        os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
    )

    def run(images: Tensor) -> Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.contiguous().numpy()})
        return torch.from_numpy(logits)

    return run


def read_onnx_metadata(path: str) -> dict[str, Any]:
    """The export metadata of an ONNX file written by :func:`write_onnx`."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {prop.key: json.loads(prop.value) for prop in model.metadata_props}
