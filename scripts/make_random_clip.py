"""Write a randomly initialised CLIP (transformers save_pretrained layout, byte-level CLIP tokenizer) to a folder.

For running the pipeline where no real weights can be had (no network): the features are random projections, so
the numbers mean nothing, but every stage runs exactly as with real weights. Needs torch (the [torch] extra).

    python scripts/make_random_clip.py out/random-clip-b32 [--size vit-b32|tiny]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--size", default="vit-b32", choices=["vit-b32", "tiny"])
    args = ap.parse_args()
    from clip_fixtures import TINY, VIT_B32, make_clip_folder

    folder = Path(args.folder)
    if (folder / "config.json").is_file():
        print(f"{folder} already holds a model; leaving it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    make_clip_folder(folder, VIT_B32 if args.size == "vit-b32" else TINY)
    print(f"wrote a random {args.size} CLIP to {folder}")


if __name__ == "__main__":
    main()
