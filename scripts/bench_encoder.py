"""Encoder throughput: clipsel_jax (JAX/XLA) against transformers.CLIPModel (PyTorch), same machine, same run.

Both load the same random ViT-B/32-shaped weights (written once with save_pretrained). Measured:
  model     images/s and texts/s of the forward pass on identical preprocessed inputs (the compute comparison);
  pipeline  images/s from uint8 images of another size (CIFAR's 32x32) to features, including preprocessing:
            ours (host PIL resize/crop + device normalise + forward) vs CLIPImageProcessorPil + CLIPModel.
Also the measured matmul peak of each framework (large float32 GEMM) and the fraction of it each model pass reaches.

    python scripts/bench_encoder.py [--batch 64] [--repeats 5] [--dtype float32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_times(fns: dict, repeats: int) -> dict:
    """Min wall time of each function, measured in alternation so that load on the machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (compilation, caches)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def vit_flops(cfg, batch: int) -> float:
    """Multiply-add FLOPs (x2) of the vision tower's matmuls for one batch."""
    v = cfg.vision_config
    t = (v.image_size // v.patch_size) ** 2 + 1
    d, f = v.hidden_size, v.intermediate_size
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 2 * 2 * t * t * d
    patch = 2 * (t - 1) * 3 * v.patch_size**2 * d
    return batch * (v.num_hidden_layers * per_layer + patch + 2 * d * cfg.projection_dim)


def text_flops(cfg, batch: int, length: int) -> float:
    c = cfg.text_config
    d, f = c.hidden_size, c.intermediate_size
    per_layer = 2 * length * (4 * d * d + 2 * d * f) + 2 * 2 * length * length * d
    return batch * (c.num_hidden_layers * per_layer + 2 * d * cfg.projection_dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from clip_fixtures import VIT_B32, make_clip_folder
    from transformers import CLIPImageProcessorPil

    import clipsel_jax as cs
    from clipsel_jax.text import length_bucket

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench_clip_"))
    tmodel, tok, _ = make_clip_folder(folder, VIT_B32)
    enc = cs.load_encoder(str(folder), dtype=getattr(jnp, args.dtype), batch_size=args.batch)
    tdtype = getattr(torch, args.dtype)  # both sides compute in the same dtype
    tmodel = tmodel.to(tdtype)
    proc = CLIPImageProcessorPil()
    b = args.batch
    rng = np.random.default_rng(0)
    imgs224 = rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
    imgs32 = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
    texts = [f"a photo of a {w}, a type of object number {i}" for i, w in
             zip(range(b), ["cat", "dog", "airplane", "truck", "ship", "frog", "horse", "bird"] * b)]
    res = {"batch": b, "dtype": args.dtype, "jax": jax.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "devices": str(jax.devices())}

    # Peak matmul rate of each framework on this machine: float32 GEMMs of the sizes the models run (the MLP's
    # 3200x768x3072) and 2048^3, best of many alternated runs (a shared 2-core VM is noisy).
    peaks = {"jax": 0.0, "torch": 0.0}
    for m, k, n in ((2048, 2048, 2048), (b * 50, 768, 3072)):
        a, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        ta, tw = torch.ones(m, k), torch.ones(k, n)
        mm = jax.jit(lambda x, y: x @ y)
        t = best_times({"jax": lambda: mm(a, w).block_until_ready(), "torch": lambda: ta @ tw}, 3 * args.repeats)
        for key in peaks:
            peaks[key] = max(peaks[key], 2 * m * k * n / t[key] / 1e9)
    res["jax_matmul_gflops"], res["torch_matmul_gflops"] = peaks["jax"], peaks["torch"]

    # Model only: identical preprocessed inputs (224x224 uint8 needs no resize; the crop is a view).
    tp = proc(list(imgs224), return_tensors="pt")["pixel_values"].to(tdtype)
    inp = tok(texts, padding=True, return_tensors="pt")

    def torch_images():
        with torch.inference_mode():
            return tmodel.get_image_features(pixel_values=tp)

    def torch_texts():
        with torch.inference_mode():
            return tmodel.get_text_features(**inp)

    t = best_times({"torch_img": torch_images, "jax_img": lambda: enc.encode_images(imgs224),
                    "torch_txt": torch_texts, "jax_txt": lambda: enc.encode_texts(texts)}, args.repeats)
    flops = vit_flops(enc.config, b)
    length = inp["input_ids"].shape[1]
    bucket = length_bucket(length, enc.context_length)
    res.update({
        "model_images_per_s": {"clipsel_jax": b / t["jax_img"], "torch": b / t["torch_img"],
                               "ratio": t["torch_img"] / t["jax_img"]},
        "model_texts_per_s": {"clipsel_jax": b / t["jax_txt"], "torch": b / t["torch_txt"],
                              "ratio": t["torch_txt"] / t["jax_txt"], "torch_tokens": length,
                              "clipsel_jax_tokens": bucket},
        "vision_fraction_of_peak": {"clipsel_jax": flops / t["jax_img"] / 1e9 / res["jax_matmul_gflops"],
                                    "torch": flops / t["torch_img"] / 1e9 / res["torch_matmul_gflops"]},
        "text_fraction_of_peak": {
            "clipsel_jax": text_flops(enc.config, b, bucket) / t["jax_txt"] / 1e9 / res["jax_matmul_gflops"],
            "torch": text_flops(enc.config, b, length) / t["torch_txt"] / 1e9 / res["torch_matmul_gflops"]},
    })

    # Whole pipeline from CIFAR-sized uint8 images.
    def torch_pipeline():
        with torch.inference_mode():
            pixels = proc(list(imgs32), return_tensors="pt")["pixel_values"].to(tdtype)
            return tmodel.get_image_features(pixel_values=pixels)

    t = best_times({"torch": torch_pipeline, "jax": lambda: enc.encode_images(imgs32)}, args.repeats)
    res["pipeline_images_per_s_32px"] = {"clipsel_jax": b / t["jax"], "torch": b / t["torch"],
                                         "ratio": t["torch"] / t["jax"]}

    ours = enc.encode_images(imgs32)
    ref = torch_pipeline().pooler_output.float().numpy()
    res["max_abs_diff_vs_torch"] = float(np.abs(ours - ref).max())

    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
