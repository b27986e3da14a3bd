"""Flax NNX models: the CLIP towers (clip.py), the adapters (adapters.py), and the offline encoder's
EfficientNet-Lite0 (efficientnet.py) and MiniLM text tower (minilm.py)."""
