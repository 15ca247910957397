"""Moved to `vlsearch.encoders.dataset_features` (eval reads it too, and eval sits below training)."""

from vlsearch.encoders.dataset_features import DatasetFeatures

__all__ = ["DatasetFeatures"]
