"""The selection-quality benchmark (`clipsel bench`, scripts/bench_quality.py): methods x keep ratios x noise
settings x seeds on any labeled image data set with a test split, resumable.

Noise settings (``--noise``, clipsel_jax.data.noise.NoiseSetting): ``symmetric:F`` (F of the labels moved to another
class drawn uniformly), ``pair:F`` (class-dependent: F of each listed class filed under its look-alike; CIFAR-10's
standard pairs, or ``--pair-map``), ``corrupt:F`` (F of the images corrupted by the five kinds of
noise.corrupt_images, labels clean), ``none``. The "noisy" samples are the mislabeled or corrupted ones.

For each setting the row holds: the noisy share of the kept subset; for methods that rank samples, the ROC-AUC of
that ranking as a detector of the noisy samples (1 = every clean sample ranked above every noisy one, 0.5 =
chance; clipsel and CCS: the alignment score SAS; confident learning: the probe's self-confidence; Moderate-DS:
closeness to the class's median distance; EL2N / GraNd / Forgetting: the score, hardest kept first); the per-class
kept fractions' spread; the selection's seconds; and with a training budget, the clean-test accuracy of each
--archs model trained on the subset. Two references: ``full`` (every sample, at the same budget) and ``oracle`` (a
random subset of the truly clean samples with the same class quotas: a perfect noise filter).

The training images are embedded once with the encoder (cached in --workdir, resumable); label noise changes only
the labels; corrupted images are embedded once per fraction and seed (only they: cached under corrupt/); the
adapters (adapters/), confident learning's probe (probe/) and the training dynamics are computed once per label set
and cached (a probe or dynamics file is read back only if it holds exactly the arrays this run expects). Each
finished row is appended to results.csv at once (never twice, when several workers share the workdir), each
finished selection is kept under selections/, and a rerun skips what is there. A markdown table (results.md) and a
plot (results.png) are written at the end.

    clipsel bench --data ../shared/data/cifar10-jpeg.zip --workdir out/quality \\
        [--methods clipsel random moderate_ds herding k_center ccs confident_learning el2n grand forgetting full
         oracle] [--ratios 0.3 0.5 0.7] [--noise symmetric:0.2 pair:0.4 corrupt:0.2 none] [--seeds 0 1 2] \\
        [--train-steps 300 --train-width 16 --archs small_cnn resnet18] [--train-image-size 32]
"""

from __future__ import annotations

import csv
import fcntl
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsel_jax.checks import arg_number
from clipsel_jax.data.noise import NoiseSetting

FIELDS = ["method", "arch", "ratio", "noise", "seed", "kept", "noisy_kept_frac", "noisy_full_frac", "detect_auc",
          "class_frac_min", "class_frac_max", "select_s", "test_accuracy", "train_s"]
DYNAMICS = ("el2n", "grand", "forgetting")
REFERENCES = ("full", "oracle")
DEFAULT_METHODS = ["clipsel", "clipsel_paper", "random", "moderate_ds", "herding", "k_center", "ccs",
                   "confident_learning", *DYNAMICS, "full", "oracle"]


