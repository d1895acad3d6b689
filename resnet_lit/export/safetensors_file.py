"""safetensors files: the network's weights in the zoo layout (the keys of ``create_model(arch).state_dict()``), with
the export metadata as the file's string metadata. The parity check rebuilds the network from that metadata alone
(``arch``, ``net``, ``num_classes``, ``in_channels``) and loads the file strictly, so the file and its JSON suffice
to use the weights."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from resnet_lit.export.deployable import DeployableClassifier
from resnet_lit.export.parity import Runner
from resnet_lit.models import create_model


def write_safetensors(
    model: nn.Module, _example: Tensor, path: str, _dynamic_batch: bool, _opset: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Save the weights of ``model.net`` (a :class:`DeployableClassifier`) as contiguous CPU tensors."""
    from safetensors.torch import save_file

    net = model.net if isinstance(model, DeployableClassifier) else model
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    save_file(state, path, metadata={"resnet_lit": json.dumps(metadata)})
    return {}


def rebuild_network(metadata: dict[str, Any]) -> nn.Module:
    """The zoo network the metadata describes, freshly initialised, in eval mode."""
    net = create_model(
        metadata["arch"], num_classes=metadata["num_classes"], in_channels=metadata["in_channels"], **metadata["net"]
    )
    return net.eval()


def safetensors_runner(path: str, metadata: dict[str, Any]) -> Runner:
    """The network rebuilt from ``metadata``, the file loaded strictly, normalisation as the metadata states."""
    from safetensors.torch import load_file

    net = rebuild_network(metadata)
    net.load_state_dict(load_file(path), strict=True)
    preprocessing = metadata["preprocessing"]
    model = DeployableClassifier(net, preprocessing["mean"], preprocessing["std"], metadata["in_channels"]).eval()

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return model(images)

    return run


def read_safetensors_metadata(path: str) -> dict[str, Any]:
    """The export metadata stored in a file written by :func:`write_safetensors`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["resnet_lit"])
