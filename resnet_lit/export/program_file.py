"""``torch.export`` programs (``.pt2``): the traced network with its weights, loadable without resnet-lit
(``torch.export.load(path).module()``), with the export metadata inside as the extra file ``resnet_lit.json``."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from resnet_lit.export.errors import ExportError
from resnet_lit.export.parity import Runner

METADATA_FILE = "resnet_lit.json"


def write_program(
    model: nn.Module, example: Tensor, path: str, dynamic_batch: bool, _opset: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Export ``model`` at ``example``'s shape (batch dimension dynamic with ``dynamic_batch``) and save it."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"torch.export failed for this network: {type(error).__name__}: {first}") from error
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata)})
    return {}


def program_runner(path: str, _metadata: dict[str, Any]) -> Runner:
    """The saved program, loaded back from ``path`` and run as a plain module."""
    module = torch.export.load(path).module()

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return module(images)

    return run


def read_program_metadata(path: str) -> dict[str, Any]:
    """The export metadata saved inside a ``.pt2`` file by :func:`write_program`."""
    extra = {METADATA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_FILE])
