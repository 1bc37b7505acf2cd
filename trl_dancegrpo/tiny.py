"""Tiny random pipelines that need no download.

They serve the built-in offline demo (`trl-dancegrpo` with no model given), the tests and the CPU benchmarks. Each
builder returns a real diffusers pipeline of the same class as its full-size model, with random weights and an
in-memory character-level tokenizer, so it exercises exactly the code paths a Hub checkpoint does (save it with
`save_pretrained` and load it back by path to test loading too).
"""

import string

import torch


_CHARS = list(string.ascii_lowercase + string.digits + ",.!?-'")


def _clip_tokenizer(max_length: int = 32):
    from transformers import CLIPTokenizer

    # Without merges, CLIP's BPE splits every word into characters, the last one carrying the "</w>" suffix.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_text_encoder(seed: int, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=32,
        hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextModel(config)


def _t5_encoder(seed: int, umt5: bool = False):
    """A two-layer T5 encoder (FLUX, SD3), or UMT5 (Wan) with the same sizes."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    return model_class(
        config_class(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _flow_vae(seed: int):
    """The 4-channel VAE with FLUX/SD3's shift and scaling factors (2x downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _flux_components(seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    text_encoder = _clip_text_encoder(seed)
    text_encoder_2 = _t5_encoder(seed)
    vae = _flow_vae(seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def tiny_flux_pipeline(seed: int = 0):
    """A `FluxPipeline` with a two-block transformer (about 100k parameters), for 16x16 to 64x64 images."""
    from diffusers import FluxPipeline

    return FluxPipeline(**_flux_components(seed))


def tiny_sd_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` with a two-level UNet and a DDIM scheduler, for 16x16 to 64x64 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip_text_encoder(seed),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


TINY_PIPELINES = {"tiny-flux": tiny_flux_pipeline, "tiny-sd": tiny_sd_pipeline}


def build_tiny_pipeline(name: str, seed: int = 0):
    """Build the tiny pipeline `name` ("tiny-flux", "tiny-sd", ...); it keeps `tiny_builder` (the builder's name and
    the seed), so that a model card can show how to build it again."""
    if name not in TINY_PIPELINES:
        raise ValueError(f"Unknown tiny pipeline {name!r}; choose one of {sorted(TINY_PIPELINES)}.")
    pipeline = TINY_PIPELINES[name](seed)
    pipeline.tiny_builder = (TINY_PIPELINES[name].__name__, seed)
    return pipeline


def save_tiny_pipeline(name: str, path: str, seed: int = 0) -> str:
    """Build the tiny pipeline `name` ("tiny-flux" or "tiny-sd") and save it to `path` for `from_pretrained`."""
    build_tiny_pipeline(name, seed).save_pretrained(path)
    return path


# -- video (HunyuanVideo, SkyReels, Wan) and SD3 ------------------------------------------------------------------------
def _llama_tokenizer(max_length: int = 16):
    from transformers import LlamaTokenizer

    # Character-level (no merges); right padding as HunyuanVideo's Llama-3 tokenizer, so the template crop is a prefix.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", padding_side="right", model_max_length=max_length)


def _hunyuan_text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    llama = LlamaModel(
        LlamaConfig(
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,  # HunyuanVideo takes the hidden states of the third layer from the end
            vocab_size=128,
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(seed)
    # HunyuanVideo pads CLIP prompts to 77 tokens
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=128,
            max_position_embeddings=77,
            projection_dim=8,
        )
    )
    return llama, clip


def _hunyuan_video_pipeline(pipeline_class, in_channels: int, seed: int):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=in_channels,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama, clip = _hunyuan_text_encoders(seed)
    return pipeline_class(
        text_encoder=llama,
        tokenizer=_llama_tokenizer(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=_clip_tokenizer(max_length=77),
    )


def tiny_hunyuan_video_pipeline(seed: int = 0):
    """A `HunyuanVideoPipeline` (text-to-video) with a two-block transformer, for 16-64 px and 1 + 4k frames."""
    from diffusers import HunyuanVideoPipeline

    return _hunyuan_video_pipeline(HunyuanVideoPipeline, in_channels=4, seed=seed)


def tiny_skyreels_pipeline(seed: int = 0):
    """A `HunyuanSkyreelsImageToVideoPipeline` (SkyReels-V1 image-to-video): the image latents concatenated on channels."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    return _hunyuan_video_pipeline(HunyuanSkyreelsImageToVideoPipeline, in_channels=8, seed=seed)


def _wan_components(in_channels: int, seed: int, image_dim: int | None = None) -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )
    return dict(
        vae=vae,
        transformer=transformer,
        text_encoder=_t5_encoder(seed, umt5=True),
        tokenizer=_t5_tokenizer(max_length=16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def tiny_wan_pipeline(seed: int = 0):
    """A `WanPipeline` (Wan 2.1 text-to-video) with a two-block transformer, for 16-64 px and 1 + 4k frames."""
    from diffusers import WanPipeline

    return WanPipeline(**_wan_components(in_channels=16, seed=seed))


def tiny_wan_v2v_pipeline(seed: int = 0):
    """A `WanVideoToVideoPipeline` (Wan 2.1 video-to-video): the tiny Wan text-to-video components."""
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline(**_wan_components(in_channels=16, seed=seed))


def tiny_wan_i2v_pipeline(seed: int = 0):
    """A `WanImageToVideoPipeline` (Wan 2.1 image-to-video): conditioning latents and mask on channels, CLIP image."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    components = _wan_components(in_channels=36, seed=seed, image_dim=4)  # 16 noise + 4 mask + 16 image latents
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    )
    image_processor = CLIPImageProcessor(crop_size=32, size=32)
    return WanImageToVideoPipeline(**components, image_encoder=image_encoder, image_processor=image_processor)


def tiny_sd3_pipeline(seed: int = 0):
    """A `StableDiffusion3Pipeline` with a two-block transformer (the last one context-pre-only, as in SD3)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,  # the two CLIP hidden states side by side (16 + 16), as wide as T5's
        pooled_projection_dim=32,  # the two CLIP projections side by side
        out_channels=4,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=32,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = _t5_encoder(seed)
    vae = _flow_vae(seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
    )


TINY_PIPELINES.update(
    {
        "tiny-hunyuan-video": tiny_hunyuan_video_pipeline,
        "tiny-skyreels": tiny_skyreels_pipeline,
        "tiny-wan": tiny_wan_pipeline,
        "tiny-wan-i2v": tiny_wan_i2v_pipeline,
        "tiny-sd3": tiny_sd3_pipeline,
    }
)


# -- Wan 2.2 (two experts; TI2V-5B), Z-Image, FLUX.2 [klein] -------------------------------------------------------------
def _wan22_vae(seed: int):
    """The Wan 2.2 VAE (48 channels, 16x spatial compression, residual blocks), at diffusers' test sizes."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    )


def _wan22_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=48,
        out_channels=48,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan22_pipeline(seed: int = 0):
    """A `WanPipeline` in its Wan 2.2 A14B form: two experts, `transformer` (high noise, steps with t >= 875) and
    `transformer_2` (low noise), for 32-64 px and 1 + 4k frames.

    It decodes with the Wan 2.2 VAE (A14B uses Wan 2.1's): the tiny random Wan 2.1 decoder hardly lets the latents
    move the mean brightness (a unit shift of any latent channel moves it by under 0.001; Wan 2.2's: up to 0.015), so
    a brightness reward could not be learned in the two-sided learning test.
    """
    from diffusers import WanPipeline

    components = _wan_components(in_channels=48, seed=seed)
    components["vae"] = _wan22_vae(seed)
    components["transformer"] = _wan22_transformer(seed)
    transformer_2 = _wan22_transformer(seed + 1)  # the experts differ, as the real ones do
    return WanPipeline(**components, transformer_2=transformer_2, boundary_ratio=0.875)


def tiny_wan22_ti2v_pipeline(seed: int = 0):
    """A `WanPipeline` in its Wan 2.2 TI2V-5B form: one transformer with per-token timesteps (`expand_timesteps`) and
    the Wan 2.2 VAE, as diffusers' own tests build it."""
    from diffusers import WanPipeline

    components = _wan_components(in_channels=48, seed=seed)
    components["vae"] = _wan22_vae(seed)
    components["transformer"] = _wan22_transformer(seed)
    return WanPipeline(**components, expand_timesteps=True)


def _qwen_tokenizer(max_length: int = 48):
    """A byte-level BPE tokenizer without merges (one token per byte) and the Qwen chat template's tags."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _qwen3_config(num_layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=260,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def tiny_z_image_pipeline(seed: int = 0):
    """A `ZImagePipeline` (Z-Image) with a two-layer transformer and a two-layer Qwen3 text encoder (diffusers' test
    sizes), for 32x32 to 64x64 images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fixed values, as diffusers' tests do
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(_qwen3_config(num_layers=2))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
        transformer=transformer,
    )


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A `Flux2KleinPipeline` (FLUX.2 [klein], base form: CFG) with a two-block transformer and a 28-layer Qwen3 text
    encoder of width 16 (the pipeline stacks layers 9, 18 and 27)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # three Qwen3 layers of width 16, side by side
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,  # patchified 2x2: the transformer sees 16 channels
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(num_layers=28))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
        transformer=transformer,
        is_distilled=is_distilled,
    )


_MISTRAL_SPECIAL_TOKENS = (
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)
# the shape of Mistral Small 3's chat template for text turns (content as a list of typed parts, as FLUX.2 sends)
_MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]"
    "{% endif %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% if m['role'] == 'system' %}"
    "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[/INST]{% endif %}{% endfor %}"
)


def _pixtral_processor(max_length: int, patch_size: int, image_size: int, spatial_merge_size: int = 1):
    """A `PixtralProcessor` (FLUX.2 [dev]'s `tokenizer`) whose tokenizer holds the words of the pipeline's system
    message whole and Mistral's special tokens, with Mistral Small 3's chat template for text turns."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = _whole_word_bpe_tokenizer(
        [SYSTEM_MESSAGE], _MISTRAL_SPECIAL_TOKENS, model_max_length=max_length, pad_token="<pad>", bos_token="<s>"
    )
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": image_size}, patch_size=patch_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        spatial_merge_size=spatial_merge_size,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def tiny_flux2_pipeline(seed: int = 0):
    """A `Flux2Pipeline` (FLUX.2 [dev]: embedded guidance) with klein's tiny transformer, VAE and scheduler and a
    31-layer Mistral-3 text encoder of width 16 (the pipeline stacks layers 10, 20 and 30) behind a `PixtralProcessor`
    whose tokenizer holds the system message's words whole, so its tokens leave room for the prompt within 64."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    klein = tiny_flux2_klein_pipeline(seed)
    klein.transformer.register_to_config(guidance_embeds=True)
    torch.manual_seed(seed)
    transformer = type(klein.transformer).from_config(klein.transformer.config)  # with the guidance embedder
    processor = _pixtral_processor(max_length=64, patch_size=8, image_size=64)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _MISTRAL_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 31,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "patch_size": 8,
            "image_size": 64,
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=1,
    )
    return Flux2Pipeline(
        scheduler=klein.scheduler,
        vae=klein.vae,
        text_encoder=Mistral3ForConditionalGeneration(config),
        tokenizer=processor,
        transformer=transformer,
    )


# -- Qwen-Image, Qwen-Image-Edit(-Plus), FLUX.1 Kontext -----------------------------------------------------------------
_QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_image_tokenizer():
    """A byte-level BPE `Qwen2Tokenizer` whose vocabulary holds every word of the Qwen-Image prompt templates whole.

    The pipelines drop a hard-coded number of template tokens from the encoder's hidden states (34 for Qwen-Image, 64
    for Qwen-Image-Edit: everything up to the user's turn, counted with the real tokenizer, which has all these
    words). With the words whole, this tokenizer counts the same, so the tiny pipelines crop exactly the template;
    other text falls back to bytes. Merges build each word left to right, words with a leading space first, so no
    merge fires inside another word.
    """
    import inspect

    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    texts = ["Picture 1: "]  # the label QwenImageEditPlusPipeline puts before each image
    for pipeline_class in (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        # the pipelines set their templates in __init__, which accepts missing components
        components = [None] * (len(inspect.signature(pipeline_class.__init__).parameters) - 1)
        texts.append(pipeline_class(*components).prompt_template_encode)
    return _whole_word_bpe_tokenizer(texts, _QWEN_SPECIAL_TOKENS)


def _whole_word_bpe_tokenizer(texts: list[str], special_tokens, **kwargs):
    """A byte-level BPE `Qwen2Tokenizer` holding every word of `texts` whole (see `_qwen_image_tokenizer`) and
    `special_tokens`; other text falls back to bytes."""
    import regex
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_to_char = bytes_to_unicode()
    special = regex.compile("|".join(regex.escape(token) for token in special_tokens))
    words = set()
    for text in texts:
        for part in special.split(text):
            for piece in regex.findall(PRETOKENIZE_REGEX, part):
                words.add("".join(byte_to_char[b] for b in piece.encode()))
    vocab = {char: i for i, char in enumerate(sorted(byte_to_char.values()))}
    merges = []
    for word in sorted(words, key=lambda word: (not word.startswith("\u0120"), word)):  # "\u0120": a leading space
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


def _qwen_image_components(seed: int, with_processor: bool) -> dict:
    """Qwen-Image's components at the sizes of diffusers' tests: a two-block transformer, a 4-channel video VAE (4x
    downsampling), a two-layer Qwen2.5-VL (with a two-block vision tower, which the editing pipelines use)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_image_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],  # not the identity, so the tests see the normalisation
        latents_std=[1.5, 0.8, 1.0, 1.2],
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if with_processor:
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        # every image becomes 56x56 pixels for the vision tower: 4x4 patches, 4 tokens after the 2x2 merge
        size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
        components["processor"] = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(size=size),
        )
    return components


def tiny_qwen_image_pipeline(seed: int = 0):
    """A `QwenImagePipeline` with a two-block transformer, for 16-64 px (multiples of 8)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_qwen_image_components(seed, with_processor=False))


def tiny_qwen_image_edit_pipeline(seed: int = 0):
    """A `QwenImageEditPipeline` (editing; the prompt encoder sees the source image)."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(**_qwen_image_components(seed, with_processor=True))


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0):
    """A `QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509: the source image behind a "Picture 1:" label)."""
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(**_qwen_image_components(seed, with_processor=True))


def tiny_flux_kontext_pipeline(seed: int = 0):
    """A `FluxKontextPipeline` (FLUX.1 Kontext editing) with the tiny FLUX components."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**_flux_components(seed))


