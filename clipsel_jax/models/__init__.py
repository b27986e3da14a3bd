"""Flax NNX models: the CLIP towers (clip.py); adapters and offline encoders follow."""
