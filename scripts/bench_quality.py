"""Selection quality on any data set with a test split (the same as `clipsel bench`; see
clipsel_jax/evaluate/benchmark.py and the README's "Evaluation harness and benchmarks").

    python scripts/bench_quality.py --data ../shared/data/cifar10-jpeg.zip --workdir out/quality \
        --noise symmetric:0.2 none --seeds 0 1 2 --train-steps 300 --train-width 16
"""

import sys

from clipsel_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
