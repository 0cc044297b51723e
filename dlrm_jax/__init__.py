"""dlrm_jax: the deep learning recommendation model (DLRM) in JAX and Flax."""

from dlrm_jax.config import ConfigError, ModelSpec
from dlrm_jax.model import DLRM

__version__ = "0.1.0"

__all__ = ["ConfigError", "DLRM", "ModelSpec", "__version__"]
