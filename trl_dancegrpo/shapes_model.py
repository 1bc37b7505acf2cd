"""A small text-to-image FLUX pipeline pretrained from scratch on the shapes domain: the learning yardstick.

`build_shapes_pipeline(output_dir)` renders captioned scenes (`trl_dancegrpo.rewards.shapes`), trains a small VAE
(`AutoencoderKL`, 4x downsampling, 8 latent channels) and then a flow-matching `FluxTransformer2DModel` on its
latents, and saves a `FluxPipeline` that loads with `DiffusionPipeline.from_pretrained(path)` like a Hub model. The
text encoders are FLUX's pair at a tiny size with random, frozen weights: a word-level T5 tokenizer covers the
domain's vocabulary (so each word is one token), and the denoiser learns to read their outputs. The denoiser has no
guidance embedding (as FLUX.1-schnell) and sees the empty prompt on a share of its training rows, so it can be sampled
with true classifier-free guidance (`FluxPipeline(..., true_cfg_scale=s, negative_prompt="")`, the trainer's
`guidance_scale=s`); `EVAL_GUIDANCE_SCALE` is the scale the yardstick uses. `shapes_pipeline_path()` builds once per
settings and code version into a cache folder and returns the path.

Everything is drawn from the seed; on a CPU the result is reproducible run to run (same torch build and threads).
"""

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .rewards.shapes import (
    CATEGORIES,
    COLORS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    render_scene,
    scene_for_prompt,
    split_prompts,
)


__all__ = [
    "EVAL_GUIDANCE_SCALE",
    "EVAL_NUM_INFERENCE_STEPS",
    "ShapesBuildSettings",
    "build_shapes_pipeline",
    "evaluate_shapes",
    "shapes_pipeline_path",
]

BUILD_VERSION = "4"  # bump when the build changes what it produces
MAX_SEQUENCE_LENGTH = 12  # T5 tokens of a prompt (one per word; the longest prompt has 11 words)
# How the yardstick samples (build.py's table, bench_learning; `trl-dancegrpo evaluate` takes them as
# `--num_inference_steps` and `--guidance_scale`): the deterministic sampler's steps and the true CFG scale (1: none).
# Build 4 at CFG 2.5 shows GenEval's pattern (single objects 0.88, colors 0.66; counting, position and color binding
# weak); unguided, colors stay under 0.6 (benchmarks/RESULTS.md). The small build (no empty prompts) has no
# unconditional branch: sample it at 1. The denoiser has no guidance embedding, so the trainer's FLUX default (3.5)
# would mean CFG 3.5: pass this instead.
EVAL_NUM_INFERENCE_STEPS = 8
EVAL_GUIDANCE_SCALE = 2.5


@dataclass(frozen=True)
class ShapesBuildSettings:
    """What a build depends on (its cache key)."""

    seed: int = 0
    image_size: int = 32
    num_images: int = 6000
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr_decay: bool = True  # warmup + cosine decay of the VAE's rate (False: a constant 2e-3, as in build 1)
    denoiser_steps: int = 8000
    batch_size: int = 64
    learning_rate: float = 2e-3
    cond_dropout: float = 0.1  # share of training rows given the empty prompt: the unconditional branch of CFG
    # the denoiser's training times: logit-normal, then shifted towards noise by `s t / (1 + (s - 1) t)` (1: SD3's
    # plain logit-normal, which almost never trains above t = 0.95, where a sample's colors and layout are decided)
    timestep_shift: float = 3.0
    train_text_encoder: bool = False  # train the T5 encoder with the denoiser (default: random frozen weights)
    num_layers: int = 2
    num_single_layers: int = 2
    heads: int = 4
    head_dim: int = 16

    @classmethod
    def small(cls, seed: int = 0) -> "ShapesBuildSettings":
        """A quicker build for tests (about a minute on an idle core): a constant VAE rate, no empty prompts.

        Build 3 (no guidance embedding, T5 in eval mode) at build 2's small step counts (150 VAE, 300 denoiser steps)
        and with 10% empty prompts: RL moved the held-out dense down both ways (-0.047 up, -0.036 down); without the
        empty prompts up both ways (+0.083, +0.099); at 600 denoiser steps it started at 0.031, with no room to fall.
        These counts start at 0.068 and move +0.052 / -0.068 (tests/test_shapes_learning.py). With the decayed VAE
        rate (build 2) the small samples were colorless. Build 4 keeps build 3's denoiser recipe here (lr 1e-3, no
        timestep shift) on its data (one or two objects drawn larger): start 0.193, +0.101 / -0.188.
        """
        return cls(
            seed=seed,
            num_images=2000,
            vae_steps=300,
            vae_lr_decay=False,
            denoiser_steps=600,
            learning_rate=1e-3,
            timestep_shift=1.0,
            num_layers=1,
            num_single_layers=1,
            cond_dropout=0.0,
        )

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- text encoders ----------------------------------------------------------------------------------------------------
def _vocabulary() -> list[str]:
    words = {"a", "photo", "of", "and", *SHAPES, *(s + "s" for s in SHAPES), *COLORS, *NUMBERS}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def _text_encoders(seed: int) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from .tiny import _CHARS

    # T5: one piece per word of the domain (characters as a fallback for anything else)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [("\u2581" + w, -1.5) for w in _vocabulary()] + [(c, -3.0) for c in _CHARS]
    tokenizer_2 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(pieces),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=16,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # CLIP (FLUX's pooled vector): character-level, as in the tiny test pipelines
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=64,
            projection_dim=32,
        )
    )
    return dict(text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)


