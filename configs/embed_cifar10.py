"""Embed CIFAR-10 (the JPEG zip) with CLIP ViT-B/32. Run:

    .venv/bin/clipsel embed $(.venv/bin/python configs/embed_cifar10.py)

Edit `DATA` to where the archive lives; set ENCODER to a local folder or OpenCLIP file when offline.
"""

import os

DATA = os.environ.get("CIFAR10_ZIP", "../shared/data/cifar10-jpeg.zip")
ENCODER = os.environ.get("CLIPSEL_ENCODER", "openai/clip-vit-base-patch32")
ARGS = ["--encoder", ENCODER, "--data", f"{DATA}:cifar10-jpeg/train", "--prompt", "A photo of a {}.",
        "--out", "out/cifar10_train_emb.npz"]

if __name__ == "__main__":
    print(" ".join(ARGS))