TINY_PIPELINES.update(
    {
        "tiny-wan22": tiny_wan22_pipeline,
        "tiny-wan22-ti2v": tiny_wan22_ti2v_pipeline,
        "tiny-z-image": tiny_z_image_pipeline,
        "tiny-flux2-klein": tiny_flux2_klein_pipeline,
        "tiny-flux2": tiny_flux2_pipeline,
        "tiny-wan-v2v": tiny_wan_v2v_pipeline,
        "tiny-qwen-image": tiny_qwen_image_pipeline,
        "tiny-qwen-image-edit": tiny_qwen_image_edit_pipeline,
        "tiny-qwen-image-edit-plus": tiny_qwen_image_edit_plus_pipeline,
        "tiny-flux-kontext": tiny_flux_kontext_pipeline,
    }
)


# -- Qwen-Image 2.1 ------------------------------------------------------------------------------------------------------
# the Qwen3-VL chat template's rendering of text turns (the pipeline only renders its system message with it)
_QWEN3_VL_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen3_vl_processor(max_length: int, min_pixels: int, max_pixels: int, patch_size: int = 16, merge_size: int = 2):
    """A `Qwen3VLProcessor` (Qwen-Image 2.1's `processor`) whose tokenizer holds the words of the pipeline's
    text-to-image template whole (the pipeline drops the system turn's tokens, which it counts with the processor's
    chat template) and Qwen's vision tokens; other text falls back to bytes."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # the pipeline's `prompt_template_t2i` (set in its __init__, which needs a processor to count the system turn)
    template = (
        "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokenizer = _whole_word_bpe_tokenizer([template], _QWEN_SPECIAL_TOKENS, model_max_length=max_length)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=patch_size, merge_size=merge_size),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=patch_size, merge_size=merge_size),
        chat_template=_QWEN3_VL_TEXT_CHAT_TEMPLATE,
    )


def tiny_qwen_image21_pipeline(seed: int = 0):
    """A `QwenImage21Pipeline` (Qwen-Image 2.1) from its real classes: a two-block single-stream transformer on
    8-channel latents, a 16x RGBA video VAE (four downsampling stages of width 8), a two-layer Qwen3-VL (one-block
    vision tower) behind a `Qwen3VLProcessor` whose tokenizer holds the template's words whole (the pipeline drops
    the system turn's tokens, counted with the processor's chat template). For 32-64 px (multiples of 32)."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = _qwen3_vl_processor(max_length=128, min_pixels=32 * 32, max_pixels=64 * 64)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        in_channels=8,
        out_channels=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=16,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=8,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, False, False, False],
        latents_mean=[0.1, -0.2, 0.0, 0.3, 0.05, -0.1, 0.2, 0.0],  # not the identity: the tests see the normalisation
        latents_std=[1.5, 0.8, 1.0, 1.2, 0.9, 1.1, 1.3, 0.7],
    )
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=None),
        vae=vae,
        text_encoder=Qwen3VLForConditionalGeneration(config),
        processor=processor,
        transformer=transformer,
    )