# -- data --------------------------------------------------------------------------------------------------------------
def _render_dataset(settings: ShapesBuildSettings) -> tuple[list[str], torch.Tensor]:
    """`num_images` (prompt, image) pairs: a category uniformly, a training prompt of it, a scene for the prompt."""
    import numpy as np

    train, _ = split_prompts()
    rng = random.Random(settings.seed)
    prompts, images = [], []
    for _ in range(settings.num_images):
        prompt = rng.choice(train[rng.choice(CATEGORIES)])
        image = render_scene(scene_for_prompt(prompt, rng, settings.image_size), settings.image_size)
        prompts.append(prompt)
        images.append(torch.from_numpy(np.array(image)))
    return prompts, torch.stack(images).permute(0, 3, 1, 2).float() / 255


# -- training ----------------------------------------------------------------------------------------------------------
def _warmup_cosine(total: int, floor: float):
    """The learning-rate factor at a step: linear warmup over 5% of `total`, then cosine decay to `floor`."""
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _train_vae(images: torch.Tensor, settings: ShapesBuildSettings, log):
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32),  # 4x downsampling: a 32x32 image is 8x8 latents, 16 packed tokens
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=settings.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    # Decaying the rate matters: at a constant 2e-3 the reconstructions keep rounded corners and a tinted background
    # (squares read as circles, 0.62 of reconstructed scenes pass the strict test after 400 steps; 0.76 after 1,000
    # cosine-decayed steps).
    factor = _warmup_cosine(settings.vae_steps, floor=0.05) if settings.vae_lr_decay else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.vae_steps):
        batch = images[torch.randint(len(images), (settings.vae_batch_size,), generator=generator)] * 2 - 1
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        kl = posterior.kl().mean() / batch[0].numel()
        loss = F.mse_loss(reconstruction, batch) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 250 == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step}: mse {F.mse_loss(reconstruction, batch).item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(256)])
    # FLUX's convention: latents = (z - shift) * scale, about zero mean and unit variance
    shift, scale = latents.mean().item(), 1 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae, (latents - shift) * scale


