"""The "shapes" domain: GenEval's six categories on plain scenes of colored circles, squares and triangles.

One grammar serves three purposes, so that they can never disagree:

- prompt sets (`shapes_prompts`): `datasets.Dataset`s with columns `prompt` and `category`, the category one of
  GenEval's names (`single_object`, `two_object`, `counting`, `colors`, `position`, `color_attr`);
- scenes drawn for a prompt (`render_scene`), the pretraining data of `benchmarks/shapes/build.py`;
- the rule-based rewards `shapes_geneval` (strict, 0/1 per image as GenEval reports) and `shapes_geneval_dense`
  (partial credit in [0, 1], for training, as Flow-GRPO trains on GenEval), which read the requirements from the
  prompt text alone (`parse_prompt`), find the objects by color segmentation and connected components
  (`detect_objects`), and name each object's shape from its geometry (how much of its bounding box it fills, whether it fills its corners).

Strict rules per category (extra objects are never penalised, as in GenEval):

- single_object "a photo of a circle": at least one circle;
- two_object "a photo of a circle and a square": at least one of each;
- counting "a photo of three circles": exactly three circles;
- colors "a photo of a red circle": at least one circle, and every circle red;
- position "a photo of a circle left of a square": a circle whose center lies left of a square's center by more than
  `RELATION_MARGIN` of the image width ("above"/"below": of its height);
- color_attr "a photo of a red circle and a blue square": a red circle and a blue square.

Dense (partial) credit: two_object and color_attr average their two objects (color_attr: 1 for the right shape in
the right color, 0.5 for the shape in another color); counting is `max(0, 1 - |found - asked| / asked)`; colors is
the fraction of the named shape's objects that have the color (0 without any); position is half for finding both
objects, half for the relation; single_object is the strict score.
"""

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._preprocessing import check_images


__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "ShapeObject",
    "detect_objects",
    "parse_prompt",
    "render_scene",
    "shapes_geneval",
    "shapes_geneval_dense",
    "shapes_prompts",
]

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES = ("circle", "square", "triangle")
# Saturated colors far apart in RGB, on a light gray background: segmentation is a nearest-color test.
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND = (235, 235, 235)
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATION_MARGIN = 0.05  # the centers must be apart by more than this fraction of the image side
# A pixel is read as a mix of the background and one color when it lies this close to their segment (Euclidean
# distance in RGB, values in [0, 1]).
COLOR_TOLERANCE = 0.25
# An object's size, as a fraction of the image side: one or two objects are drawn at 11 pixels of 32 (their shapes then
# survive a 4x-downsampling VAE: squares keep their corners), three or four at 8 pixels (so that four fit apart).
OBJECT_SIZE = 0.25
LARGE_OBJECT_SIZE = 0.34
MIN_AREA_FRACTION = 0.01  # smaller connected components are noise, not objects (10 pixels at 32x32)


@dataclass(frozen=True)
class ShapeObject:
    """One object found in (or drawn into) an image: its shape, color name and bounding box center in pixels."""

    shape: str
    color: str
    x: float
    y: float
    area: int = 0


# -- the prompt grammar ------------------------------------------------------------------------------------------------
def _a(shape: str, color: str | None = None) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def _plural(shape: str) -> str:
    return shape + "s"


def format_prompt(category: str, **slots) -> str:
    """The prompt of `category` with its slots (`shape`, `shape_2`, `color`, `color_2`, `count`, `relation`)."""
    if category == "single_object":
        return f"a photo of {_a(slots['shape'])}"
    if category == "two_object":
        return f"a photo of {_a(slots['shape'])} and {_a(slots['shape_2'])}"
    if category == "counting":
        number = {v: k for k, v in NUMBERS.items()}[slots["count"]]
        return f"a photo of {number} {_plural(slots['shape'])}"
    if category == "colors":
        return f"a photo of {_a(slots['shape'], slots['color'])}"
    if category == "position":
        return f"a photo of {_a(slots['shape'])} {slots['relation']} {_a(slots['shape_2'])}"
    if category == "color_attr":
        first, second = _a(slots["shape"], slots["color"]), _a(slots["shape_2"], slots["color_2"])
        return f"a photo of {first} and {second}"
    raise ValueError(f"Unknown shapes category {category!r}; choose one of {', '.join(CATEGORIES)}.")


