"""Offline encoder throughput: clipsel_jax (JAX/XLA) against PyTorch references on the same packaged weights.

  images  EfficientNet-Lite0, 224x224 uint8 batch -> pooled 1280-d features. Ours: the jitted tower (normalisation
          on device, batch norm folded into the convolutions). PyTorch: the torch-ops forward of
          tests/offline_reference.py (F.conv2d with groups for the depthwise convolutions, F.batch_norm in eval
          mode, as the .pth stores it) on the same pixels.
  texts   all-MiniLM-L6-v2, identical token ids -> unit-norm 384-d embeddings. Ours: the jitted tower (length
          padded to a multiple of 8); PyTorch: transformers.BertModel + mean pooling + L2 normalisation.
Tokenization and image resizing are excluded on both sides; measurements alternate between the two frameworks and
the best of --repeats is kept.

    python scripts/bench_offline.py [--batch 64] [--repeats 7] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import jax
    import torch
    from bench_encoder import best_times
    from offline_reference import torch_efficientnet, torch_minilm, torch_sentence_embeddings

    import clipsel_jax as cs
    from clipsel_jax import offline, parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    b = args.batch
    enc = cs.load_encoder("offline", batch_size=b)
    res = {"batch": b, "dtype": "float32", "jax": jax.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "devices": str(jax.devices())}

    # Images: identical 224x224 uint8 inputs (random pixels: the cost does not depend on content).
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
    sd = torch.load(str(offline.efficientnet_file()), map_location="cpu", weights_only=True)
    tu8 = torch.from_numpy(u8)

    def torch_images():
        x = ((tu8.float() - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
        return torch_efficientnet(sd, x)[0]

    def jax_images():
        return np.asarray(enc.features_of_prepared(u8))

    t = best_times({"jax": jax_images, "torch": torch_images}, args.repeats)
    res["images_per_s_224px"] = {"clipsel_jax": b / t["jax"], "torch": b / t["torch"],
                                 "ratio": t["torch"] / t["jax"],
                                 "max_abs_diff": float(np.abs(jax_images() - torch_images()).max())}

    # Texts: class prompts (short) and captions (longer), the same token ids on both sides.
    tok, tmodel = torch_minilm(offline.minilm_folder())
    words = ["cat", "dog", "airplane", "truck", "ship", "frog", "horse", "bird"]
    sets = {"prompts": [f"A photo of a {words[i % 8]}, object number {i}." for i in range(b)],
            "captions": [f"A photo of a {words[i % 8]} standing next to a red car on a busy street in the "
                         f"city at night, while people walk by with umbrellas in the rain, picture {i}, "
                         "taken with an old camera from a window on the third floor of a building." for i in range(b)]}
    sharding = parallel.batch_sharding(enc.mesh)
    for name, texts in sets.items():
        inp = tok(texts, padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt")
        ids, mask = enc._tokenize(texts)  # the same ids, padded to the next multiple of 8
        ids_d, mask_d = jax.device_put(ids, sharding), jax.device_put(mask, sharding)

        def torch_texts():
            return torch_sentence_embeddings(tmodel, inp["input_ids"], inp["attention_mask"])

        def jax_texts():
            return np.asarray(enc._text_features(enc._text_state, ids_d, mask_d))

        t = best_times({"jax": jax_texts, "torch": torch_texts}, args.repeats)
        res[f"texts_per_s_{name}"] = {"clipsel_jax": b / t["jax"], "torch": b / t["torch"],
                                      "ratio": t["torch"] / t["jax"], "torch_tokens": inp["input_ids"].shape[1],
                                      "clipsel_jax_tokens": ids.shape[1],
                                      "max_abs_diff": float(np.abs(jax_texts() - torch_texts()).max())}

    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
