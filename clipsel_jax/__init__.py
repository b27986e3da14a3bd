"""clipsel_jax: CLIP-powered data selection (Yang et al., ICLR 2025) in JAX/Flax."""

from clipsel_jax import data
from clipsel_jax.adapt import AdaptConfig
from clipsel_jax.data.preprocess import ImageError
from clipsel_jax.embedding import Embeddings, embed
from clipsel_jax.encoder import ClipEncoder, Encoder, load_encoder, register_encoder
from clipsel_jax.errors import CheckpointError
from clipsel_jax.offline import OfflineEncoder  # registers load_encoder("offline"); loads nothing yet
from clipsel_jax.pipeline import Selection, select, select_from_embeddings
from clipsel_jax.selection import SelectionConfig
from clipsel_jax.workdir_lock import WorkdirBusy, hold_workdir

__version__ = "0.1.0"

__all__ = ["AdaptConfig", "CheckpointError", "ClipEncoder", "Embeddings", "Encoder", "ImageError", "OfflineEncoder",
           "Selection", "SelectionConfig", "data", "embed", "load_encoder", "register_encoder", "select",
           "select_from_embeddings", "WorkdirBusy", "hold_workdir",
           "__version__"]
