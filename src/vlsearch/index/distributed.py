"""`vlsearch index --ray`: gallery features and embeddings computed by Ray actors, written as a segmented
index whose segments (one per shard) the workers write in parallel.

The driver lists the gallery (a dataset split or any folder of images), cuts it into contiguous shards and
hands them to actors, one model copy per actor (by default one actor per machine, using all its cores).
Each actor computes backbone features (through its machine's feature cache), the dual encoder's
embeddings and caption embeddings, and writes its shard as a normal gallery index folder. The driver then
writes the manifest (``config.json``) that makes the folder one segmented index (see ``index/manifest.py``),
and swaps the finished folder in atomically. Images and the output folder must be reachable under the
same paths from every machine (shared storage); the model weights travel through Ray's object store.
See docs/scaling.md for running it on a multi-machine cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlsearch.data import CaptionDataset, ImageReport, load_dataset
from vlsearch.data.datasets import gallery_root
from vlsearch.errors import DataError, VLSearchError
from vlsearch.index.manifest import LAYOUT, Manifest, fsync_dir, write_manifest
from vlsearch.index.plain import DEFAULT_SOURCE, IndexConfig, swap_in
from vlsearch.index.sharded import shard_name
from vlsearch.settings import OFFLINE_ENV

# Environment passed on to the workers when the driver has it set.
FORWARDED_ENV = ("VLSEARCH_HOME", "VLSEARCH_DATA", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ShardWorker:
    """One model copy. Built by Ray as an actor: ``ray.remote(num_cpus=...)(ShardWorker)``."""

    def __init__(self, checkpoint: dict[str, bytes], threads: int):
        os.environ["VLSEARCH_THREADS"] = str(threads)
        from vlsearch.models.checkpoint import load_checkpoint, read_meta
        from vlsearch.models.embedder import Embedder
        from vlsearch.models.registry import model_class
        from vlsearch.settings import configure_torch

        configure_torch()
        self.ckpt = Path(tempfile.mkdtemp(prefix="vlsearch-ray-ckpt-"))
        for name, data in checkpoint.items():
            (self.ckpt / name).write_bytes(data)
        self.meta = read_meta(self.ckpt)
        net, _ = load_checkpoint(self.ckpt, model_class(self.meta["model_type"]), self.meta["model_type"])
        self.embedder = Embedder(net, progress=False)
        self.threads = threads

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def build_shard(self, shard_dir: str, dataset: CaptionDataset, model_name: str, kind: str, source: str):
        """Embed one shard and write it as a gallery index folder. Returns what the driver reports."""
        from vlsearch.index.build import _index_config, embed_gallery, photos_of
        from vlsearch.index.plain import write_gallery

        t0 = time.perf_counter()
        report = ImageReport()
        records, emb, caps, cap_emb = embed_gallery(self.embedder, dataset, report)
        result = {
            "shard": Path(shard_dir).name,
            "skipped": report.skipped,
            "node": self.node(),
            "dim": self.embedder.dim,
            "image_backbone": self.embedder.extractor.image_config.tag,
            "text_backbone": self.embedder.extractor.text_config.tag,
        }
        if not records:
            return {**result, "n_images": 0, "n_captions": 0, "seconds": time.perf_counter() - t0}
        config = _index_config(model_name, None, self.meta, self.ckpt, self.embedder, kind, source)
        write_gallery(shard_dir, config, records, emb, caps or None, cap_emb, photos_of(records))
        return {
            **result,
            "n_images": len(records),
            "n_captions": len(caps),
            "seconds": time.perf_counter() - t0,
        }

    def close(self) -> None:
        shutil.rmtree(self.ckpt, ignore_errors=True)


def connect(address: str | None) -> bool:
    """Join (or start) a Ray cluster; True when this call started it (and the caller must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address in (None, "", "local"):
        ray.init(
            address="local",  # a new local instance, even if another cluster runs on this machine
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            **quiet,
        )
    else:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            hint = (
                ""
                if os.environ.get("RAY_AUTH_MODE")
                else "; if the cluster uses token authentication (the default for `ray start` since Ray 2.59), "
                "set RAY_AUTH_MODE=token here too, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
            )
            raise VLSearchError(
                f"cannot join the Ray cluster at {address!r} ({e}){hint}; start a cluster with `ray start --head` "
                "(see docs/scaling.md), or use --ray without an address for a local one"
            ) from e
    return True


def _plan_workers(cpus_per_worker: int | None) -> list[tuple[str, int]]:
    """(node id, cpus) per worker: one per machine using all its CPUs, or as many of ``cpus_per_worker``."""
    import ray

    plan = []
    for node in ray.nodes():
        cpus = int(node.get("Resources", {}).get("CPU", 0))
        if not node.get("Alive") or cpus < 1:
            continue
        per = min(cpus_per_worker or cpus, cpus)
        plan += [(node["NodeID"], per)] * (cpus // per)
    if not plan:
        raise VLSearchError("the Ray cluster has no CPUs to run workers on")
    return plan


def _worker_env(threads: int, extra: dict | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    for key, value in OFFLINE_ENV.items():  # the one offline setting (settings.py), unless overridden
        env.setdefault(key, value)
    env.update({"OMP_NUM_THREADS": str(threads), "VLSEARCH_THREADS": str(threads)})
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _add_folder_videos(out: Path, source, dataset: CaptionDataset, progress: bool) -> None:
    """A folder's videos, embedded on this machine as one more segment (the workers take the photos):
    the same rows a single-process build of the folder gives."""
    from vlsearch.index.build import add_to_index
    from vlsearch.index.build_video import find_videos

    if source is None or dataset.split != "all" or not Path(source).is_dir() or not find_videos(source):
        return
    n, report = add_to_index(out, source, progress=progress)  # the photos are in: only videos are new
    if report:
        print(report.summary(), file=sys.stderr)
    if progress:
        print(f"{n} video moments added beside the shards", file=sys.stderr)


def build_index_ray(
    out: str | Path,
    source: str | Path | None = None,
    split: str = "dev",
    model: str = "fast",
    address: str | None = None,
    shards: int | None = None,
    progress: bool = True,
    kind: str = "auto",
    dataset: CaptionDataset | None = None,
    cpus_per_worker: int | None = None,
    worker_env: dict | None = None,
) -> Path:
    """Build a sharded index of a gallery with Ray workers; same rows, ids and embeddings as ``build_index``.

    address: None/"local" starts a local Ray instance; "auto" or "HOST:6379" joins a running cluster (an
    already initialised Ray in this process is used as is). shards: number of index shards (default: one
    per worker). worker_env: extra environment variables for the workers (e.g. their VLSEARCH_HOME).
    """
    import ray
    from ray.util import ActorPool
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from vlsearch.models.checkpoint import CONFIG, WEIGHTS, read_meta
    from vlsearch.models.registry import fingerprint, resolve_checkpoint

    if shards is not None and shards < 1:
        raise VLSearchError("--shards must be at least 1")
    dataset = dataset or load_dataset(source, split)
    if dataset.n_images == 0:
        raise DataError("the gallery has no images")
    ckpt = resolve_checkpoint(model)
    checkpoint = {name: (ckpt / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    meta = read_meta(ckpt)
    out = Path(out).expanduser().resolve()
    source_desc = f"{source or DEFAULT_SOURCE} [{dataset.name}:{dataset.split}]"

    started = connect(address)
    actors = []
    tmp: Path | None = None
    try:
        plan = _plan_workers(cpus_per_worker)
        n_shards = max(1, min(shards or len(plan), dataset.n_images))
        plan = plan[:n_shards]
        ckpt_ref = ray.put(checkpoint)
        for node_id, cpus in plan:
            actor_cls = ray.remote(num_cpus=cpus)(ShardWorker).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                runtime_env={"env_vars": _worker_env(cpus, worker_env)},
            )
            actors.append(actor_cls.remote(ckpt_ref, cpus))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        parts = [p for p in np.array_split(np.arange(dataset.n_images), n_shards) if len(p)]
        jobs = [(str(tmp / shard_name(i)), dataset.subset(idx)) for i, idx in enumerate(parts)]
        bar = tqdm(
            total=dataset.n_images, desc="ray shards", unit="img", disable=not progress, file=sys.stderr
        )
        sizes = {shard_name(i): len(idx) for i, idx in enumerate(parts)}
        results = []
        pool = ActorPool(actors)
        try:
            for res in pool.map_unordered(
                lambda a, job: a.build_shard.remote(job[0], job[1], str(model), kind, source_desc), jobs
            ):
                results.append(res)
                bar.update(sizes[res["shard"]])
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, VLSearchError):
                raise VLSearchError(str(e.cause)) from e
            raise
        finally:
            bar.close()
        results.sort(key=lambda r: r["shard"])
        report = ImageReport([tuple(s) for r in results for s in r["skipped"]])
        names = [r["shard"] for r in results if r["n_images"]]
        if not names:
            raise DataError(f"none of the {dataset.n_images} images could be read")
        for r in results:  # a shard whose images were all unreadable is left out
            if not r["n_images"]:
                shutil.rmtree(tmp / r["shard"], ignore_errors=True)
        config = IndexConfig(
            model=str(model),
            model_type=meta["model_type"],
            model_fingerprint=fingerprint(ckpt),
            dim=results[0]["dim"],
            kind=LAYOUT,
            image_backbone=results[0]["image_backbone"],
            text_backbone=results[0]["text_backbone"],
            n_images=sum(r["n_images"] for r in results),
            n_captions=sum(r["n_captions"] for r in results),
            source=source_desc,
            roots=[gallery_root(dataset, source)],  # the service serves files inside these only
        )
        for name in names:
            fsync_dir(tmp / name)
        write_manifest(tmp, Manifest(asdict(config), names, {}, 1))
        swap_in(tmp, out)
        tmp = None
        if report:
            print(report.summary(), file=sys.stderr)
        _add_folder_videos(out, source, dataset, progress)
        if progress:
            nodes = sorted({r["node"] for r in results})
            print(
                f"{config.n_images} images in {len(names)} shard(s) by {len(actors)} worker(s) on "
                f"{len(nodes)} machine(s)",
                file=sys.stderr,
            )
        return out
    finally:
        try:
            ray.get([a.close.remote() for a in actors], timeout=30)
        except Exception:  # noqa: BLE001 - best effort cleanup of the workers' checkpoint copies
            pass
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