def _train_denoiser(latents, text_ids, pooled, empty, t5, pipeline_class, settings: ShapesBuildSettings, log):
    """Flow matching on the latents, conditioned on the T5 outputs of `text_ids` (the T5 token ids of each row's
    prompt; T5 is trained along when `settings.train_text_encoder`) and the pooled CLIP vectors `pooled`. `empty` (the
    empty prompt's T5 ids and pooled vector, one row each) replaces the prompt of a `cond_dropout` share of the rows,
    so the model also learns the unconditional velocity that classifier-free guidance contrasts with."""
    from diffusers import FluxTransformer2DModel

    from .sde import shift_sigmas

    torch.manual_seed(settings.seed)
    inner = settings.heads * settings.head_dim
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latents.shape[1],  # 2x2 packed latent patches
        num_layers=settings.num_layers,
        num_single_layers=settings.num_single_layers,
        attention_head_dim=settings.head_dim,
        num_attention_heads=settings.heads,
        joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=pooled.shape[-1],
        guidance_embeds=False,  # no embedded guidance: sampled with true classifier-free guidance instead
        axes_dims_rope=[settings.head_dim // 4, 3 * settings.head_dim // 8, 3 * settings.head_dim // 8],
    )
    log(f"denoiser: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, width {inner}")
    n, c, h, w = latents.shape
    tokens = pipeline_class._pack_latents(latents, n, c, h, w)  # (N, h * w / 4, 4c)
    image_ids = pipeline_class._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    token_positions = torch.zeros(text_ids.shape[1], 3)  # FLUX's text tokens all sit at RoPE position 0
    t5.eval().requires_grad_(settings.train_text_encoder)  # eval: no dropout
    trained = list(transformer.parameters()) + (list(t5.parameters()) if settings.train_text_encoder else [])
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings.denoiser_steps, floor=0.1))
    generator = torch.Generator().manual_seed(settings.seed + 2)
    empty_ids, empty_pooled = empty
    running = None
    for step in range(settings.denoiser_steps):
        index = torch.randint(n, (settings.batch_size,), generator=generator)
        x0 = tokens[index]
        noise = torch.randn(x0.shape, generator=generator)
        # logit-normal times (SD3's recipe): most training near the middle of the path
        sigma = torch.sigmoid(torch.randn(settings.batch_size, generator=generator))
        sigma = shift_sigmas(sigma, settings.timestep_shift).view(-1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * noise
        drop = torch.rand(settings.batch_size, generator=generator) < settings.cond_dropout
        ids = torch.where(drop.view(-1, 1), empty_ids, text_ids[index])
        with torch.set_grad_enabled(settings.train_text_encoder):
            embeds = t5(ids)[0]
        pooled_batch = torch.where(drop.view(-1, 1), empty_pooled, pooled[index])
        velocity = transformer(
            hidden_states=x_t,
            timestep=sigma.flatten(),
            guidance=None,
            pooled_projections=pooled_batch,
            encoder_hidden_states=embeds,
            txt_ids=token_positions,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == settings.denoiser_steps - 1:
            log(f"denoiser step {step}: loss {running:.4f}")
    t5.requires_grad_(False)
    return transformer.eval()


def _prompt_inputs(pipeline, prompts: list[str]):
    """The T5 token ids (as `FluxPipeline` tokenizes them) and pooled CLIP vectors of `prompts`, and the same for the
    empty prompt (CFG's negative) as one row each."""

    def t5_ids(texts):
        return pipeline.tokenizer_2(
            texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    with torch.no_grad():
        pooled = pipeline._get_clip_prompt_embeds(prompts)
        empty_pooled = pipeline._get_clip_prompt_embeds([""])
    return t5_ids(prompts), pooled, (t5_ids([""]), empty_pooled)


def build_shapes_pipeline(output_dir: str, settings: ShapesBuildSettings | None = None, log=print) -> str:
    """Render the data set, train the VAE and the denoiser, and `save_pretrained` the `FluxPipeline` to `output_dir`."""

    settings = settings or ShapesBuildSettings()
    threads = torch.get_num_threads()
    # One thread: the same result on any machine, and on a shared one far faster per CPU second (these layers are too
    # small to split; two threads under a load of 8 spent 3x the CPU time of one for the same steps).
    torch.set_num_threads(1)
    try:
        return _build(output_dir, settings, log)
    finally:
        torch.set_num_threads(threads)


def _build(output_dir: str, settings: ShapesBuildSettings, log) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    start = time.perf_counter()
    prompts, images = _render_dataset(settings)
    log(f"rendered {len(prompts)} scenes in {time.perf_counter() - start:.0f} s")
    encoders = _text_encoders(settings.seed)
    vae, latents = _train_vae(images, settings, log)
    log(f"vae trained ({time.perf_counter() - start:.0f} s)")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, transformer=None, **encoders)
    distinct = sorted(set(prompts))
    text_ids, pooled, empty = _prompt_inputs(pipeline, distinct)
    row = {p: i for i, p in enumerate(distinct)}
    index = torch.tensor([row[p] for p in prompts])
    t5 = encoders["text_encoder_2"]
    transformer = _train_denoiser(latents, text_ids[index], pooled[index], empty, t5, FluxPipeline, settings, log)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
    pipeline.save_pretrained(output_dir)
    (Path(output_dir) / "shapes_build.json").write_text(
        json.dumps(
            {
                **asdict(settings),
                "version": BUILD_VERSION,
                "seconds": round(time.perf_counter() - start),
                "eval": {"num_inference_steps": EVAL_NUM_INFERENCE_STEPS, "guidance_scale": EVAL_GUIDANCE_SCALE},
            }
        )
    )
    log(f"saved to {output_dir} ({time.perf_counter() - start:.0f} s in all)")
    return output_dir


def shapes_pipeline_path(settings: ShapesBuildSettings | None = None, cache_dir: str | None = None, log=print) -> str:
    """The path of the built pipeline for `settings`, building it on first use.

    The cache folder is `cache_dir`, else `$TRL_DANCEGRPO_CACHE`, else `~/.cache/trl_dancegrpo`; each build lives in
    `shapes-t2i-<hash of the settings and the build version>`.
    """
    settings = settings or ShapesBuildSettings()
    root = Path(cache_dir or os.environ.get("TRL_DANCEGRPO_CACHE") or Path.home() / ".cache" / "trl_dancegrpo")
    path = root / f"shapes-t2i-{settings.key()}"
    if not (path / "model_index.json").exists():
        partial = root / f".building-{settings.key()}-{os.getpid()}"
        build_shapes_pipeline(str(partial), settings, log=log)
        with contextlib.suppress(OSError):  # atomic: a concurrent build of the same key simply loses the race
            partial.rename(path)
    return str(path)


# -- evaluation --------------------------------------------------------------------------------------------------------
def evaluate_shapes(generate, prompts: list[str], categories: list[str], seeds=(0,)) -> dict[str, float]:
    """Mean strict and dense scores, overall and per category, of `generate(prompts, seed) -> images`."""
    from .rewards.shapes import shapes_geneval, shapes_geneval_dense

    prompts, categories = list(prompts), list(categories)
    strict, dense = [], []
    for seed in seeds:
        images = generate(prompts, seed)
        strict += shapes_geneval(prompts, images)
        dense += shapes_geneval_dense(prompts, images)
    labels = list(categories) * len(seeds)
    result = {"strict": sum(strict) / len(strict), "dense": sum(dense) / len(dense)}
    for category in CATEGORIES:
        values = [s for s, c in zip(strict, labels) if c == category]
        if values:
            result[f"strict/{category}"] = sum(values) / len(values)
    return result
