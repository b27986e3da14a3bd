"""The selection-quality benchmark (`clipsel bench`, scripts/bench_quality.py): methods x keep ratios x
label-noise settings x seeds on CIFAR-10, resumable.

For each setting: the mislabeled fraction inside the kept subset, the per-class kept fractions' spread, the
selection cost (seconds), and with --train-epochs > 0 the clean-test accuracy of the small CNN trained on the
subset (clipsel_jax.evaluate; --train-steps gives every subset the same budget of SGD steps); method "full" trains
on the whole training set, the reference every subset is measured against. Embeddings of the training images are
computed once with the encoder (cached in --workdir, resumable); label noise is applied to the labels afterwards
(it does not change the images). Each finished row is appended to results.csv at once (never twice, when several
workers share the workdir), each finished selection is kept under selections/, and a rerun skips what is there.
A markdown table (results.md) and a plot (results.png) are written at the end.

    clipsel bench --data ../shared/data/cifar10-jpeg.zip --workdir out/quality \
        [--methods clipsel random moderate_ds herding k_center ccs confident_learning el2n grand forgetting full] \
        [--ratios 0.3 0.5 0.7] \
        [--noise 0.0 0.2] [--seeds 0 1 2] [--train-steps 300 --train-width 16] [--limit N]
"""

from __future__ import annotations

import csv
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np

from clipsel_jax.checks import arg_number

FIELDS = ["method", "ratio", "noise", "seed", "kept", "mislabeled_kept_frac", "mislabeled_full_frac",
          "class_frac_min", "class_frac_max", "select_s", "test_accuracy", "train_s"]


def load_images(source, limit=None) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    n = len(source) if limit is None else min(limit, len(source))
    with ThreadPoolExecutor(4) as pool:
        return np.stack(list(pool.map(source.read, range(n))))


def add_arguments(ap) -> None:
    ap.add_argument("--data", help="cifar10-jpeg.zip (train/ and test/ inside, <class>/<file>)")
    ap.add_argument("--workdir", default="out/quality", help="results, caches (resumable)")
    ap.add_argument("--encoder", default="offline")
    ap.add_argument("--methods", nargs="+", default=["clipsel", "random", "moderate_ds", "herding", "k_center", "ccs",
                                                     "confident_learning", "el2n", "grand", "forgetting", "full"],
                    help="'full' is the reference: the whole training set, one row per noise and seed (keep 1.0)")
    def count(name, lo=1):
        return arg_number(name, lo=lo, integer=True)

    ap.add_argument("--ratios", nargs="+", type=arg_number("ratio", lo=0, hi=1, lo_open=True),
                    default=[0.3, 0.5, 0.7])
    ap.add_argument("--noise", nargs="+", type=arg_number("noise", lo=0, hi=1, hi_open=True), default=[0.0, 0.2],
                    help="symmetric label-noise fractions")
    ap.add_argument("--seeds", nargs="+", type=count("seed", lo=0), default=[0, 1, 2])
    ap.add_argument("--train-epochs", type=count("train_epochs", lo=0), default=0,
                    help="train the small CNN this many epochs of each subset")
    ap.add_argument("--train-steps", type=count("train_steps", lo=0), default=0,
                    help="or a fixed budget of SGD steps (batch 128) for every subset, whatever its size")
    ap.add_argument("--train-width", type=count("train_width"), default=32,
                    help="small CNN width (also for the dynamics runs)")
    ap.add_argument("--dynamics-epochs", type=count("dynamics_epochs"), default=3,
                    help="length of the short run that scores EL2N / GraNd / Forgetting (cached per noise and seed)")
    ap.add_argument("--limit", type=count("limit"), help="first N training images (class-sorted zip: use with care)")


