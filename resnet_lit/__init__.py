"""resnet-lit: config-driven ResNet-family classifiers on PyTorch Lightning."""
