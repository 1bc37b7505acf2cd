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
- `"vlm_judge"`, `"vqascore"`, `"unifiedreward"`, `"vlm_instruction_following"`: [`VLMJudge`], a vision-language model
  served behind an OpenAI-compatible API (vLLM, sglang) asked a question about each image (async);
- `"videoalign_vq"`, `"videoalign_mq"`, `"videoalign_ta"`: [`VideoAlignReward`], video quality, motion quality and
  text alignment of VideoAlign (one shared Qwen2-VL model);
- `"shapes_geneval"`, `"shapes_geneval_dense"`: GenEval-style strict and partial-credit scores on the synthetic shapes
  domain (rule-based: color segmentation and connected components; see `trl_dancegrpo.rewards.shapes`);
- `"jpeg_compressibility"`, `"jpeg_incompressibility"`, `"brightness"`: weight-free rewards.

Wrappers: [`BinaryReward`] (thresholded to 0/1) and [`per_frame`] (an image reward on every frame of a video).
Model rewards load lazily, once, on the trainer's device and dtype (see [`ModelReward`]).
"""

from ._base import ModelReward
from ._loading import RewardModelNotFoundError, clear_model_cache
from .hpsv3 import HPSv3Reward
from .image import AestheticReward, CLIPScoreReward, HPSReward, PickScoreReward
from .imagereward import ImageReward
from .registry import REWARD_REGISTRY, get_reward, register_reward
from .shapes import shapes_geneval, shapes_geneval_dense
from .simple import brightness, jpeg_compressibility, jpeg_incompressibility
from .video import VideoAlignReward
from .vlm import VLMJudge, VLMJudgeError
from .wrappers import BinaryReward, PerFrameReward, per_frame, reward_name


__all__ = [
    "REWARD_REGISTRY",
    "AestheticReward",
    "BinaryReward",
    "CLIPScoreReward",
    "HPSReward",
    "HPSv3Reward",
    "ImageReward",
    "ModelReward",
    "PerFrameReward",
    "PickScoreReward",
    "RewardModelNotFoundError",
    "VLMJudge",
    "VLMJudgeError",
    "VideoAlignReward",
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
