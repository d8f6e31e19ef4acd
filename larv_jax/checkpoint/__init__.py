"""Checkpoint conversion: Hugging Face / OpenAI / open_clip -> Flax params -> Hugging Face; orbax."""

from larv_jax.checkpoint.core import (
    ActivationWarning,
    Checkpoint,
    load_checkpoint,
    load_params,
    save_hf,
    to_hf_state_dict,
)


def __getattr__(name: str):
    # orbax (and jax with it) only when asked for: `larv merge` never needs them
    if name in ("restore_params", "save_params"):
        from larv_jax.checkpoint import orbax_io

        return getattr(orbax_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ActivationWarning", "Checkpoint", "load_checkpoint", "load_params", "save_hf", "to_hf_state_dict",
    "save_params", "restore_params",
]