def detection_auc(keep_score, noisy) -> float | None:
    """ROC-AUC of a method's preference (higher = kept first) as a detector of the noisy samples: the chance that a
    clean sample outranks a noisy one (ties count half). None when one of the two groups is empty."""
    from scipy.stats import rankdata

    s, bad = np.asarray(keep_score, np.float64), np.asarray(noisy, bool)
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad == 0 or n_good == 0:
        return None
    ranks = rankdata(s)  # 1 = lowest preference
    return float((ranks[~bad].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def add_arguments(ap) -> None:
    g = ap.add_argument_group("data")
    g.add_argument("--data", help="a folder or .zip holding train/ and test/ (or val/), at its top or in its one "
                                  "top-level folder (CIFAR-10's and Tiny-ImageNet's zips); or the training split "
                                  "(folder, zip, ZIP:inner/folder) with --test-data; or tfds:NAME")
    g.add_argument("--test-data", help="the test split (folder, zip, ZIP:inner/folder), same class folders")
    g.add_argument("--train-split", default="train", help="TFDS split to select from (tfds:NAME)")
    g.add_argument("--test-split", default="test", help="TFDS split to test on (tfds:NAME)")
    g.add_argument("--class-names", help="readable class names for the prompts: JSON list/object or words.txt-style "
                                         "'id name' lines (Tiny-ImageNet's words.txt)")
    g.add_argument("--config", help="a config file or packaged name (configs/): its data section is the training "
                                    "split, its encoder, prompts, adapt, scores and selection sections set up the "
                                    "encoder and clipsel; --data/--class-names/--encoder override it")
    ap.add_argument("--workdir", default="out/quality", help="results, caches (resumable)")
    ap.add_argument("--encoder", help="default: the config's, else offline")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                    help="'full' (every sample) and 'oracle' (a random subset of the clean samples, same class "
                         "quotas) are the references; full is one row per noise and seed (keep 1.0)")

    def count(name, lo=1):
        return arg_number(name, lo=lo, integer=True)

    def noise(text):
        try:
            return NoiseSetting.parse(text)
        except ValueError as e:
            import argparse

            raise argparse.ArgumentTypeError(str(e)) from None

    ap.add_argument("--ratios", nargs="+", type=arg_number("ratio", lo=0, hi=1, lo_open=True),
                    default=[0.3, 0.5, 0.7])
    ap.add_argument("--noise", nargs="+", type=noise, default=[NoiseSetting(), NoiseSetting("symmetric", 0.2)],
                    help="noise settings: none, symmetric:F, pair:F, corrupt:F (a bare F is symmetric); "
                         "default: none symmetric:0.2")
    ap.add_argument("--pair-map", help="for pair noise on data sets other than CIFAR-10: a JSON object "
                                       "{class: the class it is mistaken for} (class names as in the folders or "
                                       "the readable names)")
    ap.add_argument("--seeds", nargs="+", type=count("seed", lo=0), default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=["small_cnn"], choices=["small_cnn", "resnet18"],
                    help="models trained on every subset (with a training budget)")
    ap.add_argument("--train-epochs", type=count("train_epochs", lo=0), default=0,
                    help="train each --archs model this many epochs of each subset")
    ap.add_argument("--train-steps", type=count("train_steps", lo=0), default=0,
                    help="or a fixed budget of SGD steps (batch 128) for every subset, whatever its size")
    ap.add_argument("--train-width", type=count("train_width"),
                    help="width of the trained models (default: small CNN 32, ResNet-18 64; also the dynamics runs)")
    ap.add_argument("--train-image-size", type=count("train_image_size", lo=8),
                    help="train and test the models on images resized to N x N (e.g. 32 for Tiny-ImageNet's 64x64 "
                         "on a CPU; also the dynamics runs); default: as stored")
    ap.add_argument("--dynamics-epochs", type=count("dynamics_epochs"), default=3,
                    help="length of the short run that scores EL2N / GraNd / Forgetting (cached per noise and seed)")
    ap.add_argument("--per-class", type=count("per_class"),
                    help="only the first N training images of each class (a smaller, still balanced grid)")
    ap.add_argument("--limit", type=count("limit"), help="first N training images (class-sorted folders: use with "
                                                         "care; --per-class keeps every class)")


def read_cached(path: Path, expect: dict) -> dict | None:
    """The arrays of a cache file the bench wrote (np.savez), if it holds exactly what this run needs, else None
    (with the reason on stderr, and the caller computes them again). expect: name -> (shape, dtype kind), a shape of
    None for any; a `labels` entry is also compared by value by the caller. Never unpickles (allow_pickle=False):
    a cache in a shared workdir is a file from someone else."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in expect}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # truncated, not an npz, a pickled object (refused by allow_pickle=False), a key missing
        reason = f"unreadable: {e}"
    else:
        bad = []
        for k, (shape, kind) in expect.items():
            a = out[k]
            if a.dtype.kind not in kind:
                bad.append(f"{k} of type {a.dtype}, expected kind {kind!r}")
            elif shape is not None and a.shape != shape:
                bad.append(f"{k} of shape {a.shape}, expected {shape}")
            elif a.dtype.kind == "f" and not np.isfinite(a).all():
                bad.append(f"{k} holds non-finite values")
        if not bad:
            return out
        reason = "; ".join(bad)
    print(f"bench: {path} is not a usable cache ({reason}); computing it again", file=sys.stderr)
    return None


def write_cached(path: Path, **arrays) -> None:
    """np.savez through a temporary file and a rename (the embedding cache's writer): a kill leaves the old file or
    none, never half of one."""
    from clipsel_jax.embedding import savez_file, write_atomic

    write_atomic(path, lambda tmp: savez_file(tmp, **arrays))


@dataclass
class Noisy:
    """One training set as a method sees it: labels and image features after the noise, and which are noisy."""
    labels: np.ndarray
    noisy: np.ndarray  # bool: mislabeled or corrupted
    image_emb: np.ndarray
    images: np.ndarray | None  # for training (corrupted ones replaced); None when nothing trains


def _run_config(args):
    """The RunConfig of --config with the bench's own data/encoder options on top."""
    from clipsel_jax import config

    given = {"data.path": args.data, "data.class_names": args.class_names, "encoder.name": args.encoder}
    try:
        nested = config.read_config_file(args.config) if args.config else {}
        return config.build(nested, {k: v for k, v in given.items() if v is not None},
                            where=f"config {args.config}" if args.config else "options")
    except config.ConfigError as e:
        raise ValueError(str(e)) from None


def _check_methods(methods) -> None:
    import importlib.util

    from clipsel_jax.baselines import FEATURE_BASELINES

    known = {"clipsel", "clipsel_paper", "ccs", *DYNAMICS, *REFERENCES, *FEATURE_BASELINES}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if "confident_learning" in methods and not all(importlib.util.find_spec(m) for m in ("cleanlab", "sklearn")):
        raise ValueError("the confident_learning baseline needs cleanlab and scikit-learn: pip install "
                         "'clipsel_jax[bench]', or leave confident_learning out of --methods")


def _pairs(args, names, stored):
    """(class names the pairs are written in, {class: look-alike}) for pair noise."""
    from clipsel_jax.data.noise import CIFAR10_PAIRS

    if args.pair_map:
        try:
            pairs = json.loads(Path(args.pair_map).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--pair-map {args.pair_map!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--pair-map {args.pair_map}: not JSON ({e})") from None
        if not isinstance(pairs, dict) or not pairs or not all(isinstance(v, str) for v in pairs.values()):
            raise ValueError(f"--pair-map {args.pair_map}: expected a JSON object {{class: class}}")
    else:
        pairs = CIFAR10_PAIRS
    used = {n for kv in pairs.items() for n in kv}
    for space in (names, stored):
        if used <= set(space):
            return list(space), pairs
    raise ValueError(f"pair noise: the pairs name classes this data set does not have "
                     f"({sorted(used - set(names))[:5]}); " + ("fix --pair-map" if args.pair_map else
                     "CIFAR-10's pairs are the default: give --pair-map FILE, a JSON object {class: the class it "
                     "is mistaken for}, for other data sets"))


def run(args) -> int:
    """Run the grid (rows already in WORKDIR/results.csv are skipped); 0 when done."""
    import jax

    import clipsel_jax as cs
    from clipsel_jax.evaluate.splits import load_images, open_splits
    from clipsel_jax.workdir_lock import hold_workdir

    # Everything checked before hours of work, not when the grid reaches it.
    _check_methods(args.methods)
    cfg = _run_config(args)
    splits = open_splits(cfg.data, args.test_data, args.train_split, args.test_split)
    if any(n.kind == "pair" for n in args.noise):
        pair_names, pairs = _pairs(args, splits.train.class_names, splits.stored_names)
    budget = args.train_epochs or args.train_steps  # 0: no training, selection metrics only
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "selections").mkdir(exist_ok=True)
    results = work / "results.csv"
    # Rows of one results.csv come from one setting: refuse to mix another data set, encoder or budget in.
    setting = {"data": splits.where, "class_names": cfg.data.class_names, "encoder": cfg.encoder.name or "offline",
               "limit": args.limit, "per_class": args.per_class, "train_epochs": args.train_epochs,
               "train_steps": args.train_steps, "train_width": args.train_width,
               "train_image_size": args.train_image_size,
               "dynamics_epochs": args.dynamics_epochs, "pair_map": args.pair_map}
    if args.config:  # its method sections drive clipsel (a key absent from earlier setting files reads as None)
        setting["config"] = args.config
    setting_file = work / "setting.json"
    if setting_file.is_file():
        # Trained rows may be added to a workdir of selection-only rows (no budget yet), never mixed across budgets.
        before = json.loads(setting_file.read_text())
        untrained = not (before.get("train_epochs") or before.get("train_steps"))
        training = {"train_epochs", "train_steps", "train_width", "train_image_size"}
        if any(before.get(k) != setting.get(k) for k in {*before, *setting} if not (untrained and k in training)):
            raise ValueError(f"{work} holds results of another setting ({setting_file.read_text().strip()}); "
                             f"use another --workdir for {json.dumps(setting)}")
    if results.is_file():
        with open(results) as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise ValueError(f"{results} has other columns ({','.join(header)}): written by an earlier clipsel "
                             "bench; use another --workdir")
    setting_file.write_text(json.dumps(setting) + "\n")
    if not results.is_file():
        with open(results, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    print(f"bench: {splits.where}; {len(splits.train)} training images, {len(splits.test)} test images, "
          f"{len(splits.train.class_names)} classes", file=sys.stderr)

    # Every training run compiles the same step program: keep the compiled executables across runs and reruns.
    jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    enc = cs.load_encoder(setting["encoder"])
    prompts = list(cfg.embed.prompts)
    with hold_workdir(work, wait=True):  # workers sharing the workdir embed once, the others wait for the cache
        emb = cs.embed(splits.train, enc, work, prompts=prompts, limit=args.limit)
    rows_kept = np.arange(len(emb.labels))
    if args.per_class:
        rows_kept = np.concatenate([np.flatnonzero(emb.labels == c)[:args.per_class]
                                    for c in range(len(emb.class_names))])
    base_emb, clean, ids = emb.image_emb[rows_kept], emb.labels[rows_kept], emb.ids[rows_kept]
    names, c = emb.class_names, len(emb.class_names)
    if emb.unreadable:
        print(f"bench: {len(emb.unreadable)} unreadable training images left out (unreadable.json)", file=sys.stderr)

    def finished() -> set:  # rows already in results.csv (re-read before each row: several workers may share it)
        with open(results) as f:
            return {(r["method"], r["arch"], float(r["ratio"]), r["noise"], int(r["seed"]))
                    for r in csv.DictReader(f)}

    corrupting = any(n.kind == "corrupt" for n in args.noise)
    images = test = None
    if budget or corrupting or set(DYNAMICS) & set(args.methods):
        position = {int(v): i for i, v in enumerate(splits.train.ids)}  # embedded samples' ids -> source positions
        images = load_images(splits.train, [position[int(i)] for i in ids])[0]
    if budget or set(DYNAMICS) & set(args.methods):
        test_images, kept = load_images(splits.test, skip_unreadable=True)
        test = (test_images, np.asarray(splits.test.labels)[kept])

    def noisy_set(noise: NoiseSetting, seed: int) -> Noisy:
        from clipsel_jax.data.noise import corrupt_images, pair_label_noise, symmetric_label_noise

        if noise.kind == "symmetric":
            labels, flipped = symmetric_label_noise(clean, c, noise.fraction, seed=seed)
            return Noisy(labels, flipped, base_emb, images)
        if noise.kind == "pair":
            labels, flipped = pair_label_noise(clean, pair_names, noise.fraction, pairs, seed=seed)
            return Noisy(labels, flipped, base_emb, images)
        if noise.kind == "corrupt":  # only the corrupted images are embedded, once per fraction and seed
            corrupted, kind = corrupt_images(images, noise.fraction, seed=seed)
            bad = kind >= 0
            rows = np.flatnonzero(bad)
            cache = work / "corrupt" / f"{noise.fraction:g}_seed{seed}"
            src = cs.data.from_arrays(corrupted[rows], clean[rows], names, ids=ids[rows])
            with hold_workdir(cache, wait=True):
                e = cs.embed(src, enc, cache, prompts=prompts)
            image_emb = base_emb.copy()
            image_emb[rows] = e.image_emb
            return Noisy(clean, bad, image_emb, corrupted)
        return Noisy(clean, np.zeros(len(clean), bool), base_emb, images)

    def dynamics(data: Noisy, noise, seed):
        """EL2N / GraNd / Forgetting from one short run on the full (noisy) training set, cached."""
        from clipsel_jax import baselines as bl
        from clipsel_jax.evaluate import TrainConfig, train_classifier

        width = "" if args.train_width is None else f"_width{args.train_width}"
        width += "" if args.train_image_size is None else f"_size{args.train_image_size}"
        path = work / f"dynamics_{str(noise).replace(':', '')}_seed{seed}_epochs{args.dynamics_epochs}{width}.npz"
        n = (len(data.labels),)
        scores = read_cached(path, {k: (n, "f") for k in ("el2n", "grand", "forgetting")})
        if scores is None:
            r = train_classifier(data.images, data.labels, c, test[0], test[1], seed=seed, track_dynamics=True,
                                 config=TrainConfig(epochs=args.dynamics_epochs, width=args.train_width,
                                                    image_size=args.train_image_size),
                                 progress=not getattr(args, "quiet", False))
            scores = bl.dynamics_scores([r.dynamics])
            write_cached(path, **scores)
        return scores

    def probe(data: Noisy, noise, seed):
        """Confident learning's out-of-fold probe predictions of this label set and the seconds they took, computed
        once and cached under WORKDIR/probe/ for every ratio, rerun and worker (the 5-fold probe over Tiny-ImageNet's
        200 classes takes 7-10 min here). The cache is used only if it was made from exactly these labels."""
        from clipsel_jax import baselines as bl

        where = work / "probe" / f"{str(noise).replace(':', '')}_seed{seed}"
        path = where / "probs.npz"
        with hold_workdir(where, wait=True):  # another worker computing the same probe: wait, reuse
            z = read_cached(path, {"probs": ((len(data.labels), c), "f"), "labels": (data.labels.shape, "iu"),
                                   "seconds": ((), "f")})
            if z is not None and np.array_equal(z["labels"], data.labels) and z["seconds"] >= 0 \
                    and z["probs"].min() >= 0 and z["probs"].max() <= 1:
                return z["probs"], float(z["seconds"])
            if z is not None:
                print(f"bench: {path} holds the probe of another label set or invalid probabilities; computing "
                      "it again", file=sys.stderr)
            t = time.perf_counter()
            probs = bl.probe_predictions(data.image_emb, data.labels, c, seed=seed)
            seconds = time.perf_counter() - t
            write_cached(path, probs=probs, labels=data.labels, seconds=np.float64(seconds))
            return probs, seconds

    per_set: dict = {}  # SAS and probe predictions of the current noisy set, shared by the ratios

    def run_method(method, ratio, noise, seed, data: Noisy):
        """(kept indices, seconds, the method's preference per sample or None)."""
        from clipsel_jax import baselines as bl

        st = per_set.setdefault((str(noise), seed), {})
        labels, x = data.labels, data.image_emb
        t0, score = time.perf_counter(), None
        options = cfg.selection_options()

        def adapted(method):
            """The adaptation stage of this label set for `method` (its refine preset), trained once and reused by
            every ratio, method and worker (each fit checkpointed under WORKDIR/adapters/: the paper's single fit is
            clipsel's first). Each row that uses it is charged the training time of every fit it needs, as recorded
            when that fit was trained, so that select_s stays the cost of one whole selection."""
            from clipsel_jax.pipeline import method_adapter

            adapter = method_adapter(method, options["adapter"])
            key = ("adapted", adapter.refine if adapter is not None else 0)
            if key not in st:
                from clipsel_jax.adapt import adapt

                where = work / "adapters" / f"{str(noise).replace(':', '')}_seed{seed}"
                t = time.perf_counter()
                with hold_workdir(where, wait=True):  # another worker training the same adapters: wait, reuse
                    a = adapt(x, labels, emb.text_emb, adapter, seed=seed, workdir=where)
                spent = 0.0
                for i, fit in enumerate(a.history["fits"] if a.history else []):
                    record = where / ("adapt_s.json" if i == 0 else f"adapt_refit{i}_s.json")
                    if fit["resumed_from"] == fit["epochs"] and record.is_file():
                        spent += json.loads(record.read_text())["seconds"]  # reused: what training it took
                    else:
                        record.write_text(json.dumps({"seconds": fit["seconds"]}) + "\n")
                        spent += fit["seconds"]
                st[key] = (a, spent, time.perf_counter() - t)
            a, spent, here = st[key]
            st["adapt_s"] = spent  # this row's charge, of which `here` was spent inside it (see run_method's end)
            st["adapt_here_s"] = st.get("adapt_here_s", 0.0) + here
            st[key] = (a, spent, 0.0)  # a later row of this label set spends nothing here
            return a

        def select_adapted(r, method):
            a = adapted(method)
            return cs.select_from_embeddings(a.image, labels, a.text, r, seed=seed, typicality_features=x,
                                             **{**options, "adapter": None, "method": method,
                                                "temperature": options["temperature"] or a.logit_scale})

        def sas():
            adapted("clipsel")  # sets this row's charge: the adapters clipsel's SAS comes from
            if "sas" not in st:  # importance = misalignment (1 - SAS) from the method's adapted features
                st["sas"] = clipsel(ratio).scores["sas"]
            return st["sas"]

        def clipsel(r):
            return select_adapted(r, options["method"])

        def paper(r):  # the paper's method: the config's settings with method="paper"
            return select_adapted(r, "paper")

        if method == "full":  # the reference: every sample, trained at the same budget
            idx = np.arange(len(labels))
        elif method == "oracle":  # a perfect noise filter: clean samples only, the same class quotas
            idx = bl.random_subset(labels, c, ratio, seed, candidates=np.flatnonzero(~data.noisy))
        elif method in ("clipsel", "clipsel_paper"):  # score: the ranking the selection keeps the top of
            sel = clipsel(ratio) if method == "clipsel" else paper(ratio)
            idx, score = sel.indices, sel.scores["combined"]
            if method == "clipsel":
                st["sas"] = sel.scores["sas"]
        elif method == "ccs":
            score = sas()
            idx = bl.ccs(1 - score, ratio, seed=seed)
        elif method in DYNAMICS:
            score = dynamics(data, noise, seed)[method]
            idx = bl.hardest(score, ratio, seed)
        elif method == "confident_learning":  # one cross-validated probe per label set, all ratios
            if "probs" not in st:
                t = time.perf_counter()
                st["probs"], st["probe_s"] = probe(data, noise, seed)
                t0 += time.perf_counter() - t  # charged below as the probe took when it was computed
            idx = bl.confident_learning(x, labels, c, ratio, seed, pred_probs=st["probs"])
            score = st["probs"][np.arange(len(labels)), labels]  # self-confidence
        elif method == "moderate_ds":
            idx = bl.moderate_ds(x, labels, c, ratio, seed)
            score = bl.moderate_ds_scores(x, labels, c)
        else:
            idx = bl.FEATURE_BASELINES[method](x, labels, c, ratio, seed)
        seconds = time.perf_counter() - t0
        if method in ("clipsel", "clipsel_paper", "ccs") and "adapt_s" in st:
            seconds += st["adapt_s"] - st.pop("adapt_here_s", 0.0)  # the adapters' training, once per row
        if method == "confident_learning":
            seconds += st["probe_s"]  # every ratio's row: the probe is part of one whole selection
        return np.asarray(idx), seconds, score

    def write_row(row) -> None:
        key = (row["method"], row["arch"], float(row["ratio"]), row["noise"], int(row["seed"]))
        # Under a lock, and only if no other worker sharing the workdir finished the same row meanwhile.
        with open(results, "a", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if key in finished():
                print(f"{' '.join(map(str, key))}: another worker wrote this row first; not added twice",
                      file=sys.stderr)
                return
            csv.DictWriter(f, FIELDS).writerow(row)
        print(json.dumps(row), flush=True)

    archs = list(args.archs) if budget else [""]
    for noise in args.noise:
        for seed in args.seeds:
            data = None  # made when the first unfinished row of this noise and seed needs it
            grid = [(r, m) for r in args.ratios for m in args.methods if m != "full"]
            grid += [(1.0, "full")] if "full" in args.methods else []
            for ratio, method in grid:
                todo = [a for a in archs if (method, a, ratio, str(noise), seed) not in finished()]
                if not todo:
                    continue
                if data is None:
                    data = noisy_set(noise, seed)
                    per_set.clear()
                # A finished selection is kept, so a run killed during training does not select again.
                dyn = f"_e{args.dynamics_epochs}w{args.train_width}" if method in DYNAMICS else ""
                dyn += f"s{args.train_image_size}" if dyn and args.train_image_size else ""
                cached = work / "selections" / f"{method}{dyn}_r{ratio}_{str(noise).replace(':', '')}_s{seed}.npz"
                if cached.is_file():
                    with np.load(cached) as z:
                        idx, select_s = z["indices"], float(z["select_s"])
                        score = z["score"] if "score" in z.files else None
                else:
                    idx, select_s, score = run_method(method, ratio, noise, seed, data)
                    np.savez(cached, indices=idx, select_s=select_s,
                             **({} if score is None else {"score": score}))
                labels = data.labels
                frac = np.bincount(labels[idx], minlength=c) / np.maximum(np.bincount(labels, minlength=c), 1)
                auc = None if score is None else detection_auc(score, data.noisy)
                row = {"method": method, "ratio": ratio, "noise": str(noise), "seed": seed, "kept": len(idx),
                       "noisy_kept_frac": round(float(data.noisy[idx].mean()), 5),
                       "noisy_full_frac": round(float(data.noisy.mean()), 5),
                       "detect_auc": "" if auc is None else round(auc, 4),
                       "class_frac_min": round(float(frac.min()), 4), "class_frac_max": round(float(frac.max()), 4),
                       "select_s": round(select_s, 2), "test_accuracy": "", "train_s": ""}
                for arch in todo:
                    row = {**row, "arch": arch}
                    if budget:
                        from clipsel_jax.evaluate import TrainConfig, train_classifier

                        r = train_classifier(data.images, labels, c, test[0], test[1], indices=idx, seed=seed,
                                             config=TrainConfig(model=arch, epochs=args.train_epochs,
                                                                min_steps=args.train_steps, width=args.train_width,
                                                                image_size=args.train_image_size),
                                             progress=not getattr(args, "quiet", False))  # runs of many minutes
                        row.update(test_accuracy=round(r.test_accuracy, 4), train_s=r.seconds)
                    write_row(row)
    from clipsel_jax.evaluate.tables import write_plot, write_table

    write_table(results, work / "results.md")
    write_plot(results, work / "results.png")
    print(f"results: {results}, {work / 'results.md'}, {work / 'results.png'}", file=sys.stderr)
    return 0
