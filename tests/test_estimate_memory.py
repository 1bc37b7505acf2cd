"""`trl-dancegrpo estimate-memory`: the fake-tensor accounting (by hand on tiny cases), the command on tiny pipelines,
every recipe at its real size (slow), and the memory savers of the trainer."""

import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from trl_dancegrpo.cli import main as cli_main
from trl_dancegrpo.memory.configs import build_meta_pipeline, builtin_configs, load_pipeline_config
from trl_dancegrpo.memory.fake import LiveMemory, cuda_autocast_policy, flash_attention, make_fake

from .real_size import GOAL, RECIPES


GIB = 2**30


# -- the accounting, by hand --------------------------------------------------------------------------------------------
def test_live_memory_counts_new_storages_until_they_are_freed():
    with torch.device("meta"):
        layer = torch.nn.Linear(64, 32, bias=False)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    make_fake(layer, fake_mode)
    with fake_mode:
        x = torch.empty(16, 64, requires_grad=True)
        tracker = LiveMemory()
        with tracker:
            y = layer(x)  # 16 x 32 float32
            assert tracker.live == 16 * 32 * 4
            z = y * 2  # one more
            assert tracker.live == 2 * 16 * 32 * 4
            del y, z
        assert tracker.live == 0 and tracker.peak == 2 * 16 * 32 * 4
        assert tracker.flops == 2 * 16 * 64 * 32  # the matmul, as torch's flop counter counts it


def test_make_fake_keeps_shapes_dtypes_grads_and_ties():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
        model.register_buffer("scale", torch.ones(3, dtype=torch.bfloat16))
    model[1].weight = model[0].weight  # tied (as a language model head)
    model[1].bias.requires_grad_(False)
    make_fake(model, FakeTensorMode())
    assert model[1].weight is model[0].weight and model[0].weight.device.type == "cpu"
    assert model.scale.dtype == torch.bfloat16 and not model[1].bias.requires_grad
    assert sum(p.numel() for p in model.parameters()) == 10 * 8 + 10


def test_cuda_autocast_policy_applies_inside_the_context_only():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16  # CPU autocast's own policy
        with cuda_autocast_policy():
            assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32  # CUDA's: float32
            assert torch.softmax(x, -1).dtype == torch.float32
            assert torch.nn.functional.linear(x.float(), torch.randn(3, 8)).dtype == torch.bfloat16
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_flash_attention_saves_no_attention_matrix():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # where CPU attention would take the math path (forced here), which keeps the attention matrix for backward
    fake_mode = FakeTensorMode()
    heads, queries, dim = 2, 256, 64
    with fake_mode:
        q, k, v = (torch.empty(1, heads, queries, dim, requires_grad=True) for _ in range(3))
        mask = torch.ones(1, 1, queries, queries, dtype=torch.bool)
        routed, math = LiveMemory(), LiveMemory()
        with sdpa_kernel(SDPBackend.MATH):
            with routed, flash_attention():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with math:
                out_math = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # the flash kernel keeps its output, a float32 logsumexp per query and the additive mask (as the GPU kernels do)
    assert routed.live == heads * queries * dim * 4 + heads * queries * 4 + queries * queries * 4
    assert math.live > heads * queries * queries * 4 > routed.live - heads * queries * dim * 4
    assert out.shape == out_math.shape


