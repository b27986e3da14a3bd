"""End-to-end embedding throughput on real CIFAR-10 JPEGs: clipsel_jax's pipeline against a PyTorch DataLoader +
transformers.CLIPModel pipeline, same machine, same run, same random ViT-B/32 weights.

Cases (images/s over the first --n training images of the zip, best of --repeats, measured in alternation):
  encoder   our encoder alone on already prepared 224x224 uint8 batches (the ceiling: no input pipeline)
  arrays    our encode_images on pre-decoded 32x32 uint8 arrays (resize/crop on the host, no file reading)
  ours      clipsel_jax.embed on the zip: grain reads + decodes + resizes in threads, batches go to the devices,
            chunks are written to a fresh cache folder (what a real run does)
  torch     torch DataLoader (workers decode with PIL and run CLIPImageProcessorPil) + CLIPModel.get_image_features

    python scripts/bench_embed.py --data ../shared/data/cifar10-jpeg.zip [--n 1024] [--batch 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class ZipImages:
    """A torch Dataset over <class>/<file> JPEGs in a zip (one ZipFile per worker process)."""

    def __init__(self, zip_path, names, labels, processor):
        self.zip_path, self.names, self.labels, self.processor = zip_path, names, labels, processor
        self.zf = None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        import io

        from PIL import Image

        if self.zf is None:
            self.zf = zipfile.ZipFile(self.zip_path)
        with Image.open(io.BytesIO(self.zf.read(self.names[i]))) as im:
            pixels = self.processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return pixels, self.labels[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.zip")
    ap.add_argument("--n", type=int, default=1024, help="images (the first n of the training split)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-workers", type=int, default=1,
                    help="DataLoader worker processes (1 was faster than 2 on 2 cores)")
    ap.add_argument("--threads", type=int, default=None, help="grain read threads (default 2 x CPUs)")
    ap.add_argument("--cpu-devices", default="1", help="JAX CPU devices for our side (auto: one per core)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    from clipsel_jax.parallel import use_cpu_devices

    use_cpu_devices(args.cpu_devices)

    import jax
    import torch
    from clip_fixtures import VIT_B32, make_clip_folder
    from transformers import CLIPImageProcessorPil

    import clipsel_jax as cs
    from clipsel_jax.embedding import embed

    folder = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    tmodel, _, _ = make_clip_folder(folder / "clip", VIT_B32)
    tmodel.eval()
    enc = cs.load_encoder(str(folder / "clip"), batch_size=args.batch)
    src = cs.data.image_folder(f"{args.data}:cifar10-jpeg/train")
    n = min(args.n, len(src))
    # Spread over the classes: the zip is sorted by class, so take every (len/n)-th image.
    pick = np.linspace(0, len(src) - 1, n).round().astype(int)
    sub = cs.data.from_arrays([src.read(int(i)) for i in pick], src.labels[pick], src.class_names)
    decoded = np.stack(sub.images)
    prepared = np.stack([enc.prepare_image(im) for im in decoded])
    zsrc = cs.data.image_folder(f"{args.data}:cifar10-jpeg/train")
    zsrc.files = [zsrc.files[i] for i in pick]
    zsrc.labels, zsrc.ids = zsrc.labels[pick], np.arange(n)
    processor = CLIPImageProcessorPil.from_pretrained(str(folder / "clip"))
    loader_data = ZipImages(args.data, zsrc.files, zsrc.labels.tolist(), processor)
    b = args.batch

    def run_encoder():
        pending, out = None, []
        for s in range(0, n, b):
            x = prepared[s:s + b]
            if len(x) < b:
                x = np.concatenate([x, np.zeros((b - len(x), *x.shape[1:]), x.dtype)])
            y = enc.features_of_prepared(x)
            if pending is not None:
                out.append(np.asarray(pending))
            pending = y
        out.append(np.asarray(pending))
        return np.concatenate(out)[:n]

    def run_arrays():
        return enc.encode_images(decoded)

    def run_ours():
        work = Path(tempfile.mkdtemp(dir=folder))
        e = embed(zsrc, enc, work, batch_size=b, threads=args.threads, progress=False)
        shutil.rmtree(work)
        return e.image_emb

    def run_torch():
        dl = torch.utils.data.DataLoader(loader_data, batch_size=b, num_workers=args.torch_workers,
                                         persistent_workers=False)
        out = []
        with torch.no_grad():
            for pixels, _ in dl:
                out.append(tmodel.get_image_features(pixel_values=pixels).pooler_output.numpy())
        return np.concatenate(out)

    fns = {"encoder": run_encoder, "arrays": run_arrays, "ours": run_ours, "torch": run_torch}
    results = {k: fn() for k, fn in fns.items()}  # warm-up (compilation) and a correctness check
    diff = float(np.abs(results["ours"] - results["torch"]).max())
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / t for k, t in best.items()}
    report = {
        "images": n, "batch": b, "devices": jax.device_count(), "torch_threads": torch.get_num_threads(),
        "torch_workers": args.torch_workers, "images_per_s": {k: round(v, 2) for k, v in rate.items()},
        "ours_vs_torch": round(rate["ours"] / rate["torch"], 3),
        "ours_vs_encoder": round(rate["ours"] / rate["encoder"], 3),
        "arrays_vs_encoder": round(rate["arrays"] / rate["encoder"], 3),
        "max_abs_diff_ours_vs_torch": diff,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
