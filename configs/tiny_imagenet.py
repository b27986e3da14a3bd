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
    return dict(
        data=dict(path="tiny-imagenet-200/train", class_names="tiny-imagenet-200/words.txt"),
        encoder=dict(name="openai/clip-vit-base-patch32"),
        embed=dict(prompts=["A photo of a {}."]),
        adapt=dict(kind="linear", epochs=30),
        scores=dict(k_fraction=0.1),
        ratio=0.3,
        method="clipsel",  # alignment probability, alpha 0.1, per-class quotas; "paper": the paper's text
        workdir="out/tiny_imagenet",
    )
