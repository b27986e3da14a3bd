"""clipsel_jax: CLIP-powered data selection (Yang et al., ICLR 2025) in JAX/Flax."""

from clipsel_jax.encoder import ClipEncoder, load_encoder, register_encoder
from clipsel_jax.weights import CheckpointError
from clipsel_jax.data.preprocess import ImageError

__version__ = "0.1.0"

__all__ = ["ClipEncoder", "load_encoder", "register_encoder", "CheckpointError", "ImageError", "__version__"]

from clipsel_jax.adapt import AdaptConfig  # noqa: E402
from clipsel_jax.pipeline import Selection, select_from_embeddings  # noqa: E402
from clipsel_jax.select import SelectionConfig  # noqa: E402

__all__ += ["AdaptConfig", "Selection", "SelectionConfig", "select_from_embeddings"]
