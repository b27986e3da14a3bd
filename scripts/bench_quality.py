"""Selection quality on CIFAR-10: methods x keep ratios x label-noise settings x seeds, resumable.

For each setting: the mislabeled fraction inside the kept subset, the per-class kept fractions' spread, the
selection cost (seconds), and with --train-epochs > 0 the clean-test accuracy of the small CNN trained on the
subset (clipsel_jax.evaluate). Embeddings of the training images are computed once with the encoder (cached in
--workdir, resumable); label noise is applied to the labels afterwards (it does not change the images). Each
finished row is appended to results.csv at once; a rerun skips rows already there. A markdown table is written
at the end.

    python scripts/bench_quality.py --data ../shared/data/cifar10-jpeg.zip --workdir out/quality \
        [--methods clipsel random moderate_ds herding k_center ccs confident_learning el2n grand forgetting] \
        [--ratios 0.3 0.5 0.7] \
        [--noise 0.0 0.2] [--seeds 0 1 2] [--train-epochs 0] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

FIELDS = ["method", "ratio", "noise", "seed", "kept", "mislabeled_kept_frac", "mislabeled_full_frac",
          "class_frac_min", "class_frac_max", "select_s", "test_accuracy", "train_s"]


def load_images(source, limit=None) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    n = len(source) if limit is None else min(limit, len(source))
    with ThreadPoolExecutor(4) as pool:
        return np.stack(list(pool.map(source.read, range(n))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.zip")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--encoder", default="offline")
    ap.add_argument("--methods", nargs="+", default=["clipsel", "random", "moderate_ds", "herding", "k_center", "ccs",
                                                     "confident_learning", "el2n", "grand", "forgetting"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2], help="symmetric label-noise fractions")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-epochs", type=int, default=0, help="0: selection metrics only")
    ap.add_argument("--dynamics-epochs", type=int, default=3,
                    help="length of the short run that scores EL2N / GraNd / Forgetting (cached per noise and seed)")
    ap.add_argument("--limit", type=int, help="first N training images (class-sorted zip: use with care)")
    args = ap.parse_args()

    import clipsel_jax as cs
    from clipsel_jax import baselines as bl
    from clipsel_jax.data.noise import symmetric_label_noise
    from clipsel_jax.evaluate import TrainConfig, train_classifier

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train = cs.data.image_folder(f"{args.data}:cifar10-jpeg/train")
    enc = cs.load_encoder(args.encoder)
    emb = cs.embed(train, enc, work, limit=args.limit)
    clean, names, c = emb.labels, emb.class_names, len(emb.class_names)
    results = work / "results.csv"
    done = set()
    if results.is_file():
        with open(results) as f:
            done = {(r["method"], float(r["ratio"]), float(r["noise"]), int(r["seed"])) for r in csv.DictReader(f)}
    else:
        with open(results, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    images = test = None
    dyn_methods = {"el2n", "grand", "forgetting"}
    if args.train_epochs or dyn_methods & set(args.methods):
        test_src = cs.data.image_folder(f"{args.data}:cifar10-jpeg/test")
        images, test = load_images(train, args.limit), (load_images(test_src), test_src.labels)

    def dynamics(labels, noise, seed):
        """EL2N / GraNd / Forgetting from one short run on the full (noisy) training set, cached."""
        path = work / f"dynamics_noise{noise}_seed{seed}_epochs{args.dynamics_epochs}.npz"
        if not path.is_file():
            r = train_classifier(images, labels, c, test[0], test[1], seed=seed, track_dynamics=True,
                                 config=TrainConfig(epochs=args.dynamics_epochs), progress=True)
            np.savez(path, **bl.dynamics_scores([r.dynamics]))
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    for noise in args.noise:
        for seed in args.seeds:
            labels, flipped = symmetric_label_noise(clean, c, noise, seed=seed)
            sas = probs = None
            for ratio in args.ratios:
                for method in args.methods:
                    key = (method, ratio, noise, seed)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    if method == "clipsel":
                        sel = cs.select_from_embeddings(emb.image_emb, labels, emb.text_emb, ratio, seed=seed)
                        idx, sas = sel.indices, sel.scores["sas"]
                    elif method == "ccs":
                        if sas is None:  # importance = misalignment (1 - SAS) from the method's adapted features
                            sas = cs.select_from_embeddings(emb.image_emb, labels, emb.text_emb, ratio,
                                                            seed=seed).scores["sas"]
                        idx = bl.ccs(1 - sas, ratio, seed=seed)
                    elif method in dyn_methods:
                        idx = bl.hardest(dynamics(labels, noise, seed)[method], ratio, seed)
                    elif method == "confident_learning":  # one cross-validated probe per label set, all ratios
                        if probs is None:
                            probs = bl.probe_predictions(emb.image_emb, labels, c, seed=seed)
                        idx = bl.confident_learning(emb.image_emb, labels, c, ratio, seed, pred_probs=probs)
                    else:
                        idx = bl.FEATURE_BASELINES[method](emb.image_emb, labels, c, ratio, seed)
                    select_s = time.perf_counter() - t0
                    frac = np.bincount(labels[idx], minlength=c) / np.maximum(np.bincount(labels, minlength=c), 1)
                    row = {"method": method, "ratio": ratio, "noise": noise, "seed": seed, "kept": len(idx),
                           "mislabeled_kept_frac": round(float(flipped[idx].mean()), 5),
                           "mislabeled_full_frac": round(float(flipped.mean()), 5),
                           "class_frac_min": round(float(frac.min()), 4), "class_frac_max": round(float(frac.max()), 4),
                           "select_s": round(select_s, 2), "test_accuracy": "", "train_s": ""}
                    if args.train_epochs:
                        r = train_classifier(images, labels, c, test[0], test[1], indices=idx,
                                             config=TrainConfig(epochs=args.train_epochs), seed=seed)
                        row.update(test_accuracy=round(r.test_accuracy, 4), train_s=r.seconds)
                    with open(results, "a", newline="") as f:
                        csv.DictWriter(f, FIELDS).writerow(row)
                    print(json.dumps(row), flush=True)
    write_table(results, work / "results.md", names)


def write_table(results: Path, out: Path, names) -> None:
    with open(results) as f:
        rows = list(csv.DictReader(f))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["noise"], r["ratio"], r["method"]), []).append(r)
    lines = ["| noise | keep | method | mislabeled in kept (mean of seeds) | class kept min-max | test acc | "
             "select s | seeds |", "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for (noise, ratio, method), rs in sorted(groups.items()):
        mis = np.mean([float(r["mislabeled_kept_frac"]) for r in rs])
        acc = [float(r["test_accuracy"]) for r in rs if r["test_accuracy"]]
        lines.append(f"| {float(noise):.0%} | {float(ratio):.0%} | {method} | {mis:.2%} | "
                     f"{min(float(r['class_frac_min']) for r in rs):.2f}-"
                     f"{max(float(r['class_frac_max']) for r in rs):.2f} | "
                     f"{(f'{np.mean(acc):.2%}' if acc else '-')} | "
                     f"{np.mean([float(r['select_s']) for r in rs]):.1f} | {len(rs)} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
