"""Tiny-ImageNet (100,000 training images of 64x64, 200 classes) with CLIP ViT-B/32.

Data: the class folders are WordNet ids, and the official archive keeps images one level deeper
(train/<wnid>/images/<file>). Flatten once to <wnid>/<file>:

    cd tiny-imagenet-200/train && for d in */; do mv "$d"images/* "$d" && rmdir "$d"images; done

then

    clipsel select --config configs/tiny_imagenet.py --data tiny-imagenet-200/train \
        --class-names tiny-imagenet-200/words.txt

words.txt maps each id to readable names; the first synonym goes into the prompt ("A photo of a goldfish.").
"""


def get_config():
    return {
        "data": "tiny-imagenet-200/train",
        "class_names": "tiny-imagenet-200/words.txt",
        "encoder": "openai/clip-vit-base-patch32",
        "prompt": ["A photo of a {}."],
        "ratio": 0.3,
        "adapter": "linear",
        "adapter_epochs": 30,
        "k_fraction": 0.1,
        "balance": "class",
        "alpha": "code",
        "workdir": "out/tiny_imagenet",
    }