def run(args) -> int:
    """Run the grid (rows already in WORKDIR/results.csv are skipped); 0 when done."""
    if not args.data:
        raise ValueError("--data is required: the CIFAR-10 zip (cifar10-jpeg/train and cifar10-jpeg/test inside)")
    # Checked before hours of work, not when the grid reaches the method.
    import importlib.util

    from clipsel_jax.baselines import FEATURE_BASELINES

    known = {"clipsel", "ccs", "confident_learning", "el2n", "grand", "forgetting", "full", *FEATURE_BASELINES}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if "confident_learning" in args.methods and not all(importlib.util.find_spec(m) for m in ("cleanlab", "sklearn")):
        raise ValueError("the confident_learning baseline needs cleanlab and scikit-learn: pip install "
                         "'clipsel_jax[bench]', or leave confident_learning out of --methods")

    import clipsel_jax as cs
    from clipsel_jax import baselines as bl
    from clipsel_jax.data.noise import symmetric_label_noise
    from clipsel_jax.evaluate import TrainConfig, train_classifier

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # Every training run compiles the same step program: keep the compiled executables across runs and reruns.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    train = args.train_epochs or args.train_steps
    train_cfg = TrainConfig(epochs=args.train_epochs, min_steps=args.train_steps, width=args.train_width)
    (work / "selections").mkdir(exist_ok=True)
    train = cs.data.image_folder(f"{args.data}:cifar10-jpeg/train")
    enc = cs.load_encoder(args.encoder)
    emb = cs.embed(train, enc, work, limit=args.limit)
    clean, names, c = emb.labels, emb.class_names, len(emb.class_names)
    results = work / "results.csv"
    # Rows of one results.csv must come from one setting: refuse to mix another encoder or training budget in.
    setting = {"encoder": args.encoder, "limit": args.limit, "train_epochs": args.train_epochs,
               "train_steps": args.train_steps, "train_width": args.train_width,
               "dynamics_epochs": args.dynamics_epochs}
    setting_file = work / "setting.json"
    if setting_file.is_file() and json.loads(setting_file.read_text()) != setting:
        raise ValueError(f"{work} holds results of another setting ({setting_file.read_text().strip()}); "
                         f"use another --workdir for {json.dumps(setting)}")
    setting_file.write_text(json.dumps(setting) + "\n")
    def finished() -> set:  # rows already in results.csv (re-read before each row: several workers may share it)
        if not results.is_file():
            return set()
        with open(results) as f:
            return {(r["method"], float(r["ratio"]), float(r["noise"]), int(r["seed"])) for r in csv.DictReader(f)}

    if not results.is_file():
        with open(results, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    images = test = None
    dyn_methods = {"el2n", "grand", "forgetting"}
    if train or dyn_methods & set(args.methods):
        test_src = cs.data.image_folder(f"{args.data}:cifar10-jpeg/test")
        images, test = load_images(train, args.limit), (load_images(test_src), test_src.labels)

    def dynamics(labels, noise, seed):
        """EL2N / GraNd / Forgetting from one short run on the full (noisy) training set, cached."""
        width = "" if args.train_width == 32 else f"_width{args.train_width}"
        path = work / f"dynamics_noise{noise}_seed{seed}_epochs{args.dynamics_epochs}{width}.npz"
        if not path.is_file():
            r = train_classifier(images, labels, c, test[0], test[1], seed=seed, track_dynamics=True,
                                 config=TrainConfig(epochs=args.dynamics_epochs, width=args.train_width),
                                 progress=True)
            np.savez(path, **bl.dynamics_scores([r.dynamics]))
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    per_labels: dict = {}  # (noise, seed) -> SAS and probe predictions, shared by the ratios

    def run_method(method, ratio, noise, seed, labels):
        st = per_labels.setdefault((noise, seed), {})
        t0 = time.perf_counter()
        if method == "full":  # the reference: every sample, trained at the same budget
            idx = np.arange(len(labels))
        elif method == "clipsel":
            sel = cs.select_from_embeddings(emb.image_emb, labels, emb.text_emb, ratio, seed=seed)
            idx = sel.indices
            st["sas"] = sel.scores["sas"]
        elif method == "ccs":
            if "sas" not in st:  # importance = misalignment (1 - SAS) from the method's adapted features
                st["sas"] = cs.select_from_embeddings(emb.image_emb, labels, emb.text_emb, ratio,
                                                      seed=seed).scores["sas"]
            idx = bl.ccs(1 - st["sas"], ratio, seed=seed)
        elif method in dyn_methods:
            idx = bl.hardest(dynamics(labels, noise, seed)[method], ratio, seed)
        elif method == "confident_learning":  # one cross-validated probe per label set, all ratios
            if "probs" not in st:
                st["probs"] = bl.probe_predictions(emb.image_emb, labels, c, seed=seed)
            idx = bl.confident_learning(emb.image_emb, labels, c, ratio, seed, pred_probs=st["probs"])
        else:
            idx = bl.FEATURE_BASELINES[method](emb.image_emb, labels, c, ratio, seed)
        return np.asarray(idx), time.perf_counter() - t0

    for noise in args.noise:
        for seed in args.seeds:
            labels, flipped = symmetric_label_noise(clean, c, noise, seed=seed)
            # "full" (the whole training set) is one row per noise and seed, filed under keep ratio 1.0.
            grid = [(r, m) for r in args.ratios for m in args.methods if m != "full"]
            grid += [(1.0, "full")] if "full" in args.methods else []
            for ratio, method in grid:
                if (method, ratio, noise, seed) in finished():
                    continue
                # A finished selection is kept, so a run killed during training does not select again.
                dyn = f"_e{args.dynamics_epochs}w{args.train_width}" if method in dyn_methods else ""
                cached = work / "selections" / f"{method}{dyn}_r{ratio}_n{noise}_s{seed}.npz"
                if cached.is_file():
                    with np.load(cached) as z:
                        idx, select_s = z["indices"], float(z["select_s"])
                else:
                    idx, select_s = run_method(method, ratio, noise, seed, labels)
                    np.savez(cached, indices=idx, select_s=select_s)
                frac = np.bincount(labels[idx], minlength=c) / np.maximum(np.bincount(labels, minlength=c), 1)
                row = {"method": method, "ratio": ratio, "noise": noise, "seed": seed, "kept": len(idx),
                       "mislabeled_kept_frac": round(float(flipped[idx].mean()), 5),
                       "mislabeled_full_frac": round(float(flipped.mean()), 5),
                       "class_frac_min": round(float(frac.min()), 4), "class_frac_max": round(float(frac.max()), 4),
                       "select_s": round(select_s, 2), "test_accuracy": "", "train_s": ""}
                if train:
                    r = train_classifier(images, labels, c, test[0], test[1], indices=idx,
                                         config=train_cfg, seed=seed)
                    row.update(test_accuracy=round(r.test_accuracy, 4), train_s=r.seconds)
                # Under a lock, and only if no other worker sharing the workdir finished the same row meanwhile.
                with open(results, "a", newline="") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    if (method, ratio, noise, seed) in finished():
                        print(f"{method} keep {ratio} noise {noise} seed {seed}: another worker wrote this row "
                              "first; not added twice", file=sys.stderr)
                        continue
                    csv.DictWriter(f, FIELDS).writerow(row)
                print(json.dumps(row), flush=True)
    write_table(results, work / "results.md", names)
    write_plot(results, work / "results.png")
    print(f"results: {results}, {work / 'results.md'}, {work / 'results.png'}", file=sys.stderr)
    return 0


def write_table(results: Path, out: Path, names) -> None:
    with open(results) as f:
        rows = list(csv.DictReader(f))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["noise"], r["ratio"], r["method"]), []).append(r)
    lines = ["| noise | keep | method | mislabeled in kept (mean of seeds) | class kept min-max | test acc (mean ± sd) | "
             "select s | seeds |", "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for (noise, ratio, method), rs in sorted(groups.items()):
        mis = np.mean([float(r["mislabeled_kept_frac"]) for r in rs])
        acc = [float(r["test_accuracy"]) for r in rs if r["test_accuracy"]]
        acc_s = f"{np.mean(acc):.2%}" + (f" ± {np.std(acc):.2%}" if len(acc) > 1 else "") if acc else "-"
        lines.append(f"| {float(noise):.0%} | {float(ratio):.0%} | {method} | {mis:.2%} | "
                     f"{min(float(r['class_frac_min']) for r in rs):.2f}-"
                     f"{max(float(r['class_frac_max']) for r in rs):.2f} | "
                     f"{acc_s} | "
                     f"{np.mean([float(r['select_s']) for r in rs]):.1f} | {len(rs)} |")
    lines += ["", "Per noise level: test accuracy, mean ± sd over seeds (mislabeled share of the kept set); the best "
              "accuracy of each column in bold.", ""]
    for noise in sorted({float(k[0]) for k in groups}):
        ratios = sorted({float(k[1]) for k in groups if float(k[0]) == noise})
        methods = sorted({k[2] for k in groups if float(k[0]) == noise})
        cell, best = {}, {}
        for (nz, ratio, method), rs in groups.items():
            if float(nz) != noise:
                continue
            acc = [float(r["test_accuracy"]) for r in rs if r["test_accuracy"]]
            mis = np.mean([float(r["mislabeled_kept_frac"]) for r in rs])
            cell[(method, float(ratio))] = (np.mean(acc) if acc else None, np.std(acc) if acc else None, mis, len(rs))
        for ratio in ratios:
            accs = [v[0] for (m, r), v in cell.items() if r == ratio and v[0] is not None]
            best[ratio] = max(accs) if accs else None
        lines += [f"**{noise:.0%} label noise**", "",
                  "| method | " + " | ".join(f"keep {r:.0%}" for r in ratios) + " |",
                  "| --- |" + " ---: |" * len(ratios)]
        for m in methods:
            row = []
            for r in ratios:
                if (m, r) not in cell:
                    row.append("-")
                    continue
                acc, sd, mis, seeds = cell[(m, r)]
                a = "-" if acc is None else f"{acc:.2%} ± {sd:.2%}"
                if acc is not None and acc == best[r]:
                    a = f"**{a}**"
                row.append(f"{a} ({mis:.2%}; {seeds} seed{'s' if seeds > 1 else ''})")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text(), file=sys.stderr)