# -- the command on tiny pipelines ----------------------------------------------------------------------------------
def tiny_estimate(path, tmp_path, *extra):
    out = tmp_path / "estimate.json"
    argv = ["estimate-memory", "--model_name_or_path", path, "--reward_funcs", "brightness", "--height", "32"]
    argv += ["--width", "32", "--num_generations", "4", "--per_device_train_batch_size", "4", "--num_inference_steps"]
    argv += ["4", "--output_dir", str(tmp_path / "out"), "--json", str(out), *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    return json.loads(out.read_text())


def parse(argv):
    from trl_dancegrpo.cli import make_parser

    parser = make_parser()
    parser.set_defaults(use_cpu=True)
    base = ["--height", "32", "--width", "32", "--num_generations", "4", "--per_device_train_batch_size", "4"]
    base += ["--num_inference_steps", "4", "--output_dir", "unused", "--bf16", "true"]
    return parser.parse_args_and_config([*base, *argv])


def test_command_prints_and_writes_the_json(tiny_pipeline_path, tmp_path, capsys):
    result = tiny_estimate(tiny_pipeline_path("tiny-flux"), tmp_path, "--use_peft", "--rollout_batch_size", "2")
    report = capsys.readouterr().out
    assert "PEAK of the process" in report and "141 GB" in report and "Not counted" in report
    assert set(result["breakdown_gib"]) == {
        "denoiser_weights",
        "trainable_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "frozen_modules",
        "reward_models",
    }
    assert {"peak_gib", "training_step_peak_gib", "verdicts", "phases_gib"} <= set(result)
    assert result["flops_per_iteration"] > 0 and result["settings"]["rollout_batch_size"] == 2


@pytest.mark.slow
def test_tiny_flux_lora_breakdown_matches_the_tensors(tiny_pipeline_path):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from trl_dancegrpo.adapters import FluxAdapter
    from trl_dancegrpo.memory import estimate_memory

    path = tiny_pipeline_path("tiny-flux")
    estimate = estimate_memory(*parse(["--model_name_or_path", path, "--use_peft", "--lora_r", "4"]))
    # the same preparation by hand: LoRA on the bf16 base, LoRA weights in float32, frozen modules in bf16
    pipeline = DiffusionPipeline.from_pretrained(path)
    denoiser = pipeline.transformer.to(torch.bfloat16).requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=32, target_modules=FluxAdapter.default_lora_target_modules))
    lora = [p for p in denoiser.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * 4 for p in lora)
    base_bytes = sum(p.numel() * 2 for p in denoiser.parameters() if not p.requires_grad)
    base_bytes += sum(b.numel() * b.element_size() for b in denoiser.buffers())
    frozen = sum(
        sum(t.numel() * t.element_size() for t in [*m.to(torch.bfloat16).parameters(), *m.buffers()])
        for n, m in pipeline.components.items()
        if isinstance(m, torch.nn.Module) and n != "transformer"
    )
    breakdown = estimate.breakdown
    assert breakdown["trainable_weights"] == breakdown["gradients"] == lora_bytes
    assert breakdown["denoiser_weights"] == base_bytes
    assert breakdown["optimizer_states"] == 2 * lora_bytes + 4 * len(lora)  # AdamW: 2 float32 states + a step
    assert breakdown["frozen_modules"] == frozen
    assert breakdown["reward_models"] == 0  # brightness (the default reward) has no model
    assert breakdown["activations"] > 0 and estimate.peak >= estimate.training_step_peak
    assert estimate.training_step_peak == (
        base_bytes + 2 * lora_bytes + breakdown["optimizer_states"] + breakdown["activations"]
    )


def test_tiny_estimate_exact_bytes(tiny_pipeline_path):
    """Byte-exact figures from the API (the JSON rounds to 0.01 GiB)."""
    from trl_dancegrpo.memory import estimate_memory

    path = tiny_pipeline_path("tiny-flux")
    estimate = estimate_memory(*parse(["--model_name_or_path", path, "--reward_funcs", "hpsv2.1"]))
    parts = estimate.parts
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path)
    params = sum(p.numel() for p in pipeline.transformer.parameters())
    # full fine-tuning in float32 (the CLI's default dtype), AdamW's two float32 states + a step per tensor
    assert parts["trainable"] == params * 4
    assert parts["optimizer_states"] == 2 * params * 4 + 4 * len(list(pipeline.transformer.parameters()))
    assert estimate.breakdown["gradients"] == params * 4
    assert parts["rewards"] == 986_109_440 * 2  # HPS-v2.1's ViT-H-14 in bf16
    side = 32 // pipeline.vae_scale_factor  # the unpacked latent is (in_channels / 4, side, side), float32
    latent = side * side * pipeline.transformer.config.in_channels // 4
    # 4 samples x (5 latents of the 4-step trajectory + 4 float32 log-probs)
    assert parts["trajectory_buffer"] == 4 * ((latent * 4) * 5 + 4 * 4)
    # FSDP over 4 processes divides what it shards, and adds two gathered blocks
    sharded = estimate.with_options(num_processes=4).breakdown
    # autocast's cached bf16 copies of the float32 weights: at most every weight once; FSDP's policy has none
    assert 0 < parts["autocast_weight_casts"] <= params * 2
    assert sharded["activations"] == parts["activations"] - parts["autocast_weight_casts"]
    assert (
        0 < parts["rollout_autocast_weight_casts"] <= params * 2
    )  # requires_grad weights are cached without grad too
    assert sharded["rollout_forward"] == parts["rollout_forward"] - parts["rollout_autocast_weight_casts"]
    assert sharded["gradients"] == params * 4 // 4
    assert sharded["optimizer_states"] == parts["optimizer_states"] // 4
    # the savers remove what they offload from the resident set
    offloaded = estimate.with_options(offload_text_encoders=True, offload_reward_models=True)
    assert offloaded.breakdown["frozen_modules"] == estimate.breakdown["frozen_modules"] - parts["encoders"]
    assert offloaded.breakdown["reward_models"] == 0
    assert offloaded.phases["training step (backward)"] == estimate.phases["training step (backward)"] - (
        parts["encoders"] + parts["rewards"]
    )


