"""LARV units (SPEC §1): which parameters form "layer l", derived from flat parameter paths.

A unit is one depth position of the LARV veneer. Its *matrices* take part in the diagnostics
(SPEC §2); its *attached* leaves (biases, LayerNorm, class/position embeddings) only receive the
unit's scale s_l. Stacked leaves ``[B, ...]`` belong to B units, one per block, so every member is a
``(path, block)`` pair with ``block`` None for unstacked leaves.

The assignment is an ordered ``(regex, role)`` table, first match wins (``ROLE_RULES``); a role plus
the block index gives the unit through the granularity:

- ``module`` (default): ``patch`` (conv1 + class/pos embedding + ln_pre), then per block b
  ``attn_b`` (q, k, v, out + their biases + ln_1), ``mlp_in_b`` (c_fc + bias + ln_2),
  ``mlp_out_b`` (c_proj + bias), then ``proj`` if present; ln_post attaches to the last unit.
  L = 1 + 3B (+1).
- ``block``: L = B units ``block_b``; embeddings attach to block 0, ln_post / proj to block B-1.

Only paths under ``visual/`` are considered; the text tower and ``logit_scale`` are not LARV units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from larv_jax import tree as ltree

# role, is_matrix (takes part in diagnostics). First match wins.
ROLE_RULES: tuple[tuple[str, tuple[str, bool]], ...] = (
    (r"^visual/conv1/kernel$", ("patch", True)),
    (r"^visual/(class_embedding|positional_embedding)$", ("patch", False)),
    (r"^visual/ln_pre/", ("patch", False)),
    (r"^visual/transformer/resblocks/attn/(query|key|value|out)/kernel$", ("attn", True)),
    (r"^visual/transformer/resblocks/attn/(query|key|value|out)/bias$", ("attn", False)),
    (r"^visual/transformer/resblocks/ln_1/", ("attn", False)),
    (r"^visual/transformer/resblocks/mlp/c_fc/kernel$", ("mlp_in", True)),
    (r"^visual/transformer/resblocks/mlp/c_fc/bias$", ("mlp_in", False)),
    (r"^visual/transformer/resblocks/ln_2/", ("mlp_in", False)),
    (r"^visual/transformer/resblocks/mlp/c_proj/kernel$", ("mlp_out", True)),
    (r"^visual/transformer/resblocks/mlp/c_proj/bias$", ("mlp_out", False)),
    (r"^visual/proj/kernel$", ("proj", True)),
    (r"^visual/ln_post/", ("post", False)),
)

GRANULARITIES = ("module", "block")
_SUB = {"attn": 0, "mlp_in": 1, "mlp_out": 2}


class Unit(NamedTuple):
    """One LARV layer. ``matrices``/``attached``: ``((path, block or None), ...)`` in path order."""

    name: str
    depth: int  # 1..L, forward order
    matrices: tuple[tuple[str, int | None], ...]
    attached: tuple[tuple[str, int | None], ...]
    granularity: str = "module"  # the granularity that made it (:data:`GRANULARITIES`)


def _unit_key(role: str, block: int | None, n_blocks: int,
              granularity: str) -> tuple[tuple[int, int, int], str]:
    """(sort key in forward order, unit name) of a role; ``post`` is resolved by the caller."""
    if granularity == "module":
        if role == "patch":
            return (0, 0, 0), "patch"
        if role in _SUB:
            return (1, block, _SUB[role]), f"{role}_{block}"
        if role == "proj":
            return (2, 0, 0), "proj"
    else:
        if role == "patch":
            block = 0
        elif role == "proj":
            block = n_blocks - 1
        return (1, block, 0), f"block_{block}"
    raise AssertionError(role)


def units(shapes: Mapping[str, Sequence[int]], granularity: str = "module") -> list[Unit]:
    """Ordered LARV units of a vision tower from its flat parameter shapes (SPEC §1).

    Args:
      shapes: ``{path: shape}`` in the Flax layout (stacked blocks ``[B, ...]``); any mapping whose
        values have a ``.shape`` (arrays, ``jax.ShapeDtypeStruct``) is accepted too. Paths outside
        ``visual/`` are ignored.
      granularity: ``"module"`` (L = 1 + 3B (+1 with ``visual/proj``)) or ``"block"`` (L = B).

    Returns:
      ``[Unit(name, depth, matrices, attached), ...]`` with depth 1..L in forward order.

    Raises ValueError for an unknown granularity, a ``visual/`` path no rule matches, stacked
    leaves whose block counts disagree, or a unit left without a matrix.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {list(GRANULARITIES)}")
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in shapes.items() if p.startswith("visual/")}
    if not shapes:
        raise ValueError("no visual/ parameters: LARV units need the vision tower")
    blocks = {s[0] for p, s in shapes.items() if ltree.is_stacked(p)}
    if len(blocks) != 1:
        raise ValueError(f"stacked visual/transformer/resblocks leaves disagree on the block count "
                         f"(or are missing): {sorted(blocks)}")
    n_blocks = blocks.pop()

    members: dict[tuple[tuple[int, int, int], str], tuple[list, list]] = {}
    post: list[str] = []
    for path in shapes:
        rule = ltree.first_match(path, ROLE_RULES)
        if rule is None:
            raise ValueError(f"parameter {path!r} matches no LARV unit rule (larv_jax.diagnostics."
                             "unit_rules.ROLE_RULES)")
        role, is_mat = rule
        if role == "post":
            post.append(path)
            continue
        for b in (range(n_blocks) if ltree.is_stacked(path) else (None,)):
            key = _unit_key(role, b, n_blocks, granularity)
            mats, att = members.setdefault(key, ([], []))
            (mats if is_mat else att).append((path, b))
    if not members:
        raise ValueError("no LARV unit found among the visual/ parameters")
    order = sorted(members)
    last = order[-1]
    members[last][1].extend((p, None) for p in post)
    out = []
    for depth, key in enumerate(order, start=1):
        mats, att = members[key]
        if not mats:
            raise ValueError(f"LARV unit {key[1]!r} has no weight matrix (attached: {att})")
        out.append(Unit(key[1], depth, tuple(mats), tuple(att), granularity))
    return out


