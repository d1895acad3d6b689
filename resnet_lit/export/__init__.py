"""Export of trained networks: ONNX, torch.export programs and safetensors, with parity checks."""
