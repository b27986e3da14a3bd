"""The alignment score and the adapters' refinement, measured: the paper's cosine against the default probability of
the label's prompt, a single fit of the adapters (the default) against refits on the trusted samples, on the cached
embeddings of a `clipsel bench` workdir, under several noise kinds and seeds.

For each noisy label set (and for corrupted images, whose embeddings the bench cached per seed) the adapters are
trained with the library's defaults, once as a single fit (the paper's) and refitted `--refine` times (each fit
checkpointed under WORKDIR/alignment_fits/, so a rerun trains nothing), then each variant ranks the samples;
per-class top-k of that ranking is what the selection keeps (the optimiser's result, docs/method.md). Printed per
setting and seed: the share of bad samples kept at each ratio and the ranking's ROC-AUC as a detector of them
(higher = better), as JSON lines, then a Markdown table of means and standard deviations over seeds.

    python scripts/bench_alignment.py --data ../shared/data/cifar10-jpeg.zip --workdir out/detect \\
        --noise pair:0.4 corrupt:0.2 symmetric:0.2 --seeds 0 1 2 --refine 1 2 --typicality 0.3

`--refine 1 2` measures one refit (`--adapter-refine 1`) and two. `--typicality 0.3` adds three candidates for corrupted
images (docs/method.md): the refit's combined score plus 0.3 x a min-max-normalised typicality term over its mean,
the encoder's feature norm, or the cosine of an image's features to its class's mean feature (the class typicality
of the library's `typicality` option) on the encoder's features or on the adapted ones.

The workdir must hold the bench's embedding cache of the training split (`clipsel bench` writes it); for corrupt:F
the corrupted images' embeddings are read from, or when missing added to, the bench's cache WORKDIR/corrupt/F_seedS.
Pair noise uses CIFAR-10's pairs. For corrupt:F the kept share of each corruption kind and the ranking's AUC
against each kind alone are printed too (in the JSON lines).

    TI=../shared/data/tiny-imagenet-200-half.zip
    python scripts/bench_alignment.py --data $TI --class-names $TI:tiny-imagenet-200/words.txt \\
        --workdir out/tiny --noise symmetric:0.2 corrupt:0.2 --seeds 0 1 --ratios 0.3 0.5 0.7 --typicality 0.3
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the bench's --data (its training split is read for labels)")
    ap.add_argument("--class-names", help="the bench's --class-names (e.g. Tiny-ImageNet's words.txt): the same "
                    "names make the same prompts, so the bench's embedding cache is found")
    ap.add_argument("--workdir", required=True, help="a `clipsel bench` workdir holding the embedding cache")
    ap.add_argument("--noise", nargs="+", default=["pair:0.4", "symmetric:0.2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--refine", nargs="+", type=int, default=[1],
                    help="refit counts to measure beside the single fit (the library's default)")
    ap.add_argument("--typicality", nargs="*", type=float, default=[],
                    help="also rank by the default's c + W x a typicality term of the encoder's image features "
                         "(their norm; their cosine to their class's mean), for each weight W given")
    args = ap.parse_args(argv)

    import clipsel_jax as cs
    from clipsel_jax.adapt import AdaptConfig, adapt
    from clipsel_jax.config import DataConfig
    from clipsel_jax.data.noise import (CIFAR10_PAIRS, CORRUPTIONS, NoiseSetting, corrupt_images, pair_label_noise,
                                        symmetric_label_noise)
    from clipsel_jax.evaluate.benchmark import detection_auc
    from clipsel_jax.evaluate.splits import load_images, open_splits
    from clipsel_jax.scores import minmax, score_samples
    from clipsel_jax.selection import rank_and_take

    if any(not 1 <= r <= 10 for r in args.refine):
        ap.error("--refine takes refit counts from 1 to 10 (the single fit is always measured)")
    for spec in args.noise:  # checked before anything is loaded
        if NoiseSetting.parse(spec).kind not in ("symmetric", "pair", "corrupt"):
            ap.error(f"--noise {spec}: needs bad samples to detect (symmetric:F, pair:F or corrupt:F)")
    splits = open_splits(DataConfig(path=args.data, class_names=args.class_names))
    enc = cs.load_encoder("offline")
    prompts = ["A photo of a {}."]
    emb = cs.embed(splits.train, enc, args.workdir, prompts=prompts, progress=False)
    x0, clean, names, c = emb.image_emb, emb.labels, emb.class_names, len(emb.class_names)
    images = None
    rows = []
    for spec in args.noise:
        noise = NoiseSetting.parse(spec)
        for seed in args.seeds:
            x, labels, kind = x0, clean, None
            if noise.kind == "symmetric":
                labels, bad = symmetric_label_noise(clean, c, noise.fraction, seed=seed)
            elif noise.kind == "pair":
                labels, bad = pair_label_noise(clean, list(names), noise.fraction, CIFAR10_PAIRS, seed=seed)
            else:  # corrupt: the bench's cache of the corrupted images' embeddings (the images are re-made to know which)
                if images is None:
                    position = {int(v): i for i, v in enumerate(splits.train.ids)}
                    images = load_images(splits.train, [position[int(i)] for i in emb.ids])[0]
                corrupted, kind = corrupt_images(images, noise.fraction, seed=seed)
                bad = kind >= 0
                sub = np.flatnonzero(bad)
                src = cs.data.from_arrays(corrupted[sub], clean[sub], names, ids=emb.ids[sub])
                e = cs.embed(src, enc, f"{args.workdir}/corrupt/{noise.fraction:g}_seed{seed}", prompts=prompts,
                             progress=False)
                x = x0.copy()
                x[sub] = e.image_emb
            fits = f"{args.workdir}/alignment_fits/{str(noise).replace(':', '')}_seed{seed}"
            a = adapt(x, labels, emb.text_emb, AdaptConfig(refine=0), seed=seed, workdir=fits)
            row = {"noise": str(noise), "seed": seed, "bad": round(float(bad.mean()), 4),
                   "temperature": round(a.logit_scale, 3), "adapt_s": round(a.history["fits"][0]["seconds"], 1)}
            variants = {"cosine (paper)": dict(alignment="cosine", alpha=0.0),
                        "probability": dict(alignment="probability", alpha=0.0),
                        "cosine + 0.1 SDS": dict(alignment="cosine", alpha=0.1),
                        "probability + 0.1 SDS": dict(alignment="probability", alpha=0.1)}

            def measure(combined):
                out = {"auc": round(detection_auc(combined, bad), 4)}
                for r in args.ratios:
                    keep = rank_and_take(combined, combined, int(round(r * len(labels))), labels, c)
                    out[f"kept{r:g}"] = round(float(bad[keep].mean()) * 100, 2)
                    if kind is not None:  # which corruptions get through: each kind's share of the kept set
                        out[f"kept{r:g}_by_kind"] = {k: round(float((kind[keep] == i).mean()) * 100, 2)
                                                     for i, k in enumerate(CORRUPTIONS)}
                if kind is not None:  # and how well the ranking detects each kind (against the clean samples)
                    out["auc_by_kind"] = {}
                    for i, k in enumerate(CORRUPTIONS):
                        pool = (kind == i) | ~bad
                        out["auc_by_kind"][k] = round(detection_auc(combined[pool], kind[pool] == i), 4)
                return out

            combined = {}
            for name, v in variants.items():
                sc = score_samples(a.image, a.text, labels, v["alpha"], alignment=v["alignment"],
                                   temperature=a.logit_scale, seed=seed)
                combined[name] = sc.combined
                row[name] = measure(sc.combined)
            default = "probability + 0.1 SDS, refit"
            base_image = a.image  # the adapted image features of the ranking the typicality terms are added to
            for r in args.refine:  # the first fit is the one above, reused from its checkpoint
                ar = adapt(x, labels, emb.text_emb, AdaptConfig(refine=r), seed=seed, workdir=fits)
                sc = score_samples(ar.image, ar.text, labels, 0.1, temperature=ar.logit_scale, seed=seed)
                name = default if r == 1 else f"probability + 0.1 SDS, {r} refits"
                combined[name] = sc.combined
                if r == 1:
                    base_image = ar.image
                refits = ar.history["fits"][1:]
                row[name] = {**measure(sc.combined), "refit_s": round(sum(f["seconds"] for f in refits), 1),
                             "trusted": refits[0]["trained_on"]}
            if args.typicality:  # candidates for corrupted images: a typicality term added to the default's c
                feats = x.astype(np.float32)
                norm = np.linalg.norm(feats, axis=1)
                unit = feats / norm[:, None]
                means = np.stack([unit[labels == k].mean(0) for k in range(c)])
                prototype = (unit * (means / np.linalg.norm(means, axis=1, keepdims=True))[labels]).sum(1)
                from clipsel_jax.scores import class_typicality

                adapted_prototype = class_typicality(base_image, labels, c)  # the same, in the adapters' space
                for term_name, t in (("feature norm", norm), ("class-prototype cosine", prototype),
                                     ("class-prototype cosine, adapted", adapted_prototype)):
                    t = minmax(t)
                    for w in args.typicality:
                        base = default if default in combined else list(combined)[len(variants)]
                        row[f"{base} + {w:g} {term_name}"] = measure(combined[base] + w * t / t.mean())
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows, args.ratios))
    if any("auc_by_kind" in v for r in rows for v in r.values() if isinstance(v, dict)):
        print(kind_table(rows, args.ratios[0]))
    return 0


def kind_table(rows, ratio) -> str:
    """Markdown, corrupted settings only: per variant and corruption kind, the kind's share of the kept set at
    `ratio` (of the 1/5 of the bad share each kind holds in the full set) and the AUC against that kind alone."""
    lines = []
    for noise in dict.fromkeys(r["noise"] for r in rows):
        group = [r for r in rows if r["noise"] == noise and "auc_by_kind" in r["probability"]]
        if not group:
            continue
        kinds = list(group[0]["probability"]["auc_by_kind"])
        if not lines:
            lines = ["| noise | ranking | " + " | ".join(kinds) + " |", "| --- | --- |" + " ---: |" * len(kinds)]
        for v in [k for k in group[0] if isinstance(group[0][k], dict)]:
            cells = []
            for k in kinds:
                kept = np.mean([r[v][f"kept{ratio:g}_by_kind"][k] for r in group])
                auc = np.mean([r[v]["auc_by_kind"][k] for r in group])
                cells.append(f"{kept:.2f}% ({auc:.3f})")
            lines.append(f"| {noise} | {v} | " + " | ".join(cells) + " |")
    return f"Share of the kept set at {ratio:.0%} by corruption kind (AUC against that kind), mean over seeds:\n" + \
        "\n".join(lines)


def table(rows, ratios) -> str:
    """Markdown: per noise and variant, mean +- sd over seeds of the bad share kept at each ratio, and the AUC."""
    variants = [k for k in rows[0] if isinstance(rows[0][k], dict)]  # (a variant's other keys are not tabled)
    head = ["noise", "alignment score", *[f"bad kept at {r:.0%}" for r in ratios], "detection AUC", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for noise in dict.fromkeys(r["noise"] for r in rows):
        group = [r for r in rows if r["noise"] == noise]
        for v in variants:
            def stat(key, pct):
                vals = np.array([r[v][key] for r in group], float)
                sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
                return f"{vals.mean():.2f}% ± {sd:.2f}" if pct else f"{vals.mean():.3f} ± {sd:.3f}"
            cells = [noise, v, *[stat(f"kept{r:g}", True) for r in ratios], stat("auc", False), str(len(group))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
