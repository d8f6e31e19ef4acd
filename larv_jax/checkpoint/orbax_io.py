"""orbax-checkpoint save/restore of Flax params, with the CLIP config stored alongside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from larv_jax.io import atomic_path
from larv_jax.models import config as cfgmod
from larv_jax.models.config import CLIPConfig


def save_params(params: Any, config: CLIPConfig, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``params`` with orbax's ``StandardCheckpointer`` under ``path/params`` and the config
    as ``path/config.json`` (Hugging Face format). Atomic: a failed save leaves nothing behind."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    with atomic_path(path, overwrite=overwrite, is_dir=True) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(cfgmod.to_hf_dict(config), indent=2) + "\n")
    return path


def restore_params(path: str | Path, *, config: CLIPConfig | None = None,
                   sharding: Any = None) -> tuple[CLIPConfig, Any]:
    """Restore into the abstract tree of ``config`` (read from ``path/config.json`` if not given).

    ``sharding``: optional ``jax.sharding.Sharding`` applied to every leaf (default: replicated on
    the default device)."""
    import orbax.checkpoint as ocp

    from larv_jax.models.clip import abstract_params

    path = Path(path).absolute()
    if not (path / "params").exists():
        raise FileNotFoundError(f"{path}: no orbax checkpoint (missing 'params' directory)")
    if config is None:
        config = cfgmod.read_hf_config(path / "config.json")
    abstract = abstract_params(config)
    if sharding is not None:
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path / "params", abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: checkpoint does not match a {config.name} model ({e})") from None
    return config, params
