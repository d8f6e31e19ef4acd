"""CLIP ViT vision forward pass: Flax (larv_jax.models.clip) vs transformers' torch CLIPVisionModel.

    python benchmarks/forward.py [--preset ViT-B-32] [--batch-sizes 32] [--iters 5] [--quick]

Random weights, the same architecture on both sides (a CLIPVisionConfig with the preset's
sizes), float32 by default (``--dtypes float32,bfloat16`` adds torch and Flax in bfloat16; Flax
accumulates bf16 products in float32). Per dtype, two Flax rows: ``flax-<dtype>`` runs every
token through every block, as torch does; ``flax-<dtype>-pooled`` is
``encode_image(tokens=False)``, the last block for the class token only (the same pooled output;
what ``larv eval`` runs). Flax: compile (first call: trace + XLA compile + run) is timed apart
from the steady state (``block_until_ready``); torch: one warm-up call (``compile_s``), then the
steady state under ``inference_mode``. Steady-state calls alternate between the implementations
(round-robin) so that load from other processes affects all alike. Reports images/second (median
and best over ``--iters`` calls) and the Flax/torch ratios against torch in the same dtype; one
JSON line per (implementation, batch size) appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def setup_flax(preset: str, batch: int, dtype: str, tokens: bool = True):
    """-> (compile seconds, step fn returning after block_until_ready, info).

    ``tokens=False``: ``encode_image(tokens=False)``, the last block for the class token only
    (what the zero-shot scorer runs); ``True``: every token through every block, like torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from larv_jax.eval.zero_shot import split_vision
    from larv_jax.models.clip import CLIP, init_params
    from larv_jax.models.config import get_preset

    cfg = get_preset(preset).vision_only()
    params = split_vision(init_params(cfg))
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    model = CLIP(cfg, dtype=dt)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, tokens,
                                           method=CLIP.encode_image)["pooled"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (batch, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32))
    t0 = time.perf_counter()
    fwd(params, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    info = {"impl": f"flax-{dtype}" + ("" if tokens else "-pooled"),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    return compile_s, lambda: fwd(params, x).block_until_ready(), info


def setup_torch(preset: str, batch: int, dtype: str = "float32"):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from larv_jax.models.config import get_preset

    v = get_preset(preset).vision
    cfg = CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.act)
    torch.manual_seed(0)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = CLIPVisionModel(cfg).eval().to(tdt)
    x = torch.randn(batch, 3, v.image_size, v.image_size).to(tdt)

    def step():
        with torch.inference_mode():
            return model(pixel_values=x).pooler_output.float().sum().item()

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    info = {"impl": f"torch-{dtype}", "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "attn": getattr(model.config, "_attn_implementation", None)}
    return warm, step, info


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ViT-B-32")
    p.add_argument("--batch-sizes", default="32", help="comma-separated")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtypes", default="float32",
                   help="float32,bfloat16: each runs torch and Flax in that dtype (Flax bf16: "
                        "float32 accumulation)")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 iterations")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forward.jsonl")
    args = p.parse_args(argv)
    batches = [8] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    iters = 2 if args.quick else args.iters
    host = {"host": platform.node(), "cpus": os.cpu_count(), "preset": args.preset,
            "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = []
    for b in batches:
        impls = []  # per dtype: torch (the reference), Flax all tokens, Flax pooled only
        for dt in args.dtypes.split(","):
            impls.append((dt, setup_torch(args.preset, b, dt)))
            impls += [(dt, setup_flax(args.preset, b, dt, tokens)) for tokens in (True, False)]
        times: list[list[float]] = [[] for _ in impls]
        for _ in range(iters):  # round-robin, so load from other processes hits all alike
            for k, (_, (_, step, _)) in enumerate(impls):
                times[k].append(_timed(step))
        ref_ips = {}
        for (dt, (first_s, _, info)), ts in zip(impls, times, strict=True):
            med, best = statistics.median(ts), min(ts)
            r = {**info, "batch": b, "compile_s": round(first_s, 3), "step_s": round(med, 4),
                 "step_min_s": round(best, 4), "images_per_s": round(b / med, 2),
                 "images_per_s_best": round(b / best, 2)}
            if dt not in ref_ips:
                ref_ips[dt] = (r["images_per_s"], r["images_per_s_best"])
            else:  # against torch in the same dtype
                r["speedup_vs_torch"] = round(r["images_per_s"] / ref_ips[dt][0], 3)
                r["speedup_vs_torch_best"] = round(r["images_per_s_best"] / ref_ips[dt][1], 3)
            rows.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            line = json.dumps({**host, **r})
            f.write(line + "\n")
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
