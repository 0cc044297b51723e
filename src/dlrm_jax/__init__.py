"""dlrm_jax: the deep learning recommendation model (DLRM) in JAX and Flax."""

from dlrm_jax.config import ConfigError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DLRM", "ModelSpec", "__version__"]


def __getattr__(name: str):
  # The model (and with it JAX) is imported on first use, so that tools that
  # need no JAX, such as the Criteo preprocessing workers, start fast.
  if name in ("DLRM", "ModelSpec"):
    from dlrm_jax import model

    return getattr(model, name)
  raise AttributeError(f"module 'dlrm_jax' has no attribute {name!r}")
