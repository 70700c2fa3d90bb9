"""Captioned shape scenes: a built-in image-text matching task that needs no external data.

Each scene shows one or two coloured shapes on a grey background. Its caption names size,
colour and shape of each, plus the spatial relation of the two ("a large red circle left of a
small blue square"). Each record carries two or three hard-negative captions that differ from
the caption in exactly one attribute and are false for the scene, which `is_true` checks.

Scenes depend only on (seed, index), so pixel content is the same on every machine. Torch-free:
Pillow draws everything.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw

from edgemm.data.records import Record, write_dataset
from edgemm.errors import ConfigError, DataError
from edgemm.io import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

# RGB of each colour word. The background is grey, so no colour word describes it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")

# Radius ranges as fractions of the image side. The gap between them keeps "small" and "large"
# apart after the strongest zoom of the default `Augmenter` crop: 1.49x along one axis
# (area 0.6, aspect 3/4), which makes 0.11 at most 0.164.
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.17, 0.19)}

# Each relation and its mirror image. The two shapes of a scene lie in opposite halves of the
# image, so a relation is never borderline.
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

BACKGROUNDS = ("plain", "gradient", "stripes", "checker")
SCENES_JSONL = "scenes.jsonl"

# Fraction of scenes with a single shape; the rest have two.
SINGLE_SHAPE_FRACTION = 1 / 3
# Distance of a shape from the image border and from the centre line, as fractions of the side.
BORDER_MARGIN = 0.04
CENTRE_GAP = 0.03
# Every crop of the default `Augmenter` (area at least 0.6, aspect 3/4 to 4/3) contains the
# central third of the image on both axes. A shape's centre lies at most CORE_REACH radii
# outside that third, so a crop always keeps part of every shape and the caption stays true.
# The rotation after the crop is not covered by this argument, but in a check of 3,000 default
# augmentations (crop, flip, rotation) of 1,000 scenes every shape stayed visible.
CENTRAL_THIRD = (1 / 3, 2 / 3)
CORE_REACH = 0.3


@dataclass(frozen=True)
class Phrase:
    """The words for one shape: size, colour and shape."""

    size: str
    color: str
    shape: str

    @property
    def text(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its words plus centre and radius in pixels."""

    size: str
    color: str
    shape: str
    center: tuple[float, float]
    radius: float

    @property
    def phrase(self) -> Phrase:
        return Phrase(self.size, self.color, self.shape)


@dataclass(frozen=True)
class Caption:
    """A parsed caption: a subject, and for two-shape scenes a relation to a second shape."""

    subject: Phrase
    relation: str | None = None
    other: Phrase | None = None

    @property
    def text(self) -> str:
        if self.relation is None or self.other is None:
            return self.subject.text
        return f"{self.subject.text} {self.relation} {self.other.text}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw a scene and to decide whether a caption is true for it."""

    index: int
    image_size: int
    shapes: tuple[Shape, ...]
    background: str
    background_level: int
    caption: Caption
    negatives: tuple[Caption, ...]


def parse_caption(text: str) -> Caption:
    """Parse a caption written by this module; raise `DataError` for any other text."""
    words = text.split()

    def phrase(at: int) -> Phrase:
        if len(words) < at + 4 or words[at] != "a":
            raise DataError(f"Caption {text!r} is not a synthetic scene caption.", "Expected 'a <size> <colour> <shape>'.")
        size, color, shape = words[at + 1 : at + 4]
        if size not in SIZES or color not in COLORS or shape not in SHAPES:
            raise DataError(f"Caption {text!r} uses an unknown size, colour or shape.", "See edgemm.data.synthetic.")
        return Phrase(size, color, shape)

    subject = phrase(0)
    if len(words) == 4:
        return Caption(subject)
    relation_words = 2 if words[4] in ("left", "right") else 1
    relation = " ".join(words[4 : 4 + relation_words])
    if relation not in RELATIONS or len(words) != 8 + relation_words:
        raise DataError(f"Caption {text!r} has an unknown relation.", f"Use one of {', '.join(RELATIONS)}.")
    return Caption(subject, relation, phrase(4 + relation_words))


