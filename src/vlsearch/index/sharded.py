"""The sharded layout of `vlsearch index --ray` before segments: now a segmented index (index/segments.py),
whose reader opens both. Kept so ``from vlsearch.index.sharded import ShardedIndex`` still works."""

from vlsearch.index.segments import SegmentedIndex, merge_topk

ShardedIndex = SegmentedIndex
LAYOUT = "sharded"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


__all__ = ["LAYOUT", "ShardedIndex", "merge_topk", "shard_name"]
