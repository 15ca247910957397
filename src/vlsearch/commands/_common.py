"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import json
import sys


def add_data_args(p, split: str = "dev") -> None:
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset root or image folder (default: $VLSEARCH_DATA or ../shared/data)",
    )
    p.add_argument("--split", default=split, help=f"dataset split: train, dev, test (default: {split})")


def add_model_arg(p, default: str = "fast") -> None:
    p.add_argument("--model", default=default, help=f"named model or checkpoint folder (default: {default})")


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


def fmt_metrics(m: dict) -> str:
    t, i = m["t2i"], m["i2t"]
    return (
        f"text->image R@1 {t['r1']:.1f}  R@5 {t['r5']:.1f}  R@10 {t['r10']:.1f} | "
        f"image->text R@1 {i['r1']:.1f}  R@5 {i['r5']:.1f}  R@10 {i['r10']:.1f} | RSUM {m['rsum']:.1f}"
    )