_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLORS)
_PATTERNS = [
    ("counting", re.compile(rf"a photo of (?P<number>{'|'.join(NUMBERS)}) (?P<shape>{_SHAPE})s")),
    (
        "color_attr",
        re.compile(
            rf"a photo of a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) and a (?P<color_2>{_COLOR}) (?P<shape_2>{_SHAPE})"
        ),
    ),
    ("two_object", re.compile(rf"a photo of a (?P<shape>{_SHAPE}) and a (?P<shape_2>{_SHAPE})")),
    (
        "position",
        re.compile(rf"a photo of a (?P<shape>{_SHAPE}) (?P<relation>{'|'.join(RELATIONS)}) a (?P<shape_2>{_SHAPE})"),
    ),
    ("colors", re.compile(rf"a photo of a (?P<color>{_COLOR}) (?P<shape>{_SHAPE})")),
    ("single_object", re.compile(rf"a photo of a (?P<shape>{_SHAPE})")),
]


def parse_prompt(prompt: str) -> tuple[str, dict]:
    """The category of a shapes prompt and its slots; a `ValueError` for a prompt outside the grammar."""
    text = prompt.strip().lower().rstrip(".")
    for category, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            slots = match.groupdict()
            if "number" in slots:
                slots["count"] = NUMBERS[slots.pop("number")]
            return category, slots
    raise ValueError(
        f"The shapes rewards cannot read the prompt {prompt!r}: it is not in their grammar (see "
        "trl_dancegrpo.rewards.shapes, e.g. 'a photo of a red circle and a blue square')."
    )


def all_prompts() -> dict[str, list[str]]:
    """Every prompt of the grammar, per category (the pairs of two different shapes only)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    return {
        "single_object": [format_prompt("single_object", shape=s) for s in SHAPES],
        "two_object": [format_prompt("two_object", shape=a, shape_2=b) for a, b in pairs],
        "counting": [format_prompt("counting", shape=s, count=n) for s in SHAPES for n in NUMBERS.values()],
        "colors": [format_prompt("colors", shape=s, color=c) for s in SHAPES for c in COLORS],
        "position": [format_prompt("position", shape=a, shape_2=b, relation=r) for a, b in pairs for r in RELATIONS],
        "color_attr": [
            format_prompt("color_attr", shape=a, color=c, shape_2=b, color_2=d)
            for a, b in pairs
            for c in COLORS
            for d in COLORS
            if c != d
        ],
    }


# Position and color attribution hold out a quarter of their prompts: combinations never seen in pretraining.
HELD_OUT_CATEGORIES = ("position", "color_attr")


def split_prompts(seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, unseen) prompts per category: a quarter of the position and color_attr prompts are never trained on."""
    train, unseen = {}, {}
    for category, prompts in all_prompts().items():
        prompts = list(prompts)
        if category in HELD_OUT_CATEGORIES:
            random.Random(f"{seed}-{category}").shuffle(prompts)
            k = len(prompts) // 4
            unseen[category], train[category] = sorted(prompts[:k]), sorted(prompts[k:])
        else:
            unseen[category], train[category] = [], prompts
    return train, unseen


def shapes_prompts(split: str = "train", per_category: int = 8, seed: int = 0):
    """A prompt set of the shapes domain: a `datasets.Dataset` with columns `prompt` and `category`.

    `split="train"` draws from the pretraining prompts; `split="test"` (held out) takes, per category, the unseen
    prompts first (combinations never seen in pretraining: a quarter of position and color_attr), then trained
    prompts, `per_category` in all (the categories with few prompts repeat them). Deterministic from `seed`.
    """
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    train, unseen = split_prompts(seed=0)  # the split itself is fixed: the model is pretrained on `train`
    rng = random.Random(f"shapes-{split}-{seed}")
    rows = []
    for category in CATEGORIES:
        pool = list(train[category])
        rng.shuffle(pool)
        chosen = (unseen[category] if split == "test" else []) + pool
        chosen = [chosen[i % len(chosen)] for i in range(per_category)]
        rows += [{"prompt": p, "category": category} for p in chosen]
    return Dataset.from_list(rows)


# -- drawing scenes ----------------------------------------------------------------------------------------------------
def object_size(count: int, size: int = 32) -> float:
    """The side, in pixels, of each of the `count` objects of a `size` x `size` scene."""
    return size * (LARGE_OBJECT_SIZE if count <= 2 else OBJECT_SIZE)


def _draw(draw, shape: str, color: tuple, x: float, y: float, size: float) -> None:
    r = size / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        s = r * 0.9  # a square of the same area as the circle would be 0.89 r; 0.9 keeps their sizes alike
        draw.rectangle([x - s, y - s, x + s, y + s], fill=color)
    else:
        draw.polygon([(x - r, y + r * 0.9), (x + r, y + r * 0.9), (x, y - r)], fill=color)


