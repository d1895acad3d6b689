"""Deployment of an exported ONNX model: `resnet_lit.export.preprocess` (PIL + numpy) against the eval pipeline of
training, and the LitServe example `examples/serve_litserve.py` answering a real request in-process."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from resnet_lit.data.datasets import load_image
from resnet_lit.data.transforms import ImagePipeline
from resnet_lit.export.metadata import preprocessing_spec
from resnet_lit.export.preprocess import (
    center_crop,
    preprocess_batch,
    preprocess_image,
    read_onnx_metadata,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "serve_litserve.py"
PREPROCESS = REPO / "resnet_lit" / "export" / "preprocess.py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_eval(pipeline: ImagePipeline, image: Image.Image) -> np.ndarray:
    """The eval pipeline of training without normalisation, scaled by 1/255 (float32 in [0, 1])."""
    return pipeline.eval(normalize=False)(image).numpy().astype(np.float32) / np.float32(255.0)


def photo(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour waves plus noise: resampling sees both flat regions and sharp pixel-to-pixel changes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 17 + k) * np.cos(y / 23 - k) for k in range(3)], axis=-1)
    pixels = np.clip(waves + rng.normal(0, 25, waves.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def digit_png(index: int) -> bytes:
    """Digit ``index`` of scikit-learn's digits (values 0..16) as an 8x8 8-bit grayscale PNG."""
    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().images[index] * 255 / 16).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# --- preprocess_image against torchvision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [(300, 400), (480, 640), (200, 150), (1000, 333), (866, 275), (257, 255), (100, 100), (64, 90)],
)
def test_resized_images_match_torchvision_within_one_level(height: int, width: int) -> None:
    # Pins the measured gap between PIL's and torch's uint8 antialiased bilinear resize: every pixel within one 8-bit
    # level, and on average at most 0.26 of a level (tall narrow downscales such as 866x275 are the worst seen over
    # 60 random sizes; upscales are identical).
    pipeline = ImagePipeline("imagenet", 224, 256, IMAGENET_MEAN, IMAGENET_STD)
    image = photo(height, width, seed=height * width)
    got = preprocess_image(image, preprocessing_spec(pipeline, 224, 3))
    expected = torchvision_eval(pipeline, image)
    assert got.dtype == np.float32 and got.shape == expected.shape == (3, 224, 224)
    difference = np.abs(got - expected) * 255  # in 8-bit levels
    assert difference.max() <= 1 + 1e-4
    assert difference.mean() < 0.35


def test_exact_resize_matches_torchvision_within_one_level() -> None:
    pipeline = ImagePipeline("plain", 16, 16, (0.5,), (0.5,))
    preprocessing = preprocessing_spec(pipeline, 16, 1)
    assert preprocessing["resize"] == [16, 16] and preprocessing["resize_mode"] == "exact"
    for height, width in [(40, 30), (11, 23), (16, 16)]:
        image = photo(height, width, seed=width, mode="L")
        got = preprocess_image(image, preprocessing)
        assert got.shape == (1, 16, 16)
        assert np.abs(got - torchvision_eval(pipeline, image)).max() * 255 <= 1 + 1e-4


@pytest.mark.parametrize(
    "height, width",
    # (373 - 224) / 2 = 74.5 rounds down to 74 and (375 - 224) / 2 = 75.5 up to 76 (round half to even): floor and
    # round-half-up each get one of them wrong by a pixel.
    [(256, 373), (256, 375), (375, 256), (373, 256), (256, 256)],
)
def test_crop_only_is_exact(height: int, width: int) -> None:
    pipeline = ImagePipeline("imagenet", 224, 256, IMAGENET_MEAN, IMAGENET_STD)
    image = photo(height, width, seed=width)
    got = preprocess_image(image, preprocessing_spec(pipeline, 224, 3))
    np.testing.assert_array_equal(got, torchvision_eval(pipeline, image))


