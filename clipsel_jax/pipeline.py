"""The method end to end: the stages composed. ``select_from_embeddings`` (arrays in) is the library's heart,
``select`` (a data source in) adds embedding and the output files.

Each stage is one public function in its own module, and the command line composes the same functions:

    embedding.embed          source -> Embeddings (image and prompt features; cached, resumable)
    adapt.adapt              features -> Adapted (both in the adapters' shared space; checkpointed)
    scores.score_samples     aligned features -> Scores (SAS, SDS, combined score, preferred class)
    selection.optimise       combined score -> Optimised (the keep-mask's ranking key; checkpointed)
    selection.rank_and_take  ranking key -> exactly k indices (per class, or globally)
    report.write_outputs     Selection -> selection.npz, scores.csv, meta.json (write_report: report.html)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from clipsel_jax import checks, parallel
from clipsel_jax.adapt import DEFAULT_REFINE, AdaptConfig, adapt
from clipsel_jax.ckpt import Checkpointer
from clipsel_jax.scores import ALIGNMENTS, DEFAULT_TEMPERATURE, DiversityConfig, diversity_settings, score_samples
from clipsel_jax.selection import SelectionConfig, optimise, rank_and_take
from clipsel_jax.workdir import RunDir
from clipsel_jax.workdir_lock import with_workdir_lock


@dataclass
class Selection:
    indices: np.ndarray  # sorted int64 indices of the kept samples, len == round(ratio * N)
    mask: np.ndarray  # bool (N,), True = kept
    scores: dict  # float32 (N,): "sas" (the alignment score used: meta["alignment"]; higher = better aligned),
    #                "cosine" (the paper's SAS), "sds" (mean kNN distance; higher = more diverse), "combined" (c of
    #                the loss; higher = kept first)
    meta: dict = field(default_factory=dict)
    # int64 (N,): the class whose (adapted) prompt each image is closest to; != label marks a likely mislabel.
    preferred_class: np.ndarray | None = None
    ids: np.ndarray | None = None  # int64 (N,): the samples' ids in their source (default 0..N-1); kept: ids[indices]
    # float32 (N,): the probability that the image picks preferred_class's prompt among all C (what relabelling
    # goes by: clipsel export --relabel)
    preferred_confidence: np.ndarray | None = None
    labels: np.ndarray | None = None  # int64 (N,): the given labels the selection was made with


def _validate(image_emb, labels, text_emb, ratio):
    image_emb = np.asarray(image_emb)
    text_emb = np.asarray(text_emb)
    labels = np.asarray(labels)
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(f"image_emb and text_emb must be 2-D (N, D) and (C, D'); got {image_emb.shape} and "
                         f"{text_emb.shape}")
    n, c = len(image_emb), len(text_emb)
    if n == 0:
        raise ValueError("no samples: image_emb is empty")
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"labels must be 1-D with one entry per image embedding: got shape {labels.shape} for "
                         f"{n} embeddings")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}; map class names to "
                         "0..C-1 first")
    bad = np.nonzero((labels < 0) | (labels >= c))[0]
    if len(bad):
        raise ValueError(f"{len(bad)} labels are outside 0..{c - 1} (text_emb has {c} rows, one per class): "
                         f"e.g. sample {bad[0]} has label {labels[bad[0]]}. Give one text embedding per class")
    for name, a in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            raise ValueError(f"{name} must be floating point, got {a.dtype}")
        checks.finite_input(name, a)
    ratio = checks.number("ratio", ratio, lo=0, hi=1, lo_open=True)
    k = int(round(ratio * n))
    if k == 0:
        raise ValueError(f"ratio {ratio} keeps round({ratio} * {n}) = 0 samples; raise the ratio")
    # float16/bfloat16 features stay as they are (half the memory of float32 for 10M x 512): every stage casts
    # the rows it works on.
    return image_emb, labels.astype(np.int64), np.asarray(text_emb, np.float32), ratio, k


# The method's presets: what `method` sets when the call leaves a setting unset (None). "paper" is the paper's text:
# the cosine SAS, alpha = r, one top-k over the whole data set, one fit of the adapters (docs/method.md says where
# the default departs, why, and the evidence).
METHODS = {"clipsel": dict(alignment="probability", balance="class", alpha="code", refine=DEFAULT_REFINE,
                           typicality=0.0),
           "paper": dict(alignment="cosine", balance="global", alpha="paper", refine=0, typicality=0.0)}


def method_settings(method: str, alignment: str | None, balance: str | None,
                    selection: SelectionConfig) -> tuple[str, str, SelectionConfig]:
    """(alignment, balance, selection) with the unset ones (None) taken from `method`'s preset."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    preset = METHODS[method]
    if selection.alpha is None:
        selection = dataclasses.replace(selection, alpha=preset["alpha"])
    return alignment or preset["alignment"], balance or preset["balance"], selection


