"""The method end to end on arrays: adapt -> score -> select. ``select_from_embeddings`` is the library's heart."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clipsel_jax import checks, parallel
from clipsel_jax.adapt import AdaptConfig, apply_adapters, data_fingerprint, train_adapters
from clipsel_jax.ckpt import Checkpointer
from clipsel_jax.scores import alignment_and_preferred_class, diversity_settings, minmax, sample_diversity
from clipsel_jax.selection import (SelectionConfig, band_failure, band_with_passengers, combined_score, decisive_band,
                                  init_state, loop_done, optimise_chunk, rank_and_take, ranking_key,
                                  selected_prefix)
from clipsel_jax.workdir_lock import with_workdir_lock


@dataclass
class Selection:
    indices: np.ndarray  # sorted int64 indices of the kept samples, len == round(ratio * N)
    mask: np.ndarray  # bool (N,), True = kept
    scores: dict  # float32 (N,): "sas" (cosine; higher = better aligned), "sds" (mean kNN distance; higher = more
    #                diverse), "combined" (c of the loss; higher = kept first)
    meta: dict = field(default_factory=dict)
    # int64 (N,): the class whose (adapted) prompt each image is closest to; != label marks a likely mislabel.
    preferred_class: np.ndarray | None = None


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


def alpha_value(alpha, ratio) -> float:
    if alpha == "code":
        return 0.1
    if alpha == "paper":
        return float(ratio)
    if isinstance(alpha, str):
        raise ValueError(f"alpha must be 'code' (0.1), 'paper' (= ratio) or a number >= 0, got {alpha!r}")
    return checks.number("alpha", alpha, lo=0)


@with_workdir_lock
def select_from_embeddings(image_emb, labels, text_emb, ratio: float, seed: int = 0, *,
                           adapter: AdaptConfig | None = AdaptConfig(), balance: str = "class",
                           alpha="code", beta: float = 2.0, k_neighbors: int | None = None, k_fraction: float = 0.1,
                           reference_threshold: int | None = None, reference_size: int = 4096,
                           selection: SelectionConfig | None = None, workdir: str | Path | None = None,
                           mesh=None, progress: bool = False, chunk_steps: int = 20_000) -> Selection:
    """Select round(ratio * N) samples from embeddings of any encoder.

    image_emb (N, Di), labels (N,) ints in 0..C-1, text_emb (C, Dt): one (class prompt) embedding per class; Di and
    Dt may differ (the adapters map both to a shared dim). adapter=None skips adaptation (then Di must equal Dt).
    balance: "class" (default; each class keeps round(ratio * n_c), adjusted to sum to k) or "global" (the paper's
    top-k over the whole data set). alpha: "code" (0.1), "paper" (= ratio) or a number.
    workdir: checkpoints of adapters and selection state (orbax); a rerun resumes where a killed run stopped. Held
    for the call: a second run on it gets clipsel_jax.WorkdirBusy (see clipsel_jax.workdir_lock).
    """
    t0 = time.perf_counter()
    image_emb, labels, text_emb, ratio, k = _validate(image_emb, labels, text_emb, ratio)
    timings = {"validate_s": time.perf_counter() - t0}
    if balance not in ("class", "global"):
        raise ValueError(f"balance must be 'class' or 'global', got {balance!r}")
    # Every setting is checked before the first stage runs: a bad one never costs an adapter training.
    seed = checks.number("seed", seed, lo=0, integer=True)
    chunk_steps = checks.number("chunk_steps", chunk_steps, lo=1, integer=True)
    diversity = dict(zip(("k", "k_fraction", "reference_threshold", "reference_size"),
                         diversity_settings(k_neighbors, k_fraction, reference_threshold, reference_size)))
    n, num_classes = len(image_emb), len(text_emb)
    mesh = mesh or parallel.data_mesh()
    a = alpha_value(alpha, ratio)
    sel_cfg = dataclasses.replace(selection or SelectionConfig(), alpha=a, beta=beta)
    workdir = Path(workdir) if workdir is not None else None

    # 1. Dataset adaptation.
    t1 = time.perf_counter()
    history = None
    if adapter is not None and adapter.epochs > 0:
        adapter = dataclasses.replace(adapter, seed=seed)
        adapters, history = train_adapters(image_emb, labels, text_emb, adapter, workdir=workdir, mesh=mesh,
                                           progress=progress)
        u, v = apply_adapters(adapters, image_emb, text_emb)
    else:
        if image_emb.shape[1] != text_emb.shape[1]:
            raise ValueError(f"image dim {image_emb.shape[1]} != text dim {text_emb.shape[1]}: unaligned encoders "
                             "need adapters (adapter=AdaptConfig(...) with epochs > 0)")
        u, v = image_emb, text_emb
    timings["adapt_s"] = time.perf_counter() - t1

    # 2. Scores.
    t1 = time.perf_counter()
    sas, sds, c, preferred, div = score_samples(u, v, labels, a, seed=seed, mesh=mesh, **diversity)
    timings["score_s"] = time.perf_counter() - t1

    # 3. Selection optimisation (resumable in chunks of steps), then exactly k by rank.
    t2 = time.perf_counter()
    d, steps, count, how = _optimise(c, k, sel_cfg, mesh, workdir, chunk_steps, seed)
    keep = rank_and_take(d, c, k, labels if balance == "class" else None, num_classes)
    timings["select_s"] = time.perf_counter() - t2
    mask = np.zeros(n, bool)
    mask[keep] = True
    sizes = np.bincount(labels, minlength=num_classes)
    kept = np.bincount(labels[keep], minlength=num_classes)
    shrunk = np.nonzero(sizes - 1 < div.k_requested)[0]  # classes too small for K neighbours: K = size - 1
    meta = {
        "n": n, "k": k, "ratio": ratio, "num_classes": num_classes, "seed": seed, "balance": balance,
        "alpha": a, "beta": beta, "selection": dataclasses.asdict(sel_cfg),
        "adapter": dataclasses.asdict(adapter) if adapter is not None else None,
        "adapter_loss": history["loss"] if history else None,
        "optimiser": {"steps": int(steps), "count_at_stop": int(count),
                      "converged": bool(abs(count - k) < (sel_cfg.tolerance or n / 2000)), **how},
        "sds_k": {"requested": div.k_requested.tolist(), "used": div.k.tolist(),
                  "reference_size": div.reference_size.tolist(),
                  "shrunk_classes": shrunk.tolist()},
        "class_sizes": sizes.tolist(), "kept_per_class": kept.tolist(),
        "label_disagrees_with_preferred": int((preferred != labels).sum()),
        "kept_fraction_per_class": (kept / np.maximum(sizes, 1)).round(6).tolist(),
        "timings": {**{key: round(val, 3) for key, val in timings.items()},
                    "total_s": round(time.perf_counter() - t0, 3)},
        "versions": {"jax": jax.__version__, "devices": mesh.devices.size},
    }
    result = Selection(keep.astype(np.int64), mask, {"sas": sas.astype(np.float32), "sds": sds.astype(np.float32),
                                                     "combined": c.astype(np.float32)}, meta, preferred)
    if workdir is not None:
        ck = Checkpointer(workdir / "selection_final", max_to_keep=1)
        ck.clear()  # the final selection of this run replaces any earlier one
        ck.save(0, {"indices": result.indices, "mask": mask, "d": d, **result.scores}, meta)
        ck.close()
    return result


def score_samples(u, v, labels, alpha: float, *, k: int | None = None, k_fraction: float = 0.1,
                  reference_threshold: int | None = None, reference_size: int = 4096, seed: int = 0, mesh=None):
    """The scoring stage on aligned features u (N, D) and v (C, D): (SAS, SDS, combined score c, preferred class,
    DiversityInfo); c = combined_score of the min-max normalised scores with diversity weight `alpha`."""
    sas, preferred = alignment_and_preferred_class(u, v, labels, mesh=mesh)
    sds, div = sample_diversity(u, labels, len(v), k_fraction=k_fraction, k=k,
                                reference_threshold=reference_threshold, reference_size=reference_size, seed=seed,
                                mesh=mesh)
    c = np.asarray(combined_score(jnp.asarray(minmax(sas)), jnp.asarray(minmax(sds)), alpha))
    for name, x in (("SAS", sas), ("SDS", sds), ("the combined score", c)):
        checks.finite_output("scoring", name, x, "features too large for float32 distances (rescale the embeddings), "
                                                 "or NaN/inf in features given without adapters")
    return sas, sds, c, preferred, div


def _optimise(c: np.ndarray, k: int, cfg: SelectionConfig, mesh, workdir: Path | None, chunk_steps: int, seed: int):
    """The selection loop: on the decisive band (cfg.loop == "band", when its premise holds) or on every sample.
    Returns (a ranking key that orders as the full loop's d, steps, count at stop, how it ran)."""
    n = len(c)
    fingerprint = data_fingerprint(c[:, None], np.array([k, seed]), np.zeros((1, 1), np.float32))
    settings = {**dataclasses.asdict(cfg), "fingerprint": fingerprint}
    band = decisive_band(c, k, cfg) if cfg.loop == "band" else None
    if band is not None:
        order, lo, hi = band
        c_band = c[order[lo:hi]]
        d_band, steps, count = _run_loop(c_band, k, cfg, n, mesh, workdir and workdir / "selection_band",
                                         chunk_steps, {**settings, "band": [lo, hi]}, band=(lo, n - hi))
        fallback = band_failure(d_band)
        if fallback is None and (d_band[-1] > 0 or d_band[0] <= 0):
            # Stopped at max_steps with the count outside the band's range: count the selected samples past the
            # band's end (all of the band selected) or before its start (none of it selected).
            def d_of(passengers):
                d_rerun, d_pass = band_with_passengers(c_band, passengers, k, steps, cfg, n, lo, n - hi)
                if not np.array_equal(d_rerun, d_band):
                    raise RuntimeError("the band loop did not repeat itself bit for bit; rerun with loop='full' "
                                       "(--loop full) and report this")
                return d_pass

            past = selected_prefix(c[order[hi:]], d_of) if d_band[-1] > 0 else selected_prefix(c[order[:lo]], d_of)
            fallback = "d out of the order of c outside the band" if past is None else None
            count = hi + (past or 0) if d_band[-1] > 0 else (past or 0)
        if fallback is None:
            return ranking_key(d_band, order, lo, hi), steps, float(count), {"loop": "band", "band": [lo, hi]}
    else:
        fallback = "loop='full'" if cfg.loop == "full" else "init <= 0: the band loop does not apply"
    d, steps, count = _run_loop(c, k, cfg, n, mesh, workdir and workdir / "selection", chunk_steps, settings)
    return d, steps, count, {"loop": "full", "why": fallback}


def _run_loop(c: np.ndarray, k: int, cfg: SelectionConfig, n: int, mesh, ckpt_dir: Path | None, chunk_steps: int,
              settings: dict, band: tuple[int, int] | None = None):
    """Run optimise_chunk in chunks of steps over c (all n samples, or the band with `band` = (samples above it,
    samples below it)), checkpointing (d, optimiser state) after each chunk; a rerun resumes from the checkpoint.
    All n samples are split over the mesh; the band (a few thousand) is replicated. Returns (d, steps, count)."""
    m = len(c)
    m_pad = m if band is not None else parallel.round_up(m, mesh.devices.size)
    sharding = parallel.replicated(mesh) if band is not None else parallel.batch_sharding(mesh)
    c_pad = np.zeros(m_pad, np.float32)  # entries past m are padding, masked inside the loss
    c_pad[:m] = c
    c_dev = jax.device_put(c_pad, sharding)
    state = init_state(c_dev, cfg, n)
    ckpt = None
    rep = parallel.replicated(mesh)

    def unpadded(state):  # checkpoints hold the m real samples: a run resumes on any device count
        return jax.tree.map(lambda a: jax.device_put(a[:m], rep) if np.ndim(a) else a, state)

    if ckpt_dir is not None:
        ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
        if ckpt.latest_step() is not None:
            if ckpt.restore_meta().get("settings") == settings:
                restored, _ = ckpt.restore(like=unpadded(state))
                state = jax.tree.map(
                    lambda a: jax.device_put(np.pad(np.asarray(a), (0, m_pad - m)), sharding) if np.ndim(a)
                    else jax.device_put(np.asarray(a), rep), restored)
            else:  # another run's state (other scores or settings): removed, never resumed or mixed in
                ckpt.clear()
    above, below = band or (0, 0)
    while not loop_done(int(state[0]), float(state[3]), k, cfg, n):
        stop = jnp.int32(min(cfg.max_steps, int(state[0]) + chunk_steps))
        state = optimise_chunk(state, c_dev, jnp.float32(k), stop, cfg, n, m, m if band else None,
                               jnp.float32(above), jnp.float32(below))
        if ckpt is not None:
            ckpt.save(int(state[0]), unpadded(state), {"settings": settings, "step": int(state[0])})
    if ckpt is not None:
        ckpt.close()
    return parallel.to_host(state[1])[:m], int(state[0]), float(state[3])


@with_workdir_lock
def select(source, ratio: float, encoder, workdir: str | Path, seed: int = 0, *, prompts=None,
           embed_options: dict | None = None, progress: bool = True, report: bool = True,
           data_spec: dict | None = None, **options) -> Selection:
    """The whole pipeline: embed `source` with `encoder` (a spec for load_encoder, or an encoder object), adapt,
    score, select, and write the outputs (selection.npz, scores.csv, meta.json and, with report=True,
    report.html; see clipsel_jax.report). Embeddings are cached in chunks under workdir/embeddings (a rerun, or a
    run resumed after a kill, reuses finished chunks); adapter and selection checkpoints live in workdir too.
    `prompts`: a template or list of templates (default "A photo of a {}."); `embed_options` go to ``embed``
    (batch_size, workers, limit, ...); `data_spec` (how to reopen the source; recorded in meta.json for
    `clipsel report`); `options` go to select_from_embeddings.

    Returns a Selection whose indices and mask refer to the embedded samples; `meta["ids"]` maps them to the
    source's sample ids (unreadable images are excluded and listed in meta["unreadable"]). On several processes
    every process gets the same Selection and process 0 writes the files.
    """
    from clipsel_jax.embedding import embed
    from clipsel_jax.encoder import load_encoder
    from clipsel_jax.report import write_outputs, write_report
    from clipsel_jax.text import DEFAULT_TEMPLATE

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enc = load_encoder(encoder) if isinstance(encoder, (str, Path)) else encoder
    prompts = prompts or DEFAULT_TEMPLATE
    e = embed(source, enc, workdir, prompts, progress=progress, **(embed_options or {}))
    sel = select_from_embeddings(e.image_emb, e.labels, e.text_emb, ratio, seed, workdir=workdir, progress=progress,
                                 **options)
    sel.meta.update({"ids": e.ids.tolist(), "unreadable": e.unreadable, "class_names": e.class_names,
                     "encoder": enc.identity, "prompts": e.prompts, "source": repr(source)})
    if data_spec is not None:
        sel.meta["data_spec"] = data_spec
    if jax.process_index() == 0:
        write_outputs(workdir, sel, e.ids, e.labels, e.class_names, source)
        if report:
            write_report(workdir, source)
    return sel
