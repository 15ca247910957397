"""Training the Slow model on Fast-mined hard negatives, choosing the fusion weight on dev, and the Slow
teacher for distilling the Fast model (Miech et al. 2021, Sec. 3.2-3.3).

Objective: listwise softmax in both directions over *groups* of confusable images. A group is a seed image,
``group_hard`` of the images the Fast model ranks highest (wrongly) for one of the seed's captions, and a
few random images; every caption of every group image is scored against every group image (one
``score_block``: image keys/values computed once, shared by ~80 captions). Text-to-image: each caption's
image among the group's images (what re-ranking sorts); image-to-text: each of an image's captions among
the group's captions of other images (the other captions of the same image are left out).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlsearch.models.slow import SlowConfig, SlowModel
from vlsearch.precision import autocast
from vlsearch.training import apply_overrides
from vlsearch.training.features import DatasetFeatures
from vlsearch.training.losses import candidate_kl


@dataclass
class SlowTrainConfig:
    minutes: float = 25.0  # wall-clock budget for the optimisation (the cosine schedule follows it)
    max_epochs: float = 30.0  # cap in passes over the train images as group seeds
    group_size: int = 16
    group_hard: int = 12  # images from the seed caption's Fast hard negatives; the rest are random
    groups_per_step: int = 2
    mine_k: int = 31  # hard negatives are drawn from each caption's Fast top-mine_k wrong images
    lr: float = 5e-4  # fresh parameters (image projections, cross-attention, head)
    pretrained_lr: float = 1e-4  # MiniLM-initialised self-attention and feed-forward
    weight_decay: float = 0.01
    warmup_steps: int = 20
    bucket: int = 40  # captions per length bucket within a group
    i2t_weight: float = 1.0
    flip: bool = True  # random horizontal flip of both feature maps
    fusion_k: int = 20  # the re-ranking depth the fusion weights are chosen for, on dev
    seed: int = 0


def group_loss(scores: torch.Tensor, cap_img: torch.Tensor, i2t_weight: float = 1.0) -> torch.Tensor:
    """scores [T, G]: T captions x G group images; cap_img [T] each caption's image (0..G-1).

    Text-to-image softmax over the G images plus image-to-text softmax, for every caption as its image's
    positive, over the captions of the other images."""
    t2i = F.cross_entropy(scores, cap_img)
    if i2t_weight <= 0:
        return t2i
    cols = scores[:, cap_img].t()  # [T, T]: row t = every caption's score with t's image
    same = cap_img[None, :] == cap_img[:, None]
    other_pos = same & ~torch.eye(len(cap_img), dtype=torch.bool)
    i2t = F.cross_entropy(cols.masked_fill(other_pos, float("-inf")), torch.arange(len(cap_img)))
    return t2i + i2t_weight * i2t


class GroupSampler:
    """Groups of confusable images: a seed, Fast hard negatives of one of its captions, random fill."""

    def __init__(self, feats: DatasetFeatures, neg_img: np.ndarray, tc: SlowTrainConfig, rng):
        self.caption_image = feats.caption_image.numpy()
        self.captions_of = [[] for _ in range(feats.n_images)]
        for c, i in enumerate(self.caption_image.tolist()):
            self.captions_of[i].append(c)
        self.pool = np.flatnonzero([len(c) > 0 for c in self.captions_of])
        self.neg_img = neg_img[:, : tc.mine_k]
        self.tc, self.rng = tc, rng
        self.size = min(tc.group_size, len(self.pool))
        self._order, self._pos, self.epoch = self.rng.permutation(self.pool), 0, 0

    def next_seed(self) -> int:
        if self._pos >= len(self._order):
            self._order, self._pos = self.rng.permutation(self.pool), 0
            self.epoch += 1
        self._pos += 1
        return int(self._order[self._pos - 1])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self._pos / max(1, len(self._order))

    def group(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images [G], captions [T], caption's image position in the group [T])."""
        seed = self.next_seed()
        caps = self.captions_of[seed]
        c = caps[self.rng.integers(len(caps))]
        hard = [int(i) for i in self.neg_img[c] if self.captions_of[i]]
        n_hard = min(self.tc.group_hard, len(hard), self.size - 1)
        chosen = [seed] + list(self.rng.choice(hard, size=n_hard, replace=False)) if n_hard else [seed]
        taken = set(chosen)
        while len(chosen) < self.size:
            i = int(self.pool[self.rng.integers(len(self.pool))])
            if i not in taken:
                chosen.append(i)
                taken.add(i)
        images = np.array(chosen)
        captions = np.array([c for i in images for c in self.captions_of[i]])
        where = {int(i): n for n, i in enumerate(images)}
        return images, captions, np.array([where[int(self.caption_image[c])] for c in captions])


