"""Where task vectors come from: one protocol for leaf sources, opened checkpoints and trees alike.

A :class:`LeafSource` is anything the merging engine reads Flax leaves from: an opened checkpoint
(:class:`larv_jax.checkpoint.Checkpoint`) or an in-memory tree (:class:`TreeSource`). The
engine's task vectors (:class:`larv_jax.merging.TaskVectors`) read the base and the K fine-tuned
models through this protocol and nothing else, so every way of giving models to a merge (paths,
opened checkpoints, parameter trees) takes the same code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from larv_jax import tree


class LeafSource(Protocol):
    """Flax leaves by slash path, read on demand (float32, stacked blocks ``[B, ...]``).

    ``origin`` names the source in error messages; ``files`` are the files it reads (hashed in
    the merge report; none for a tree); ``source_dtype`` is the stored dtype (leaves are upcast
    to float32); ``config`` is its :class:`larv_jax.models.config.CLIPConfig` or None.
    """

    origin: Any
    config: Any

    @property
    def files(self) -> Sequence[Path]: ...

    @property
    def source_dtype(self) -> str: ...

    def paths(self) -> list[str]:
        """Every leaf path, in the source's order."""

    def shape(self, path: str) -> tuple[int, ...]:
        """The Flax shape of one leaf (no read)."""

    def leaf(self, path: str, block: int | None = None, out: np.ndarray | None = None, *,
             native: bool = False) -> np.ndarray:
        """One leaf as a fresh float32 array (into ``out`` when given; ``block``: one slice of a
        stacked leaf; ``native``: in the stored memory order, same values)."""

    def raw_layout(self, path: str) -> tuple[list[tuple[Path, int, int]], bool] | None:
        """The stored float32 byte spans of the leaf when reading them is the leaf in memory
        order (:meth:`larv_jax.checkpoint.Checkpoint.raw_layout`); None otherwise."""


class TreeSource:
    """An in-memory parameter tree (flat ``{path: array}`` or nested) as a :class:`LeafSource`."""

    files: tuple[Path, ...] = ()

    def __init__(self, params: Mapping[str, Any], origin: Any = "memory", *,
                 config: Any = None, source_dtype: str = "float32"):
        nested = any(isinstance(v, Mapping) for v in params.values())
        self.flat = tree.flatten(params) if nested else params
        self.origin = origin
        self.config = config
        self.source_dtype = source_dtype

    def paths(self) -> list[str]:
        return list(self.flat)

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(np.shape(self.flat[path]))

    def leaf(self, path: str, block: int | None = None, out: np.ndarray | None = None, *,
             native: bool = False) -> np.ndarray:
        try:
            x = np.asarray(self.flat[path], dtype=np.float32)
        except KeyError:
            raise KeyError(f"{self.origin}: no parameter {path!r}") from None
        if block is not None:
            x = x[block]
        if out is None:
            return np.array(x)
        if out.shape != x.shape:
            raise ValueError(f"{self.origin}: {path!r} has shape {x.shape}; expected {out.shape}")
        out[...] = x
        return out

    def raw_layout(self, path: str) -> None:
        return None


def open_source(src: Any) -> LeafSource:
    """A :class:`LeafSource` from a checkpoint path (opened lazily with
    :func:`larv_jax.checkpoint.load_checkpoint`), a parameter tree, or a source itself."""
    if isinstance(src, (str, Path)):
        from larv_jax.checkpoint import load_checkpoint

        return load_checkpoint(src)
    if isinstance(src, Mapping):
        return TreeSource(src)
    return src
