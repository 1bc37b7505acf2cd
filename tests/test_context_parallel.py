"""Context parallelism (`context_parallel_size`, parallel.py): 2 processes that split each sample's sequence give the
rollout, rewards, loss and update of 1 process without it, for FLUX and Wan (LoRA and full fine-tuning, with FSDP2)
and HunyuanVideo and SkyReels-V1 I2V (our plan, LoRA).

Tolerance of the slow comparisons: float32 on the CPU. With context parallelism each process computes attention for
half of the heads over the whole sequence (Ulysses), and the parameter gradient is the sum of two partial ones: the
same math in another summation order, so results differ by float32 rounding (about 1e-7 relative), never by a factor.
The advantages divide reward differences by the group's reward std (about 1e-3 here), which turns 1e-7 reward
rounding into about 1e-4: they are compared with atol 1e-3. The updated weights are compared within 1e-3 of the
update's own size (measured: about 1e-4 of it): a missing gradient scale (the update halved) or a group whose
processes drew different prompts or noise is off by far more.
"""

import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader

from trl_dancegrpo.config_checks import check_context_parallel
from trl_dancegrpo.parallel import GroupRepeatSampler, check_context_parallel_support
from trl_dancegrpo.trainer import PromptSampler

from .test_distributed import FSDP, LAUNCH, SCRIPT, fsdp_wrap, run, saved_weights
from .test_trainer import make_config


