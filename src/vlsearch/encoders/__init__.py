"""Frozen pretrained backbones (EfficientNet-Lite, MiniLM) and the on-disk feature cache they fill."""