def test_crop_larger_than_image_pads_with_zeros_like_torchvision() -> None:
    # Resize 24 < crop 32: torchvision pads the height (4 + 4 rows) and crops the width 41 -> 32 (offset round(4.5)).
    pipeline = ImagePipeline("imagenet", 32, 24, IMAGENET_MEAN, IMAGENET_STD)
    image = photo(24, 41, seed=7)
    got = preprocess_image(image, preprocessing_spec(pipeline, 32, 3))
    np.testing.assert_array_equal(got, torchvision_eval(pipeline, image))
    assert got[:, :4].max() == 0 and got[:, -4:].max() == 0


def test_center_crop_pads_the_odd_pixel_at_the_bottom_right() -> None:
    pixels = np.full((3, 2, 1), 9, dtype=np.uint8)
    cropped = center_crop(pixels, (4, 5))
    assert cropped[:, :, 0].tolist() == [[0, 9, 9, 0, 0], [0, 9, 9, 0, 0], [0, 9, 9, 0, 0], [0, 0, 0, 0, 0]]


# --- the exported digits model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart network (random weights) exported to ONNX by the CLI."""
    from resnet_lit.cli import main

    root = tmp_path_factory.mktemp("export")
    output = root / "m.onnx"
    main(["export", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
          "--output", str(output)])  # fmt: skip
    return output


def test_digit_png_is_read_exactly_as_training_reads_it(onnx_model: Path, tmp_path: Path) -> None:
    preprocessing = read_onnx_metadata(onnx_model)["preprocessing"]
    assert preprocessing["color"] == "L" and preprocessing["center_crop"] is None
    assert (preprocessing["resize"], preprocessing["resize_mode"]) == ([8, 8], "exact")  # a no-op for 8x8 digits
    path = tmp_path / "digit.png"
    path.write_bytes(digit_png(3))
    got = preprocess_image(path, preprocessing)
    pipeline = ImagePipeline("plain", None, None, (0.3053,), (0.376,))
    assert got.shape == (1, 8, 8)
    np.testing.assert_array_equal(got, torchvision_eval(pipeline, load_image(str(path), "L")))
    rgb = Image.open(path).convert("RGB")  # an RGB file of the same digit: converted to "L" as the training loader does
    np.testing.assert_array_equal(preprocess_image(rgb, preprocessing), got)


def test_preprocess_batch_stacks_the_images(onnx_model: Path) -> None:
    preprocessing = read_onnx_metadata(onnx_model)["preprocessing"]
    images = [Image.open(io.BytesIO(digit_png(i))) for i in range(3)]
    batch = preprocess_batch(images, preprocessing)
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[2], preprocess_image(images[2], preprocessing))
    with pytest.raises(ValueError, match="differ in shape"):
        preprocess_batch([images[0], Image.new("L", (9, 8))], {**preprocessing, "resize": None, "resize_mode": None})


def test_read_onnx_metadata_from_a_session_or_a_path(onnx_model: Path) -> None:
    import onnxruntime

    from resnet_lit.export.onnx_file import read_onnx_metadata as read_with_onnx

    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    from_session = read_onnx_metadata(session)
    assert from_session == read_onnx_metadata(onnx_model) == read_onnx_metadata(str(onnx_model))
    assert from_session == read_with_onnx(str(onnx_model))
    assert from_session["class_names"] == [str(d) for d in range(10)]
    assert from_session["input"]["channels"] == 1 and from_session["input"]["batch"] == "dynamic"


def test_bad_metadata_is_refused_naming_the_key() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=re.escape("preprocessing.color must be 'RGB' or 'L', got 'CMYK'")):
        preprocess_image(image, {"color": "CMYK"})
    with pytest.raises(ValueError, match="interpolation 'nearest'"):
        preprocess_image(image, {"color": "RGB", "interpolation": "nearest"})
    with pytest.raises(ValueError, match=re.escape("preprocessing.resize [8, 8] with resize_mode 'shorter_side'")):
        preprocess_image(image, {"color": "RGB", "resize": [8, 8], "resize_mode": "shorter_side"})


