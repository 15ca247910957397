"""Open-vocabulary concepts from what the frozen backbones already know, nothing trained.

EfficientNet-Lite0 ships with its ImageNet classifier (1,000 classes): one linear layer on the mean of
the final 7x7 map, so the logits come from the cached ``grid`` features without another forward pass.
MiniLM embeds the class names ("a photo of a {name}."). An image's concept vector is its class
probabilities times those name embeddings; a query is scored against it in MiniLM's own space. That
carries what ImageNet saw (cats, pizzas, panda bears) to galleries unlike Flickr8k.

The class list ships in package data (synset + WordNet lemmas, from timm's
``imagenet_synset_to_lemma.txt``, in the classifier's output order); a list of another length or content
is refused, since every logit would then be named wrongly.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from vlsearch.encoders.features import pad
from vlsearch.encoders.text import TextBackbone, masked_mean
from vlsearch.errors import CheckpointError

CLASSES_FILE = "imagenet_classes.txt"
# WordNet glosses of the same synsets, same order (timm's ``imagenet_synset_to_definition.txt``): "tabby"
# alone says little to MiniLM, "tabby, a cat with a grey or tawny coat" says cat.
DEFINITIONS_FILE = "imagenet_definitions.txt"
DEFINITIONS_SHA256 = "ebd07cd510fca8e7a4f359e6e62dbd0d846dc16754b55ca551a490e84a5710c9"
GLOSS_PROMPT = "a photo of a {}, {}."
N_CLASSES = 1000
# sha256 of CLASSES_FILE; FastConfig records it, so a checkpoint's label embeddings name the right logits.
CLASSES_SHA256 = "c98cf8e050b2f67f824762ebdb5bcf683adc7955382b9ff8b1c0f49548bb449b"
PROMPT = "a photo of a {}."
PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a {} in the scene.")


def _classes_text() -> bytes:
    return resources.files("vlsearch.encoders").joinpath(CLASSES_FILE).read_bytes()


@lru_cache(maxsize=1)
def class_lemmas(expected_sha256: str = CLASSES_SHA256) -> tuple[tuple[str, ...], ...]:
    """Per class (classifier output order), its lemmas, e.g. ("tabby", "tabby cat"). Checks count + hash."""
    data = _classes_text()
    digest = hashlib.sha256(data).hexdigest()
    rows = [ln.split("\t", 1) for ln in data.decode("utf-8").splitlines() if ln.strip()]
    if len(rows) != N_CLASSES or digest != expected_sha256:
        raise CheckpointError(
            f"concept class list {CLASSES_FILE} has {len(rows)} classes (sha256 {digest[:16]}), expected "
            f"{N_CLASSES} ({expected_sha256[:16]}): reinstall vlsearch or retrain the model"
        )
    return tuple(tuple(x.strip() for x in lemmas.split(",") if x.strip()) for _, lemmas in rows)


@lru_cache(maxsize=1)
def class_definitions() -> tuple[str, ...]:
    """Per class (classifier output order), its WordNet gloss. Checks count, hash and synset order."""
    data = resources.files("vlsearch.encoders").joinpath(DEFINITIONS_FILE).read_bytes()
    rows = [ln.split("\t", 1) for ln in data.decode("utf-8").splitlines() if ln.strip()]
    synsets = [ln.split("\t", 1)[0] for ln in _classes_text().decode("utf-8").splitlines() if ln.strip()]
    digest = hashlib.sha256(data).hexdigest()
    if digest != DEFINITIONS_SHA256 or [r[0] for r in rows] != synsets:
        raise CheckpointError(
            f"concept definitions {DEFINITIONS_FILE} do not match the class list (sha256 {digest[:16]}): "
            "reinstall vlsearch"
        )
    return tuple(r[1].strip() for r in rows)


def class_names() -> list[str]:
    """One display name per class: its first lemma ("tabby", "giant panda")."""
    return [lemmas[0] for lemmas in class_lemmas()]


def _name_variants(lemmas: tuple[str, ...], n: int) -> list[str]:
    """Up to n common-name lemmas (Latin binomials, written capitalised in WordNet, left out)."""
    common = [x for x in lemmas if not x[:1].isupper()] or list(lemmas[:1])
    return common[:n]


def classifier_head(net) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [1000,1280], bias [1000]) of an EfficientNet's own ImageNet classifier, fp32 copies."""
    fc = net._fc
    if fc.out_features != N_CLASSES:
        raise CheckpointError(f"backbone classifier has {fc.out_features} classes, not {N_CLASSES}")
    return fc.weight.detach().float().clone(), fc.bias.detach().float().clone()