@pytest.mark.slow  # one tiny pipeline per family: the FLUX tests above stay in the fast subset
@pytest.mark.parametrize(
    "builder",
    [
        "tiny_sd_pipeline",
        "tiny_sd3_pipeline",
        "tiny_wan_pipeline",
        "tiny_wan_i2v_pipeline",
        "tiny_wan_v2v_pipeline",
        "tiny_hunyuan_video_pipeline",
        "tiny_skyreels_pipeline",
        "tiny_hunyuan_video15_pipeline",
        "tiny_hunyuan_video15_i2v_pipeline",
        "tiny_flux2_klein_pipeline",
        "tiny_flux2_pipeline",
        "tiny_flux_kontext_pipeline",
        "tiny_qwen_image_pipeline",
        "tiny_qwen_image_edit_pipeline",
        "tiny_qwen_image_edit_plus_pipeline",
        "tiny_qwen_image21_pipeline",
        "tiny_z_image_pipeline",
        "tiny_wan22_ti2v_pipeline",
        "tiny_ltx2_pipeline",
    ],
)
def test_tiny_pipelines_of_every_family(builder, tmp_path):
    from trl_dancegrpo import tiny

    path = str(tmp_path / builder)
    getattr(tiny, builder)().save_pretrained(path)
    extra = ["--num_frames", "5"] if any(name in builder for name in ("wan", "hunyuan", "skyreels", "ltx2")) else []
    result = tiny_estimate(path, tmp_path, "--use_peft", *extra)
    assert result["breakdown_gib"]["activations"] >= 0 and result["peak_gib"] >= 0
    assert result["flops_per_iteration"] > 0


@pytest.mark.slow
def test_two_experts_count_both_and_train_what_is_chosen(tmp_path):
    """Wan 2.2 A14B's form: both experts' weights resident; gradients and optimizer states of the trained ones only."""
    from trl_dancegrpo import tiny
    from trl_dancegrpo.memory import estimate_memory

    path = str(tmp_path / "tiny-wan22")
    pipeline = tiny.tiny_wan22_pipeline()
    pipeline.save_pretrained(path)
    base = ["--model_name_or_path", path, "--num_frames", "5", "--use_peft", "--lora_r", "4"]
    both = estimate_memory(*parse(base))
    low_noise = estimate_memory(*parse([*base, "--train_experts", "transformer_2"]))
    experts = [pipeline.transformer.to(torch.bfloat16), pipeline.transformer_2.to(torch.bfloat16)]
    weights = sum(t.numel() * t.element_size() for e in experts for t in [*e.parameters(), *e.buffers()])
    for estimate in (both, low_noise):
        # the bf16 base weights of both experts, whichever is trained
        assert estimate.breakdown["denoiser_weights"] == weights
        assert estimate.breakdown["activations"] > 0
    assert both.breakdown["trainable_weights"] == 2 * low_noise.breakdown["trainable_weights"] > 0
    assert both.breakdown["optimizer_states"] == 2 * low_noise.breakdown["optimizer_states"]
    assert low_noise.settings["trained_experts"] == ["transformer_2"]
    with pytest.raises(ValueError, match="not FSDP"):
        estimate_memory(*parse(base), num_processes=2)


