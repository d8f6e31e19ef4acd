"""Writes colab/larv_quickstart.ipynb (kept as code so the notebook diff stays reviewable).

Run: python colab/make_notebooks.py
"""

import json
from pathlib import Path

CELLS = [
    ("markdown", """# larv_jax on Colab (TPU or GPU)

Merge CLIP ViT-B/32 fine-tunes (FusionBench's `tanganke/clip-vit-base-patch32_<task>`) with Task
Arithmetic, with and without the LARV veneer, look at the per-layer diagnostics, and evaluate
zero-shot on TFDS. Runtime: *TPU v2-8* or any GPU; everything also runs (slowly) on CPU.
All logic lives in the `larv_jax` package; this notebook only calls it."""),
    ("code", """# Install larv_jax. On a TPU runtime jax[tpu] is already present; on GPU, jax[cuda12].
import subprocess, sys
LARV_SRC = "larv_jax"   # a clone of the repository (upload it, or `git clone` your copy here)
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", LARV_SRC], check=True)"""),
    ("code", """import jax
print(jax.devices())   # the diagnostics shard their matrix axis over all of these"""),
    ("code", """# Checkpoints from the Hugging Face hub (Colab has network access).
from huggingface_hub import snapshot_download
TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
base_dir = snapshot_download("openai/clip-vit-base-patch32",
                             allow_patterns=["*.json", "*.safetensors", "*.txt"])
model_dirs = [snapshot_download(f"tanganke/clip-vit-base-patch32_{t}",
                                allow_patterns=["*.json", "*.safetensors"]) for t in TASKS]"""),
    ("code", """# Task Arithmetic, and Task Arithmetic + LARV (tiered gate), streamed leaf by leaf.
from larv_jax.checkpoint import load_checkpoint
from larv_jax.larv.plan import apply, plan
from larv_jax.merging import merge_delta

base = load_checkpoint(base_dir)
models = [load_checkpoint(d) for d in model_dirs]
ta_delta, report = merge_delta(base, models, "task_arithmetic")
ta = apply(base, ta_delta)                              # theta0 + D
p = plan(base.flat(native=True), ta_delta, gate="tiered")   # units, e, c, z, w, s
larv = apply(base, ta_delta, p)                         # theta0 + s * D
for u in p.report()[:6]:
    print(u)"""),
    ("code", """# The Figure-2-style plot: e, c and the scales s against depth.
from IPython.display import Image
from larv_jax import diagnostics as dg
dg.plot(p.diagnostics, "diagnostics.png", s=p.s)
Image("diagnostics.png")"""),
    ("code", """# Zero-shot evaluation on TFDS (downloads the datasets that TFDS can fetch: MNIST, SVHN, DTD, ...).
import tensorflow_datasets as tfds
from larv_jax import tree
from larv_jax.checkpoint import load_params
from larv_jax.eval import evaluate
from larv_jax.models.tokenizer import load_tokenizer

EVAL_TASKS = ["mnist", "svhn", "dtd"]
for name in ["mnist", "svhn_cropped", "dtd"]:
    tfds.builder(name).download_and_prepare()
clip_cfg, clip_params = load_params(base_dir)
tok = load_tokenizer(base_dir)
for label, flat in [("task_arithmetic", ta), ("task_arithmetic + LARV", larv)]:
    out = evaluate(tree.unflatten(dict(flat)), clip_params, clip_cfg, EVAL_TASKS, tokenizer=tok)
    print(label, {t: round(100 * r["top1"], 2) for t, r in out["tasks"].items()},
          "avg", round(100 * out["average"], 2))"""),
    ("code", """# Write the merged model back in Hugging Face format (transformers.CLIPVisionModel loads it).
from larv_jax.checkpoint import save_hf
save_hf(dict(larv), base.config, "merged_ta_larv")   # the base's architecture"""),
]


def notebook() -> dict:
    cells = []
    for kind, text in CELLS:
        cell = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"accelerator": "TPU", "colab": {"provenance": []},
                         "kernelspec": {"display_name": "Python 3", "name": "python3"}}}


if __name__ == "__main__":
    out = Path(__file__).with_name("larv_quickstart.ipynb")
    out.write_text(json.dumps(notebook(), indent=1) + "\n")
    print(f"wrote {out}")