# -- fast: validation and the group-aware prompt sampler ---------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"context_parallel_size": 0}, "context_parallel_size must be at least 1"),
        ({"context_parallel_type": "tree"}, "context_parallel_type must be one of"),
        ({"context_parallel_size": 2}, r"context_parallel_size \(2\) must divide the number of processes \(1\)"),
    ],
)
def test_config_refuses(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_ring_needs_cuda():
    with pytest.raises(ValueError, match="context_parallel_type='ring' needs an attention kernel"):
        check_context_parallel(2, 2, "ring", "cpu")
    check_context_parallel(2, 4, "ring", "cuda")
    check_context_parallel(2, 4, "ulysses", "cpu")


def test_a_denoiser_without_a_plan_is_refused():
    from trl_dancegrpo.tiny import tiny_sd3_pipeline

    pipeline = tiny_sd3_pipeline()
    adapter = SimpleNamespace(pipeline=pipeline, denoiser=pipeline.transformer)
    args = SimpleNamespace(context_parallel_size=2, context_parallel_type="ulysses")
    with pytest.raises(
        ValueError, match=r"SD3Transformer2DModel \(StableDiffusion3Pipeline\) has no context parallel"
    ):
        check_context_parallel_support(adapter, args)
    check_context_parallel_support(adapter, SimpleNamespace(context_parallel_size=1))  # off: nothing to check
    # a plan the adapter ships is used (as HunyuanVideo's is)
    adapter.cp_plan = {"": {}}
    check_context_parallel_support(adapter, args)


def test_ulysses_needs_heads_divisible_by_the_group():
    from trl_dancegrpo.tiny import tiny_flux_pipeline

    pipeline = tiny_flux_pipeline()  # 2 attention heads
    adapter = SimpleNamespace(pipeline=pipeline, denoiser=pipeline.transformer)
    with pytest.raises(
        ValueError, match="FluxTransformer2DModel has 2 heads, not a multiple of context_parallel_size=4"
    ):
        check_context_parallel_support(
            adapter, SimpleNamespace(context_parallel_size=4, context_parallel_type="ulysses")
        )


def test_hunyuan_video_has_our_plan_for_ulysses_only():
    from trl_dancegrpo.adapters.hunyuan_video import HunyuanVideoAdapter
    from trl_dancegrpo.tiny import tiny_hunyuan_video_pipeline

    pipeline = tiny_hunyuan_video_pipeline()
    assert getattr(type(pipeline.transformer), "_cp_plan", None) is None  # diffusers 0.42 has none: ours is used
    adapter = SimpleNamespace(
        pipeline=pipeline,
        denoiser=pipeline.transformer,
        cp_plan=HunyuanVideoAdapter.cp_plan.fget(None),
        context_parallel_types=HunyuanVideoAdapter.context_parallel_types,
    )
    check_context_parallel_support(adapter, SimpleNamespace(context_parallel_size=2, context_parallel_type="ulysses"))
    with pytest.raises(ValueError, match="HunyuanVideoTransformer3DModel's context parallel plan supports 'ulysses'"):
        check_context_parallel_support(adapter, SimpleNamespace(context_parallel_size=2, context_parallel_type="ring"))


@pytest.mark.parametrize("size", [2, 3])
def test_local_joint_attention_masks_gathered_mask_the_gathered_keys(size):
    """Ulysses attends over the keys gathered rank after rank, each rank's `[image_r, text_r]`, with the local masks
    gathered alike: attention there equals attention over `[image, text]` with the whole mask (float64)."""
    from trl_dancegrpo.adapters.hunyuan_video import local_joint_attention_mask

    generator = torch.Generator().manual_seed(0)
    image, text, heads, dim = 4 * size, 3 * size, 2, 8
    valid = torch.tensor([2, text - 1])  # prompt lengths: padding in more than one rank's text chunk
    mask = torch.cat([torch.ones(2, image, dtype=torch.bool), torch.arange(text) < valid[:, None]], 1)[:, None, None]
    query, key, value = torch.randn(3, 2, heads, image + text, dim, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    def chunk(x, r):  # rank r's image and text tokens (dim -2)
        i, t = image // size, text // size
        return torch.cat([x[..., r * i : (r + 1) * i, :], x[..., image + r * t : image + (r + 1) * t, :]], -2)

    gathered_key = torch.cat([chunk(key, r) for r in range(size)], -2)
    gathered_value = torch.cat([chunk(value, r) for r in range(size)], -2)
    local = [local_joint_attention_mask(mask, image // size, text // size, r, size) for r in range(size)]
    got = torch.nn.functional.scaled_dot_product_attention(
        query, gathered_key, gathered_value, attn_mask=torch.cat(local, -1)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the whole mask over the gathered keys (no slicing) masks the wrong tokens
    wrong = torch.nn.functional.scaled_dot_product_attention(query, gathered_key, gathered_value, attn_mask=mask)
    assert (wrong - expected).abs().max() > 1e-2
    with pytest.raises(ValueError, match="a joint mask of"):
        local_joint_attention_mask(mask, image, text, 0, size)


def shard_batches(sampler, batch_size: int, processes: int) -> list[list[list[int]]]:
    """The batches each process gets when accelerate deals the dataloader's batches over `processes`."""
    loader = DataLoader(range(100), batch_size=batch_size, sampler=sampler)
    return [list(BatchSamplerShard(loader.batch_sampler, processes, p)) for p in range(processes)]


@pytest.mark.parametrize("data_parallel, context_parallel", [(1, 2), (2, 2), (2, 3)])
def test_group_repeat_sampler_gives_a_group_one_batch(data_parallel, context_parallel):
    """The processes of one context-parallel group get the same prompts; the groups get what `data_parallel`
    processes without context parallelism get, in the same order, epoch after epoch."""
    per_process, generations = 6, 3

    def prompt_sampler():
        return PromptSampler(
            data_source=list(range(10)),
            mini_repeat_count=generations,
            batch_size=per_process * data_parallel // generations,
            repeat_count=2,
            shuffle=True,
            seed=5,
        )

    expected = shard_batches(prompt_sampler(), per_process, data_parallel)
    wrapped = GroupRepeatSampler.wrap(prompt_sampler(), per_process, context_parallel)
    for epoch in (0, 1):
        wrapped.set_epoch(epoch)
        if epoch:
            base = prompt_sampler()
            base.set_epoch(epoch)
            expected = shard_batches(base, per_process, data_parallel)
        got = shard_batches(wrapped, per_process, data_parallel * context_parallel)
        for rank, batches in enumerate(got):
            assert batches == expected[rank // context_parallel], (epoch, rank)
        assert len(got[0]) == len(expected[0])
    assert GroupRepeatSampler.wrap(prompt_sampler(), per_process, 1).__class__ is PromptSampler


# -- slow: 2 processes with context parallelism against 1 without -------------------------------------------------------
def two_processes(extra, fsdp=()):
    return [*LAUNCH, *(fsdp or ["--multi_gpu"]), SCRIPT, *extra, "--context_parallel", "2"]


def assert_same_run(one_dir, two_dir) -> None:
    one = torch.load(one_dir / "rank0.pt")
    two = [torch.load(two_dir / f"rank{r}.pt") for r in (0, 1)]
    assert two[0]["context_parallel"] and two[1]["context_parallel"] and not one["context_parallel"]
    # the group's processes sampled the same 8 samples as the single process: same rewards, so same advantages
    torch.testing.assert_close(two[0]["advantages"], two[1]["advantages"], rtol=0, atol=0)
    torch.testing.assert_close(two[0]["advantages"], one["advantages"], rtol=0, atol=1e-3)
    for key in one["eval"]:
        assert two[0]["eval"][key] == pytest.approx(one["eval"][key], abs=1e-5), key
    if "params" not in one:
        return
    torch.testing.assert_close(two[0]["params"], two[1]["params"], rtol=0, atol=0)
    update = (one["params"] - one["initial_params"]).abs().max()
    assert update > 0
    # within 1e-3 of the step's size (measured: about 1e-4 of it); a halved update would be off by half of it
    torch.testing.assert_close(two[0]["params"], one["params"], rtol=0, atol=1e-3 * update.item())


CASES = [("tiny-flux", []), ("tiny-wan", ["--num_frames", "5"])]


# Wan fully fine-tuned here; FLUX with LoRA in the 2 x 2 test below, full FLUX in the FSDP one (the suite's time budget)
@pytest.mark.slow
@pytest.mark.parametrize("name, extra, lora", [(*CASES[1], False)], ids=["wan-full"])
def test_context_parallel_matches_one_process(name, extra, lora, tiny_pipeline_path, tmp_path):
    path, extra = tiny_pipeline_path(name), [*extra, *["--lora"] * lora]
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", *extra], tmp_path / "one")
    double = run(two_processes([path, str(tmp_path / "two"), "8", *extra]), tmp_path / "two")
    assert_same_run(single, double)


@pytest.mark.slow
@pytest.mark.parametrize(  # SkyReels I2V: the same transformer and plan, with CFG and image tokens
    "name, extra", [("tiny-skyreels", ["--conditioning", "image"])], ids=["i2v"]
)
def test_hunyuan_video_plan_matches_one_process(name, extra, tmp_path):
    """Our plan (adapters/hunyuan_video.py), LoRA: HunyuanVideo and SkyReels-V1 I2V (the same transformer, with CFG).

    The tiny tokenizer pads prompts to 48 tokens here (16 by default, where a prompt fills all but the last one or
    none, which any mask order masks alike): "a cat" leaves 33 padded, "a red house" 27, so each process's text chunk
    holds padding, batches mix lengths, and SkyReels' empty negative prompt is nearly all padding. With the whole mask
    over the gathered keys instead of each attention's own slice, the update is off by about 0.4 of itself."""
    from trl_dancegrpo.tiny import TINY_PIPELINES

    pipeline = TINY_PIPELINES[name]()
    pipeline.tokenizer.model_max_length = 48
    path = str(tmp_path / name)
    pipeline.save_pretrained(path)
    extra = [*extra, "--num_frames", "5", "--lora"]
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", *extra], tmp_path / "one")
    double = run(two_processes([path, str(tmp_path / "two"), "8", *extra]), tmp_path / "two")
    assert_same_run(single, double)


@pytest.mark.slow
def test_two_data_parallel_groups_of_two(tiny_pipeline_path, tmp_path):
    """4 processes, 2 (data) x 2 (context), FLUX with LoRA: each group samples 8 of the 16 samples 1 process samples,
    the evaluation splits over the groups (about 40 s on 2 CPU cores)."""
    path = tiny_pipeline_path("tiny-flux")
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "16", "--lora"], tmp_path / "one")
    launch = [*LAUNCH[:3], "--multi_gpu", "--num_processes", "4", *LAUNCH[5:], SCRIPT]
    run([*launch, path, str(tmp_path / "four"), "8", "--lora", "--context_parallel", "2"], tmp_path)
    one, four = torch.load(single / "rank0.pt"), [torch.load(tmp_path / "four" / f"rank{r}.pt") for r in range(4)]
    for first, second in ((0, 1), (2, 3)):  # the processes of a group hold the same samples
        torch.testing.assert_close(four[first]["advantages"], four[second]["advantages"], rtol=0, atol=0)
    advantages = torch.cat([four[0]["advantages"], four[2]["advantages"]])
    torch.testing.assert_close(advantages, one["advantages"], rtol=0, atol=1e-3)
    for key in one["eval"]:
        assert four[0]["eval"][key] == pytest.approx(one["eval"][key], abs=1e-5), key
    # the samples of an optimizer step (transformers' samples/s): a group's processes share theirs, so they count once
    assert [r["total_train_batch_size"] for r in four] == [one["total_train_batch_size"]] * 4 == [16] * 4
    update = (one["params"] - one["initial_params"]).abs().max().item()
    for rank in range(4):
        torch.testing.assert_close(four[rank]["params"], one["params"], rtol=0, atol=1e-3 * update)


@pytest.mark.slow
def test_fsdp_and_context_parallel_match_one_process_and_resume_exactly(tiny_pipeline_path, tmp_path):
    """FSDP2 shards the weights over both processes, which also split each sample's sequence; the checkpoint
    (sharded weights and optimizer state, each process's RNG, and the rollout buffer: the checkpoint falls inside a
    rollout that feeds 2 optimizer steps) resumes to the same weights as the straight run."""
    path = tiny_pipeline_path("tiny-flux")
    extra = ["--max_steps", "2", "--ema_decay", "0.5", "--steps_per_generation", "2"]
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", *extra], tmp_path / "one")
    fsdp = [*FSDP, *fsdp_wrap("FluxTransformerBlock,FluxSingleTransformerBlock")]
    straight = [path, str(tmp_path / "two"), "8", *extra, "--save_steps", "1", "--cpu_fsdp"]
    sharded = run(two_processes(straight, fsdp), tmp_path / "two")
    expected, got = saved_weights(single / "final", False), saved_weights(sharded / "final", False)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)

    buffers = {p.name for p in (sharded / "checkpoint-1").glob("rollout_buffer_*.pt")}
    assert buffers == {"rollout_buffer_0.pt", "rollout_buffer_1.pt"}  # step 2 still trains on the first rollout
    resumed_args = [path, str(tmp_path / "re"), "8", *extra, "--resume", str(sharded / "checkpoint-1"), "--cpu_fsdp"]
    resumed = run(two_processes(resumed_args, fsdp), tmp_path / "re")
    for folder in ("final", "final/ema"):
        again, straight_weights = saved_weights(resumed / folder, False), saved_weights(sharded / folder, False)
        for key in straight_weights:
            torch.testing.assert_close(again[key], straight_weights[key], rtol=0, atol=0, msg=f"{folder}: {key}")


# -- estimate-memory --context_parallel ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, config, tokens",
    [
        ((1, 4096, 64), {"patch_size": 1}, 4096),  # FLUX's packed latents: one row per token
        ((1, 16, 21, 90, 160), {"patch_size": [1, 2, 2]}, 21 * 45 * 80),  # Wan 2.1 720x1280x81
        ((1, 16, 33, 90, 160), {"patch_size": 2, "patch_size_t": 1}, 33 * 45 * 80),  # HunyuanVideo 720x1280x129
    ],
)
def test_sequence_tokens(shape, config, tokens):
    from trl_dancegrpo.memory.estimate import sequence_tokens

    assert sequence_tokens(torch.empty(shape, device="meta"), config) == tokens


def test_estimate_divides_the_sequence_and_counts_the_buffers():
    from trl_dancegrpo.memory.estimate import MemoryEstimate

    parts = dict.fromkeys(
        ["frozen_denoiser", "trainable", "trainable_float32", "largest_block_compute", "optimizer_states"], 800
    )
    parts.update(activations=8000, autocast_weight_casts=0, rollout_forward=4000, rollout_autocast_weight_casts=0)
    parts.update(encoders=0, other_frozen=0, rewards=0, vae_decode=10, trajectory_buffer=20)
    parts.update(attention_qkv_train=1600, attention_qkv_rollout=800, prediction_train=8, prediction_rollout=4)
    options = dict(num_processes=4, offload_text_encoders=False, offload_reward_models=False)
    alone = MemoryEstimate("m", {}, parts, {**options, "context_parallel": 1}).breakdown
    split = MemoryEstimate("m", {}, parts, {**options, "context_parallel": 4}).breakdown
    assert alone["activations"] == 8000 and alone["rollout_forward"] == 4000
    # a quarter of the tokens' activations, the q, k, v sent and received (1600 / 4 each way), the gathered prediction
    # and its gradient
    assert split["activations"] == 2000 + 800 + 16
    assert split["rollout_forward"] == 1000 + 400 + 4
    for key in ("denoiser_weights", "gradients", "optimizer_states", "trajectory_buffer", "vae_decode"):
        assert split[key] == alone[key], key


def test_estimate_takes_the_recipe_s_context_parallel_size(tmp_path):
    from trl_dancegrpo.memory.report import _context_parallel_size

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: x\ncontext_parallel_size: 4\n")
    size, rest = _context_parallel_size(None, ["--config", str(recipe)])
    assert size == 4 and rest[-2:] == ["--context_parallel_size", "1"]  # one process estimates one of the group
    assert _context_parallel_size(None, ["--config", str(recipe), "--context_parallel_size", "2"])[0] == 2
    assert _context_parallel_size(8, ["--config", str(recipe)])[0] == 8
    assert _context_parallel_size(None, [])[0] == 1