def test_preprocess_file_imports_neither_torch_nor_resnet_lit(tmp_path: Path) -> None:
    # The module's promise: copied into a serving image, it runs with PIL and numpy alone.
    shutil.copy(PREPROCESS, tmp_path / "preprocess.py")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import preprocess; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'resnet_lit')))"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the LitServe example ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The example's server around ``onnx_model``, started in this process with LitServe's test helper.

    LitServe still runs ``setup``/``predict`` in a spawned worker process, which imports the example by module name:
    the example's folder goes on ``sys.path``, and so does a copy of ``preprocess.py`` (as in a serving image), which
    spares the worker torch's import time. ``wrap_litserve_start`` terminates the worker and the manager on exit;
    the teardown checks that no worker process or thread is left running.
    """
    import litserve as ls
    from fastapi.testclient import TestClient  # starlette's test client needs httpx2 (the test extra has it)
    from litserve.utils import WorkerSetupStatus, wrap_litserve_start

    serving = tmp_path_factory.mktemp("serving")
    shutil.copy(PREPROCESS, serving / "preprocess.py")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(EXAMPLE.parent))
        monkeypatch.syspath_prepend(str(serving))
        spec = importlib.util.spec_from_file_location("serve_litserve", EXAMPLE)
        example = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "serve_litserve", example)  # the worker unpickles the API by this name
        spec.loader.exec_module(example)
        server = ls.LitServer(example.ONNXClassifierAPI(str(onnx_model)), accelerator="cpu", timeout=30)
        threads = set(threading.enumerate())
        with wrap_litserve_start(server) as server, TestClient(server.app) as test_client:
            deadline = time.monotonic() + 60
            while WorkerSetupStatus.READY not in server.workers_setup_status.values():
                if WorkerSetupStatus.ERROR in server.workers_setup_status.values():
                    pytest.fail("the example's setup failed in the LitServe worker (its log is above)")
                if time.monotonic() > deadline:
                    pytest.fail("the LitServe worker was not ready after 60 s")
                time.sleep(0.05)
            yield test_client
    if Path(getattr(sys.modules.get("preprocess"), "__file__", "")).parent == serving:  # the example's import of it
        del sys.modules["preprocess"]
    assert not [worker for worker in server.inference_workers if worker.is_alive()]
    assert set(threading.enumerate()) <= threads, "the server left threads running"


@pytest.mark.timeout(120)
def test_server_answers_the_top5_of_onnxruntime(client: Any, onnx_model: Path) -> None:
    import onnxruntime

    png = digit_png(7)
    response = client.post("/predict", json={"image": base64.b64encode(png).decode("ascii")})
    assert response.status_code == 200, response.text
    top = response.json()["top"]

    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    metadata = read_onnx_metadata(session)
    pixels = preprocess_image(Image.open(io.BytesIO(png)), metadata["preprocessing"])
    (logits,) = session.run(["logits"], {"images": pixels[None]})
    logits = logits[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    assert len(top) == 5
    assert [entry["class"] for entry in top] == [metadata["class_names"][entry["index"]] for entry in top]
    assert top[0]["index"] == int(np.argmax(logits))
    got = [entry["probability"] for entry in top]
    assert got == sorted(got, reverse=True) and sum(got) <= 1.0
    np.testing.assert_allclose(got, probabilities[[entry["index"] for entry in top]], rtol=1e-6)


@pytest.mark.timeout(120)
def test_server_refuses_a_bad_request_with_400_and_resizes_other_sizes(client: Any) -> None:
    not_base64 = client.post("/predict", json={"image": "not base64!"})
    assert not_base64.status_code == 400 and "base64" in not_base64.json()["detail"]
    not_an_image = client.post("/predict", json={"image": base64.b64encode(b"hello").decode("ascii")})
    assert not_an_image.status_code == 400
    buffer = io.BytesIO()
    Image.new("L", (20, 30)).save(buffer, format="PNG")
    other_size = client.post("/predict", json={"image": base64.b64encode(buffer.getvalue()).decode("ascii")})
    assert other_size.status_code == 200  # resized to the 8x8 input, as the metadata says
