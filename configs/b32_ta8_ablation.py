"""larv run --config configs/b32_ta8_ablation.py:checkpoint_dir=checkpoints

LARV ablations on ViT-B/32, TA8 with Task Arithmetic and TSV-M as base mergers: the score factors
(the paper's Table 3: drop e, r or c), the depth-only schedules (Tables 5/6: uniform, linear, tier2,
tier3, tier6, tier12), the freeze ablations (thirds(0,1,1.5), thirds(0.5,1,0)), the continuous gate
and apply="pre" versus "post". Everything reuses one set of task vectors, one base cache and one
diagnostics run per merger.

Expected numbers: none known to this repository yet; with ``eval=True,data_dir=...`` the grid
reports zero-shot top-1 per task.

Args: as configs/b32_ta8.py (quick, checkpoint_dir, eval, data_dir; not best).
"""

import larv_common


def get_config(arg=None):
    c = larv_common.get_base_config("b32", "ta8", arg)
    if c.name.endswith("_best"):
        raise ValueError("'best' is one merge of a base config (configs/b32_ta8.py:best); "
                         "the ablation grid has no single best cell")
    c.name = "b32_ta8_ablation" + ("_quick" if "quick" in c.name else "")
    c.out_dir = f"results/{c.name}"
    if "quick" not in c.name:
        c.mergers = [{"name": "ta", "method": "task_arithmetic"},
                     {"name": "tsv_m", "method": "tsv_m"}]
    c.gates = [
        {"gate": "none"},
        {"gate": "tiered"},
        {"gate": "tiered", "options": {"use_e": False}, "name": "tiered(-e)"},
        {"gate": "tiered", "options": {"use_r": False}, "name": "tiered(-r)"},
        {"gate": "tiered", "options": {"use_c": False}, "name": "tiered(-c)"},
        {"gate": "continuous"},
        {"gate": "tiered", "apply": "pre"},
        {"gate": "uniform(1.2)"},
        {"gate": "linear"},
        {"gate": "tier2"},
        {"gate": "tier3"},
        {"gate": "tier6"},
        {"gate": "tier12"},
        {"gate": "thirds(0, 1, 1.5)"},
        {"gate": "thirds(0.5, 1, 0)"},
    ]
    return c