def holds(relation: str, first: Shape, second: Shape) -> bool:
    """Return whether `first` is `relation` `second`, using shape centres (y grows downwards)."""
    (x1, y1), (x2, y2) = first.center, second.center
    return {
        "left of": x1 < x2,
        "right of": x1 > x2,
        "above": y1 < y2,
        "below": y1 > y2,
    }[relation]


def is_true(caption: Caption, shapes: Sequence[Shape]) -> bool:
    """Return whether some shapes of the scene fit the caption (two distinct shapes for a relation)."""
    subjects = [index for index, shape in enumerate(shapes) if shape.phrase == caption.subject]
    if caption.relation is None or caption.other is None:
        return bool(subjects)
    for i in subjects:
        for j, other in enumerate(shapes):
            if j != i and other.phrase == caption.other and holds(caption.relation, shapes[i], other):
                return True
    return False


def shapes_from_caption(caption: Caption) -> tuple[Shape, ...]:
    """Return stand-in shapes that fit `caption` and nothing more, one unit apart on the relation's axis.

    Synthetic captions name every shape of their scene, so a text that is true for these shapes
    is true for the scene. Relations are only decided on the caption's own axis: the real scene
    may also have a vertical offset in a left-right layout, which this ignores.
    """
    subject_center, other_center = {
        None: ((0.0, 0.0), (0.0, 0.0)),
        "left of": ((0.0, 0.0), (1.0, 0.0)),
        "right of": ((1.0, 0.0), (0.0, 0.0)),
        "above": ((0.0, 0.0), (0.0, 1.0)),
        "below": ((0.0, 1.0), (0.0, 0.0)),
    }[caption.relation]
    subject = caption.subject
    shapes = [Shape(subject.size, subject.color, subject.shape, subject_center, 1.0)]
    if caption.other is not None:
        other = caption.other
        shapes.append(Shape(other.size, other.color, other.shape, other_center, 1.0))
    return tuple(shapes)


def is_synthetic_caption(text: str) -> bool:
    """Return whether `text` parses as a caption of this module."""
    try:
        parse_caption(text)
    except DataError:
        return False
    return True


def is_false_for(true_captions: Sequence[str], candidate: str) -> bool:
    """Return whether `candidate` is false for a scene described by `true_captions`.

    Used to reject random captions of other scenes that happen to describe this one too,
    e.g. "a small red star" for a scene with a small red star and a blue circle.
    """
    try:
        claim = parse_caption(candidate)
    except DataError:
        return True
    for text in true_captions:
        if is_true(claim, shapes_from_caption(parse_caption(text))):
            return False
    return True


