"""The one registry of merge methods: names, hyperparameters with their defaults, and binding.

``METHODS[name](task_vectors, **hparams) -> delta`` (:mod:`larv_jax.merging.methods`). Everything
that takes a method by name reads this module: the CLI's ``--method`` choices, ``larv run``'s
configs, ``larv demo``, the streaming engine (:func:`larv_jax.merging.merge_delta`) and the
benchmarks. A method's hyperparameters are its keyword-only arguments (a preset's are those of
the function it binds, with the preset's values as defaults; DARE's also include those of the
merger it hands over to, ``then``), and :func:`hparams` is the one place given options are
checked against them.

Adding a merger: write ``my_merger(task_vectors, *, scale=1.0, ...) -> delta`` in its own module
under ``larv_jax/merging/`` and add one line to :data:`METHODS` (and, for SVC, to
:data:`larv_jax.merging.svc.SVC_ALPHA` if the SVC paper gives it an alpha).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from larv_jax.merging import methods as M
from larv_jax.merging.svc import svc as _svc
from larv_jax.merging.svc import svc_alpha

MergeFn = Callable[[Mapping[str, Any]], dict[str, Any]]

METHODS: dict[str, Callable[..., Any]] = {
    "simple_average": M.simple_average,
    "task_arithmetic": M.task_arithmetic,
    "ties": M.ties,
    "ties_paper": M.ties_paper,
    "dare_task_arithmetic": M.dare_task_arithmetic,
    "dare_ties": M.dare_ties,
    "dare_average": M.dare_average,
    "tsv_m": M.tsv_m,
    "iso_c": M.iso_c,
    "iso_cts": M.iso_cts,
}

# The merger DARE hands over to (``then``): names of its ``then`` argument.
_DARE_NEXT = {"task_arithmetic": M.task_arithmetic, "ties": M.ties,
              "simple_average": M.simple_average}


# Options a preset fixes because they define it: simple averaging has no coefficient (scale None
# is 1/K), DARE-Average is DARE then simple averaging. Giving one is an error, not a silent
# change of method (`--method simple_average --scale 0.5` used to write Task Arithmetic).
FIXED = {"simple_average": ("scale",), "dare_average": ("scale", "then")}


def get_method(name: str) -> Callable[..., Any]:
    """``METHODS[name]``, or a ValueError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; valid: {sorted(METHODS)}") from None


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword-only parameters of ``fn`` -> default (``inspect.Parameter.empty`` if none); a
    ``functools.partial`` preset's keywords are its defaults."""
    params = inspect.signature(fn).parameters.values()
    out = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
    if isinstance(fn, functools.partial):  # keywords bound for the merger's **then_kwargs too
        out.update(fn.keywords)
    return out


def hparams(method: str, given: Mapping[str, Any] | None = None, *,
            model: str | None = None) -> dict[str, Any]:
    """Every hyperparameter of ``method`` with its value: ``given``, else the default.

    ``model`` (a ``CLIPConfig.name`` such as ``ViT-B-32``) fills Iso-C's ``model`` argument and
    so its per-backbone scale. An unknown hyperparameter raises a ValueError naming it and the
    valid ones: the one check of a method's options.
    """
    fn = get_method(method)
    given = dict(given or {})
    defaults = _keyword_defaults(fn)
    then = given.get("then", defaults.get("then"))
    if then in _DARE_NEXT and "then" in defaults:  # DARE: the next merger's options are its own
        for name, default in _keyword_defaults(_DARE_NEXT[then]).items():
            defaults.setdefault(name, default)
    fixed = sorted(set(given) & set(FIXED.get(method, ())))
    if fixed:
        raise ValueError(f"{method}: {fixed} cannot be set (fixed by the method itself); valid: "
                         f"{sorted(set(defaults) - set(FIXED[method]))}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {unknown}; valid: "
                         f"{sorted(defaults)}")
    out = {n: d for n, d in defaults.items() if d is not inspect.Parameter.empty}
    if "model" in defaults and model is not None:
        out["model"] = model
    out.update(given)
    if method == "iso_c" and out.get("scale") is None:
        out["scale"] = M.ISO_C_SCALES.get(out.get("model"), 1.0)
    return out


def bind(method: str, *, model: str | None = None, **given: Any) -> MergeFn:
    """``merge(tau_flat) -> delta_flat`` for registry method ``method`` with its hyperparameters
    (:func:`hparams`) bound; the delta is float32 and includes the method's own coefficient."""
    hp = hparams(method, given, model=model)
    fn = METHODS[method]

    def merge(tau: Mapping[str, Any]) -> dict[str, Any]:
        return _float32(fn(tau, **hp))

    merge.__name__ = f"merge_{method}"
    return merge


def bind_svc(method: str | None = None, *, alpha: float | None = None, **options: Any
             ) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
    """``svc(delta_flat, tau_flat) -> delta_flat``: singular value calibration (SPEC §5), with
    ``alpha`` defaulting to the base merger's value (:data:`larv_jax.merging.svc.SVC_ALPHA`);
    ``options``: ``exclude``, ``cluster_rtol``."""
    unknown = sorted(set(options) - {"exclude", "cluster_rtol"})
    if unknown:
        raise ValueError(f"svc: unknown option(s) {unknown}; valid: "
                         "['alpha', 'cluster_rtol', 'exclude']")
    alpha = (svc_alpha(method) if method else 0.1) if alpha is None else alpha

    def calibrate(delta: Mapping[str, Any], tau: Mapping[str, Any]) -> dict[str, Any]:
        return _float32(_svc(delta, tau, alpha=alpha, **options))

    return calibrate


def _float32(delta: Mapping[str, Any]) -> dict[str, Any]:
    from larv_jax import tree

    flat = delta
    if isinstance(delta, dict) and any(isinstance(v, Mapping) for v in delta.values()):
        flat = tree.flatten(delta)
    return {p: np.asarray(v, np.float32) for p, v in flat.items()}
