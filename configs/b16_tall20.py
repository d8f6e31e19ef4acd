"""larv run --config configs/b16_tall20.py:checkpoint_dir=checkpoints

LARV on ViT-B/16, TALL20 (20 tasks): the paper's data-free mergers (TA, TIES, TSV-M, Iso-C, Iso-CTS,
each with and without SVC) x gates (none, tiered, continuous), apply="post".

Checkpoints (on disk under ``checkpoint_dir``, e.g. ``checkpoints/openai/clip-vit-base-patch16`` and
``checkpoints/tanganke/clip-vit-base-patch16_<task>``): base ``openai/clip-vit-base-patch16``,
models ``tanganke/clip-vit-base-patch16_<task>`` for the first 20 FusionBench tasks
(``larv_common.TASKS``).

Expected numbers: none known to this repository yet (no run on the real checkpoints has been
recorded here). With ``eval=True,data_dir=...`` in the arg the grid also reports zero-shot top-1
per task; compare against the LARV paper's Table 1 (ViT-B/16, TALL20) once measured.

Args (comma separated, e.g. ``:quick,checkpoint_dir=/data/ckpt,eval=True,data_dir=/data/tfds``):
quick (shrink for tests), best (one cell, the setting's single best data-free merge:
Iso-CTS with the tiered gate, ``larv_common.BEST``; for
``larv merge --config configs/b16_tall20.py:best,checkpoint_dir=...``), checkpoint_dir, eval, data_dir.
"""

import larv_common


def get_config(arg=None):
    return larv_common.get_base_config("b16", "tall20", arg)
