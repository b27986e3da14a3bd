"""The cost of one whole selection (adapters, scores, optimiser) on a real data set's embeddings, as a user pays it.

Each measurement runs in a fresh process, so it includes JAX's compilation and the adapters' training, exactly what
`select_from_embeddings` (and `clipsel select` after embedding) costs: the embeddings are read from a `clipsel bench`
workdir's cache first (not timed), a label set is made (clean, or symmetric/pair label noise), and one call with the
method's defaults and no workdir (no checkpoints, no adapter cache) is timed. Per method the median of --repeats runs
is printed with its stage times (the library's own meta["timings"]), as JSON lines and then a Markdown table.

Beside our methods, the authors' selection loop in PyTorch (scripts/bench_select.py's torch_loop: SGD with momentum,
STE, their loss and stopping test) runs on the same normalised scores as our paper preset, in the same process: the
like-for-like reference for the optimiser stage (their adapters are not re-implemented in PyTorch here).

    python scripts/bench_cost.py --data ../shared/data/cifar10-jpeg.zip --workdir out/robust \\
        --noise pair:0.4 symmetric:0.2 --methods clipsel paper --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def load(args):
    """(image_emb, clean labels, text_emb, class names) from the bench's embedding cache (embedding if missing)."""
    import clipsel_jax as cs
    from clipsel_jax.config import DataConfig
    from clipsel_jax.evaluate.splits import open_splits

    splits = open_splits(DataConfig(path=args.data, class_names=args.class_names))
    emb = cs.embed(splits.train, cs.load_encoder("offline"), args.workdir, prompts=["A photo of a {}."],
                   progress=args.one is None)
    return emb.image_emb, emb.labels, emb.text_emb, list(emb.class_names)


def noisy_labels(clean, names, spec: str, seed: int):
    from clipsel_jax.data.noise import CIFAR10_PAIRS, NoiseSetting, pair_label_noise, symmetric_label_noise

    noise = NoiseSetting.parse(spec)
    if noise.kind == "symmetric":
        return symmetric_label_noise(clean, len(names), noise.fraction, seed=seed)[0]
    if noise.kind == "pair":
        return pair_label_noise(clean, names, noise.fraction, CIFAR10_PAIRS, seed=seed)[0]
    if noise.kind == "none":
        return clean
    raise SystemExit(f"--noise {spec}: label sets only (none, symmetric:F, pair:F); corrupted images change the "
                     "embeddings, not the cost")


def one(args) -> dict:
    """Child process: load (untimed), then time one whole selection."""
    from clipsel_jax.parallel import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    import numpy as np

    import clipsel_jax as cs

    spec, seed, method = args.one.split(",")
    seed = int(seed)
    x, clean, text, names = load(args)
    labels = noisy_labels(clean, names, spec, seed)
    t0 = time.perf_counter()
    sel = cs.select_from_embeddings(x, labels, text, args.ratio, seed=seed, method=method)
    total = time.perf_counter() - t0
    res = {"noise": spec, "seed": seed, "method": method, "n": len(labels), "total_s": round(total, 2),
           **sel.meta["timings"], "steps": sel.meta["optimiser"]["steps"]}
    if method == "paper" and args.torch_cap > 0:  # the authors' loop on the same scores, same process
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_select import torch_loop

        from clipsel_jax.scores import minmax

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        steps, secs, finished = torch_loop(minmax(np.asarray(sel.scores["sas"])),
                                           minmax(np.asarray(sel.scores["sds"])),
                                           round(args.ratio * len(labels)), alpha=args.ratio, cap_s=args.torch_cap)
        res.update(torch_loop_s=round(secs if finished else secs / steps * res["steps"], 2),
                   torch_steps=steps, torch_finished=finished)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the bench's --data (its training split)")
    ap.add_argument("--class-names", help="the bench's --class-names, so that its embedding cache is found")
    ap.add_argument("--workdir", required=True, help="a `clipsel bench` workdir holding the embedding cache")
    ap.add_argument("--noise", nargs="+", default=["pair:0.4"], help="none, symmetric:F or pair:F (CIFAR-10 pairs)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--methods", nargs="+", default=["clipsel", "paper"], choices=["clipsel", "paper"])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per setting; the median is reported")
    ap.add_argument("--cpu-devices", default="auto", help="JAX CPU devices (auto: one per core, as the CLI)")
    ap.add_argument("--torch-cap", type=float, default=120.0,
                    help="seconds for the authors' PyTorch loop (extrapolated from its step rate when capped); 0 "
                         "skips it")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or not 0 < args.ratio <= 1:
        ap.error("--repeats must be >= 1 and --ratio in (0, 1]")
    if args.one:
        print(json.dumps(one(args)))
        return 0
    from clipsel_jax.data.noise import NoiseSetting

    for spec in args.noise:  # checked before anything is loaded
        try:
            kind = NoiseSetting.parse(spec).kind
        except ValueError as e:
            ap.error(str(e))
        if kind not in ("none", "symmetric", "pair"):
            ap.error(f"--noise {spec}: label sets only (none, symmetric:F, pair:F); corrupted images change the "
                     "embeddings, not the cost")
    if "paper" in args.methods and args.torch_cap > 0:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            ap.error("the authors' PyTorch loop needs torch (pip install torch==2.13.0, CPU); or pass --torch-cap 0")
    try:
        load(args)  # embed once here (cached), so no timed child ever embeds
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    rows = []
    for spec in args.noise:
        for seed in args.seeds:
            for method in args.methods:
                runs = []
                for _ in range(args.repeats):
                    cmd = [sys.executable, __file__, "--one", f"{spec},{seed},{method}", "--data", args.data,
                           "--workdir", args.workdir, "--ratio", str(args.ratio), "--cpu-devices",
                           args.cpu_devices, "--torch-cap", str(args.torch_cap),
                           *(["--class-names", args.class_names] if args.class_names else [])]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(runs[-1]), flush=True)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]
                       if isinstance(runs[0][k], float) and not isinstance(runs[0][k], bool)}
                rows.append({"noise": spec, "seed": seed, "method": method, "runs": len(runs),
                             "total_all": [r["total_s"] for r in runs], **med})
    print("| noise | seed | method | whole selection s (median; all runs) | adapters s | scores s | optimiser s "
          "| authors' PyTorch loop s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        torch_s = f"{r['torch_loop_s']:.1f}" if "torch_loop_s" in r else "-"
        print(f"| {r['noise']} | {r['seed']} | {r['method']} | {r['total_s']:.1f} "
              f"({', '.join(f'{t:.1f}' for t in r['total_all'])}) | {r.get('adapt_s', 0):.1f} | "
              f"{r.get('score_s', 0):.1f} | {r.get('select_s', 0):.1f} | {torch_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
