"""What one SGD step of the bench's downstream trainer costs, by image size: the figure behind --train-image-size.

`train_classifier` runs twice per setting on random uint8 images (the cost of a step does not depend on their
content), with two step budgets; the difference divided by the extra steps is the marginal cost of a step, free of
compilation and of the test-set evaluation, which both runs pay alike. Each setting prints a JSON line.

    python scripts/bench_train.py --sizes 32 64 --classes 200 --width 16 --steps 30 90
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="square image sizes to train at")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet18"])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs=2, default=[30, 90], help="the two budgets (fewer, more)")
    ap.add_argument("--train", type=int, default=15000, help="training images (batch 128 drawn from them)")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="JAX CPU devices (default 1: what clipsel bench trains on unless given --cpu-devices)")
    args = ap.parse_args()
    if not 0 < args.steps[0] < args.steps[1]:
        ap.error("--steps: two positive budgets, the second larger than the first")
    if min(args.sizes) < 8 or args.classes < 2 or args.width < 1 or args.train < 1 or args.test < 1:
        ap.error("--sizes must be >= 8, --classes >= 2, --width, --train and --test >= 1")

    from clipsel_jax import parallel

    parallel.use_cpu_devices(args.cpu_devices)
    from clipsel_jax.evaluate import TrainConfig, train_classifier

    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = rng.integers(0, 256, (args.train + args.test, size, size, 3), dtype=np.uint8)
        y = rng.integers(0, args.classes, len(x))
        seconds = []
        for steps in args.steps:
            cfg = TrainConfig(model=args.model, width=args.width, epochs=0, min_steps=steps)
            t0 = time.perf_counter()
            train_classifier(x[:args.train], y[:args.train], args.classes, x[args.train:], y[args.train:], config=cfg)
            seconds.append(time.perf_counter() - t0)
        per_step = (seconds[1] - seconds[0]) / (args.steps[1] - args.steps[0])
        print(json.dumps({"size": size, "classes": args.classes, "model": args.model, "width": args.width,
                          "steps": args.steps, "seconds": [round(s, 1) for s in seconds],
                          "per_step_s": round(per_step, 3)}), flush=True)


if __name__ == "__main__":
    main()