TINY_PIPELINES["tiny-qwen-image21"] = tiny_qwen_image21_pipeline


# -- HunyuanVideo 1.5 ----------------------------------------------------------------------------------------------------
def _hunyuan_video15_components(seed: int, task_type: str, image_embed_dim: int) -> dict:
    """The components both HunyuanVideo 1.5 pipelines share: a two-block transformer on 4-channel latents (its input
    holds the latents, the conditioning latents and a mask: 9 channels), an 8x spatial / 4x temporal VAE, a two-layer
    Qwen2.5-VL text model behind a whole-word `Qwen2Tokenizer` with the Qwen chat template, and a one-layer ByT5
    encoder (the glyph branch) with the real `ByT5Tokenizer`, which needs no files."""
    import inspect

    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    template = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    # 16 prompt tokens (the adapter caps the pipeline's 1000 at `model_max_length`), after the template's 123 here (the
    # pipeline's hard-coded crop is the real tokenizer's count, 108: the adapter counts them instead)
    tokenizer = _whole_word_bpe_tokenizer([template], _QWEN_SPECIAL_TOKENS, model_max_length=16)
    tokenizer.chat_template = _QWEN3_VL_TEXT_CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=image_embed_dim,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type=task_type,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    torch.manual_seed(seed)
    text_config = Qwen2_5_VLTextConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,  # the pipeline takes the hidden states of the third layer from the end
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    byt5 = T5EncoderModel(
        T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    )
    return {
        "text_encoder": Qwen2_5_VLTextModel(text_config),
        "tokenizer": tokenizer,
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
        "text_encoder_2": byt5,
        "tokenizer_2": ByT5Tokenizer(model_max_length=16),
        "guider": ClassifierFreeGuidance(guidance_scale=6.0),  # the published checkpoints' CFG 6
    }