def write_plot(results: Path, out: Path) -> None:
    """Test accuracy vs keep ratio (when trained) and the mislabeled fraction of each kept set, per noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results) as f:
        rows = list(csv.DictReader(f))
    noises = sorted({float(r["noise"]) for r in rows})
    metrics = [("test_accuracy", "test accuracy"), ("mislabeled_kept_frac", "mislabeled fraction of the kept set")]
    metrics = [m for m in metrics if any(r[m[0]] for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(noises), figsize=(5.5 * len(noises), 4 * len(metrics)),
                             squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for j, noise in enumerate(noises):
        for i, (field, label) in enumerate(metrics):
            ax = axes[i][j]
            if field == "mislabeled_kept_frac" and noise == 0:
                ax.text(0.5, 0.5, "no label noise", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for m in methods:
                pts: dict = {}
                for r in rows:
                    if r["method"] == m and float(r["noise"]) == noise and r[field]:
                        pts.setdefault(float(r["ratio"]), []).append(float(r[field]))
                if pts and m == "full":  # a reference level, not a curve over ratios
                    ax.axhline(np.mean(pts[1.0]), color="k", ls="--", lw=1, label="full set")
                elif pts:
                    xs = sorted(pts)
                    ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[np.std(pts[x]) for x in xs], marker="o",
                                capsize=3, label=m, lw=2.5 if m == "clipsel" else 1)
            ax.set_title(f"{noise:.0%} label noise")
            ax.set_xlabel("keep ratio")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