def _flip(x: torch.Tensor, side: int) -> torch.Tensor:
    B, n, C = x.shape
    return x.view(B, side, side, C).flip(2).reshape(B, n, C)


def train_slow(
    train: DatasetFeatures,
    neg_img: np.ndarray,
    config: SlowConfig = SlowConfig(),
    tc: SlowTrainConfig = SlowTrainConfig(),
    progress: bool = True,
    log=print,
    init_from_pretrained: bool = True,
    max_steps: int | None = None,
    init: SlowModel | None = None,
) -> tuple[SlowModel, dict]:
    """Train on ``train`` (DatasetFeatures with mid) with Fast hard negatives ``neg_img`` [M, >=1];
    ``init`` warm-starts from a trained model (a new warm-up + cosine schedule over this budget)."""
    if train.mid is None:
        raise ValueError("the Slow model trains on the 14x14 mid map: DatasetFeatures.load(..., mid=True)")
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    model = init.train() if init is not None else SlowModel(config, init_from_pretrained=init_from_pretrained)
    config = model.config
    fresh, pretrained = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the frozen Fast prior
            continue
        is_pretrained = name.startswith("layers.") and ".cross_attn." not in name
        (pretrained if is_pretrained else fresh).append(p)
    opt = torch.optim.AdamW(
        [{"params": fresh, "lr": tc.lr}, {"params": pretrained, "lr": tc.pretrained_lr}],
        weight_decay=tc.weight_decay,
    )
    base = [tc.lr, tc.pretrained_lr]
    sampler = GroupSampler(train, neg_img, tc, rng)
    budget = tc.minutes * 60.0
    history: dict = {"loss": [], "steps": 0}
    bar = tqdm(
        total=int(budget), desc="train slow (s)", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    t0 = time.time()
    step, ema = 0, None
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or sampler.epochs_done >= tc.max_epochs or (max_steps and step >= max_steps):
            break
        frac = elapsed / budget if not max_steps else step / max_steps
        factor = min(1.0, (step + 1) / tc.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * factor
        loss = 0.0
        for _ in range(tc.groups_per_step):
            images, captions, cap_img = sampler.group()
            imgs = torch.from_numpy(images)
            mid = train.mid[imgs]
            grid = train.grid[imgs] if config.use_grid else None
            if tc.flip and rng.random() < 0.5:
                mid = _flip(mid, config.mid_side)
                grid = _flip(grid, config.grid_side) if grid is not None else None
            # captions sorted by length and scored in buckets: each bucket pads only to its own longest
            order = np.argsort(train.lengths[torch.from_numpy(captions)].numpy(), kind="stable")
            captions, cap_img = captions[order], cap_img[order]
            with autocast():
                kv = model.image_kv(mid, grid)
                parts = []
                for b0 in range(0, len(captions), tc.bucket):
                    caps = torch.from_numpy(captions[b0 : b0 + tc.bucket])
                    lengths = train.lengths[caps]
                    text = model.text_state(train.states[caps, : int(lengths.max())], lengths)
                    parts.append(model.score_block(text, kv))
                scores = torch.cat(parts)
            loss = loss + group_loss(scores.float(), torch.from_numpy(cap_img), tc.i2t_weight)
        loss = loss / tc.groups_per_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        history["loss"].append(value)
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.n = min(int(time.time() - t0), int(budget))
        bar.set_postfix(step=step, loss=f"{ema:.3f}", ep=f"{sampler.epochs_done:.2f}")
        if step % 100 == 0 and not progress:
            log(f"step {step}: loss {ema:.3f}, {sampler.epochs_done:.2f} epochs, {time.time() - t0:.0f}s")
    bar.close()
    history.update({"steps": step, "epochs": sampler.epochs_done, "train_seconds": time.time() - t0})
    return model.eval(), history


# -- fusion with the Fast score ---------------------------------------------------------------------------
FUSION_GRID = [0.0, *np.geomspace(1e-3, 1.0, 31).tolist()]


def choose_fusion_weights(
    model: SlowModel, dev: DatasetFeatures, fast_name="fast", K: int = 20, progress=True
):
    """Pick w (fused = fast cosine + w * slow) per direction on dev at re-ranking depth K, maximising that
    direction's R@1+R@5+R@10. Returns (w_t2i, w_i2t, report)."""
    from vlsearch.eval.metrics import i2t_ranks, recalls, retrieval_metrics, t2i_ranks
    from vlsearch.models.registry import load_model
    from vlsearch.search.rerank import fused_matrices, rerank_candidates
    from vlsearch.training.fast import embed_features

    fast, _, _ = load_model(fast_name)
    img, txt = embed_features(fast, dev)
    sim = txt @ img.T
    ci = dev.caption_image.numpy()
    cands = rerank_candidates(model, dev, sim, K, progress)
    best = {"t2i": (-1.0, 0.0), "i2t": (-1.0, 0.0)}
    curve = []
    for w in [*FUSION_GRID, 1e6]:  # 1e6 ~ the Slow score alone within the top-K
        s_t2i, s_i2t = fused_matrices(sim, *cands[:4], w, w)
        r_t2i, r_i2t = recalls(t2i_ranks(s_t2i, ci)), recalls(i2t_ranks(s_i2t, ci))
        curve.append({"w": w, "t2i": r_t2i, "i2t": r_i2t})
        for d, r in (("t2i", r_t2i), ("i2t", r_i2t)):
            if w < 1e6 and sum(r.values()) > best[d][0] + 1e-9:
                best[d] = (sum(r.values()), w)
    w_t2i, w_i2t = best["t2i"][1], best["i2t"][1]
    s_t2i, s_i2t = fused_matrices(sim, *cands[:4], w_t2i, w_i2t)
    fused = retrieval_metrics(s_t2i, ci, s_i2t)
    report = {
        "K": K,
        "fast": retrieval_metrics(sim, ci),
        "fused": fused,
        "slow_only_in_top_k": curve[-1],
        "curve": curve,
    }
    return w_t2i, w_i2t, report


def train_from_args(args):
    """`vlsearch train slow`: mine Fast hard negatives on Flickr8k train, train (default 20 min), choose
    the fusion weights on dev, save the named model `slow`."""
    from vlsearch.commands.train import out_path
    from vlsearch.data import load_dataset
    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.training.mining import cached_fast_candidates

    tc = apply_overrides(SlowTrainConfig(seed=args.seed), args, epochs_field="max_epochs")
    progress = not args.quiet
    log = (lambda *a, **k: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    train = DatasetFeatures.load(load_dataset(args.data_root, "train"), mid=True, progress=progress)
    fast_name = getattr(args, "fast_model", None) or "fast"
    mined = cached_fast_candidates(fast_name, train, tc.mine_k, progress)
    config, init, previous = SlowConfig(), None, None
    if getattr(args, "init", None):  # warm start: `vlsearch train slow --init CHECKPOINT`
        from vlsearch.errors import CheckpointError
        from vlsearch.models.registry import load_model

        init, previous, init_path = load_model(args.init)
        if not isinstance(init, SlowModel):
            raise CheckpointError(f"--init {args.init}: a {init.model_type!r} model, not a Slow model")
        config = init.config
    elif not getattr(args, "no_fast_prior", False):  # default: start from the Fast model's ranking
        from vlsearch.models.registry import load_model

        fast, _, _ = load_model(fast_name)
        config = SlowConfig(fast_prior=asdict(fast.config))
        init = SlowModel(config)
        init.set_prior(fast)
    model, history = train_slow(train, mined["neg_img"], config, tc, progress=progress, log=log, init=init)
    log(
        f"trained {history['steps']} steps ({history['epochs']:.2f} epochs) in {history['train_seconds'] / 60:.1f} min"
    )
    del train
    meta = {
        "train": asdict(tc),
        "data_root": str(args.data_root or "default"),
        "history": {k: v for k, v in history.items() if k != "loss"},
    }
    if previous is not None:
        meta["warm_start"] = {
            "from": str(init_path),
            "train": previous.get("train"),
            "history": previous.get("history"),
            "warm_start": previous.get("warm_start"),  # a chain of warm starts stays on record
        }
    meta["loss_last"] = float(np.mean(history["loss"][-50:])) if history["loss"] else None
    meta["fast_model"] = str(fast_name)
    out = out_path(args, "slow")
    # saved before the dev step with a neutral fusion weight: a long run is never lost to what follows
    model.config.fusion_weight = model.config.fusion_weight_i2t = 0.02
    saved = save_checkpoint(out, model, meta)
    try:
        dev = DatasetFeatures.load(load_dataset(args.data_root, "dev"), mid=True, progress=progress)
    except Exception as e:  # no dev split: keep a neutral fusion weight
        log(f"no dev split to choose the fusion weight on ({e}); using w = 0.02")
        dev = None
    if dev is not None and len(dev.states):
        w_t2i, w_i2t, report = choose_fusion_weights(model, dev, fast_name, tc.fusion_k, progress)
        model.config.fusion_weight, model.config.fusion_weight_i2t = w_t2i, w_i2t
        meta["fusion_dev"] = {k: v for k, v in report.items() if k != "curve"}
        meta["fusion_curve"] = report["curve"]
        f = report["fused"]
        log(
            f"dev, Fast top-{tc.fusion_k} re-ranked: w_t2i {w_t2i:.4f} w_i2t {w_i2t:.4f}; "
            f"t2i R@1 {report['fast']['t2i']['r1']:.1f} -> {f['t2i']['r1']:.1f}, "
            f"i2t R@1 {report['fast']['i2t']['r1']:.1f} -> {f['i2t']['r1']:.1f}"
        )
        saved = save_checkpoint(out, model, meta)  # again, with the fusion weights chosen on dev
    return saved


# -- distillation -------------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    k: int = 7  # candidates per train caption: its image + the Fast top-k wrong images
    target: str = "fused"  # "fused" (fast + w * slow, in the Fast logit scale) or "slow" (the Slow score)
    captions_per_step: int = 96  # batch captions that get the KL term (all get InfoNCE)
    captions_per_image: int = 1  # train captions with teacher scores (fixed, seeded); others: InfoNCE only
    weight: float = 1.0
    temperature: float = 1.0


class SlowTeacher:
    """Precomputed teacher logits over fixed candidates; ``loss`` is the train_fast hook.

    The student's scores over the same candidates use its image tower on the un-augmented grids; the
    mean+max pooling has no parameters, so the pooled grids are computed once and only the MLP runs per
    step."""

    def __init__(
        self, candidates: torch.Tensor, logits: torch.Tensor, captions_per_step: int = 128, seed: int = 0
    ):
        self.candidates, self.logits = candidates.long(), logits.float()
        self.captions_per_step = captions_per_step
        self.gen = torch.Generator().manual_seed(seed)
        self._pooled: torch.Tensor | None = None

    def _image_emb(self, model, train, rows: torch.Tensor) -> torch.Tensor:
        if not all(hasattr(model, a) for a in ("pool_image", "image_norm", "image_mlp", "image_skip")):
            return model.encode_image(train.grid[rows])
        if self._pooled is None or len(self._pooled) != len(train.grid):
            with torch.no_grad():
                self._pooled = torch.cat(
                    [model.pool_image(train.grid[s : s + 512]) for s in range(0, len(train.grid), 512)]
                )
        x = model.image_norm(self._pooled[rows])
        return F.normalize(model.image_mlp(x) + model.image_skip(x), dim=-1)

    def loss(self, model, train, imgs, caps, image_emb, text_emb, temperature) -> torch.Tensor:
        rows = torch.nonzero(self.candidates[caps, 0] >= 0).flatten()  # captions the teacher scored
        if len(rows) == 0:
            return text_emb.sum() * 0.0
        if self.captions_per_step and len(rows) > self.captions_per_step:
            rows = rows[torch.randperm(len(rows), generator=self.gen)[: self.captions_per_step]]
        cand = self.candidates[caps[rows]]  # [B, C]
        uniq, inv = torch.unique(cand, return_inverse=True)
        with autocast():
            emb = self._image_emb(model, train, uniq)
        emb = emb.float()[inv]  # [B, C, D]
        student = model.scale * (text_emb[rows][:, None, :] * emb).sum(-1)
        return candidate_kl(student, self.logits[caps[rows]], temperature)


def teacher_logits(slow_name, train: DatasetFeatures, dc: DistillConfig, fast_name="fast", progress=True):
    """Candidates [M, 1+k] (each train caption's image first, then the Fast top-k wrong images) and their
    Slow scores, cached under $VLSEARCH_HOME/distill keyed by the Slow and Fast fingerprints. Returns
    (candidates, slow_scores, fast_cosines, fast_scale)."""
    import io

    from vlsearch.config import atomic_write_bytes
    from vlsearch.models.registry import fingerprint, load_model
    from vlsearch.search.rerank import score_pairs_grouped
    from vlsearch.settings import home
    from vlsearch.training.mining import cached_fast_candidates, features_fingerprint

    slow, _, slow_path = load_model(slow_name)
    _, _, fast_path = load_model(fast_name)
    key = (
        f"{fingerprint(slow_path)}-{fingerprint(fast_path)}-{features_fingerprint(train)}"
        f"-k{dc.k}-c{dc.captions_per_image}"
    )
    cache = home() / "distill" / f"{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["candidates"], z["slow"], z["fast"], float(z["scale"])
    mined = cached_fast_candidates(fast_name, train, max(dc.k, 31), progress)
    ci = train.caption_image.numpy()
    cand = np.concatenate([ci[:, None], mined["neg_img"][:, : dc.k]], axis=1)
    M = len(cand)
    # a fixed, seeded subset of each image's captions gets teacher scores; the others are marked -1
    rng = np.random.default_rng(0)
    keep = np.zeros(M, dtype=bool)
    by_image = np.argsort(ci, kind="stable")
    for caps in np.split(by_image, np.flatnonzero(np.diff(ci[by_image])) + 1):
        keep[rng.permutation(caps)[: dc.captions_per_image]] = True
    rows = np.flatnonzero(keep)
    slow_scores = np.zeros(cand.shape, dtype=np.float32)
    slow_scores[rows] = score_pairs_grouped(
        slow,
        train.states,
        train.lengths,
        train.mid,
        train.grid if slow.config.use_grid else None,
        np.repeat(rows, cand.shape[1]),
        cand[rows].ravel(),
        progress,
        "distill: slow teacher scores",
    ).reshape(len(rows), cand.shape[1])
    cand[~keep] = -1
    fast_cos = np.einsum("md,mkd->mk", mined["text_emb"], mined["image_emb"][np.maximum(cand, 0)])
    buf = io.BytesIO()
    np.savez(
        buf,
        candidates=cand,
        slow=slow_scores,
        fast=fast_cos.astype(np.float32),
        scale=np.float32(mined["scale"]),
    )
    atomic_write_bytes(cache, buf.getvalue())
    return cand, slow_scores, fast_cos, float(mined["scale"])


def distillation_teacher(name, args):
    """(teacher, FastTrainConfig overrides) for `vlsearch train fast --distill NAME`."""
    from vlsearch.data import load_dataset
    from vlsearch.models.registry import load_model

    dc = DistillConfig()
    train = DatasetFeatures.load(load_dataset(args.data_root, "train"), mid=True, progress=not args.quiet)
    slow, meta, _ = load_model(name)
    fast_name = meta.get("fast_model", "fast")
    cand, slow_scores, fast_cos, scale = teacher_logits(name, train, dc, fast_name, progress=not args.quiet)
    if dc.target == "fused":
        logits = scale * (fast_cos + slow.config.fusion_weight * slow_scores)
    else:
        logits = slow_scores
    teacher = SlowTeacher(
        torch.from_numpy(cand), torch.from_numpy(np.asarray(logits)), dc.captions_per_step, args.seed
    )
    weight = getattr(args, "distill_weight", None)
    temperature = getattr(args, "distill_temperature", None)
    settings = {
        "distill_weight": dc.weight if weight is None else weight,
        "distill_temperature": dc.temperature if temperature is None else temperature,
        "distill_teacher": str(name),
    }
    return teacher, settings
