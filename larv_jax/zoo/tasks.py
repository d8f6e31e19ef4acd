"""The zoo's tasks: eight 32x32 classification problems built offline, with CLIP-style prompts.

``ZOO_TASKS`` is one literal dict ``name -> ZooTask``. Each task has its own generator in
:mod:`larv_jax.zoo.images` (digits: scikit-learn's bundled 8x8 glyphs, upscaled; the rest
procedural), its own prompt templates and, since zoo format 3, its own input domain
(``ZooTask.domain``: the background every image of the task is drawn on: paper, fabric, night
sky, grass, sand, sky; digits are white on black and textures fill the frame). Real task suites
mix domains (cars, satellite images, digits, textures); tasks that all drew the same kind of image
and asked opposite things of it (colour but not shape, shape but not colour) made every merge fall
below zero-shot (README, "The zoo's merge regime").
"""

from __future__ import annotations

import dataclasses

from larv_jax.zoo import images as im

# The TFDS dataset the zoo writes (one builder config per task) and its version.
TFDS_NAME = "larv_zoo"
TFDS_BUILDER_MODULE = "larv_jax.zoo.tfds_builder"


@dataclasses.dataclass(frozen=True)
class ZooTask:
    """One zoo task: ``classnames`` in label order, ``templates`` with one ``{}``; ``generator``
    names the function of :mod:`larv_jax.zoo.images` that draws it (``digits`` is special: it is
    built over a held-out split of the glyphs)."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    generator: str
    description: str
    domain: str | None = None  # background look under ZooSpec.domains == "distinct"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


ZOO_TASKS: dict[str, ZooTask] = {
    "digits": ZooTask(
        "digits", im.NUMBERS,
        ("a photo of the number {}.", "a handwritten digit {}.", "the digit {}."),
        "digits", "scikit-learn 8x8 handwritten digits upscaled to 32x32, white on black"),
    "shapes": ZooTask(
        "shapes", im.SHAPES,
        ("a photo of a {}.", "a drawing of a {}.", "a {} shape."),
        "gen_shapes", "one shape of any colour, size and place, noisy background, distractor dots", "paper"),
    "colours": ZooTask(
        "colours", tuple(im.COLOURS),
        ("a photo of something {}.", "a {} object.", "the colour {}."),
        "gen_colours", "one or two shapes of one colour, random brightness and saturation", "fabric"),
    "counts": ZooTask(
        "counts", im.COUNTS,
        ("a photo of {} objects.", "{} shapes.", "there are {} things."),
        "gen_counts", "one to six small mixed shapes", "night"),
    "positions": ZooTask(
        "positions", im.POSITIONS,
        ("an object in the {}.", "a shape at the {}.", "something in the {} of the image."),
        "gen_positions", "one small shape in one of nine places", "grass"),
    "textures": ZooTask(
        "textures", im.TEXTURES,
        ("a {} texture.", "a {} pattern.", "a photo of a {} surface."),
        "gen_textures", "full-frame two-tone textures (stripes at any angle)"),
    "orientations": ZooTask(
        "orientations", im.ORIENTATIONS,
        ("{} stripes.", "a {} line.", "a photo of {} lines."),
        "gen_orientations", "one to three short parallel bars at 0/45/90/135 degrees +- 15", "sand"),
    "sizes": ZooTask(
        "sizes", im.SIZES,
        ("a {} object.", "a photo of a {} shape.", "something {}."),
        "gen_sizes", "one shape, tiny / small / large / huge", "sky"),
}

# The quick zoo (tests, smoke runs) uses the first few of these.
QUICK_TASKS = ("colours", "textures", "digits")


def get_zoo_task(name: str) -> ZooTask:
    try:
        return ZOO_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown zoo task {name!r}; valid: {list(ZOO_TASKS)}") from None


def all_prompts() -> list[str]:
    """Every prompt of every task (for the tokenizer's vocabulary)."""
    return [t.format(c) for task in ZOO_TASKS.values() for c in task.classnames
            for t in task.templates]