def method_adapter(method: str, adapter: AdaptConfig | None) -> AdaptConfig | None:
    """The adapter settings with an unset refine (None) taken from `method`'s preset."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if adapter is None or adapter.refine is not None:
        return adapter
    return dataclasses.replace(adapter, refine=METHODS[method]["refine"])


def method_typicality(method: str, typicality: float | None) -> float:
    """The class typicality's weight, checked; unset (None): `method`'s preset."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return checks.number("typicality", METHODS[method]["typicality"] if typicality is None else typicality, lo=0)


def alpha_value(alpha, ratio) -> float:
    """The diversity weight: "code" (0.1), "paper" (= ratio) or a number >= 0."""
    return SelectionConfig(alpha=alpha).alpha_for(ratio)


@with_workdir_lock
def select_from_embeddings(image_emb, labels, text_emb, ratio: float, seed: int = 0, *,
                           adapter: AdaptConfig | None = AdaptConfig(), method: str = "clipsel",
                           alignment: str | None = None, temperature: float | None = None,
                           balance: str | None = None,
                           alpha: float | str | None = None, beta: float | None = None, k_neighbors: int | None = None,
                           k_fraction: float = DiversityConfig.k_fraction, reference_threshold: int | None = None,
                           reference_size: int = DiversityConfig.reference_size, typicality: float | None = None,
                           typicality_features=None,
                           selection: SelectionConfig | None = None, ids=None, workdir: str | Path | None = None,
                           mesh=None, progress: bool = False, chunk_steps: int = 20_000,
                           stop_after_chunks: int | None = None) -> Selection:
    """Select round(ratio * N) samples from embeddings of any encoder: adapt, score, optimise the keep-mask, take
    exactly k by rank.

    Parameters
    ----------
    image_emb : float array (N, Di)
        One image embedding per sample (float32, float16 or bfloat16; NaN/inf rows are refused).
    labels : int array (N,)
        The given (possibly noisy) label of each sample, in 0..C-1.
    text_emb : float array (C, Dt)
        One class-prompt embedding per class. Di and Dt may differ: the adapters map both to a shared dim.
    ratio : float in (0, 1]
        The fraction to keep: k = round(ratio * N) samples are selected (k >= 1).
    seed : int >= 0
        Seeds the adapters (unless AdaptConfig.seed is set) and the SDS reference samples of large classes.
    method : "clipsel" or "paper"
        Presets for the settings left unset (None): "clipsel" (default): alignment "probability", balance "class",
        alpha "code"; "paper": the paper's text: alignment "cosine", balance "global", alpha "paper" (= ratio).
    alignment : "probability", "cosine" or None
        The alignment score SAS in the combined score: "probability": softmax over the C prompts of
        temperature * cos(u_i, v_c), at the label (it also sees how close the other classes' prompts are);
        "cosine": the paper's cos(u_i, v_{y_i}). None: the method's.
    temperature : float > 0 or None
        The probability's temperature; None: the adapters' learned logit scale (100, CLIP's, without adapters).
    adapter : AdaptConfig or None
        How to train the image and text adapters (form, loss, epochs, lr, batch, seed). None (or epochs=0) scores
        the encoder's own features, which then must share one dim (an aligned CLIP).
    balance : "class", "global" or None
        "class": each class keeps round(ratio * n_c), adjusted to sum to k. "global": the paper's top-k over the
        whole data set. None: the method's ("class" for clipsel).
    alpha, beta : optional
        Shorthands for SelectionConfig(alpha=..., beta=...): the diversity weight ("code" = 0.1, "paper" = ratio,
        or a number >= 0; default: the method's) and the count constraint's weight (default 2.0). Give them here or in
        `selection`, not both.
    k_neighbors : int >= 1 or None
        SDS's K for every class; None: round(k_fraction * class size).
    k_fraction : float in (0, 1]
        SDS's K as a fraction of the class size (the paper's 10%), when k_neighbors is None.
    reference_threshold : int >= 1 or None
        Classes larger than this measure SDS against `reference_size` random members (memory for huge classes).
    reference_size : int >= 2
        The size of that reference sample.
    typicality : float >= 0 or None
        The weight w of the class typicality T in the combined score, c + w T / mean(T): T is the cosine of a sample's
        encoder features to its labeled class's mean direction (low for an image unlike its class, e.g. a corrupted
        one). None: the method's (0, off; docs/method.md, "Typicality", gives the measurements).
    typicality_features : float array (N, Di) or None
        The features T is measured on; None: image_emb. Give the encoder's features here when image_emb is
        already adapted.
    selection : SelectionConfig or None
        The selection optimiser's settings (temperature, init, alpha, beta, lr, momentum, max_steps, tolerance,
        loop "band" or "full").
    ids : int array (N,) or None
        The samples' ids in their source, carried to the result (default 0..N-1).
    workdir : path or None
        Checkpoints of the adapters and of the selection loop (orbax); a rerun resumes where a killed run stopped.
        Held for the call: a second run on it gets clipsel_jax.WorkdirBusy (see clipsel_jax.workdir_lock). A URL
        (gs://bucket/run, any fsspec scheme) works through a synced local mirror (clipsel_jax.storage).
    mesh : jax.sharding.Mesh or None
        The devices (default: all, one 'data' axis; the adapters train on one of them on a single-process CPU host,
        see clipsel_jax.parallel.training_mesh).
    progress : bool
        Progress bars for the long stages.
    chunk_steps : int >= 1
        Selection steps between two checkpoints.
    stop_after_chunks : int >= 1 or None
        With a workdir: stop the selection loop after this many chunks of this call, checkpoint kept, raising
        clipsel_jax.selection.LoopStopped (a time-boxed job); the same call again resumes. None: run to the end.

    Returns
    -------
    Selection
        indices (sorted int64 (k,)), mask (bool (N,)), scores {"sas", "sds", "combined"} (float32 (N,)),
        preferred_class (int64 (N,)), preferred_confidence (float32 (N,)), ids (int64 (N,)), labels (int64 (N,))
        and meta (settings, per-class kept fractions, K per class,
        optimiser steps, timings, versions).
    """
    t0 = time.perf_counter()
    image_emb, labels, text_emb, ratio, k = _validate(image_emb, labels, text_emb, ratio)
    timings = {"validate_s": time.perf_counter() - t0}
    alignment, balance, sel_cfg = method_settings(method, alignment, balance, _selection_config(selection, alpha, beta))
    adapter = method_adapter(method, adapter)
    typicality = method_typicality(method, typicality)
    if typicality_features is not None:  # checked as image_emb is, before any stage runs
        typicality_features = np.asarray(typicality_features)
        if typicality_features.ndim != 2 or len(typicality_features) != len(image_emb):
            raise ValueError(f"typicality_features must be one feature row per sample ({len(image_emb)}, D), got "
                             f"shape {typicality_features.shape}")
        if not (np.issubdtype(typicality_features.dtype, np.floating) or typicality_features.dtype.name == "bfloat16"):
            raise ValueError(f"typicality_features must be floating point, got {typicality_features.dtype}")
        checks.finite_input("typicality_features", typicality_features)
    if balance not in ("class", "global"):
        raise ValueError(f"balance must be 'class' or 'global', got {balance!r}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    temperature = checks.optional_number("temperature", temperature, lo=0, lo_open=True)
    # Every setting is checked before the first stage runs: a bad one never costs an adapter training.
    seed = checks.number("seed", seed, lo=0, integer=True)
    chunk_steps = checks.number("chunk_steps", chunk_steps, lo=1, integer=True)
    if stop_after_chunks is not None:
        stop_after_chunks = checks.number("stop_after_chunks", stop_after_chunks, lo=1, integer=True)
        if workdir is None:
            raise ValueError("stop_after_chunks needs a workdir: the loop stops to be resumed from its checkpoint")
    diversity = dict(zip(("k", "k_fraction", "reference_threshold", "reference_size"),
                         diversity_settings(k_neighbors, k_fraction, reference_threshold, reference_size)))
    n, num_classes = len(image_emb), len(text_emb)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != (n,):
        raise ValueError(f"ids must be one id per sample ({n}), got shape {ids.shape}")
    adapter_mesh = mesh  # None: parallel.training_mesh (one device on a CPU host, where a split only slows them)
    mesh = mesh or parallel.data_mesh()
    a = sel_cfg.alpha_for(ratio)
    workdir = Path(workdir) if workdir is not None else None

    t1 = time.perf_counter()
    adapted = adapt(image_emb, labels, text_emb, adapter, seed=seed, workdir=workdir, mesh=adapter_mesh,
                    progress=progress)
    timings["adapt_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    temperature = temperature or adapted.logit_scale or DEFAULT_TEMPERATURE
    sc = score_samples(adapted.image, adapted.text, labels, a, alignment=alignment, temperature=temperature,
                       seed=seed, mesh=mesh, typicality=typicality,
                       typicality_feats=image_emb if typicality_features is None else typicality_features,
                       **diversity)
    timings["score_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    opt = optimise(sc.combined, k, sel_cfg, mesh, workdir, chunk_steps, stop_after_chunks)
    keep = rank_and_take(opt.key, sc.combined, k, labels if balance == "class" else None, num_classes)
    timings["select_s"] = time.perf_counter() - t1

    mask = np.zeros(n, bool)
    mask[keep] = True
    sizes = np.bincount(labels, minlength=num_classes)
    kept = np.bincount(labels[keep], minlength=num_classes)
    div = sc.diversity
    shrunk = np.nonzero(sizes - 1 < div.k_requested)[0]  # classes too small for K neighbours: K = size - 1
    meta = {
        "n": n, "k": k, "ratio": ratio, "num_classes": num_classes, "seed": seed, "method": method,
        "alignment": alignment, "temperature": round(float(temperature), 6), "balance": balance,
        "alpha": a, "beta": sel_cfg.beta, "typicality": typicality, "selection": dataclasses.asdict(sel_cfg),
        "adapter": dataclasses.asdict(adapted.config) if adapted.config is not None else None,
        "adapter_loss": adapted.history["loss"] if adapted.history else None,
        "adapter_trained_on": [f["trained_on"] for f in adapted.history["fits"]] if adapted.history else None,
        "adapter_devices": adapted.history["devices"] if adapted.history else None,
        "optimiser": {"steps": int(opt.steps), "count_at_stop": int(opt.count),
                      "converged": bool(abs(opt.count - k) < sel_cfg.tolerance_for(n)), **opt.how},
        "sds_k": {"requested": div.k_requested.tolist(), "used": div.k.tolist(),
                  "reference_size": div.reference_size.tolist(), "shrunk_classes": shrunk.tolist()},
        "class_sizes": sizes.tolist(), "kept_per_class": kept.tolist(),
        "label_disagrees_with_preferred": int((sc.preferred_class != labels).sum()),
        "kept_fraction_per_class": (kept / np.maximum(sizes, 1)).round(6).tolist(),
        "timings": {**{key: round(val, 3) for key, val in timings.items()},
                    "total_s": round(time.perf_counter() - t0, 3)},
        "versions": {"jax": jax.__version__, "devices": mesh.devices.size},
    }
    result = Selection(keep.astype(np.int64), mask,
                       {"sas": sc.sas, "sds": sc.sds, "combined": sc.combined, "cosine": sc.cosine}, meta,
                       sc.preferred_class, ids, sc.preferred_confidence, labels.astype(np.int64))
    if workdir is not None:
        ck = Checkpointer(RunDir(workdir).selection_final, max_to_keep=1)
        ck.clear()  # the final selection of this run replaces any earlier one
        ck.save(0, {"indices": result.indices, "mask": mask, "d": opt.key, **result.scores,
                    "preferred_class": result.preferred_class,
                    "preferred_confidence": result.preferred_confidence}, meta)
        ck.close()
    return result


def _selection_config(selection: SelectionConfig | None, alpha, beta) -> SelectionConfig:
    """The selection settings in one place: `selection`, or the alpha / beta shorthands, never both."""
    given = {name: value for name, value in (("alpha", alpha), ("beta", beta)) if value is not None}
    if selection is not None and given:
        raise ValueError(f"give {' and '.join(given)} inside selection=SelectionConfig(...) or as keyword arguments, "
                         "not both")
    return selection if selection is not None else SelectionConfig(**given)


def write_selection(workdir, sel: Selection, labels, class_names, source=None, *, report: bool = True,
                    meta: dict | None = None) -> None:
    """The output stage: meta added to sel.meta, then selection.npz, scores.csv, meta.json and (report=True)
    report.html under workdir, written by process 0 only."""
    from clipsel_jax.report import write_outputs, write_report

    sel.meta.update(meta or {})
    if jax.process_index() == 0:
        write_outputs(workdir, sel, sel.ids, labels, class_names, source)
        if report:
            write_report(workdir, source)


@with_workdir_lock
def select(source, ratio: float, encoder, workdir: str | Path, seed: int = 0, *, prompts=None,
           embed_options: dict | None = None, progress: bool = True, report: bool = True,
           data_spec: dict | None = None, **options) -> Selection:
    """The whole pipeline: embed `source` with `encoder` (a spec for load_encoder, or an encoder object), adapt,
    score, select, and write the outputs (selection.npz, scores.csv, meta.json and, with report=True,
    report.html; see clipsel_jax.report). Embeddings are cached in chunks under workdir/embeddings (a rerun, or a
    run resumed after a kill, reuses finished chunks); adapter and selection checkpoints live in workdir too.
    `prompts`: a template or list of templates (default "A photo of a {}."); `embed_options` go to ``embed``
    (batch_size, workers, limit, ...); `data_spec` (how to reopen the source, recorded in meta.json for `clipsel
    report` / `export`; default: the source's own ``spec()``, none for arrays); `options` go to
    select_from_embeddings.

    Returns a Selection whose indices and mask refer to the embedded samples; `ids` maps them to the source's
    sample ids (unreadable images are excluded and listed in meta["unreadable"]). On several processes every
    process gets the same Selection and process 0 writes the files.
    """
    from clipsel_jax.embedding import embed
    from clipsel_jax.encoder import load_encoder
    from clipsel_jax.text import DEFAULT_TEMPLATE

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enc = load_encoder(encoder) if isinstance(encoder, (str, Path)) else encoder
    prompts = prompts or DEFAULT_TEMPLATE
    e = embed(source, enc, workdir, prompts, progress=progress, **(embed_options or {}))
    sel = select_from_embeddings(e.image_emb, e.labels, e.text_emb, ratio, seed, ids=e.ids, workdir=workdir,
                                 progress=progress, **options)
    meta = {"unreadable": e.unreadable, "class_names": e.class_names, "encoder": enc.identity, "prompts": e.prompts,
            "source": repr(source)}
    # folders, zips and TFDS sets know how to open themselves again (clipsel report / export, subset.load_kept)
    data_spec = data_spec or getattr(source, "spec", lambda: None)()
    if data_spec is not None:
        meta["data_spec"] = data_spec
    write_selection(workdir, sel, e.labels, e.class_names, source, report=report, meta=meta)
    return sel