def scene_for_prompt(prompt: str, rng: random.Random, size: int = 32) -> list[ShapeObject]:
    """Objects satisfying `prompt` (unnamed colors at random), placed without touching; `rng` draws everything."""
    category, slots = parse_prompt(prompt)
    colors = list(COLORS)

    def color(name):
        return slots.get(name) or rng.choice(colors)

    if category == "single_object":
        wanted = [(slots["shape"], color("color"))]
    elif category == "counting":
        fixed = rng.choice(colors) if rng.random() < 0.5 else None
        wanted = [(slots["shape"], fixed or rng.choice(colors)) for _ in range(slots["count"])]
    elif category == "colors":
        wanted = [(slots["shape"], slots["color"])]
    else:
        wanted = [(slots["shape"], color("color")), (slots["shape_2"], color("color_2"))]
    side = object_size(len(wanted), size)
    margin = side / 2 + 1
    for _ in range(5000):
        points = [(rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)) for _ in wanted]
        far = all(
            max(abs(p[0] - q[0]), abs(p[1] - q[1])) > side + 1.5 for i, p in enumerate(points) for q in points[:i]
        )
        if not far:
            continue
        if category == "position":
            (x1, y1), (x2, y2) = points
            dx, dy = x2 - x1, y2 - y1  # from the first object to the second
            needed = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[slots["relation"]]
            # a clear relation: along its axis the offset dominates the other one
            if needed < size * 0.25 or abs(needed) < 1.5 * (
                abs(dy) if slots["relation"] in RELATIONS[:2] else abs(dx)
            ):
                continue
        return [ShapeObject(s, c, x, y) for (s, c), (x, y) in zip(wanted, points)]
    raise RuntimeError(f"Could not place the objects of {prompt!r} in a {size}x{size} image.")


