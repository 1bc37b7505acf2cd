"""The sampler on each model family (issue 12's families): an SDE window, the shared prefix and the clean last step."""

import pytest
import torch

from trl_dancegrpo.rollout import denoise, sample_slices

from .test_editing import source
from .test_trainer import assert_first_step_on_policy, make_trainer
from .test_video import one_thread  # noqa: F401 (fixture)


FAMILIES = [
    ("tiny-qwen-image", {}),
    ("tiny-qwen-image", {"guidance_scale": 4.0}),  # true CFG with the norm rescale
    ("tiny-qwen-image-edit", {"guidance_scale": 4.0}),  # CFG with per-row negative prompts that see the source
    ("tiny-qwen-image-edit-plus", {}),
    ("tiny-flux-kontext", {}),
]
PROMPTS = ["make it red"] * 4 + ["add a hat"] * 4  # two groups of 4


def rows_of(name: str) -> list[dict]:
    if name == "tiny-qwen-image":
        return [{"prompt": prompt} for prompt in PROMPTS]
    return [{"prompt": prompt, "image": source(i // 4)} for i, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize("name, overrides", FAMILIES, ids=[f"{n}{'-cfg' if o else ''}" for n, o in FAMILIES])
def test_window_shared_prefix_and_clean_last_step(name, overrides, tiny_pipeline_path, tmp_path):
    from datasets import Dataset

    rows = rows_of(name)
    dataset = Dataset.from_dict({key: [row[key] for row in rows[::4]] for key in rows[0]})
    seen = []

    def reward(prompts, images, **kwargs):
        seen.append(images.clone())
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = make_trainer(
        tiny_pipeline_path(name),
        tmp_path,
        reward=reward,
        dataset=dataset,
        num_inference_steps=5,
        sde_window_size=2,
        timestep_fraction=1.0,
        max_steps=1,
        **overrides,
    )
    adapter = trainer.adapter
    batch = trainer._generate_and_score(rows)
    window = trainer.sampler.window(trainer.args.seed, 0)
    # only the window's steps are stochastic and trained; the last step is deterministic
    assert (batch["log_probs"] != 0).all(dim=0).tolist() == [i in window for i in range(5)]
    assert set(batch["train_steps"].flatten().tolist()) <= set(window)
    # the rewards see the clean image of the last step: x - sigma * v from the latent before it
    x, last = batch["latents"][:, -2], torch.full((8,), 4)
    with torch.no_grad():
        output = denoise(adapter, trainer.denoiser, x, last, batch["cond"], batch["negative_cond"])
        clean = x - adapter.sigmas[4] * output
        expected = adapter.decode(clean)
    torch.testing.assert_close(batch["latents"][:, -1], clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1], expected, rtol=1e-5, atol=1e-5)

    # the deterministic steps before the window run once per group and give what running them per sample gives
    cond, negative = trainer._conditioning(PROMPTS, [row.get("image") for row in rows])
    kwargs = dict(first=4, seed=7, parts=sample_slices(8, 8, 3), window=range(3, 5), group_size=4)
    shared = trainer.sampler.sample(trainer.denoiser, cond, negative, share_prefix=True, **kwargs)
    per_sample = trainer.sampler.sample(trainer.denoiser, cond, negative, share_prefix=False, **kwargs)
    torch.testing.assert_close(shared.latents, per_sample.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.log_probs, per_sample.log_probs, rtol=1e-5, atol=1e-5)

    trainer.train()
    assert_first_step_on_policy(trainer)
