"""Models: Fast dual encoder, Slow cross-attention scorer, VLDeformer; and the checkpoint registry."""
