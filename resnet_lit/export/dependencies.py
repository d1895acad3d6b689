"""The optional packages each export format needs (the `export` extra), checked before any work is done."""

from __future__ import annotations

import importlib

from resnet_lit.export.errors import ExportError

REQUIRED_PACKAGES: dict[str, tuple[str, ...]] = {
    # torch's ONNX exporter (dynamo) needs onnxscript; the parity check runs the file in onnxruntime.
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "exported_program": (),
    "safetensors": ("safetensors",),
}


def require_packages(export_format: str) -> None:
    """Raise :class:`ExportError` naming the missing packages of ``export_format`` and the extra to install."""
    missing = []
    for name in REQUIRED_PACKAGES[export_format]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"--format {export_format} needs {', '.join(REQUIRED_PACKAGES[export_format])} (missing: "
            f"{', '.join(missing)}); install them with: pip install 'resnet-lit[export]'"
        )
