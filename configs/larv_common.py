"""The base experiment config of ``larv run`` and the helpers every variant uses.

Not a runnable config itself: ``configs/<model>_<suite>.py`` call :func:`get_base_config` and
override fields. ``larv run`` puts this directory on ``sys.path`` while it loads a config, so
variants ``import larv_common``.

Fields (all plain Python / ConfigDict values; ``larv run --set KEY=VALUE`` overrides any of them):

- ``base``: Hugging Face id (or a path) of the pretrained CLIP (e.g. ``openai/clip-vit-base-patch32``).
- ``models``: ids (or paths) of the fine-tuned vision towers, one per task (``tasks``, FusionBench
  names, same order).
- ``checkpoint_dir``: where the ids live on disk: an id ``org/name`` is looked up as
  ``<checkpoint_dir>/org/name``, ``<checkpoint_dir>/name`` or the Hugging Face cache layout
  ``<checkpoint_dir>/models--org--name/snapshots/*``; a path that exists is used as is.
- ``mergers``: list of ``{name, method, options, svc, svc_options, svc_order}`` (method = a
  :mod:`larv_jax.merging` registry name; only ``method`` is required).
- ``gates``: list of ``{gate, options, apply, name}`` (gate = a LARV spec such as ``tiered``,
  ``continuous``, ``none``, ``thirds(0,1,1.5)``; options = gate/score options).
- ``granularity``: LARV units, ``module`` (SPEC default) or ``block``.
- ``diagnostics``: ``mode`` (of D), ``base_mode`` (of theta0), ``seed``, ``k``, ``p``, ``q``.
- ``eval``: ``enabled`` (default False), ``data_dir``, ``batch_size``, ``limit`` (0 = full split),
  ``heads_cache_dir``; the tasks evaluated are ``eval_tasks`` (default: the merged ones).
- ``out_dir``: where ``results.jsonl``, ``results.md``, ``config.json`` and the diagnostics go.
- ``save_params``: also write each cell's merged vision tower as a Hugging Face checkpoint.
- ``act`` (optional): the towers' activation, as ``--act`` (default: read from each checkpoint).

``larv merge --config FILE[:ARG]`` reads the same format for one merge: one entry in ``mergers``
and one in ``gates`` (the ARG ``best`` of the paper configs gives that: :data:`BEST`).
"""

from __future__ import annotations

import ml_collections

# FusionBench task names, in FusionBench order: TA8 = first 8, TALL14 = first 14, TALL20 = all.
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
         "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100",
         "cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
SUITES = {"ta8": TASKS[:8], "tall14": TASKS[:14], "tall20": TASKS}

# model key -> (pretrained base, fine-tuned model id pattern)
MODELS = {
    "b32": ("openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_{task}"),
    "b16": ("openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16_{task}"),
    "l14": ("openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14_{task}"),
}

# The paper's data-free base mergers (Table 1) at FusionBench defaults (SPEC §4), each with and
# without SVC (SPEC §5 alphas). Names are larv_jax.merging registry names.
MERGERS = (
    {"name": "ta", "method": "task_arithmetic"},
    {"name": "ties", "method": "ties"},
    {"name": "tsv_m", "method": "tsv_m"},
    {"name": "iso_c", "method": "iso_c"},
    {"name": "iso_cts", "method": "iso_cts"},
)

GATES = (
    {"gate": "none"},
    {"gate": "tiered"},
    {"gate": "continuous"},
)


def eval_name(task: str) -> str:
    """FusionBench model-id task name -> larv_jax.eval registry name (hyphens -> underscores)."""
    return task.replace("-", "_")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``"quick,checkpoint_dir=/data"`` -> ConfigDict; a bare word is a True flag (big_vision's
    ``configs/common.py::parse_arg``). Values as ``larv run --set`` reads them
    (:func:`larv_jax.cli.flags.parse_key_values`: Python literals, true/false, else strings)."""
    from larv_jax.cli.flags import parse_key_values

    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        given = {item: True} if "=" not in item else parse_key_values([item], "config arg")
        unknown = sorted(set(given) - set(defaults))
        if unknown:  # a misspelt arg (':quik') would otherwise run the full grid silently
            raise ValueError(f"config arg {unknown[0]!r} is not one of "
                             f"{', '.join(sorted(defaults))}")
        out.update(given)
    return ml_collections.ConfigDict(out)


def get_base_config(model: str, suite: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full grid for ``model`` (b32 | b16 | l14) x ``suite`` (ta8 | tall14 | tall20)."""
    a = parse_arg(arg, quick=False, best=False, checkpoint_dir="checkpoints", eval=False,
                  data_dir="")
    base, pattern = MODELS[model]
    tasks = SUITES[suite]
    c = ml_collections.ConfigDict()
    c.name = f"{model}_{suite}"
    c.base = base
    c.tasks = list(tasks)
    c.models = [pattern.format(task=t) for t in tasks]
    c.checkpoint_dir = a.checkpoint_dir
    c.mergers = [dict(m, svc=svc) for m in MERGERS for svc in (False, True)]
    c.gates = [dict(g) for g in GATES]
    c.granularity = "module"
    c.diagnostics = ml_collections.ConfigDict(
        {"mode": "randomized", "base_mode": "exact", "seed": 0, "k": 64, "p": 10, "q": 2})
    c.eval = ml_collections.ConfigDict(
        {"enabled": bool(a.eval), "data_dir": a.data_dir, "batch_size": 64, "limit": 0,
         "heads_cache_dir": ""})
    c.eval_tasks = [eval_name(t) for t in tasks]
    c.out_dir = f"results/{c.name}"
    c.save_params = False
    if a.quick:
        shrink(c)
    if a.best:
        best(c)
    return c


# ``best``: the setting's single best data-free merge, for ``larv merge --config``. Our call, not
# a measurement of this repository (no run on the real checkpoints is recorded here): as we read
# Table 1 of the Iso paper (Marczak et al., "No Task Left Behind: Isotropic Model Merging with
# Common and Task-Specific Subspaces", ICML 2025), Iso-CTS is the best data-free merger, or within
# a point of it, on 8, 14 and 20 tasks for ViT-B/32, B/16 and L/14; the LARV paper's default
# veneer is the tiered gate applied after the merge. Change either with flags:
# ``larv merge --config configs/b32_ta8.py:best --method tsv_m --larv continuous``.
BEST = {"merger": {"name": "iso_cts", "method": "iso_cts"}, "gate": {"gate": "tiered"}}


def best(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``best``: one merger x one gate (:data:`BEST`), written to ``results/<name>_best``."""
    c.name = c.name + "_best"
    c.mergers = [dict(BEST["merger"])]
    c.gates = [dict(BEST["gate"])]
    c.out_dir = f"results/{c.name}"
    return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``quick``: a few seconds on tiny checkpoints (two tasks, two mergers, small sketches)."""
    c.name = c.name + "_quick"
    c.tasks = list(c.tasks[:2])
    c.models = list(c.models[:2])
    c.eval_tasks = list(c.eval_tasks[:2])
    c.mergers = [m for m in c.mergers if not m.get("svc")][:2]
    c.gates = [{"gate": "none"}, {"gate": "tiered"}, {"gate": "tier3"},
               {"gate": "tiered", "apply": "pre"}]
    c.diagnostics.k, c.diagnostics.p, c.diagnostics.q = 4, 2, 1
    c.eval.limit = 16
    c.out_dir = c.out_dir + "_quick"
    return c
