"""The package version and the on-disk format version (a foundation: imports nothing of vlsearch)."""

__version__ = "0.1.0"
# Bumped whenever a checkpoint, index or feature-cache layout changes incompatibly.
FORMAT_VERSION = 1
