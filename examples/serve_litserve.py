"""Serve a model exported by `resnet-lit export --format onnx` with LitServe, onnxruntime, PIL and numpy.

    python examples/serve_litserve.py --model runs/quickstart/export/resnet20.onnx --port 8000
    curl -X POST localhost:8000/predict -H 'Content-Type: application/json' \
         -d "{\"image\": \"$(base64 -w0 digit.png)\"}"

The answer: {"top": [{"class": "7", "index": 7, "probability": 0.98}, ...]}, the five likeliest classes (fewer when
the model has fewer), most likely first.
"""

import argparse
import base64
import binascii
import io
import os

import litserve as ls
import numpy as np
import onnxruntime
from fastapi import HTTPException
from PIL import Image

try:  # a copy of resnet_lit/export/preprocess.py beside this file: the server then needs no torch or resnet-lit
    from preprocess import preprocess_image, read_onnx_metadata
except ImportError:
    from resnet_lit.export.preprocess import preprocess_image, read_onnx_metadata

TOP_K = 5


class ONNXClassifierAPI(ls.LitAPI):
    """One request: ``{"image": "<base64 of an image file>"}``; one answer: the top classes with probabilities."""

    def __init__(self, model_path: str | None = None) -> None:
        super().__init__()
        self.model_path = model_path or os.environ.get("RESNET_LIT_ONNX")
        if not self.model_path:
            raise ValueError("give the .onnx file: ONNXClassifierAPI(model_path) or the RESNET_LIT_ONNX variable")

    def setup(self, device: str) -> None:
        self.session = onnxruntime.InferenceSession(self.model_path, providers=["CPUExecutionProvider"])
        metadata = read_onnx_metadata(self.session)
        self.class_names = metadata["class_names"]
        self.preprocessing = metadata["preprocessing"]
        spec = metadata["input"]
        if spec["batch"] not in ("dynamic", 1):
            raise ValueError(f"{self.model_path} takes batches of {spec['batch']}; export with --dynamic_batch true")
        self.input_shape = (spec["channels"], spec["height"], spec["width"])

    def decode_request(self, request: dict) -> np.ndarray:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(request["image"], validate=True)))
            pixels = preprocess_image(image, self.preprocessing)
        except (KeyError, TypeError, binascii.Error, OSError) as error:  # OSError: PIL cannot read the bytes
            raise HTTPException(400, f'expected {{"image": "<base64 of an image file>"}}: {error}') from error
        if pixels.shape != self.input_shape:
            raise HTTPException(400, f"the image gives {list(pixels.shape)} after preprocessing; the model takes "
                                     f"{list(self.input_shape)}")  # fmt: skip
        return pixels

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"images": pixels[None]})
        logits = logits[0].astype(np.float64)
        exp = np.exp(logits - logits.max())  # softmax, stable for any logit
        return exp / exp.sum()

    def encode_response(self, probabilities: np.ndarray) -> dict:
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]
        top = [{"class": self.class_names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]
        return {"top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("RESNET_LIT_ONNX"), help="the .onnx file")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not args.model:
        parser.error("--model (or the RESNET_LIT_ONNX variable) is required")
    server = ls.LitServer(ONNXClassifierAPI(os.path.abspath(args.model)), accelerator="cpu")
    server.run(port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
