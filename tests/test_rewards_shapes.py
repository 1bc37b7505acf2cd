"""The shapes rewards (GenEval's categories on drawn scenes): exact strict and dense scores, near misses included."""

import numpy as np
import pytest
import torch

from trl_dancegrpo.rewards import get_reward, shapes_geneval, shapes_geneval_dense
from trl_dancegrpo.rewards.shapes import (
    CATEGORIES,
    ShapeObject,
    all_prompts,
    detect_objects,
    parse_prompt,
    render_scene,
    shapes_prompts,
    split_prompts,
)


def draw(*objects, size: int = 32) -> torch.Tensor:
    """A `(3, size, size)` image of `(shape, color, x, y)` objects (centers in pixels)."""
    image = render_scene([ShapeObject(*o) for o in objects], size=size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def scores(prompt: str, image: torch.Tensor) -> tuple[float, float]:
    images = image.unsqueeze(0)
    return shapes_geneval([prompt], images)[0], shapes_geneval_dense([prompt], images)[0]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("color", ["red", "green", "blue", "yellow"])
def test_detects_each_shape_and_color_with_its_center(shape, color):
    (found,) = detect_objects(draw((shape, color, 10, 20)))
    assert (found.shape, found.color) == (shape, color)
    assert abs(found.x - 10) <= 1 and abs(found.y - 20) <= 1.5


def test_blank_image_has_no_objects_and_scores_zero():
    blank = draw()
    assert detect_objects(blank) == []
    for prompts in all_prompts().values():
        assert scores(prompts[0], blank) == (0.0, 0.0)


# (prompt, objects drawn, strict, dense): the right scene, then near misses with their exact partial credit.
CASES = [
    ("a photo of a triangle", [("triangle", "blue", 16, 16)], 1.0, 1.0),
    ("a photo of a triangle", [("circle", "blue", 16, 16)], 0.0, 0.0),
    ("a photo of a circle and a square", [("circle", "red", 8, 8), ("square", "green", 24, 24)], 1.0, 1.0),
    ("a photo of a circle and a square", [("circle", "red", 8, 8), ("circle", "green", 24, 24)], 0.0, 0.5),
    (
        "a photo of three circles",
        [("circle", "red", 6, 6), ("circle", "blue", 26, 6), ("circle", "red", 16, 26)],
        1,
        1,
    ),
    (
        "a photo of four circles",
        [("circle", "red", 6, 6), ("circle", "blue", 26, 6), ("circle", "red", 16, 26)],
        0,
        0.75,
    ),
    (
        "a photo of two squares",
        [("square", "red", 6, 6), ("square", "blue", 26, 6), ("square", "red", 16, 26)],
        0,
        0.5,
    ),
    ("a photo of a yellow square", [("square", "yellow", 16, 16)], 1.0, 1.0),
    ("a photo of a yellow square", [("square", "green", 16, 16)], 0.0, 0.0),  # wrong color
    ("a photo of a yellow square", [("square", "yellow", 8, 8), ("square", "red", 24, 24)], 0.0, 0.5),
    ("a photo of a yellow square", [("circle", "yellow", 16, 16)], 0.0, 0.0),  # right color, wrong shape
    ("a photo of a circle left of a triangle", [("circle", "red", 6, 16), ("triangle", "blue", 26, 16)], 1.0, 1.0),
    ("a photo of a circle right of a triangle", [("circle", "red", 6, 16), ("triangle", "blue", 26, 16)], 0.0, 0.5),
    ("a photo of a circle above a triangle", [("circle", "red", 16, 6), ("triangle", "blue", 16, 26)], 1.0, 1.0),
    ("a photo of a circle below a triangle", [("circle", "red", 16, 6), ("triangle", "blue", 16, 26)], 0.0, 0.5),
    ("a photo of a circle left of a triangle", [("circle", "red", 6, 16)], 0.0, 0.0),  # one object missing
    ("a photo of a red circle and a blue square", [("circle", "red", 8, 8), ("square", "blue", 24, 24)], 1.0, 1.0),
    ("a photo of a red circle and a blue square", [("circle", "blue", 8, 8), ("square", "red", 24, 24)], 0.0, 0.5),
    ("a photo of a red circle and a blue square", [("circle", "red", 8, 8), ("square", "red", 24, 24)], 0.0, 0.75),
    ("a photo of a red circle and a blue square", [("circle", "red", 8, 8)], 0.0, 0.5),
]


@pytest.mark.parametrize("prompt, objects, strict, dense", CASES)
def test_exact_strict_and_dense_scores(prompt, objects, strict, dense):
    assert scores(prompt, draw(*objects)) == (strict, dense)


def test_scores_batched_with_noise_and_through_the_registry():
    """A batch of drawn scenes with mild pixel noise scores as the clean ones; the registry names give the same."""
    prompts = [case[0] for case in CASES]
    images = torch.stack([draw(*case[1]) for case in CASES])
    noisy = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert shapes_geneval(prompts, noisy) == [float(case[2]) for case in CASES]
    assert get_reward("shapes_geneval_dense")(prompts, noisy) == [float(case[3]) for case in CASES]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not in their grammar"):
        parse_prompt("a photo of a purple hexagon")
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        shapes_geneval(["a photo of a circle"] * 2, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="split"):
        shapes_prompts("validation")


def test_prompt_sets_cover_the_categories_and_hold_out_unseen_combinations():
    train, test = shapes_prompts("train", per_category=40), shapes_prompts("test", per_category=8)
    assert set(train.column_names) == {"prompt", "category"} and set(test["category"]) == set(CATEGORIES)
    for prompt, category in zip(test["prompt"], test["category"]):
        assert parse_prompt(prompt)[0] == category
    every_train_prompt = {p for prompts in split_prompts()[0].values() for p in prompts}
    unseen = [p for p in test["prompt"] if p not in every_train_prompt]
    assert unseen and {parse_prompt(p)[0] for p in unseen} == {"position", "color_attr"}
    assert shapes_prompts("test", per_category=8)["prompt"] == test["prompt"]  # deterministic
