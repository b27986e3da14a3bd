"""Build the demo data set shipped in the package: 2,000 CIFAR-10 training images (200 per class), 5% of them
(100, 10 per class) filed under a wrong class on purpose, as a <class>/<file> zip plus the ground truth.

    python scripts/make_demo.py ../shared/data/cifar10-jpeg.zip clipsel_jax/demo

Deterministic (seed 0): rerunning gives the same files. Flipped images keep their original file name prefixed with
the true class, so a person browsing the zip can see the mistake; `cifar10_demo_flipped.json` lists them.
"""

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

PER_CLASS, FLIP_PER_CLASS, SEED = 200, 10, 0


def main(src: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    with zipfile.ZipFile(src) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("cifar10-jpeg/train/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[2] for n in names})
        entries, flipped = [], []
        for c, cls in enumerate(classes):
            files = [n for n in names if n.split("/")[2] == cls]
            picked = sorted(rng.choice(len(files), PER_CLASS, replace=False))
            flip = set(rng.choice(PER_CLASS, FLIP_PER_CLASS, replace=False).tolist())
            for j, i in enumerate(picked):
                base = files[i].split("/")[-1]
                if j in flip:  # filed under another class, uniformly
                    wrong = classes[(c + 1 + rng.integers(len(classes) - 1)) % len(classes)]
                    name = f"{wrong}/{cls}_{base}"
                    flipped.append({"file": name, "true_class": cls, "given_class": wrong})
                else:
                    name = f"{cls}/{base}"
                entries.append((name, zf.read(files[i])))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # fixed stamps: byte-identical reruns
            z.writestr(info, data)
    (out / "cifar10_demo.zip").write_bytes(buf.getvalue())
    (out / "cifar10_demo_flipped.json").write_text(json.dumps(
        {"source": "CIFAR-10 train (Krizhevsky, 2009), JPEG", "images": len(entries), "flipped": flipped},
        indent=1) + "\n")
    print(f"{len(entries)} images, {len(flipped)} flipped, {len(buf.getvalue()) / 1e6:.2f} MB -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