def logits_from_grid(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """grid [B,49,1280] (the backbone's final map, after its head conv) -> ImageNet logits [B,1000].

    Exactly the backbone's own classifier: average pooling, dropout (identity at inference), ``_fc``."""
    return grid.float().mean(1) @ weight.T + bias


def sentence_states(states: torch.Tensor, lengths: torch.Tensor, layers) -> torch.Tensor:
    """MiniLM sentence embeddings [B,384] (unit) from cached lower-layer token states, through the
    pretrained upper ``layers``: mean over tokens, as all-MiniLM-L6-v2 is used."""
    mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
    h = states.float()
    for layer in layers:
        h = layer(h, mask)
    return torch.nn.functional.normalize(masked_mean(h, mask), dim=-1)


def class_texts(
    c: int, prompts: tuple[str, ...] = PROMPTS, names_per_class: int = 2, gloss: bool = False
) -> list[str]:
    """The texts that name class ``c``: each prompt for each of its first name variants, or with ``gloss``
    "a photo of a {name}, {its WordNet definition}." per name."""
    names = _name_variants(class_lemmas()[c], names_per_class)
    if gloss:
        return [GLOSS_PROMPT.format(name, class_definitions()[c]) for name in names]
    return [p.format(name) for name in names for p in prompts]


@torch.no_grad()
def label_embeddings(
    layers, prompts: tuple[str, ...] = (PROMPT,), names_per_class: int = 1, gloss: bool = False
) -> torch.Tensor:
    """[1000,384] unit MiniLM embeddings of the class names, averaged over prompts x name variants; with
    ``gloss``, of "a photo of a {name}, {its WordNet definition}." instead (``prompts`` unused)."""
    backbone = TextBackbone()
    texts, owner = [], []
    for c in range(N_CLASSES):
        variants = class_texts(c, prompts, names_per_class, gloss)
        texts += variants
        owner += [c] * len(variants)
    out = []
    for s in range(0, len(texts), 256):
        states, _ = backbone.encode(texts[s : s + 256])
        lengths = torch.tensor([len(x) for x in states])
        out.append(sentence_states(torch.from_numpy(pad(states)), lengths, layers))
    emb = torch.cat(out)
    summed = torch.zeros(N_CLASSES, emb.shape[1]).index_add_(0, torch.tensor(owner), emb)
    return torch.nn.functional.normalize(summed, dim=-1)


def concept_distribution(logits: torch.Tensor, temperature: float = 1.0, topk: int = 0) -> torch.Tensor:
    """Class probabilities [B,1000]; with topk > 0 only the k most likely, renormalised (sparse form)."""
    probs = (logits.float() / temperature).softmax(-1)
    if topk and topk < probs.shape[-1]:
        vals, idx = probs.topk(topk, dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, idx, vals / vals.sum(-1, keepdim=True))
    return probs


def top_concepts(probs: np.ndarray, k: int = 5, min_weight: float = 0.02) -> list[list[tuple[str, float]]]:
    """Per image, its top-k concept names with their probabilities (those below min_weight dropped)."""
    names = class_names()
    out = []
    for row in np.atleast_2d(probs):
        idx = np.argsort(-row)[:k]
        out.append([(names[i], float(row[i])) for i in idx if row[i] >= min_weight])
    return out