def param_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a nested or flat parameter tree (arrays or ShapeDtypeStructs)."""
    flat = params if all(not isinstance(v, Mapping) for v in params.values()) else ltree.flatten(params)
    return {p: tuple(v.shape) for p, v in flat.items()}


def unit_scales_to_tree(unit_list: Sequence[Unit], s: Any, shapes: Mapping[str, Sequence[int]],
                        *, fill: float | None = None) -> dict[str, Any]:
    """Expand per-unit scales ``s[L]`` into per-leaf scales, ready for ``theta0 + s * D``.

    Every member of unit l (matrices and attached leaves) gets ``s[l-1]``. An unstacked leaf gets a
    scalar ``[]``; a stacked leaf ``[B, ...]`` gets its B per-block scales shaped
    ``[B, 1, ..., 1]`` (broadcasts against the leaf). Paths outside every unit (text tower,
    ``logit_scale``) are absent, or get the scalar ``fill`` if given. Uses ``jnp`` ops only, so it
    works under ``jit``/``grad`` with a traced ``s``.
    """
    s = jnp.asarray(s)
    if s.shape != (len(unit_list),):
        raise ValueError(f"scales have shape {s.shape}; expected ({len(unit_list)},) for "
                         f"{len(unit_list)} LARV units")
    shapes = {p: tuple(getattr(v, "shape", v)) for p, v in shapes.items()}
    index: dict[str, dict[int | None, int]] = {}
    for i, u in enumerate(unit_list):
        for path, b in u.matrices + u.attached:
            index.setdefault(path, {})[b] = i
    out: dict[str, Any] = {}
    for path, shape in shapes.items():
        where = index.get(path)
        if where is None:
            if fill is not None:
                out[path] = jnp.asarray(fill, s.dtype)
            continue
        if None in where:
            out[path] = s[where[None]]
        else:
            n = shape[0]
            missing = [b for b in range(n) if b not in where]
            if missing:
                raise ValueError(f"{path!r}: blocks {missing} belong to no unit (shape {shape})")
            idx = np.array([where[b] for b in range(n)])
            out[path] = s[idx].reshape((n,) + (1,) * (len(shape) - 1))
    return out


def unit_table(unit_list: Sequence[Unit]) -> list[dict[str, Any]]:
    """JSON-friendly description of the units (name, depth, members)."""
    fmt = lambda m: [f"{p}[{b}]" if b is not None else p for p, b in m]  # noqa: E731
    return [{"name": u.name, "depth": u.depth, "matrices": fmt(u.matrices),
             "attached": fmt(u.attached)} for u in unit_list]

