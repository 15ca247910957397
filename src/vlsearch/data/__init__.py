"""Datasets: Flickr8k layout, COCO captions, Karpathy JSON, and plain image folders."""

from vlsearch.data.datasets import (
    CaptionDataset,
    load_coco,
    load_dataset,
    load_flickr8k,
    load_folder,
    load_karpathy,
)
from vlsearch.data.images import IMAGE_EXTENSIONS, ImageReport, load_image

__all__ = [
    "CaptionDataset",
    "IMAGE_EXTENSIONS",
    "ImageReport",
    "load_coco",
    "load_dataset",
    "load_flickr8k",
    "load_folder",
    "load_image",
    "load_karpathy",
]
