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


def _orbax(path: Path, act: str | None) -> tuple[CLIPConfig, dict[str, Any]]:
    """An orbax directory's ``(config, params)``; its config.json states the activation, which
    an explicit ``act`` overrides (with a warning when they differ), as for any checkpoint."""
    import warnings

    from larv_jax.checkpoint.core import ActivationWarning
    from larv_jax.checkpoint.orbax_io import restore_params
    from larv_jax.models.config import check_act, with_act

    config, params = restore_params(path)
    if act is not None:
        check_act(act)
        if config.vision.act != act:
            warnings.warn(f"{path}: using act={act!r} as given (--act), not "
                          f"{config.vision.act!r} from {path / 'config.json'}",
                          ActivationWarning, stacklevel=3)
        config = with_act(config, act)
    return config, params


def open_any(path: str | Path, *, allow_pickle: bool = False, act: str | None = None
             ) -> tuple[CLIPConfig, dict[str, Any], str, str]:
    """``(config, flat params, format, source dtype)`` for any supported input; for a lazy
    checkpoint the flat values are ``jax.ShapeDtypeStruct`` (nothing is read). ``act`` as
    :func:`larv_jax.checkpoint.load_checkpoint`'s."""
    import jax
    import numpy as np

    from larv_jax.checkpoint.core import load_checkpoint

    path = Path(path)
    if is_orbax_dir(path):
        config, params = _orbax(path, act)
        flat = tree.flatten(params)
        return config, {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat.items()}, \
            "orbax", "float32"
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle, act=act)
    flat = {p: jax.ShapeDtypeStruct(ckpt.shape(p), np.float32) for p in ckpt.paths()}
    return ckpt.config, flat, ckpt.format, ckpt.source_dtype


def load_any(path: str | Path, *, allow_pickle: bool = False, act: str | None = None
             ) -> tuple[CLIPConfig, dict[str, Any]]:
    """Read every parameter: ``(config, nested params)`` from any supported input (``act`` as
    :func:`larv_jax.checkpoint.load_checkpoint`'s)."""
    from larv_jax.checkpoint.core import load_params

    path = Path(path)
    if is_orbax_dir(path):
        return _orbax(path, act)
    return load_params(path, allow_pickle=allow_pickle, act=act)


def convert(src: str | Path, dst: str | Path, *, to: str, vision_only: bool = False,
            allow_pickle: bool = False, overwrite: bool = False, act: str | None = None) -> Path:
    """Convert ``src`` (any format) to ``to`` = ``"hf"`` or ``"flax"`` (orbax) at ``dst``.

    ``vision_only`` drops the text tower and projections (a ``CLIPVisionModel``). Tokenizer files
    next to a Hugging Face source are copied to a Hugging Face destination. ``act``: the
    activation written to the output's config (``None``: the source's; see
    :func:`larv_jax.checkpoint.load_checkpoint`)."""
    import jax
    import numpy as np

    from larv_jax.checkpoint.core import save_hf
    from larv_jax.checkpoint.orbax_io import save_params

    if to not in ("hf", "flax"):
        raise ValueError(f"--to must be 'hf' or 'flax', got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite to replace it)")
    config, params = load_any(src, allow_pickle=allow_pickle, act=act)
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