def make_scene(seed: int, index: int, image_size: int = 128) -> Scene:
    """Build scene `index` of the stream for `seed`, independent of how many scenes are generated.

    The scene (shapes, positions, captions) is the same on every run and machine. Its pixels
    also depend on Pillow's drawing code, which may change between Pillow versions.
    """
    # String seeds hash with SHA-512 in `random.Random`, independent of PYTHONHASHSEED.
    rng = random.Random(f"edgemm-synthetic:{seed}:{index}")
    background = rng.choice(BACKGROUNDS)
    background_level = rng.randint(70, 140)

    if rng.random() < SINGLE_SHAPE_FRACTION:
        shapes = (_place(rng, _random_phrase(rng), image_size, cell=(0.0, 0.0, 1.0, 1.0)),)
        caption = Caption(shapes[0].phrase)
    else:
        first = _random_phrase(rng)
        second = _random_phrase(rng)
        while second == first:
            second = _random_phrase(rng)
        horizontal = rng.random() < 0.5
        cells = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)] if horizontal else [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
        shapes = (_place(rng, first, image_size, cells[0]), _place(rng, second, image_size, cells[1]))
        subject, other = (0, 1) if rng.random() < 0.5 else (1, 0)
        if horizontal:
            relation = "left of" if subject == 0 else "right of"
        else:
            relation = "above" if subject == 0 else "below"
        caption = Caption(shapes[subject].phrase, relation, shapes[other].phrase)

    negatives = make_hard_negatives(caption, shapes, rng, count=rng.choice((2, 3)))
    return Scene(index, image_size, shapes, background, background_level, caption, tuple(negatives))


def _random_phrase(rng: random.Random) -> Phrase:
    return Phrase(rng.choice(sorted(SIZES)), rng.choice(sorted(COLORS)), rng.choice(SHAPES))


def _place(rng: random.Random, phrase: Phrase, image_size: int, cell: tuple[float, float, float, float]) -> Shape:
    """Place a shape at a random spot of `cell` (fractions of the image) near the central third."""
    low, high = SIZES[phrase.size]
    radius = rng.uniform(low, high) * image_size
    x = rng.uniform(*_centre_range(cell[0], cell[2], radius, image_size))
    y = rng.uniform(*_centre_range(cell[1], cell[3], radius, image_size))
    return Shape(phrase.size, phrase.color, phrase.shape, (round(x, 2), round(y, 2)), round(radius, 2))


def _centre_range(start: float, end: float, radius: float, image_size: int) -> tuple[float, float]:
    """Return the allowed centre coordinates along one axis of a cell spanning [start, end] (fractions)."""
    margin_start = BORDER_MARGIN if start == 0.0 else CENTRE_GAP
    margin_end = BORDER_MARGIN if end == 1.0 else CENTRE_GAP
    low = start * image_size + radius + margin_start * image_size
    high = end * image_size - radius - margin_end * image_size
    low = max(low, CENTRAL_THIRD[0] * image_size - CORE_REACH * radius)
    high = min(high, CENTRAL_THIRD[1] * image_size + CORE_REACH * radius)
    # The size ranges and margins above keep low <= high for every cell; min() guards rounding.
    return min(low, high), high


def make_hard_negatives(caption: Caption, shapes: Sequence[Shape], rng: random.Random, count: int) -> list[Caption]:
    """Return up to `count` false captions, each changing one attribute of a different kind.

    Kinds are colour, shape, size (of the subject or the other shape) and the relation
    (swapped for its mirror). A candidate that is still true for the scene is skipped.
    """
    kinds = ["color", "shape", "size"] + (["relation"] if caption.relation else [])
    rng.shuffle(kinds)
    negatives: list[Caption] = []
    for kind in kinds:
        if len(negatives) == count:
            break
        candidates = _one_attribute_changes(caption, kind)
        rng.shuffle(candidates)
        for candidate in candidates:
            if not is_true(candidate, shapes) and candidate not in negatives:
                negatives.append(candidate)
                break
    return negatives


def _one_attribute_changes(caption: Caption, kind: str) -> list[Caption]:
    if kind == "relation":
        assert caption.relation is not None
        return [replace(caption, relation=RELATIONS[caption.relation])]

    values = {"color": sorted(COLORS), "shape": list(SHAPES), "size": sorted(SIZES)}[kind]
    roles = ["subject"] + (["other"] if caption.other is not None else [])
    changes = []
    for role in roles:
        phrase = getattr(caption, role)
        for value in values:
            if value != getattr(phrase, kind):
                changes.append(replace(caption, **{role: replace(phrase, **{kind: value})}))
    return changes


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of `image_size` x `image_size` pixels, without anti-aliasing."""
    size = scene.image_size
    image = _background(scene.background, scene.background_level, size, scene.index)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    return image


def _background(kind: str, level: int, size: int, index: int) -> Image.Image:
    """Draw a grey background: plain, a vertical gradient, stripes or a checkerboard."""
    if kind == "gradient":
        ramp = Image.linear_gradient("L").resize((size, size))
        # Map 0..255 onto level-30..level+30 so the background stays mid-grey.
        grey = ramp.point(lambda value: level - 30 + value * 60 // 255)
        return Image.merge("RGB", (grey, grey, grey))

    image = Image.new("RGB", (size, size), (level, level, level))
    if kind == "plain":
        return image
    draw = ImageDraw.Draw(image)
    shade = (level + 25,) * 3
    period = max(4, size // (6 + index % 6))
    if kind == "stripes":
        for offset in range(-size, size, period):
            draw.line([(offset, 0), (offset + size, size)], fill=shade, width=max(1, period // 3))
    elif kind == "checker":
        for row in range(0, size, period):
            for column in range(0, size, period):
                if (row // period + column // period) % 2 == 0:
                    draw.rectangle([column, row, column + period - 1, row + period - 1], fill=shade)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x, y = shape.center
    r = shape.radius
    fill = COLORS[shape.color]
    if shape.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape.shape == "square":
        # A square of side 1.8 r has about the area of a circle of radius r.
        half = 0.9 * r
        draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
    elif shape.shape == "triangle":
        draw.polygon(_star_points(x, y, r, points=3, inner=None), fill=fill)
    elif shape.shape == "star":
        draw.polygon(_star_points(x, y, r, points=5, inner=0.45 * r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.shape!r}")


def _star_points(x: float, y: float, r: float, points: int, inner: float | None) -> list[tuple[float, float]]:
    """Return the corners of a regular polygon (inner=None) or star pointing up, centred on (x, y)."""
    corners = []
    steps = points if inner is None else 2 * points
    for step in range(steps):
        angle = -math.pi / 2 + 2 * math.pi * step / steps
        radius = r if inner is None or step % 2 == 0 else inner
        corners.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return corners


def split_names(n_images: int, splits: Sequence[tuple[str, float]]) -> list[str]:
    """Assign a split to each of `n_images` scenes in order, by the fractions in `splits`."""
    if not splits:
        raise ConfigError("splits is empty.", 'Pass e.g. (("train", 0.8), ("dev", 0.2)).')
    total = sum(fraction for _, fraction in splits)
    if any(fraction < 0 for _, fraction in splits) or abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"Split fractions {[fraction for _, fraction in splits]} must be non-negative and sum to 1.",
            'Pass e.g. (("train", 0.8), ("dev", 0.2)).',
        )
    names: list[str] = []
    cumulative = 0.0
    for position, (name, fraction) in enumerate(splits):
        cumulative += fraction
        end = n_images if position == len(splits) - 1 else round(cumulative * n_images)
        names.extend([name] * (end - len(names)))
    return names


def generate_scenes(
    out_folder: Path | str,
    n_images: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    splits: Sequence[tuple[str, float]] = (("train", 0.8), ("dev", 0.2)),
    image_format: str = "png",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Record]:
    """Write `n_images` scenes with captions as a dataset folder and return its records.

    The folder gets `images/NNNNNN.<format>`, `records.jsonl` (one caption and its hard
    negatives per image) and `scenes.jsonl` (shape positions, for checks and debugging).
    Scenes are assigned to splits in order. `progress(done, total)` is called after each image.
    PNG keeps exact colours; JPEG is smaller but blurs edges.
    """
    if n_images < 1:
        raise ConfigError(f"n_images must be at least 1, got {n_images}.", "Ask for one or more scenes.")
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32 pixels, got {image_size}.", "Use e.g. 128.")
    image_format = image_format.lower()
    if image_format not in ("png", "jpg", "jpeg"):
        raise ConfigError(f"image_format {image_format!r} is not supported.", "Use 'png' or 'jpg'.")
    extension = "jpg" if image_format in ("jpg", "jpeg") else "png"
    names = split_names(n_images, splits)

    out_folder = Path(out_folder)
    records = []
    scene_lines = []
    with atomic_directory(out_folder, overwrite=overwrite) as staging:
        (staging / "images").mkdir()
        for index in range(n_images):
            scene = make_scene(seed, index, image_size)
            relative = Path("images") / f"{index:06d}.{extension}"
            image = render_scene(scene)
            if extension == "png":
                image.save(staging / relative, format="PNG", compress_level=1)
            else:
                image.save(staging / relative, format="JPEG", quality=95)
            records.append(
                Record(
                    image=relative,
                    text=scene.caption.text,
                    split=names[index],
                    negatives=tuple(negative.text for negative in scene.negatives),
                )
            )
            scene_lines.append(json.dumps({"image": relative.as_posix(), **_scene_to_dict(scene)}))
            if progress is not None:
                progress(index + 1, n_images)

        write_dataset(staging, records)
        atomic_write_text(staging / SCENES_JSONL, "\n".join(scene_lines) + "\n")

    logger.info("Wrote %d synthetic scenes (seed %d) to %s", n_images, seed, out_folder)
    root = out_folder.resolve()
    return [replace(record, image=root / record.image) for record in records]


def _scene_to_dict(scene: Scene) -> dict:
    return {
        "index": scene.index,
        "background": scene.background,
        "shapes": [asdict(shape) for shape in scene.shapes],
        "caption": scene.caption.text,
        "negatives": [negative.text for negative in scene.negatives],
    }


def caption_words() -> list[str]:
    """Return every word a synthetic caption can contain, for checking a vocabulary."""
    words = {"a", *SIZES, *COLORS, *SHAPES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)
