"""Concept-channel variants on Flickr8k dev and coco-mini: concepts alone and Fast + w x concepts.

Weights are chosen on Flickr8k dev; coco-mini is only the check. Usage:
  .venv/bin/python scripts/concepts_sweep.py --model fast [--coco ../shared/data/coco-mini]
"""

from __future__ import annotations

import argparse
import json

import torch

from vlsearch.data import load_dataset
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.models.registry import load_model
from vlsearch.training.concepts import attach_concepts, channel_sims, sweep


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fast")
    p.add_argument("--data-root", default=None)
    p.add_argument("--coco", default="../shared/data/coco-mini")
    p.add_argument("--prompts", default="single,ensemble,gloss")
    p.add_argument("--temperatures", default="1")
    p.add_argument("--topk", default="10")
    args = p.parse_args()
    net, _, _ = load_model(args.model)
    galleries = {
        "flickr8k-dev": DatasetFeatures.load(load_dataset(args.data_root, "dev"), progress=False),
        "coco-mini": DatasetFeatures.load(load_dataset(args.coco), progress=False),
    }
    attach_concepts(net)
    base = {name: channel_sims(net, f) for name, f in galleries.items()}  # Fast sims, text side reused
    query = {}
    with torch.no_grad():
        for name, f in galleries.items():
            query[name] = torch.cat(
                [
                    net.concept.text(f.states[s : s + 1024], f.lengths[s : s + 1024])
                    for s in range(0, len(f.states), 1024)
                ]
            )
    for prompts in args.prompts.split(","):
        if prompts != net.config.concept_prompts:
            net.concept.set_prompts(prompts)
        for t in map(float, args.temperatures.split(",")):
            for k in map(int, args.topk.split(",")):
                net.config.concept_temperature, net.config.concept_topk = t, k
                row = {"prompts": prompts, "temperature": t, "topk": k}
                for name, feats in galleries.items():
                    with torch.no_grad():
                        concept = (query[name] @ net.concept.image(feats.grid).T).numpy()
                    fast = base[name][0]
                    ci = feats.caption_image.numpy()
                    alone = retrieval_metrics(concept, ci)
                    row[name] = {
                        "alone": [round(alone["t2i"]["r1"], 1), round(alone["rsum"], 1)],
                        "fused": {
                            r["weight"]: [round(r["t2i"]["r1"], 1), round(r["rsum"], 1)]
                            for r in sweep(fast, concept, ci)
                        },
                    }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
