"""Reward functions: a name registry plus the built-in rewards.

A reward is any callable `f(prompts, images, **kwargs) -> list[float | None]` where `images` is a float tensor in
[0, 1] of shape `(N, 3, H, W)` (videos: `(N, F, 3, H, W)`), and dataset columns arrive as keyword arguments.
`None` means "not applicable" for that sample. `async def` rewards work too: the trainer awaits them.

Built in, by registry name:

- `"hpsv2.1"`, `"hpsv2"`: [`HPSReward`], human preference (open_clip ViT-H-14 + the HPS checkpoint);
- `"clip_score"`: [`CLIPScoreReward`], image-prompt cosine similarity of an open_clip model;
- `"pickscore"`: [`PickScoreReward`], PickScore (transformers `CLIPModel`);
- `"aesthetic"`: [`AestheticReward`], the LAION aesthetic predictor (no prompt);
- `"hpsv3"`: [`HPSv3Reward`], HPSv3 human preference (a Qwen2-VL-7B reward model);
- `"imagereward"`: [`ImageReward`], ImageReward human preference (BLIP);
- `"ocr"`: [`OCRReward`], Flow-GRPO's text-rendering reward (RapidOCR's PP-OCR ONNX models on the CPU, extra `[ocr]`);
- `"vlm_judge"`, `"vqascore"`, `"unifiedreward"`, `"vlm_instruction_following"`: [`VLMJudge`], a vision-language model
  served behind an OpenAI-compatible API (vLLM, sglang) asked a question about each image (async);
- `"videoalign_vq"`, `"videoalign_mq"`, `"videoalign_ta"`: [`VideoAlignReward`], video quality, motion quality and
  text alignment of VideoAlign (one shared Qwen2-VL model);
- `"shapes_geneval"`, `"shapes_geneval_dense"`: GenEval-style strict and partial-credit scores on the synthetic shapes
  domain (rule-based: color segmentation and connected components; see `trl_dancegrpo.rewards.shapes`);
- `"clap_score"`: [`CLAPScoreReward`], text-audio agreement of LAION CLAP (transformers `ClapModel`), for pipelines
  that generate sound (LTX-2);
- `"jpeg_compressibility"`, `"jpeg_incompressibility"`, `"brightness"`, `"audio_loudness"`: weight-free rewards.

Pipelines that generate sound (LTX-2) also pass `audio` (a float tensor `(N, channels, samples)` in [-1, 1]) and
`audio_sample_rate` (Hz) to the rewards that take them (by name or through `**kwargs`).

Wrappers: [`BinaryReward`] (thresholded to 0/1) and [`per_frame`] (an image reward on every frame of a video).
Model rewards load lazily, once, on the trainer's device and dtype (see [`ModelReward`]).
"""

from .._lazy import lazy_attributes


# Imported on first use (PEP 562), so that `trl_dancegrpo.rewards.registry` (reward names, checked by the command line
# before torch is imported) imports nothing heavy.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "ModelReward": "._base",
        "CLAPScoreReward": ".audio",
        "audio_loudness": ".audio",
        "RewardModelNotFoundError": "._loading",
        "clear_model_cache": "._loading",
        "HPSv3Reward": ".hpsv3",
        "AestheticReward": ".image",
        "CLIPScoreReward": ".image",
        "HPSReward": ".image",
        "PickScoreReward": ".image",
        "ImageReward": ".imagereward",
        "OCRReward": ".ocr",
        "REWARD_REGISTRY": ".registry",
        "get_reward": ".registry",
        "register_reward": ".registry",
        "shapes_geneval": ".shapes",
        "shapes_geneval_dense": ".shapes",
        "brightness": ".simple",
        "jpeg_compressibility": ".simple",
        "jpeg_incompressibility": ".simple",
        "VideoAlignReward": ".video",
        "VLMJudge": ".vlm",
        "VLMJudgeError": ".vlm",
        "VLMServerError": ".vlm",
        "BinaryReward": ".wrappers",
        "PerFrameReward": ".wrappers",
        "per_frame": ".wrappers",
        "reward_name": ".wrappers",
    },
)


__all__ = [
    "REWARD_REGISTRY",
    "AestheticReward",
    "BinaryReward",
    "CLAPScoreReward",
    "CLIPScoreReward",
    "HPSReward",
    "HPSv3Reward",
    "ImageReward",
    "ModelReward",
    "OCRReward",
    "PerFrameReward",
    "PickScoreReward",
    "RewardModelNotFoundError",
    "VLMJudge",
    "VLMJudgeError",
    "VLMServerError",
    "VideoAlignReward",
    "audio_loudness",
    "brightness",
    "clear_model_cache",
    "get_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "per_frame",
    "register_reward",
    "reward_name",
    "shapes_geneval",
    "shapes_geneval_dense",
]
