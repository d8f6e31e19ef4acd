"""Checkpoint conversion: Hugging Face / OpenAI / open_clip -> Flax params -> Hugging Face; orbax."""

from larv_jax.checkpoint.core import (
    Checkpoint,
    load_checkpoint,
    load_params,
    save_hf,
    to_hf_state_dict,
)
from larv_jax.checkpoint.orbax_io import restore_params, save_params

__all__ = [
    "Checkpoint", "load_checkpoint", "load_params", "save_hf", "to_hf_state_dict",
    "save_params", "restore_params",
]
