"""CIFAR-10 (50,000 training images, 10 classes) with CLIP ViT-B/32, the paper's setting.

    clipsel select --config configs/cifar10.py                     # tfds:cifar10 (TFDS downloads/prepares it)
    clipsel select --config configs/cifar10.py --data ../shared/data/cifar10-jpeg.zip --subdir cifar10-jpeg/train
    clipsel select --config configs/cifar10.py --encoder offline   # no network: EfficientNet-Lite0 + MiniLM
    clipsel select --config configs/cifar10.py --limit 2000 --adapter-epochs 2   # local debug run

The paper's prompt is "A photo of a {}." (the authors' code); add --prompt repeatedly for a template ensemble.
"""


def get_config():
    return dict(
        data=dict(path="tfds:cifar10", subdir="train"),  # subdir: the split, for tfds:
        encoder=dict(name="openai/clip-vit-base-patch32"),
        embed=dict(prompts=["A photo of a {}."]),
        adapt=dict(kind="linear", epochs=30),  # Adam 1e-4, batch 256: docs/method.md, "Dataset adaptation"
        scores=dict(k_fraction=0.1),  # SDS: K = 10% of the class
        ratio=0.3,
        method="clipsel",  # alignment probability, alpha 0.1, per-class quotas; "paper": the paper's text
        workdir="out/cifar10",
    )
