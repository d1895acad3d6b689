"""Fine-tuning helpers of `ResNetClassifier`: stage freezing, an exponential moving average of the weights,
test-time augmentation and the check of the data preprocessing against a pretrained source's."""
