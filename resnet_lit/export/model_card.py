"""The model card written beside an exported network: Markdown in the spirit of Hugging Face model cards, saying
what the network is, how to prepare its input, what it was trained on, how well it did and how faithful the export
is.

The card is rendered from plain data (`ModelCardInputs`), so it needs neither a network nor a run folder;
`read_final_metrics` takes the last val/test values from a run's metrics.csv. Reading metrics never fails an
export: a missing or unreadable file gives no metrics and a note that the card prints instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from resnet_lit.errors import ResNetLitError
from resnet_lit.models.describe import LayerSummary

EVAL_PREFIXES = ("val/", "test/")
MAX_LISTED_CLASSES = 50
FORMAT_NAMES = {
    "onnx": "ONNX",
    "exported_program": "torch.export program (`torch.export.ExportedProgram`)",
    "safetensors": "safetensors (weights only)",
}
MAC_CONVENTION = "MACs = multiply-accumulates of conv/linear layers, batch 1; 1 GMAC is the usual '1 GFLOP'"


class ModelCardWriteError(ResNetLitError):
    """The model card could not be written (full or read-only disk, missing permission)."""


@dataclass(frozen=True)
class MetricsReading:
    """The final metrics of a run, and a one-line note when they are missing or incomplete (None: all read)."""

    metrics: dict[str, float]
    note: str | None = None


def final_metrics(metrics_csv: str | os.PathLike[str]) -> dict[str, float]:
    """The last logged value of each `val/*` and `test/*` metric of a run's metrics.csv, with the `epoch` and
    `step` (ints) of the last row that has a val value; {} when the file is missing or unreadable."""
    return read_final_metrics(metrics_csv).metrics


def read_final_metrics(metrics_csv: str | os.PathLike[str]) -> MetricsReading:
    """`final_metrics`, with a note saying why values are missing (no file, not a metrics.csv, unreadable values).

    Rows count in file order, so a resumed run's rows, appended after the interrupted run's, win over the steps
    that the interrupted run logged after its last checkpoint. A header line in the middle of the file (a run
    appended under columns of its own) applies to the rows below it.
    """
    path = os.fspath(metrics_csv)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _scan_metrics(csv.reader(f), path)
    except FileNotFoundError:
        return MetricsReading({}, f"no metrics.csv found at {path}")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return MetricsReading({}, f"could not read {path}: {reason}")


def _scan_metrics(rows: Iterable[list[str]], path: str) -> MetricsReading:
    header: list[str] | None = None
    last: dict[str, float] = {}
    position: dict[str, int] = {}
    skipped = 0
    for row in rows:
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if _is_header(cells):
            header = cells
            continue
        if header is None:
            return MetricsReading({}, f"{path} is not a metrics.csv: its first line has no 'step' column")
        values: dict[str, float] = {}
        for name, cell in zip(header, cells, strict=False):
            if name.startswith(EVAL_PREFIXES) and cell:
                value = _number(cell)
                if value is None:
                    skipped += 1
                else:
                    values[name] = value
        last.update(values)
        if any(name.startswith("val/") for name in values):
            row_values = dict(zip(header, cells, strict=False))
            position = {}
            for key in ("epoch", "step"):
                number = _number(row_values.get(key, ""))
                if number is not None and number.is_integer():
                    position[key] = int(number)
    if header is None:
        return MetricsReading({}, f"{path} is empty")
    if not last:
        return MetricsReading({}, f"{path} has no val/* or test/* values")
    metrics: dict[str, float] = {name: last[name] for name in _eval_order(last)}
    metrics.update(position)
    note = f"{skipped} unreadable value{'s' if skipped != 1 else ''} in {path} skipped" if skipped else None
    return MetricsReading(metrics, note)


def _is_header(cells: Sequence[str]) -> bool:
    return "step" in cells and all(_number(cell) is None for cell in cells)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _eval_order(names: Iterable[str]) -> list[str]:
    """val metrics, then test metrics, each alphabetical."""
    return sorted((n for n in names if n.startswith(EVAL_PREFIXES)), key=lambda n: (not n.startswith("val/"), n))


@dataclass(kw_only=True)
class ModelCardInputs:
    """What the card says, as plain data.

    `preprocessing` keys the deployer's steps are built from (all optional; every key is also listed in a
    table, as `resnet_lit.export.metadata.preprocessing_spec` makes them): `color` ("RGB" or "L"; default from
    `in_channels`), `resize` (an int, or `[H, W]`), `resize_mode` ("shorter_side" or "exact"; default: an int
    resizes the shorter side, `[H, W]` resizes to exactly that size), `interpolation` (default "bilinear"),
    `antialias` (default True), `center_crop` (int or `[H, W]`), `mean`, `std`, and `normalization` (a
    sentence: the network normalises its input itself when it says "inside", and when it is absent; a bool
    `normalization_in_model`, if given, decides instead; safetensors files, the bare network's weights, need the
    caller to normalise unless `normalization_in_model` is True).
    `input_spec`: `dtype` (default "float32"), `layout` (default "NCHW"), `range` (default `[0, 1]`) and any
    other key (name, batch, ...), listed in a table.
    `parity`: any of `passed`, `max_abs_diff`, `relative_diff`, `max_abs_logit`, `tolerance`, `top1_agreement`,
    `source`, `batch_sizes` (`ParityReport.as_dict()`); `passed` defaults to `relative_diff <= tolerance`.
    `summary_rows` come from `resnet_lit.models.summarize` (None when the network is not a ResNet; then
    `parameters` gives the count). `metrics` come from `read_final_metrics`, and `metrics_note` is its note.
    """

    title: str
    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    format: str
    artefact: str
    created: str
    resnet_lit_version: str
    torch_version: str
    net_overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    input_spec: dict[str, Any] = field(default_factory=dict)
    summary_rows: list[LayerSummary] | None = None
    parameters: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    recipe: list[str] = field(default_factory=list)
    run_config: str | None = None
    checkpoint: str | None = None
    ema: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_note: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)


def render_model_card(inputs: ModelCardInputs) -> str:
    """The card as Markdown: YAML front matter, title, summary, then Architecture, Input and preprocessing,
    Classes, Training, Evaluation, Export and Limitations."""
    sections = [
        _front_matter(inputs),
        f"# {inputs.title}",
        _summary(inputs),
        _architecture(inputs),
        _input_and_preprocessing(inputs),
        _classes(inputs),
        _training(inputs),
        _evaluation(inputs),
        _export(inputs),
        _limitations(inputs),
        f"*Written by resnet-lit {inputs.resnet_lit_version} (torch {inputs.torch_version}) on {inputs.created}.*",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(path: str | os.PathLike[str], inputs: ModelCardInputs) -> None:
    """Render the card and write it to `path` through a temporary file in the same folder and `os.replace`, so
    that a reader never sees half a card; on failure the temporary file is removed, and an OSError becomes a
    `ModelCardWriteError` naming `path`."""
    text = render_model_card(inputs)
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as f:  # "x": a fresh file with the umask's permissions
            f.write(text)
        os.replace(temp, path)
    except BaseException as err:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(err, OSError):
            raise ModelCardWriteError(f"cannot write the model card {path}: {err.strerror or err}") from err
        raise


# Sections


def _front_matter(inputs: ModelCardInputs) -> str:
    tags = ["resnet-lit", "image-classification", inputs.format]
    lines = ["---", "library_name: resnet-lit", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    return "\n".join([*lines, "---"])


def _summary(inputs: ModelCardInputs) -> str:
    facts = [f"{_parameters_text(params)} parameters"] if (params := _total_parameters(inputs)) is not None else []
    if inputs.summary_rows:
        facts.insert(0, "ResNet")
        facts.append(f"{_macs_text(sum(r.macs for r in inputs.summary_rows))} MACs at {_input_shape(inputs)}")
    text = f"`{inputs.arch}`" + (f" ({', '.join(facts)})" if facts else "")
    text += f", a classifier of {inputs.num_classes} classes"
    if inputs.data:
        text += f", trained on {_data_text(inputs.data)}"
    headline = _headline_metric(inputs.metrics)
    if headline is not None:
        text += f", reaching {headline} {_metric_text(inputs.metrics[headline])}"
        if headline.startswith("val/") and "epoch" in inputs.metrics:
            text += f" ({_position_text(inputs.metrics)})"
    text += f". Exported as {FORMAT_NAMES.get(inputs.format, inputs.format)} to `{inputs.artefact}`"
    text += " with the EMA weights." if inputs.ema else "."
    if headline is None:
        text += f" No evaluation metrics were recorded ({inputs.metrics_note or 'none given'})."
    return text


def _architecture(inputs: ModelCardInputs) -> str:
    params = _total_parameters(inputs)
    lines = [
        "## Architecture",
        "",
        f"- name: `{inputs.arch}`",
        f"- parameters: {_parameters_text(params) if params is not None else 'not recorded'}",
    ]
    if inputs.summary_rows:
        lines.append(f"- MACs: {_macs_text(sum(r.macs for r in inputs.summary_rows))} at {_input_shape(inputs)}")
    lines += [
        f"- input: {inputs.in_channels} channels, {inputs.image_size} x {inputs.image_size} pixels",
        f"- classes: {inputs.num_classes}",
        f"- the same network in Python: `{_rebuild_call(inputs)}`",
        "",
    ]
    if inputs.net_overrides:
        lines += ["Overrides of the architecture (`model.net`):", ""]
        overrides = [[f"`{key}`", _value_text(value)] for key, value in inputs.net_overrides.items()]
        lines += _table(["key", "value"], overrides)
    else:
        lines.append("Overrides of the architecture (`model.net`): none, the architecture as registered.")
    if inputs.summary_rows:
        rows = inputs.summary_rows
        lines += ["", f"Per stage, for one {_input_shape(inputs)} image ({MAC_CONVENTION}):", ""]
        body = [[r.name, " x ".join(str(d) for d in r.output_shape), f"{r.params:,}", f"{r.macs:,}"] for r in rows]
        body.append(["**total**", "", f"**{sum(r.params for r in rows):,}**", f"**{sum(r.macs for r in rows):,}**"])
        lines += _table(["layer", "output (C x H x W)", "params", "MACs"], body, align="lrrr")
    else:
        lines += ["", "No per-stage summary: the network is not a resnet-lit ResNet."]
    return "\n".join(lines)


def _input_and_preprocessing(inputs: ModelCardInputs) -> str:
    spec = {"dtype": "float32", "layout": "NCHW", "range": "[0, 1]", **inputs.input_spec}
    pre = inputs.preprocessing
    lines = ["## Input and preprocessing", "", "The exported network takes:", ""]
    lines += _table(["input", "value"], [[key, _value_text(value)] for key, value in spec.items()])
    lines += ["", "To classify an image, in this order:", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(_preprocessing_steps(inputs, spec), start=1)]
    if pre:
        lines += ["", "The evaluation preprocessing of the run:", ""]
        lines += _table(["setting", "value"], [[key, _value_text(value)] for key, value in pre.items()])
    return "\n".join(lines)


def _preprocessing_steps(inputs: ModelCardInputs, spec: dict[str, Any]) -> list[str]:
    pre = inputs.preprocessing
    color = pre.get("color") or {1: "L", 3: "RGB"}.get(inputs.in_channels)
    mode = {"L": "L (8-bit grayscale, one channel)", "RGB": "RGB (three channels, in that order)"}.get(
        str(color), f"{color or inputs.in_channels} channels"
    )
    steps = ["Decode the image file (PNG, JPEG, ...) to 8-bit pixels.", f"Convert it to {mode}."]
    method = f"{pre.get('interpolation', 'bilinear')} interpolation"
    if pre.get("antialias", True):
        method += " with antialiasing"
    resize, crop = pre.get("resize"), pre.get("center_crop")
    exact = pre.get("resize_mode", "shorter_side" if isinstance(resize, int) else "exact") == "exact"
    if resize and not exact:
        side = resize if isinstance(resize, int) else min(resize)
        steps.append(f"Resize it so that its shorter side is {side} pixels, keeping the aspect ratio ({method}).")
    elif resize:
        steps.append(f"Resize it to exactly {_size_text(resize)} pixels (height x width, {method}).")
    if crop:
        steps.append(f"Crop the central {_size_text(crop)} pixels.")
    if not resize and not crop:
        size = f"{inputs.image_size} x {inputs.image_size}"
        steps.append(f"Do not resize or crop: the run evaluated the images as decoded, {size} pixels.")
    value_range = _range_text(spec["range"])
    if str(spec["dtype"]) == "uint8":
        steps.append(f"Keep the pixel values as uint8 in {value_range}.")
    else:
        steps.append(f"Convert the pixels to {spec['dtype']} and scale them to {value_range} (divide by 255).")
    steps.append(f"Arrange them as {spec['layout']} (batch, channels, height, width), adding the batch dimension.")
    mean, std = pre.get("mean"), pre.get("std")
    stats = f"mean {_value_text(mean)}, std {_value_text(std)}" if mean is not None and std is not None else None
    if _normalizes_inside(pre, inputs.format):
        reference = f"; for reference, {stats}" if stats else ""
        steps.append(f"Do not normalise: the network subtracts the mean and divides by the std itself{reference}.")
    else:
        steps.append(f"Normalise each channel: (x - mean) / std, with {stats or 'the mean and std of the run'}.")
    return steps


def _normalizes_inside(preprocessing: dict[str, Any], export_format: str) -> bool:
    flag = preprocessing.get("normalization_in_model")
    if isinstance(flag, bool):
        return flag
    if export_format == "safetensors":
        return False  # the weights of the bare network: nothing in the file normalises
    sentence = preprocessing.get("normalization")
    return sentence is None or "inside" in str(sentence).lower()


def _classes(inputs: ModelCardInputs) -> str:
    names = inputs.class_names
    lines = ["## Classes", ""]
    if not names:
        lines.append(f"Class names were not recorded: the outputs are classes 0 to {inputs.num_classes - 1}.")
        return "\n".join(lines)
    if len(names) != inputs.num_classes:
        lines += [f"Note: {len(names)} class names for {inputs.num_classes} outputs.", ""]
    lines += [f"Output index to class ({len(names)} classes):", ""]
    lines += _table(["index", "class"], [[str(i), name] for i, name in enumerate(names[:MAX_LISTED_CLASSES])], "rl")
    if len(names) > MAX_LISTED_CLASSES:
        more = len(names) - MAX_LISTED_CLASSES
        lines += ["", f"... and {more} more (indices {MAX_LISTED_CLASSES} to {len(names) - 1}), not listed here."]
    return "\n".join(lines)


def _training(inputs: ModelCardInputs) -> str:
    lines = ["## Training", ""]
    data = dict(inputs.data)
    class_path = data.pop("class_path", None)
    init_args = data.pop("init_args", None) or {}
    settings = {**data, **init_args}
    lines.append(f"- data: `{class_path}`" if class_path else "- data: not recorded")
    lines.append(f"- recipe: {', '.join(f'`{p}`' for p in inputs.recipe)}" if inputs.recipe else "- recipe: none")
    lines.append(f"- run config: `{inputs.run_config}`" if inputs.run_config else "- run config: none")
    lines.append(f"- checkpoint: `{inputs.checkpoint}`" if inputs.checkpoint else "- checkpoint: none")
    lines.append(
        "- weights: the exponential moving average (EMA) of the training weights"
        if inputs.ema
        else "- weights: the training weights (no EMA)"
    )
    if settings:
        lines += ["", "Data settings:", ""]
        lines += _table(["setting", "value"], [[key, _value_text(value)] for key, value in settings.items()])
    return "\n".join(lines)


def _evaluation(inputs: ModelCardInputs) -> str:
    lines = ["## Evaluation", ""]
    metrics = inputs.metrics
    names = _eval_order(metrics)
    if not names:
        lines.append(f"No metrics recorded: {inputs.metrics_note}." if inputs.metrics_note else "No metrics recorded.")
        return "\n".join(lines)
    lines.append("The last value of each metric the run logged to its metrics.csv:")
    lines.append("")
    lines += _table(["metric", "value"], [[name, _metric_text(metrics[name])] for name in names], "lr")
    if "epoch" in metrics or "step" in metrics:
        lines += ["", f"The val metrics are those of the last validation, at {_position_text(metrics)}."]
    if inputs.metrics_note:
        lines += ["", f"Note: {inputs.metrics_note}."]
    return "\n".join(lines)


def _export(inputs: ModelCardInputs) -> str:
    lines = [
        "## Export",
        "",
        f"- format: {FORMAT_NAMES.get(inputs.format, inputs.format)}",
        f"- file: `{inputs.artefact}`",
        f"- parity with the PyTorch network: {_parity_text(inputs.parity)}",
    ]
    if inputs.parity:
        lines.append("")
        lines += _table(["check", "value"], [[key, _value_text(value)] for key, value in inputs.parity.items()])
    usage = _usage(inputs)
    if usage:
        lines += ["", "Loading:", "", "```python", usage, "```"]
    return "\n".join(lines)


def _usage(inputs: ModelCardInputs) -> str | None:
    """Python lines that load the artefact and compute the logits of preprocessed `images`."""
    name = os.path.basename(inputs.artefact)
    lines = {
        "onnx": [
            "import onnxruntime",
            f'session = onnxruntime.InferenceSession("{name}")',
            "logits = session.run(None, {session.get_inputs()[0].name: images})[0]  # images: as above",
        ],
        "exported_program": [
            "import torch",
            f'program = torch.export.load("{name}")',
            "logits = program.module()(images)  # images: as above",
        ],
        "safetensors": [
            "import resnet_lit",
            "from safetensors.torch import load_file",
            f"net = {_rebuild_call(inputs)}.eval()",
            f'net.load_state_dict(load_file("{name}"), strict=True)',
            "logits = net(images)  # images: as above, normalised",
        ],
    }.get(inputs.format)
    return "\n".join(lines) if lines else None


def _limitations(inputs: ModelCardInputs) -> str:
    splits = [
        split for split, prefix in (("validation", "val/"), ("test", "test/")) if _has_prefix(inputs.metrics, prefix)
    ]
    measured = (
        f"The accuracy above was measured on the run's own {' and '.join(splits)} split{'s' if len(splits) > 1 else ''}"
        " only; it says little about images from another source, camera or distribution."
        if splits
        else "No accuracy was recorded for these weights."
    )
    return "\n".join([
        "## Limitations",
        "",
        f"{measured} The network only knows the {inputs.num_classes} classes above and gives one of them for any "
        "image, including images of none of them. Its outputs are logits, not calibrated probabilities. "
        "Predictions are only as good as the preprocessing: a different resize, crop, channel order or value "
        f"range than the steps above degrades them silently. It was exported for {inputs.image_size} x "
        f"{inputs.image_size} inputs; the accuracy of other sizes is unmeasured. The exported file matches the PyTorch "
        "network only within the parity tolerance above.",
    ])  # fmt: skip


# Formatting


def _has_prefix(names: Iterable[str], prefix: str) -> bool:
    return any(name.startswith(prefix) for name in names)


def _rebuild_call(inputs: ModelCardInputs) -> str:
    args = [repr(inputs.arch), f"num_classes={inputs.num_classes}", f"in_channels={inputs.in_channels}"]
    args += [f"{key}={value!r}" for key, value in inputs.net_overrides.items()]
    return f"resnet_lit.create_model({', '.join(args)})"


def _total_parameters(inputs: ModelCardInputs) -> int | None:
    if inputs.summary_rows:
        return sum(r.params for r in inputs.summary_rows)
    return inputs.parameters


def _parameters_text(count: int) -> str:
    """`0.27 M (269,722)`."""
    return f"{count / 1e6:.2f} M ({count:,})"


def _macs_text(macs: int) -> str:
    """As `resnet-lit describe` writes the total: `40.6 M`, `4.1 G`."""
    return f"{macs / 1e9:.1f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


def _input_shape(inputs: ModelCardInputs) -> str:
    return f"{inputs.in_channels}x{inputs.image_size}x{inputs.image_size}"


def _size_text(size: Any) -> str:
    if isinstance(size, int):
        return f"{size} x {size}"
    return " x ".join(str(s) for s in size)


def _data_text(data: dict[str, Any]) -> str:
    class_path = data.get("class_path")
    name = f"`{str(class_path).rsplit('.', 1)[-1]}`" if class_path else "the run's data"
    root = (data.get("init_args") or {}).get("root", data.get("root"))
    return f"{name} (root `{root}`)" if root else name


def _headline_metric(metrics: dict[str, float]) -> str | None:
    for name in ("val/acc", "test/acc", *_eval_order(metrics)):
        if name in metrics:
            return name
    return None


def _metric_text(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _position_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {int(metrics[key])}" for key in ("epoch", "step") if key in metrics)


def _parity_text(parity: dict[str, Any]) -> str:
    if not parity:
        return "not checked"
    passed = parity.get("passed")
    tolerance = parity.get("tolerance")
    relative, largest = parity.get("relative_diff"), parity.get("max_abs_logit")
    if passed is None and relative is not None and tolerance is not None:
        passed = relative <= tolerance
    details = []
    if parity.get("max_abs_diff") is not None:
        details.append(f"max |difference| {parity['max_abs_diff']:.3g}")
    if relative is not None:
        of = f" of the largest logit {largest:.4g}" if largest is not None else ""
        details.append(f"relative difference {relative:.3g}{of}")
    if tolerance is not None:
        details.append(f"tolerance {tolerance:.3g}")
    if parity.get("top1_agreement") is not None:
        details.append(f"top-1 agreement {parity['top1_agreement']:.1%}")
    if parity.get("source"):
        details.append(f"on {parity['source']}")
    if parity.get("batch_sizes"):
        details.append(f"batch sizes {_value_text(parity['batch_sizes'])}")
    verdict = "checked" if passed is None else ("passed" if passed else "FAILED")
    return verdict + (f": {', '.join(details)}" if details else "")


def _range_text(value_range: Any) -> str:
    if isinstance(value_range, list | tuple) and len(value_range) == 2:
        return f"[{value_range[0]:g}, {value_range[1]:g}]"
    return str(value_range)


def _value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """A Markdown table; `align` is one letter (l or r) per column."""
    rule = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    return [_row(header), _row(rule)] + [_row(row) for row in rows]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
