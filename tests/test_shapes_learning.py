"""The shapes yardstick end to end: build the small pretrained model, train a few RL steps with the dense shapes
reward, and the held-out dense score moves up; with the negated reward it moves down (two-sided, from the same start).
"""

import pytest

from trl_dancegrpo.rewards.shapes import shapes_geneval_dense, shapes_prompts
from trl_dancegrpo.shapes_model import (
    EVAL_NUM_INFERENCE_STEPS,
    ShapesBuildSettings,
    evaluate_shapes,
    shapes_pipeline_path,
)

from .test_trainer import make_trainer


# Measured on 2026-12-04 (small build, seed 0): held-out dense +0.073 up, -0.042 down, the same on a fresh build (the
# build is deterministic); 2 min 9 s with the build (about 95 s of it), 35 s with the cached build, one other job
# running. Build 2 (one thread): +0.042 up, -0.042 down, 77 s with the build (50 s of it), load about 3. Build 3
# (300 VAE and 600 denoiser steps, no guidance embedding): start 0.068, +0.052 up, -0.068 down, 4 min 6 s with the
# build (175 s of it) under a load of 10 to 14. On the full build 2, 20 steps at lr 2e-4 raised the held-out dense
# score on all three seeds (+0.026, +0.078, +0.034; benchmarks/RESULTS.md) and lr 5e-4 was unstable. Build 4 (one or
# two objects drawn at 11 pixels; the small build keeps build 3's denoiser recipe): start 0.193, +0.101 up, -0.188
# down, 99 s with the build, one other build running.
STEPS, LEARNING_RATE = 20, 2e-4
MARGIN = 0.02  # held-out dense score, in [0, 1]


def negated_dense(prompts, images, **kwargs):
    return [-value for value in shapes_geneval_dense(prompts, images)]


@pytest.mark.slow
def test_shapes_reward_moves_held_out_scores_both_ways(tmp_path):
    path = shapes_pipeline_path(ShapesBuildSettings.small())  # built once into the shared cache
    train = shapes_prompts("train", per_category=16)
    test = shapes_prompts("test", per_category=4)

    def held_out_dense(trainer) -> float:
        generate = lambda prompts, seed: trainer.generate(prompts, seed=100 + seed)[0]  # noqa: E731
        return evaluate_shapes(generate, test["prompt"], test["category"], seeds=range(2))["dense"]

    shifts, starts = {}, {}
    for direction, reward in (("up", shapes_geneval_dense), ("down", negated_dense)):
        trainer = make_trainer(
            path,
            tmp_path / direction,
            reward=reward,
            dataset=train,
            num_generations=8,
            per_device_train_batch_size=32,  # 4 prompts x G = 8
            num_inference_steps=EVAL_NUM_INFERENCE_STEPS,
            guidance_scale=1.0,  # the small build trains no unconditional branch (no empty prompts): no CFG
            max_steps=STEPS,
            learning_rate=LEARNING_RATE,
            log_samples=False,
        )
        before = starts[direction] = held_out_dense(trainer)
        trainer.train()
        shifts[direction] = held_out_dense(trainer) - before
    print(f"held-out dense at the start: {starts}, shifts: {shifts}")
    assert shifts["up"] > MARGIN, shifts
    assert shifts["down"] < -MARGIN, shifts
