"""Build (or reuse) the offline model zoo: a tiny CLIP pretrained contrastively on procedural
captioned images, fine-tuned on each zoo task, written as Hugging Face checkpoints + TFDS datasets.

Layout of a zoo directory::

    manifest.json                      seed, spec, spec hash, per-task accuracies, file hashes
    pretrained/                        CLIPModel: config.json, model.safetensors, tokenizer.json
    finetuned/<task>/                  CLIPVisionModel: config.json, model.safetensors
    data/larv_zoo/<task>/1.0.0/        TFDS array_record, splits train / test

Deterministic given (seed, spec) on one backend: every random draw comes from
``np.random.default_rng([seed, stage, ...])`` or ``jax.random.PRNGKey(seed)``. A zoo is reused
when its manifest has the same seed and spec hash; anything else is rebuilt in a temporary
directory and renamed into place (:func:`larv_jax.io.atomic_path`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from larv_jax.io import atomic_path, read_json, sha256_file
from larv_jax.zoo import images as im
from larv_jax.zoo.tasks import QUICK_TASKS, ZOO_TASKS, get_zoo_task

FORMAT = 3  # bump when the build procedure changes what a spec produces
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo besides the seed (hashed into the manifest)."""

    tasks: tuple[str, ...] = tuple(ZOO_TASKS)
    # "distinct": each task draws on its own background domain (ZooTask.domain) and pretraining
    # also sees captioned scenes on every domain; "shared": every object task on the same noisy
    # grey (the zoo before format 3, where merging fell below zero-shot)
    domains: str = "distinct"
    # model
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 6
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 16
    embed_dim: int = 64
    # pretraining (contrastive, full CLIP)
    pretrain_pool: int = 40_000
    pretrain_steps: int = 900
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 60
    pretrain_weight_decay: float = 0.05
    # fine-tuning (vision tower only, frozen zero-shot head)
    n_train: int = 6_000
    n_test: int = 500
    finetune_steps: int = 300
    finetune_batch: int = 64
    finetune_lr: float = 3e-4
    finetune_warmup: int = 30
    finetune_weight_decay: float = 0.0
    finetune_optimizer: str = "adamw"
    digits_test_glyphs: int = 500

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def digest(self) -> str:
        blob = json.dumps({"format": FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


QUICK = ZooSpec(tasks=QUICK_TASKS, vision_width=32, vision_layers=2, vision_heads=2,
                text_width=32, text_layers=1, text_heads=2, embed_dim=32,
                pretrain_pool=1_536, pretrain_steps=40, pretrain_batch=64, pretrain_lr=3e-3,
                pretrain_warmup=5, n_train=256, n_test=128, finetune_steps=60,
                finetune_batch=32, finetune_lr=3e-3, finetune_warmup=3, digits_test_glyphs=128)


def check_seed(seed: Any) -> int:
    """A zoo seed is a non-negative integer (numpy's seed sequences take no other)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"zoo seed (--seed) must be a non-negative integer; got {seed!r}")
    return int(seed)


def zoo_spec(quick: bool = False, **overrides: Any) -> ZooSpec:
    """The full spec (8 tasks, 6 blocks) or the quick one (3 tasks, 2 blocks), with overrides."""
    spec = QUICK if quick else ZooSpec()
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(ZooSpec)})
    if bad:
        raise ValueError(f"unknown zoo spec field(s) {bad}; valid: "
                         f"{[f.name for f in dataclasses.fields(ZooSpec)]}")
    spec = dataclasses.replace(spec, **overrides)
    if spec.domains not in ("shared", "distinct"):
        raise ValueError(f"zoo spec domains must be 'shared' or 'distinct'; got {spec.domains!r}")
    for t in spec.tasks:
        get_zoo_task(t)
    if not spec.tasks:
        raise ValueError("a zoo needs at least one task")
    return spec


def clip_config(spec: ZooSpec, vocab_size: int):
    """The zoo's CLIPConfig (EOS = pad = ``vocab_size - 1``)."""
    from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig

    vision = VisionConfig(width=spec.vision_width, layers=spec.vision_layers,
                          heads=spec.vision_heads, mlp_dim=4 * spec.vision_width,
                          image_size=spec.image_size, patch_size=spec.patch_size)
    text = TextConfig(width=spec.text_width, layers=spec.text_layers, heads=spec.text_heads,
                      mlp_dim=4 * spec.text_width, vocab_size=vocab_size,
                      context_length=spec.context_length, eos_token_id=vocab_size - 1,
                      pad_token_id=vocab_size - 1)
    return CLIPConfig(vision=vision, text=text, embed_dim=spec.embed_dim,
                      name=f"zoo-w{spec.vision_width}-d{spec.vision_layers}-p{spec.patch_size}")


# -- data -------------------------------------------------------------------------------------

def split_glyphs(seed: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn digits split into train glyphs (pretraining + the digits task's train split)
    and held-out test glyphs (the digits task's test split)."""
    glyphs, labels = im.load_digits()
    perm = np.random.default_rng([seed, 1]).permutation(len(glyphs))
    test, train = perm[:n_test], perm[n_test:]
    return {"train": (glyphs[train], labels[train]), "test": (glyphs[test], labels[test])}


def task_arrays(name: str, *, seed: int, n_train: int, n_test: int,
                glyphs: dict[str, tuple[np.ndarray, np.ndarray]], domains: str = "shared"
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (...)}`` of one zoo task (uint8, int64)."""
    task = get_zoo_task(name)
    index = list(ZOO_TASKS).index(name)
    out = {}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        rng = np.random.default_rng([seed, 2, index, k])
        if task.generator == "digits":
            g, lab = glyphs[split]
            if split == "test":
                n = min(n, len(g))
                x = np.stack([im.add_noise(rng, im.digit_image(rng, g[j], styled=False), 4.0)
                              for j in range(n)])
                out[split] = (x, lab[:n].astype(np.int64))
                continue
            gen: Callable = im.make_digit_task(g, lab)
        else:
            gen = getattr(im, task.generator)
            if domains == "distinct" and task.domain is not None:
                gen = functools.partial(gen, background=im.DOMAINS[task.domain])
        out[split] = gen(rng, n)
    return out


def pretraining_data(*, seed: int, n: int, glyphs: dict[str, tuple[np.ndarray, np.ndarray]],
                     domains: str = "shared") -> tuple[np.ndarray, list[str]]:
    """The captioned pretraining pool (train glyphs only: no test digit is ever seen)."""
    mixture = im.pretraining_mixture(*glyphs["train"], domains=domains == "distinct")
    return im.caption_pool(np.random.default_rng([seed, 3]), n, mixture)


# -- the build ----------------------------------------------------------------------------------

def _timed(timings: dict[str, float], key: str, t0: float) -> float:
    now = time.perf_counter()
    timings[key] = round(timings.get(key, 0.0) + now - t0, 2)
    return now


class ZooState(NamedTuple):
    """A trained zoo in memory (what :func:`write_zoo` writes)."""

    spec: ZooSpec
    seed: int
    config: Any                    # CLIPConfig of the pretrained model
    tokenizer: Any                 # tokenizers.Tokenizer (word level)
    params: dict[str, Any]         # pretrained CLIP, numpy leaves
    finetuned: dict[str, Any]      # task -> {"visual": ...} (no proj), numpy leaves
    data: dict[str, Any]           # task -> {"train": (x, y), "test": (x, y)}
    results: dict[str, Any]        # task -> accuracies, sizes, losses
    pretrain_losses: list[float]
    timings: dict[str, float]


def train_zoo(*, seed: int = 0, spec: ZooSpec | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None) -> ZooState:
    """Generate the data, pretrain the CLIP, fine-tune one vision tower per task (in memory)."""
    import jax

    from larv_jax.eval.heads import zero_shot_head
    from larv_jax.models.clip import init_params
    from larv_jax.models.tokenizer import CLIPTokenizer
    from larv_jax.zoo import train, vocab
    from larv_jax.zoo.tasks import all_prompts

    seed = check_seed(seed)
    spec = spec or zoo_spec()
    say = log or (lambda _: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    glyphs = split_glyphs(seed, spec.digits_test_glyphs)
    data = {}
    for name in _iter(spec.tasks, "tasks", progress):
        data[name] = task_arrays(name, seed=seed, n_train=spec.n_train, n_test=spec.n_test,
                                 glyphs=glyphs, domains=spec.domains)
    pool_images, captions = pretraining_data(seed=seed, n=spec.pretrain_pool, glyphs=glyphs,
                                             domains=spec.domains)
    t0 = _timed(timings, "data", t0)
    say(f"data: {len(spec.tasks)} tasks x ({spec.n_train} train, {spec.n_test} test), "
        f"{spec.pretrain_pool} captioned images ({timings['data']:.1f} s)")

    tok = vocab.build_tokenizer([*captions, *all_prompts()])
    config = clip_config(spec, tok.get_vocab_size())
    tokenizer = CLIPTokenizer(tok, spec.context_length)
    unique, caption_ids = np.unique(np.asarray(captions), return_inverse=True)
    unique_ids = tokenizer(list(unique))
    params = jax.tree.map(np.asarray, init_params(config, seed=seed))
    params, losses = train.pretrain(
        params, config=config, images=pool_images, ids=unique_ids[caption_ids],
        caption_ids=caption_ids, steps=spec.pretrain_steps, batch_size=spec.pretrain_batch,
        lr=spec.pretrain_lr, warmup=spec.pretrain_warmup,
        weight_decay=spec.pretrain_weight_decay, seed=seed, progress=progress)
    t0 = _timed(timings, "pretrain", t0)
    say(f"pretrain: {spec.pretrain_steps} steps, loss {np.mean(losses[:10]):.3f} -> "
        f"{np.mean(losses[-10:]):.3f} ({timings['pretrain']:.1f} s)")

    proj = params["visual"]["proj"]["kernel"]
    base_vision = train.vision_tree(params)
    results: dict[str, Any] = {}
    finetuned: dict[str, Any] = {}
    for k, name in enumerate(spec.tasks):
        task = ZOO_TASKS[name]
        (xtr, ytr), (xte, yte) = data[name]["train"], data[name]["test"]
        head = zero_shot_head(params, config, tokenizer, task.classnames, task.templates)
        zs = train.accuracy(base_vision, config=config, proj=proj, head=head, images=xte,
                            labels=yte)
        t0 = _timed(timings, "evaluate", t0)
        vparams, ft_losses = train.finetune(
            base_vision, config=config, proj=proj, head=head, images=xtr, labels=ytr,
            steps=spec.finetune_steps, batch_size=spec.finetune_batch, lr=spec.finetune_lr,
            warmup=spec.finetune_warmup, weight_decay=spec.finetune_weight_decay,
            optimizer=spec.finetune_optimizer,
            seed=seed * 1000 + k, progress=progress, desc=f"finetune {name}")
        t0 = _timed(timings, "finetune", t0)
        ft = train.accuracy(vparams, config=config, proj=proj, head=head, images=xte, labels=yte)
        t0 = _timed(timings, "evaluate", t0)
        finetuned[name] = vparams
        results[name] = {"classes": list(task.classnames), "templates": list(task.templates),
                         "n_train": int(len(ytr)), "n_test": int(len(yte)),
                         "zero_shot_top1": zs, "finetuned_top1": ft,
                         "finetune_loss_first": float(np.mean(ft_losses[:5])),
                         "finetune_loss_last": float(np.mean(ft_losses[-5:]))}
        say(f"{name:>13}: zero-shot {zs:6.1%} -> fine-tuned {ft:6.1%}")
    return ZooState(spec, seed, config, tok, params, finetuned, data, results, losses, timings)


def write_zoo(state: ZooState, out_dir: str | Path, *, quick: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Write a trained zoo (datasets, checkpoints, tokenizer, manifest) atomically to ``out_dir``;
    returns the manifest (``files``: sha256 of every file written)."""
    from larv_jax.checkpoint import save_hf
    from larv_jax.zoo import tfds_builder, vocab

    spec, timings = state.spec, dict(state.timings)
    losses = state.pretrain_losses
    manifest: dict[str, Any] = {
        "format": FORMAT, "seed": state.seed, "quick": bool(quick), "spec_hash": spec.digest(),
        "spec": spec.to_dict(), "tasks": state.results,
        "vocab_size": state.tokenizer.get_vocab_size(),
        "pretrain_loss_first": float(np.mean(losses[:10])),
        "pretrain_loss_last": float(np.mean(losses[-10:])),
        "versions": _versions(),
    }
    t0 = time.perf_counter()
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name in _iter(spec.tasks, "write datasets", progress):
            tfds_builder.write_task(name, state.data[name], tmp / "data")
        save_hf(state.params, state.config, tmp / "pretrained",
                extra_files={"tokenizer.json": vocab.tokenizer_json(state.tokenizer)})
        for name in spec.tasks:
            save_hf(state.finetuned[name], state.config.vision_only(), tmp / "finetuned" / name)
        _timed(timings, "write", t0)
        manifest["files"] = {str(p.relative_to(tmp)): _file_digest(p, tmp)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        timings["total"] = round(sum(timings.values()), 2)
        manifest["timings_s"] = timings
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


RECORDS_PREFIX = "records-sha256:"


def _file_digest(path: Path, root: Path) -> str:
    """sha256 of the file, except TFDS array_record shards: ``records-sha256:`` + the digest of
    their decoded examples (:func:`larv_jax.zoo.tfds_builder.records_digest`), because TFDS
    writes the same records with process-dependent bytes."""
    from larv_jax.zoo.tfds_builder import records_digest

    rel = path.relative_to(root).parts
    if ".array_record-" in path.name and rel[:2] == ("data", "larv_zoo"):
        split = path.name.split("-")[1].split(".")[0]  # larv_zoo-<split>.array_record-...
        return RECORDS_PREFIX + records_digest(rel[2], split, root / "data")
    return sha256_file(path)


def check_out_dir(out_dir: Path) -> None:
    """FileExistsError unless ``out_dir`` is absent, an empty directory, or a zoo."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        raise FileExistsError(f"{out_dir} exists and is not a zoo (no {MANIFEST}); "
                              "pick another --out or remove it")


def build_zoo(out_dir: str | Path, *, seed: int = 0, quick: bool = False,
              spec: ZooSpec | None = None, force: bool = False, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the zoo under ``out_dir`` (or reuse it) and return its manifest.

    Reuses an existing zoo whose manifest has the same ``seed`` and spec hash and whose files are
    all present (unless ``force``). ``out_dir`` must be absent, empty, or a zoo (a
    ``manifest.json``): anything else is a FileExistsError, so a mistyped path is never replaced.
    ``log`` receives one-line stage notes; ``progress`` shows tqdm bars.
    """
    out_dir = Path(out_dir)
    seed = check_seed(seed)
    spec = spec or zoo_spec(quick)
    say = log or (lambda _: None)
    if out_dir.exists() and not force and (out_dir / MANIFEST).exists():
        existing = _read_manifest(out_dir)
        if existing.get("seed") == seed and existing.get("spec_hash") == spec.digest():
            missing = [p for p in existing.get("files", {}) if not (out_dir / p).exists()]
            if not missing:
                say(f"zoo {out_dir}: up to date (seed {seed}, spec {spec.digest()}); reusing it")
                return existing
            say(f"zoo {out_dir}: {len(missing)} file(s) missing ({missing[0]}); rebuilding")
        else:
            say(f"zoo {out_dir}: seed or spec changed; rebuilding")
    check_out_dir(out_dir)
    state = train_zoo(seed=seed, spec=spec, progress=progress, log=log)
    manifest = write_zoo(state, out_dir, quick=quick, progress=progress)
    say(f"zoo written to {out_dir} ({manifest['timings_s']['total']:.1f} s)")
    return manifest


def _iter(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "flax", "optax", "numpy", "pillow", "scikit-learn", "tensorflow-datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _read_manifest(root: Path) -> dict[str, Any]:
    return read_json(root / MANIFEST, missing="no zoo manifest (build one with `larv zoo build`)")
