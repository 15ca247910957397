"""`vlsearch demo` (what `make demo` runs): train Fast (or reuse it), index dev, report recall, search."""

from __future__ import annotations

import time
from pathlib import Path

from vlsearch.commands._common import add_quiet, fmt_metrics
from vlsearch.settings import data_root, default_index_dir

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.

EXAMPLE_QUERIES = [
    "a dog jumps over a fence",
    "children playing in the water",
    "a man riding a bicycle on a dirt road",
    "a snowy mountain with skiers",
]


def register(sub):
    p = sub.add_parser(
        "demo", help="the main job: train Fast (or reuse it), index a gallery, report recall, search"
    )
    p.add_argument(
        "--data-root", default=None, help="Flickr8k-layout root (default) or any folder of photos to index"
    )
    p.add_argument("--queries", nargs="*", default=EXAMPLE_QUERIES)
    add_quiet(p)
    return p


def run(args):
    from vlsearch.data import load_dataset
    from vlsearch.data.datasets import find_flickr8k
    from vlsearch.index.build import build_index
    from vlsearch.models.registry import default_checkpoint
    from vlsearch.search.engine import SearchEngine

    t0 = time.time()
    root = Path(args.data_root).expanduser() if args.data_root else data_root()
    progress = not args.quiet
    is_dataset = find_flickr8k(root) is not None
    ckpt = default_checkpoint("fast")
    if (ckpt / "model.safetensors").exists():
        print(f"[1/4] Fast model: reusing {ckpt}")
    else:
        train_root = root if is_dataset else None
        print(
            f"[1/4] Fast model: training on {'Flickr8k train under ' + str(train_root) if train_root else 'the default Flickr8k data root'}"
        )
        from vlsearch.training.common import TrainRequest
        from vlsearch.training.fast import train_and_save

        train_and_save(TrainRequest(data_root=train_root, quiet=args.quiet))
    dataset = load_dataset(root, "dev") if is_dataset else load_dataset(root)
    print(
        f"[2/4] Index: {dataset.n_images} images of {dataset.name}:{dataset.split} -> {default_index_dir()}"
    )
    build_index(default_index_dir(), root, dataset=dataset, progress=progress)
    if dataset.captions:
        from vlsearch.eval.evaluate import evaluate

        print("[3/4] Recall on this split (vlsearch eval):")
        m = evaluate(root, dataset.split, "fast", progress=progress)
        print(f"      {fmt_metrics(m)}")
    else:
        print("[3/4] Recall: skipped (this folder has no captions)")
    print("[4/4] Example searches (vlsearch search QUERY):")
    engine = SearchEngine.open(default_index_dir())
    for q in args.queries:
        res = engine.search(q, 3)
        print(f"  {q!r} ({res.timings_ms['total']:.0f} ms)")
        for h in res.hits:
            print(f"      {h.score:.3f}  {h.path}")
    print(
        f'done in {(time.time() - t0) / 60:.1f} min. Next: `vlsearch search "your words"` or `vlsearch serve`.'
    )
    return 0
