"""Scoring + selection cost on synthetic embeddings, and our optimiser loop against the authors' PyTorch loop.

For each N (and C), in a fresh subprocess so peak memory is per case: class-clustered float32 embeddings (D=512),
text embeddings near the class centres; then `select_from_embeddings(adapter=None)` (SAS, per-class SDS, the STE
optimiser, exact k). Reported: seconds per stage and the process's peak resident memory. The optimiser runs as
shipped (loop="band": the decisive band only) and then, unless --no-full-loop, over all N parameters
(loop="full"), like for like with the PyTorch loop; both must give the same steps, count and selection.

The PyTorch side re-creates the authors' loop faithfully (SGD lr 1e-3, momentum 0.9, STE via detach, loss as in
their code, stop when |sum(b) - k| < N/2000, at most 100,000 steps) on the same normalised scores, capped at
--torch-cap seconds: when capped, its time for the same number of steps as ours is extrapolated from its step rate
(and the output says so).

    python scripts/bench_select.py --cases 50000:10 1280000:10 1280000:1000 [--torch-cap 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def make_data(n: int, classes: int, dim: int, seed: int = 0, storage: str = "float32"):
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 2
    labels = rng.integers(0, classes, n)
    x = np.empty((n, dim), storage)
    for s in range(0, n, 262_144):  # in chunks: bounded temporary memory
        e = min(n, s + 262_144)
        x[s:e] = centers[labels[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32)
    text = centers + 0.5 * rng.standard_normal((classes, dim), dtype=np.float32)
    return x, labels, text


def torch_loop(sas, sds, k, alpha=0.1, beta=2.0, cap_s=120.0, max_steps=100_000, device="cpu"):
    """The authors' selection loop in PyTorch, faithfully: returns (steps, seconds, finished). Each step reads the
    count back to the host (their stopping test), so on CUDA the timing includes every step's kernels."""
    import torch

    sas, sds = torch.from_numpy(sas).to(device), torch.from_numpy(sds).to(device)
    n = len(sas)
    d = torch.full((n,), 0.01, requires_grad=True, device=device)
    opt = torch.optim.SGD([d], lr=1e-3, momentum=0.9)
    t0 = time.perf_counter()
    for step in range(1, max_steps + 1):
        s = torch.sigmoid(100 * d)
        hard = (s > 0.5).float()
        b = s + (hard - s).detach()  # straight-through estimator
        loss = (-torch.mean(s * sas / sas.mean()) - alpha * torch.mean(s * sds / sds.mean())
                + beta * torch.abs(b.sum() - k) / n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if abs(b.sum().item() - k) < n / 2000:
            return step, time.perf_counter() - t0, True
        if time.perf_counter() - t0 > cap_s:
            return step, time.perf_counter() - t0, False
    return max_steps, time.perf_counter() - t0, True


def run_case(n: int, classes: int, dim: int, ratio: float, torch_cap: float, reference_threshold: int | None,
             storage: str = "float32", torch_device: str = "auto", full_loop: bool = True):
    import clipsel_jax as cs
    from clipsel_jax.scores import minmax

    t0 = time.perf_counter()
    x, labels, text = make_data(n, classes, dim, storage=storage)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = cs.select_from_embeddings(x, labels, text, ratio, adapter=None, balance="global",
                                    reference_threshold=reference_threshold, reference_size=4096)
    total = time.perf_counter() - t0
    import jax

    res = {"n": n, "classes": classes, "devices": jax.device_count(), "dim": dim, "storage": storage, "ratio": ratio,
           "data_gen_s": round(gen_s, 1),
           "ours_total_s": round(total, 2), **{f"ours_{k}": v for k, v in sel.meta["timings"].items()},
           "ours_steps": sel.meta["optimiser"]["steps"], "reference_threshold": reference_threshold,
           "loop": sel.meta["optimiser"]["loop"], "ours_count": sel.meta["optimiser"]["count_at_stop"],
           "peak_rss_gb_before_torch": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if full_loop:  # our loop over all N parameters, like for like with PyTorch's; it must select the same samples
        import numpy as np

        from clipsel_jax import parallel
        from clipsel_jax.selection import SelectionConfig, optimise, rank_and_take

        c, k = sel.scores["combined"], round(ratio * n)
        t0 = time.perf_counter()
        d, steps, count, _ = optimise(c, k, SelectionConfig(loop="full"), parallel.data_mesh())
        keep = rank_and_take(d, c, k)
        res.update({"full_loop_s": round(time.perf_counter() - t0, 2), "full_loop_steps": steps,
                    "full_loop_same_result": bool(steps == res["ours_steps"] and count == res["ours_count"]
                                                  and np.array_equal(keep, sel.indices))})
    if torch_cap > 0:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        if torch_device == "auto":  # the strongest PyTorch on this machine: CUDA where it has a GPU
            torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        sas, sds = minmax(sel.scores["sas"]), minmax(sel.scores["sds"])
        steps, secs, finished = torch_loop(sas, sds, round(ratio * n), cap_s=torch_cap, device=torch_device)
        res["torch_device"] = torch_device
        per_step = secs / steps
        torch_s = secs if finished else per_step * res["ours_steps"]
        res.update({"torch_steps_run": steps, "torch_s_run": round(secs, 2), "torch_finished": finished,
                    "torch_loop_s" + ("" if finished else "_extrapolated"): round(torch_s, 1),
                    "loop_ratio_torch_over_ours": round(torch_s / sel.meta["timings"]["select_s"], 1)})
        if full_loop:
            res["loop_ratio_torch_over_full_loop"] = round(torch_s / res["full_loop_s"], 1)
        if finished:
            # Their loop tests the count of the mask it just used, ours the mask after the step: one step apart.
            res["same_trajectory"] = abs(steps - res["ours_steps"]) <= 1
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["50000:10", "50000:1000", "1280000:10", "1280000:1000"],
                    help="N:C pairs")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--torch-cap", type=float, default=120.0, help="seconds; 0 skips the PyTorch loop")
    ap.add_argument("--reference-threshold", type=int, default=20_000,
                    help="classes larger than this use a 4,096-member reference sample for SDS (0: always exact)")
    ap.add_argument("--storage", default="float32", choices=["float32", "float16"],
                    help="dtype of the synthetic embeddings (float16 halves memory: 10M x 512 is 10 GB)")
    ap.add_argument("--cpu-devices", default="auto",
                    help="JAX CPU devices for our side (auto, the CLI's default: one per core)")
    ap.add_argument("--torch-device", default="auto", help="the PyTorch loop's device: cpu, cuda, or auto (cuda "
                    "where torch sees a GPU, else cpu)")
    ap.add_argument("--no-full-loop", action="store_true",
                    help="skip timing our loop over all N parameters (loop='full'; by default it runs after the "
                         "band loop, like for like with PyTorch's, and must select the same samples)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ref = args.reference_threshold or None
    if args.one:
        from clipsel_jax.parallel import use_cpu_devices

        use_cpu_devices(args.cpu_devices)
        n, c = map(int, args.one.split(":"))
        print(json.dumps(run_case(n, c, args.dim, args.ratio, args.torch_cap, ref, args.storage, args.torch_device,
                                  not args.no_full_loop)))
        return
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case, "--dim", str(args.dim), "--ratio", str(args.ratio),
               "--torch-cap", str(args.torch_cap), "--reference-threshold", str(args.reference_threshold),
               "--storage", args.storage, "--cpu-devices", args.cpu_devices, "--torch-device", args.torch_device,
               *(["--no-full-loop"] if args.no_full_loop else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results.append({"case": case, "error": out.stderr[-2000:]})
        else:
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
