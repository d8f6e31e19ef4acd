"""Path names are the API: flat views of parameter trees and per-leaf layout facts.

A parameter tree is the nested dict a Flax ``init`` returns under ``"params"``. Every leaf has a
slash-joined path, e.g. ``visual/transformer/resblocks/attn/query/kernel``. Encoder blocks are
stacked: every leaf under ``*/transformer/resblocks/`` has a leading block axis ``[B, ...]``.

Layouts (Flax) and their matrix views (PyTorch ``[out, in]``, the orientation every algorithm in
SPEC is written for):

=====================  ===========================  =====================================
leaf                   Flax layout                  matrix view
=====================  ===========================  =====================================
Dense ``.../kernel``   ``[in, out]``                ``kernel.T``  -> ``[out, in]``
Conv ``conv1/kernel``  ``[P, P, C, D]`` (HWIO)      ``[D, C*P*P]`` (torch OIHW flattened)
embedding tables       ``[N, D]``                   as stored (same as torch)
vectors / scalars      ``[D]`` / ``[]``             none
=====================  ===========================  =====================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Params = dict[str, Any]
Flat = dict[str, Any]

STACKED_RE = re.compile(r"(^|/)transformer/resblocks/")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    """Nested dict -> ``{path: leaf}`` in insertion (forward) order."""
    out: Flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> Params:
    """``{path: leaf}`` -> nested dict (inverse of :func:`flatten`)."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def is_stacked(path: str) -> bool:
    """True for leaves that carry a leading encoder-block axis."""
    return STACKED_RE.search(path) is not None


def leaf_kind(path: str, ndim: int) -> str:
    """One of ``dense``, ``conv``, ``embedding``, ``vector`` (``ndim`` excludes the block axis)."""
    if path.endswith("/kernel") and ndim == 2:
        return "dense"
    if path.endswith("/kernel") and ndim == 4:
        return "conv"
    if ndim == 2:
        return "embedding"
    return "vector"


def unstacked_ndim(path: str, shape: Sequence[int]) -> int:
    return len(shape) - 1 if is_stacked(path) else len(shape)


def to_matrix(path: str, leaf: Any) -> Any:
    """Matrix view ``[..., out, in]`` of a leaf (block axis kept in front); vectors unchanged.

    Works for numpy and jax arrays alike (only ``swapaxes``/``reshape``/``transpose``).
    """
    kind = leaf_kind(path, unstacked_ndim(path, leaf.shape))
    if kind == "dense":
        return leaf.swapaxes(-1, -2)
    if kind == "conv":
        lead = leaf.shape[:-4]
        p1, p2, c, d = leaf.shape[-4:]
        perm = tuple(range(len(lead))) + tuple(len(lead) + i for i in (3, 2, 0, 1))
        return leaf.transpose(perm).reshape(*lead, d, c * p1 * p2)
    return leaf


def from_matrix(path: str, matrix: Any, shape: Sequence[int]) -> Any:
    """Inverse of :func:`to_matrix` given the leaf's Flax ``shape``."""
    kind = leaf_kind(path, unstacked_ndim(path, shape))
    if kind == "dense":
        return matrix.swapaxes(-1, -2)
    if kind == "conv":
        lead = tuple(shape[:-4])
        p1, p2, c, d = shape[-4:]
        oihw = matrix.reshape(*lead, d, c, p1, p2)
        perm = tuple(range(len(lead))) + tuple(len(lead) + i for i in (2, 3, 1, 0))
        return oihw.transpose(perm)
    return matrix


def is_matrix(path: str, shape: Sequence[int]) -> bool:
    """The SPEC "2-D rule": dense kernels and 2-D embedding tables take matrix paths; conv and
    vectors take the fallback."""
    return leaf_kind(path, unstacked_ndim(path, shape)) in ("dense", "embedding")


def first_match(path: str, rules: Iterable[tuple[str, Any]], default: Any = None) -> Any:
    """Value of the first ``(regex, value)`` rule whose regex ``re.search``-es ``path``."""
    for pattern, value in rules:
        if re.search(pattern, path):
            return value
    return default


def num_params(flat: Mapping[str, Any]) -> int:
    return int(sum(int(np.prod(np.shape(v))) for v in flat.values()))
