"""clipsel_jax: CLIP-powered data selection (Yang et al., ICLR 2025) in JAX/Flax."""

from clipsel_jax.encoder import ClipEncoder, load_encoder, register_encoder
from clipsel_jax.weights import CheckpointError
from clipsel_jax.data.preprocess import ImageError

__version__ = "0.1.0"

__all__ = ["ClipEncoder", "load_encoder", "register_encoder", "CheckpointError", "ImageError", "__version__"]