@pytest.mark.slow
def test_prompt_length_from_values_is_assumed_maximal(tmp_path):
    from trl_dancegrpo import tiny
    from trl_dancegrpo.adapters.qwen_image import QwenImageAdapter
    from trl_dancegrpo.memory import estimate_memory

    path = str(tmp_path / "tiny-qwen-image")
    tiny.tiny_qwen_image_pipeline().save_pretrained(path)
    estimate = estimate_memory(*parse(["--model_name_or_path", path]))
    assert any("upper bound" in note for note in estimate.notes)
    # the conditioning of the rollout's 4 samples: max_sequence_length tokens each, of width 16 (bf16), and the mask
    assert estimate.parts["conditioning"] == 4 * QwenImageAdapter.max_sequence_length * (16 * 2 + 8)
    # Z-Image cuts each prompt to its own tokens by the attention mask's values (kept real under fake tensors): the
    # placeholder prompts fill the tokenizer's 48 tokens, of width 16 (bf16), and our boolean mask
    path = str(tmp_path / "tiny-z-image")
    tiny.tiny_z_image_pipeline().save_pretrained(path)
    estimate = estimate_memory(*parse(["--model_name_or_path", path]))
    assert any("ZImagePipeline keeps each prompt's own tokens" in note for note in estimate.notes)
    assert estimate.parts["conditioning"] == 4 * 48 * (16 * 2 + 1)


