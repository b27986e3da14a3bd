"""CIFAR-100 (50,000 training images, 100 classes of 500) with CLIP ViT-B/32.

    clipsel select --config configs/cifar100.py
    clipsel select --config configs/cifar100.py --limit 5000 --adapter-epochs 2   # local debug run
"""


def get_config():
    return {
        "data": "tfds:cifar100",
        "subdir": "train",
        "encoder": "openai/clip-vit-base-patch32",
        "prompt": ["A photo of a {}."],
        "ratio": 0.3,
        "adapter": "linear",
        "adapter_epochs": 30,
        "k_fraction": 0.1,  # K = 50 neighbours per class
        "balance": "class",
        "alpha": "code",
        "workdir": "out/cifar100",
    }
