"""CIFAR-100 (50,000 training images, 100 classes of 500) with CLIP ViT-B/32.

    clipsel select --config configs/cifar100.py
    clipsel select --config configs/cifar100.py --limit 5000 --adapter-epochs 2   # local debug run
"""


def get_config():
    return dict(
        data=dict(path="tfds:cifar100", subdir="train"),
        encoder=dict(name="openai/clip-vit-base-patch32"),
        embed=dict(prompts=["A photo of a {}."]),
        adapt=dict(kind="linear", epochs=30),
        scores=dict(k_fraction=0.1),  # K = 50 neighbours per class
        ratio=0.3,
        method="clipsel",  # alignment probability, alpha 0.1, per-class quotas; "paper": the paper's text
        workdir="out/cifar100",
    )