def render_scene(objects: list[ShapeObject], size: int = 32, side: float | None = None):
    """A PIL image of `objects` on the plain background (drawn 4x larger and downsampled: smooth edges), each object
    `side` pixels across (default: `object_size(len(objects), size)`)."""
    from PIL import Image, ImageDraw

    scale = 4
    side = object_size(len(objects), size) if side is None else side
    image = Image.new("RGB", (size * scale, size * scale), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw(draw, o.shape, COLORS[o.color], o.x * scale, o.y * scale, side * scale)
    return image.resize((size, size), Image.Resampling.BOX)


# -- finding the objects -----------------------------------------------------------------------------------------------
def _label_components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of a boolean mask `(B, H, W)`: 0 outside, a positive label per component.

    Each pixel starts with its own index and repeatedly takes the largest label among its neighbours in the mask,
    until nothing changes (a batched flood fill; as many rounds as the longest path within a component).
    """
    b, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w).clone()
    labels = labels * mask
    while True:
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _shape_of(component: torch.Tensor) -> str | None:
    """Name a component (a boolean mask cropped to its bounding box) from its geometry.

    A square fills the corners of its bounding box, a circle and a triangle do not; a triangle (apex up) puts most
    of its area in the lower half of its box, a circle splits it evenly. Both tests keep a wide gap at 8 pixels per
    object, where pixel noise moves the fill ratio alone by several percent.
    """
    h, w = component.shape
    if max(h, w) > 1.6 * min(h, w):  # much longer than wide: no shape of ours (merged objects or a smear)
        return None
    fill = component.float().mean().item()
    k = max(1, round(min(h, w) / 4))
    corners = torch.cat(
        [c.flatten() for c in (component[:k, :k], component[:k, -k:], component[-k:, :k], component[-k:, -k:])]
    )
    if corners.float().mean().item() >= 0.7 and fill >= 0.75:
        return "square"
    top, bottom = component[: h // 2].sum().item(), component[h - h // 2 :].sum().item()
    if fill >= 0.35 and top < 0.65 * bottom:
        return "triangle"
    if fill >= 0.55:
        return "circle"
    return None


def detect_objects(image: torch.Tensor) -> list[ShapeObject]:
    """The objects of one image `(3, H, W)` in [0, 1]: per color, its connected components, each named by shape.

    Components smaller than `MIN_AREA_FRACTION` of the image, and those whose geometry fits no shape (too thin, too
    ragged), are not objects.
    """
    image = image.detach().float().cpu()
    h, w = image.shape[-2:]
    pixels = image.permute(1, 2, 0).reshape(-1, 3)  # (P, 3)
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
    colors = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255 - background  # (C, 3)
    # How much of each color a pixel holds, read as a mix of that color and the background (an antialiased edge
    # pixel covered half by the object holds 0.5); a pixel far from every such mix holds none.
    alpha = ((pixels - background) @ colors.T / (colors**2).sum(-1)).clamp(0, 1)  # (P, C)
    residual = (pixels.unsqueeze(1) - background - alpha.unsqueeze(-1) * colors).norm(dim=-1)
    alpha = torch.where(residual < COLOR_TOLERANCE, alpha, torch.zeros_like(alpha))
    best = alpha.argmax(-1)
    # half covered or more, as a rasterizer decides which pixels a shape owns
    masks = torch.stack([(best == i) & (alpha[:, i] > 0.5) for i in range(len(COLORS))]).view(-1, h, w)
    labels = _label_components(masks)
    found = []
    min_area = max(3, round(MIN_AREA_FRACTION * h * w))
    for c, name in enumerate(COLORS):
        for label in labels[c].unique().tolist():
            if label == 0:
                continue
            ys, xs = torch.nonzero(labels[c] == label, as_tuple=True)
            area = len(ys)
            if area < min_area:
                continue
            component = labels[c, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == label
            shape = _shape_of(component)
            if shape is not None:
                x, y = (xs.min() + xs.max()).item() / 2 + 0.5, (ys.min() + ys.max()).item() / 2 + 0.5
                found.append(ShapeObject(shape, name, x, y, area))
    return found


# -- scoring -----------------------------------------------------------------------------------------------------------
def _relation_holds(a: ShapeObject, b: ShapeObject, relation: str, width: int, height: int) -> bool:
    dx, dy = b.x - a.x, b.y - a.y  # from a to b; "a left of b" means b lies to the right
    needed = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    side = width if relation in ("left of", "right of") else height
    return needed > RELATION_MARGIN * side


def score_objects(prompt: str, objects: list[ShapeObject], width: int, height: int) -> tuple[float, float]:
    """(strict, dense) scores of the objects found in an image for `prompt`."""
    category, slots = parse_prompt(prompt)
    shape = slots["shape"]
    of_shape = [o for o in objects if o.shape == shape]
    if category == "single_object":
        strict = float(bool(of_shape))
        return strict, strict
    if category == "two_object":
        found = [bool(of_shape), any(o.shape == slots["shape_2"] for o in objects)]
        return float(all(found)), sum(found) / 2
    if category == "counting":
        count, asked = len(of_shape), slots["count"]
        return float(count == asked), max(0.0, 1 - abs(count - asked) / asked)
    if category == "colors":
        right = sum(o.color == slots["color"] for o in of_shape)
        strict = float(bool(of_shape) and right == len(of_shape))
        return strict, right / len(of_shape) if of_shape else 0.0
    if category == "position":
        others = [o for o in objects if o.shape == slots["shape_2"]]
        holds = any(_relation_holds(a, b, slots["relation"], width, height) for a in of_shape for b in others)
        both = bool(of_shape) and bool(others)
        return float(holds), 0.5 * both + 0.5 * holds
    # color_attr
    credits = []
    for s, c in ((shape, slots["color"]), (slots["shape_2"], slots["color_2"])):
        credits.append(
            1.0 if any(o.shape == s and o.color == c for o in objects) else 0.5 * any(o.shape == s for o in objects)
        )
    return float(all(credit == 1.0 for credit in credits)), sum(credits) / 2


def _score_images(prompts, images, reward_name: str) -> list[tuple[float, float]]:
    images = check_images(images, reward_name)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{reward_name}: got {len(prompts)} prompts for {images.shape[0]} images.")
    h, w = images.shape[-2:]
    return [score_objects(p, detect_objects(image), w, h) for p, image in zip(prompts, images)]


def shapes_geneval(prompts, images, **kwargs) -> list[float]:
    """GenEval's strict score on the shapes domain: 1.0 when every requirement of the prompt holds, else 0.0.

    Images `(N, 3, H, W)` in [0, 1]; prompts in the grammar of `trl_dancegrpo.rewards.shapes` (a `category` or
    `metadata` column, if the data set has one, is not needed: the prompt says it all).
    """
    return [strict for strict, _ in _score_images(prompts, images, "shapes_geneval")]


def shapes_geneval_dense(prompts, images, **kwargs) -> list[float]:
    """Partial credit in [0, 1] on the shapes domain (see the module docstring): the training reward."""
    return [dense for _, dense in _score_images(prompts, images, "shapes_geneval_dense")]