def tiny_hunyuan_video15_pipeline(seed: int = 0):
    """A `HunyuanVideo15Pipeline` (HunyuanVideo 1.5 text-to-video), for 32-64 px (multiples of 16) and 1 + 4k frames."""
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline(**_hunyuan_video15_components(seed, "t2v", image_embed_dim=12))


def tiny_hunyuan_video15_i2v_pipeline(seed: int = 0):
    """A `HunyuanVideo15ImageToVideoPipeline` (HunyuanVideo 1.5 image-to-video): the tiny text-to-video components plus
    a one-layer SigLIP vision tower (32 px images, 16 tokens) and its image processor."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=12,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    return HunyuanVideo15ImageToVideoPipeline(
        **_hunyuan_video15_components(seed, "i2v", image_embed_dim=12),
        image_encoder=vision,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )


TINY_PIPELINES["tiny-hunyuan-video15"] = tiny_hunyuan_video15_pipeline
TINY_PIPELINES["tiny-hunyuan-video15-i2v"] = tiny_hunyuan_video15_i2v_pipeline


# -- LTX-2 (video with audio) ------------------------------------------------------------------------------------------
def _gemma_tokenizer(max_length: int = 16):
    from transformers import GemmaTokenizer

    # Character-level (no merges); LTX2Pipeline pads Gemma prompts on the left.
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=max_length, padding_side="left")


def tiny_ltx2_pipeline(seed: int = 0):
    """An `LTX2Pipeline` (LTX-2, text to video with audio): a two-block audio-video transformer, the video and audio
    VAEs, the vocoder, the text connectors and a two-layer Gemma 3 at diffusers' test sizes; 32-64 px, 1 + 2k frames
    at 25 fps, stereo audio at 16 kHz."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = _gemma_tokenizer()
    torch.manual_seed(seed)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "sliding_window": 16,
    }
    vision_config = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
    }
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    ).eval()
    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=32,
        rope_double_precision=False,
        rope_type="split",
        perturbed_attn=True,  # LTX-2.3's spatio-temporal guidance, so that its forward is exercised
    )
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=text_config["num_hidden_layers"] + 1,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    # the resolution-dependent shift of the LTX-2 scheduler config (mu from the video's token count)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTX2Pipeline(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


def tiny_ltx2_condition_pipeline(seed: int = 0):
    """An `LTX2ConditionPipeline` (LTX-2 conditioned on images: image to video with audio) from the tiny LTX-2
    components."""
    from diffusers import LTX2ConditionPipeline

    return LTX2ConditionPipeline(**tiny_ltx2_pipeline(seed).components)


TINY_PIPELINES["tiny-ltx2"] = tiny_ltx2_pipeline
TINY_PIPELINES["tiny-ltx2-condition"] = tiny_ltx2_condition_pipeline
