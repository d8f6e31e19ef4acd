"""Format-agnostic open and convert (what ``larv inspect`` and ``larv convert`` call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from larv_jax import tree
from larv_jax.models.config import CLIPConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "preprocessor_config.json")


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params").is_dir() and (path / "config.json").exists()


def open_any(path: str | Path, *, allow_pickle: bool = False
             ) -> tuple[CLIPConfig, dict[str, Any], str, str]:
    """``(config, flat params, format, source dtype)`` for any supported input; for a lazy
    checkpoint the flat values are ``jax.ShapeDtypeStruct`` (nothing is read)."""
    import jax
    import numpy as np

    from larv_jax.checkpoint.core import load_checkpoint

    path = Path(path)
    if is_orbax_dir(path):
        from larv_jax.checkpoint.orbax_io import restore_params

        config, params = restore_params(path)
        flat = tree.flatten(params)
        return config, {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat.items()}, \
            "orbax", "float32"
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    flat = {p: jax.ShapeDtypeStruct(ckpt.shape(p), np.float32) for p in ckpt.paths()}
    return ckpt.config, flat, ckpt.format, ckpt.source_dtype


def load_any(path: str | Path, *, allow_pickle: bool = False) -> tuple[CLIPConfig, dict[str, Any]]:
    """Read every parameter: ``(config, nested params)`` from any supported input."""
    from larv_jax.checkpoint.core import load_params

    path = Path(path)
    if is_orbax_dir(path):
        from larv_jax.checkpoint.orbax_io import restore_params

        return restore_params(path)
    return load_params(path, allow_pickle=allow_pickle)


def convert(src: str | Path, dst: str | Path, *, to: str, vision_only: bool = False,
            allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert ``src`` (any format) to ``to`` = ``"hf"`` or ``"flax"`` (orbax) at ``dst``.

    ``vision_only`` drops the text tower and projections (a ``CLIPVisionModel``). Tokenizer files
    next to a Hugging Face source are copied to a Hugging Face destination."""
    import jax
    import numpy as np

    from larv_jax.checkpoint.core import save_hf
    from larv_jax.checkpoint.orbax_io import save_params

    if to not in ("hf", "flax"):
        raise ValueError(f"--to must be 'hf' or 'flax', got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite to replace it)")
    config, params = load_any(src, allow_pickle=allow_pickle)
    if vision_only:
        config = config.vision_only()
        params = {"visual": {k: v for k, v in params["visual"].items() if k != "proj"}}
    if to == "flax":
        return save_params(params, config, dst, overwrite=True)
    extra = {}
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                extra[name] = (src / name).read_bytes()
    save_hf(jax.tree.map(np.asarray, params), config, dst, overwrite=True, extra_files=extra)
    return dst