@pytest.mark.slow
def test_editing_prompt_encoder_counts_the_source_image_tokens(tmp_path):
    """Qwen-Image-Edit: the vision-language encoder sees the source image; its tokens join the prompt's, as many on
    fake tensors as the real pipeline gives the same placeholder prompt and image."""
    from trl_dancegrpo import tiny
    from trl_dancegrpo.memory import estimate_memory
    from trl_dancegrpo.memory.estimate import _long_prompt, _placeholder_images
    from trl_dancegrpo.trainer import DanceGRPOTrainer

    pipeline = tiny.tiny_qwen_image_edit_pipeline()
    path = str(tmp_path / "tiny-qwen-image-edit")
    pipeline.save_pretrained(path)
    for side in (32, 64):
        argv = ["--model_name_or_path", path, "--height", str(side), "--width", str(side)]
        adapter = DanceGRPOTrainer._make_adapter(pipeline, parse(argv)[1])
        real = adapter.encode_conditioning([_long_prompt(adapter, 0)], _placeholder_images(adapter, 1))
        tokens = real["prompt_embeds"].shape[1]
        assert tokens > 512 + 4  # the placeholder prompt and the tiny processor's 4 image tokens, at least
        estimate = estimate_memory(*parse(argv))
        # 4 samples: the prompt embeddings (width 16, bf16) and their mask (int64), then the source image's latents
        latents = 4 * 16 * (side // 8) ** 2 * 4  # (side / 8)^2 tokens of 16 packed channels, float32
        assert estimate.parts["conditioning"] == 4 * tokens * (16 * 2 + 8) + latents


def test_real_values_keep_token_counts_and_masks_under_fake_tensors():
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor, FakeTensorMode

    from trl_dancegrpo.memory.fake import REAL_VALUES_MAX_ELEMENTS, RealValues

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # two prompts of 3 and 2 tokens
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        hidden = torch.empty(2, 5, 8)  # fake, as the encoder's output (made from fake weights)
    with fake_mode, RealValues():
        assert isinstance(hidden * 2, FakeTensor)
        lengths = mask.bool().sum(dim=1)
        assert not isinstance(lengths, FakeTensor) and lengths.tolist() == [3, 2]
        selected = hidden[mask.bool()]  # shape from the mask's values
        assert isinstance(selected, FakeTensor) and selected.shape == (5, 8)
        assert [part.shape[0] for part in torch.split(selected, lengths.tolist())] == [3, 2]
        positions = torch.ones(3, 2, 5, dtype=torch.long).cumsum(-1)  # small: computed
        assert positions[0, 0].tolist() == [1, 2, 3, 4, 5]
        big = torch.zeros(REAL_VALUES_MAX_ELEMENTS + 1)  # large: stays fake, no memory
        assert isinstance(big, FakeTensor)
        # a broadcast scalar stays real at any size, and so does the test code branches on (HunyuanVideo 1.5's
        # all-zero image tokens); other ops on it still give fake results when large
        tokens = torch.zeros(()).expand(4, REAL_VALUES_MAX_ELEMENTS)
        assert not isinstance(tokens, FakeTensor) and bool(torch.all(tokens == 0))
        assert isinstance(tokens + 1, FakeTensor)
    # without it, the token counts are unknown
    with fake_mode, pytest.raises(DynamicOutputShapeException):
        hidden[mask.bool()]


def test_unknown_model_offline_says_what_to_provide(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["estimate-memory", "--model_name_or_path", "someone/unknown-model", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "someone/unknown-model" in error and "model_index.json" in error


def test_output_shape_check():
    from trl_dancegrpo.memory.estimate import _check_output

    with pytest.raises(ValueError, match="returned shape"):
        _check_output(torch.empty(1, 16, 3, 30, 52), torch.empty(1, 16, 3, 30, 53), "wan")


def recipe_model(recipe: str) -> str:
    import yaml

    with open(recipe) as handle:
        return yaml.safe_load(handle)["model_name_or_path"]


def test_builtin_table_covers_the_recipes_and_counts_public_figures():
    table = builtin_configs()
    missing = {os.path.basename(r) for r in RECIPES if recipe_model(r) not in table}
    assert not missing, f"recipes whose model is not in the built-in table (trl_dancegrpo/model_configs): {missing}"
    for entry in table.values():
        assert entry["sources"]
    # FLUX.1-dev + LoRA r=4 on the attention projections: the Hugging Face FLUX QLoRA blog post's count
    from peft import LoraConfig

    pipeline = build_meta_pipeline(load_pipeline_config("black-forest-labs/FLUX.1-dev"))
    transformer = pipeline.transformer
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    assert sum(p.numel() for p in transformer.parameters()) - 11_901_408_320 == 4_669_440
    # FLUX.1 Kontext [dev]'s DiT is FLUX.1-dev's architecture (12B); FLUX.2 [klein] 4B: a 3.9B DiT and Qwen3-4B (4.0B)
    kontext = build_meta_pipeline(load_pipeline_config("black-forest-labs/FLUX.1-Kontext-dev"))
    assert type(kontext).__name__ == "FluxKontextPipeline"
    assert sum(p.numel() for p in kontext.transformer.parameters()) == 11_901_408_320
    klein = build_meta_pipeline(load_pipeline_config("black-forest-labs/FLUX.2-klein-4B"))
    assert klein.config.is_distilled  # a pipeline argument of model_index.json, passed through
    assert sum(p.numel() for p in klein.transformer.parameters()) == 3_875_544_576
    assert sum(p.numel() for p in klein.text_encoder.parameters()) == 4_022_468_096
    # HunyuanVideo 1.5: "8.3 billion parameters" (its technical report); the SigLIP so400m vision tower, 0.43B
    hv15 = build_meta_pipeline(load_pipeline_config("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"))
    assert round(sum(p.numel() for p in hv15.transformer.parameters()) / 1e9, 1) == 8.3
    assert round(sum(p.numel() for p in hv15.image_encoder.parameters()) / 1e9, 2) == 0.43


# -- every recipe at its real size ------------------------------------------------------------------------------------
# run as the command line a user runs, in the background from the start of the session (tests/real_size.py)
def real_size_result(config, name: str) -> dict:
    code, output, out_dir = config.real_size_runs.result(name)
    assert code == 0, output[-3000:]
    with open(os.path.join(out_dir, "estimate.json")) as handle:
        return json.load(handle)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_at_real_size(recipe, pytestconfig):
    result = real_size_result(pytestconfig, os.path.basename(recipe))
    breakdown = result["breakdown_gib"]
    assert result["peak_gib"] > breakdown["denoiser_weights"] + breakdown["trainable_weights"] > 1
    assert breakdown["activations"] > 0


@pytest.mark.slow
def test_goal_flux_lora_512_under_40_gb(pytestconfig):
    """FLUX.1-dev LoRA r=128 (default targets), 512x512, gradient checkpointing, one sample per forward, HPS-v2.1."""
    assert real_size_result(pytestconfig, GOAL)["peak_gib"] < 40


def test_target_lists_only_the_changes_that_fit(tiny_pipeline_path):
    import dataclasses

    from trl_dancegrpo.memory import estimate_memory
    from trl_dancegrpo.memory.report import changes_for_target, format_report, needed_gib, to_json, verdict

    path = tiny_pipeline_path("tiny-flux")
    estimate = estimate_memory(*parse(["--model_name_or_path", path, "--reward_funcs", "hpsv2.1"]))
    savers = dict(offload_text_encoders=True, offload_reward_models=True)
    # just enough for FSDP over 4 with the overheads the verdicts count (~10% reserve + 1 GB CUDA context)
    target = needed_gib(estimate.with_options(num_processes=4, **savers).peak) + 1e-6
    changes = dict(changes_for_target(estimate, target))
    fitting = {label: peak for label, peak in changes.items() if peak is not None}
    # every change listed is rated "fits" for that size, as the verdicts rate cards
    assert fitting and all(verdict(peak, target).startswith("fits") for peak in fitting.values())
    assert any("FSDP over 4" in label for label in fitting) and any("FSDP over 8" in label for label in fitting)
    assert not any("FSDP over 2" in label for label in fitting)  # does not fit: left out
    assert any("gradient_checkpointing" in label for label in changes)  # off in this run: advised, to re-run
    # a change whose count fits but not with the overheads ("tight") is not listed
    tight = estimate.with_options(num_processes=4, **savers).peak / GIB + 1e-6
    assert not any("FSDP over 4" in label for label, peak in changes_for_target(estimate, tight) if peak is not None)
    assert f"to fit {target:g} GiB" in format_report(estimate, target_gib=target, gpu="h100")
    listed = to_json(estimate, target_gib=target)["suggestions"]
    assert listed["target_gib"] == target and not listed["already_fits"]
    assert [change["change"] for change in listed["changes"]] == list(changes)
    assert verdict(int(10 * GIB), 24).startswith("fits") and verdict(int(23.5 * GIB), 24).startswith("tight")
    assert verdict(int(30 * GIB), 24).startswith("does not fit")
    # fitting a card: no suggestions unless asked for; fitting none: suggestions for the largest card, unasked
    assert to_json(estimate)["suggestions"] is None and "to fit" not in format_report(estimate)
    huge = dataclasses.replace(estimate, parts={key: value * 10**6 for key, value in estimate.parts.items()})
    assert not any(verdict(huge.peak, card).startswith("fits") for card in (24, 40, 48, 80, 141))
    assert to_json(huge)["suggestions"]["target_gib"] == 141
    assert "to fit 141 GiB with the overheads above (it fits none of the cards above)" in format_report(huge)


def test_the_ema_is_counted(tiny_pipeline_path, capsys):
    """`ema_decay` adds a float32 copy of the trained weights (sharded by FSDP), resident in every phase; with
    `ema_on_cpu` nothing, and the advice offers it."""
    from trl_dancegrpo.memory import estimate_memory
    from trl_dancegrpo.memory.report import changes_for_target, format_report, to_json

    path = tiny_pipeline_path("tiny-flux")
    plain = estimate_memory(*parse(["--model_name_or_path", path, "--use_peft", "--lora_r", "4"]))
    ema = estimate_memory(
        *parse(["--model_name_or_path", path, "--use_peft", "--lora_r", "4", "--ema_decay", "0.995"])
    )
    lora_bytes = plain.breakdown["trainable_weights"]  # the LoRA is float32: its EMA is as large
    assert plain.breakdown["ema_weights"] == 0
    assert ema.breakdown["ema_weights"] == lora_bytes > 0
    for phase, value in plain.phases.items():
        assert ema.phases[phase] == value + lora_bytes, phase
    assert ema.with_options(num_processes=4).breakdown["ema_weights"] == lora_bytes // 4
    on_cpu = ema.with_options(ema_on_cpu=True)
    assert on_cpu.breakdown["ema_weights"] == 0 and on_cpu.peak == plain.peak
    assert "EMA of the trained weights" in format_report(ema)
    assert "EMA of the trained weights" not in format_report(plain)
    assert to_json(ema)["other_gib"]["ema_weights"] == round(lora_bytes / 2**30, 2)
    assert "--ema_on_cpu true" in [label for label, _ in changes_for_target(ema, 1000.0)]
    assert not any("ema_on_cpu" in label for label, _ in changes_for_target(plain, 1000.0))
