"""VideoAlign / VideoReward (Liu et al., 2025, "Improving Video Generation with Human Feedback"): a Qwen2-VL-2B reward
model scoring a video's visual quality (VQ), motion quality (MQ) and text alignment (TA).

The checkpoint layout (Hub repository `KwaiVGI/VideoReward`, written by the VideoAlign trainer):

    model_config.json            {"data_config": {...}, "model_config": {...}, "peft_lora_config": {...},
                                  "inference_config": {"VQ_mean": ..., "VQ_std": ..., ...}, ...}
    checkpoint-<step>/model.pth  torch state dict of the whole PEFT-wrapped reward model: the Qwen2-VL weights
                                 (LoRA layers as `base_layer` + `lora_A`/`lora_B`), the resized token embeddings
                                 and the reward head `rm_head` (a bias-free Linear(hidden_size, output_dim))

plus the base model named in `model_config.model_name_or_path` (`Qwen/Qwen2-VL-2B-Instruct`), of which only the
config and the processor files are used: `model.pth` already holds every weight. The LoRA deltas are merged into
the base weights at load time, so inference needs no PEFT. The three scores are read from the reward head's output
at three special tokens (`<|VQ_reward|>`, `<|MQ_reward|>`, `<|TA_reward|>`) placed in VideoAlign's
"detailed_special" prompt, and by default standardised with `inference_config`'s means and standard deviations (as
VideoAlign's inference does with `use_norm=True`).
"""

import glob
import json
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import ModelReward
from ._loading import (
    build_qwen2_vl_backbone,
    load_state_dict,
    local_or_hub_dir,
    source_key,
    split_qwen2_vl_reward_weights,
)
from ._preprocessing import check_images, check_prompts


VIDEOALIGN_REPO_ID = "KwaiVGI/VideoReward"
DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# Base models that model_config.json names by a local path of the machine VideoAlign was trained on.
_BASE_MODEL_ALIASES = {
    "Qwen2-VL-2B-Instruct": "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen2-VL-7B-Instruct": "Qwen/Qwen2-VL-7B-Instruct",
}

# VideoAlign's "detailed_special" prompt (prompt_template.py of github.com/KwaiVGI/VideoAlign, MIT license), kept
# byte for byte (trailing spaces included): the reward model was trained on exactly this text.
VIDEOALIGN_PROMPT = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being "
    "the worst and 10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions "
    "should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking "
    "or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and "
    "direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)


def build_videoalign_prompt(prompt: str) -> str:
    """The text VideoAlign scores a video against: its "detailed_special" template around the user's prompt."""
    return VIDEOALIGN_PROMPT.replace("{text_prompt}", prompt)


def convert_videoalign_state_dict(
    state_dict: dict[str, torch.Tensor], lora_config: dict | None = None, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Turn VideoAlign's `model.pth` into state dicts of a transformers `Qwen2VLModel` and of the reward head.

    Undoes the PEFT wrapping (LoRA deltas merged into the base weights with scale `lora_alpha / r`, PEFT's
    `modules_to_save` copies unwrapped) and maps both Qwen2-VL layouts (transformers < 4.52: `model.layers...`,
    `visual...`; later: `model.language_model...`, `model.visual...`) to `Qwen2VLModel`'s. The language-model head
    is dropped: the reward needs hidden states only.
    """
    weights = {}
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.")
        if ".original_module." in key:  # PEFT's frozen copy of a module trained in full (`modules_to_save`)
            continue
        weights[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = value
    lora_modules = [key[: key.index(".lora_A.")] for key in weights if ".lora_A." in key]
    if lora_modules:
        if not lora_config or "lora_r" not in lora_config or "lora_alpha" not in lora_config:
            raise ValueError(
                "The checkpoint holds LoRA weights but model_config.json has no peft_lora_config r/alpha."
            )
        rank = lora_config["lora_r"]
        scale = lora_config["lora_alpha"] / (math.sqrt(rank) if lora_config.get("use_rslora") else rank)
    for module in lora_modules:
        (key_a,) = [key for key in weights if key.startswith(f"{module}.lora_A.")]
        lora_a = weights.pop(key_a).float()
        lora_b = weights.pop(key_a.replace(".lora_A.", ".lora_B.")).float()
        base = weights.pop(f"{module}.base_layer.weight")
        merged = base.float() + scale * (lora_b @ lora_a)
        weights[f"{module}.weight"] = merged.to(dtype or base.dtype)
        if f"{module}.base_layer.bias" in weights:
            weights[f"{module}.bias"] = weights.pop(f"{module}.base_layer.bias")
    leftovers = [key for key in weights if ".lora_" in key or ".base_layer." in key]
    if leftovers:
        raise ValueError(f"Unsupported PEFT weights in the VideoAlign checkpoint (e.g. {leftovers[0]!r}).")

    backbone, head = split_qwen2_vl_reward_weights(weights, keep_other_keys=True)
    if not head:
        raise ValueError("The VideoAlign checkpoint has no reward head (`rm_head.weight`).")
    return backbone, head


def _round_to(number: float, factor: int) -> int:
    return round(number / factor) * factor


def sample_frame_indices(
    total_frames: int, video_fps: float, sample_fps: float, num_frames: int | None = None, frame_factor: int = 2
) -> list[int]:
    """Indices of the frames VideoAlign sees: `sample_fps` frames per second of video (qwen-vl-utils' rule: at least
    4, an even number, uniformly spread), or `num_frames` frames when given."""
    if total_frames < frame_factor:
        return list(range(total_frames))
    max_frames = min(768, total_frames) // frame_factor * frame_factor
    if num_frames is None:
        min_frames = math.ceil(4 / frame_factor) * frame_factor
        count = min(max(total_frames / video_fps * sample_fps, min_frames), max_frames)
    else:
        count = min(max(num_frames, frame_factor), max_frames)
    count = min(max(_round_to(count, frame_factor), frame_factor), max_frames)
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


@dataclass
class _LoadedVideoAlign:
    model: nn.Module  # transformers Qwen2VLModel
    head: nn.Linear
    processor: object
    special_token_ids: list[int]
    data_config: dict
    inference_config: dict | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The last batch scored (weak reference to its tensor, its version, the settings) and its raw VQ/MQ/TA scores,
    # so that the three VideoAlign rewards of one training step run the model once.
    last: tuple | None = None


class VideoAlignReward(ModelReward):
    r"""
    VideoAlign / VideoReward: one of the visual quality (`"VQ"`), motion quality (`"MQ"`) or text alignment (`"TA"`)
    scores of a Qwen2-VL-2B video reward model (DanceGRPO's video rewards; its image-to-video recipe trains on motion
    quality only).

    Rewards of the three dimensions created with the same arguments share one loaded model, and a batch scored by
    one of them is not run again by the others.

    Frames are sampled like VideoAlign's inference (`sample_fps` frames per second of a video played at
    `video_fps`, at least 4), resized on the device to Qwen2-VL's patch grid within `max_pixels`, and handed to the
    processor and model as video tensors.

    Args:
        dimension (`str`, *optional*, defaults to `"MQ"`):
            `"VQ"`, `"MQ"`, `"TA"`, or `"Overall"` (their sum).
        model_name_or_path (`str`, *optional*, defaults to `"KwaiVGI/VideoReward"`):
            Hub id or local folder of the VideoAlign checkpoint (`model_config.json` and `checkpoint-<step>/model.pth`).
        base_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the base Qwen2-VL (only its config and processor files are read). `None` uses
            the one named in `model_config.json` (`Qwen/Qwen2-VL-2B-Instruct`).
        checkpoint_step (`int`, *optional*):
            Which `checkpoint-<step>` to load. `None` takes the latest.
        normalize (`bool`, *optional*, defaults to `True`):
            Standardise the score with the mean and standard deviation in `model_config.json`'s `inference_config`.
        video_fps (`float`, *optional*, defaults to `24.0`):
            Frame rate the generated videos are played at.
        sample_fps (`float`, *optional*):
            Frames per second VideoAlign looks at. `None` uses `model_config.json`'s (2).
        num_frames (`int`, *optional*):
            Look at this many uniformly spaced frames instead (rounded to an even number).
        max_pixels (`int`, *optional*):
            Upper bound on a frame's pixels after resizing. `None` uses `model_config.json`'s `max_frame_pixels`.
        min_pixels (`int`, *optional*):
            Lower bound on a frame's pixels after resizing. `None` uses qwen-vl-utils' (128 merged patches).
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model. `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `4`):
            Videos per forward pass; does not change the scores.
    """

    __name__ = "videoalign_mq"
    scores_videos = True

    def __init__(
        self,
        dimension: str = "MQ",
        model_name_or_path: str = VIDEOALIGN_REPO_ID,
        base_model_name_or_path: str | None = None,
        checkpoint_step: int | None = None,
        normalize: bool = True,
        video_fps: float = 24.0,
        sample_fps: float | None = None,
        num_frames: int | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 4,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if dimension not in (*DIMENSIONS, "Overall"):
            raise ValueError(f"dimension must be one of {(*DIMENSIONS, 'Overall')}, got {dimension!r}.")
        self.dimension = dimension
        self.model_name_or_path = model_name_or_path
        self.base_model_name_or_path = base_model_name_or_path
        self.checkpoint_step = checkpoint_step
        self.normalize = normalize
        self.video_fps = video_fps
        self.sample_fps = sample_fps
        self.num_frames = num_frames
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.__name__ = f"videoalign_{dimension.lower()}"

    def _cache_key(self) -> tuple:
        return (source_key(self.model_name_or_path), source_key(self.base_model_name_or_path), self.checkpoint_step)

    # ---------------------------------------------------------------------------------------------------------------
    # Loading

    def _checkpoint_file(self, reward_dir: str) -> str:
        if self.checkpoint_step is not None:
            path = os.path.join(reward_dir, f"checkpoint-{self.checkpoint_step}", "model.pth")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"No checkpoint-{self.checkpoint_step}/model.pth in {reward_dir!r}.")
            return path
        found = glob.glob(os.path.join(reward_dir, "checkpoint-*", "model.pth"))
        found = [path for path in found if re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.dirname(path)))]
        if not found:
            raise FileNotFoundError(
                f"No checkpoint-<step>/model.pth in {reward_dir!r}: not a VideoAlign checkpoint folder. (Checkpoints "
                "saved as LoRA adapter + non_lora_state_dict.pth are not supported; merge them into model.pth.)"
            )
        return max(found, key=lambda path: int(os.path.basename(os.path.dirname(path)).split("-")[1]))

    def _base_model(self, model_config: dict, reward_dir: str) -> str:
        if self.base_model_name_or_path is not None:
            return self.base_model_name_or_path
        name = model_config.get("model_name_or_path") or "Qwen/Qwen2-VL-2B-Instruct"
        for candidate in (name, os.path.join(reward_dir, name)):
            if os.path.isdir(candidate):
                return candidate
        return _BASE_MODEL_ALIASES.get(os.path.basename(name.rstrip("/")), name)

    def check_weights(self) -> None:
        """Find (or download) the reward checkpoint now: the trainer calls this before it loads the pipeline."""
        local_or_hub_dir(
            self.model_name_or_path, ["model_config.json", "checkpoint-*/model.pth"], argument="model_name_or_path"
        )

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedVideoAlign:
        from transformers import AutoProcessor

        reward_dir = local_or_hub_dir(
            self.model_name_or_path, ["model_config.json", "checkpoint-*/model.pth"], argument="model_name_or_path"
        )
        config_file = os.path.join(reward_dir, "model_config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"No model_config.json in {reward_dir!r}: not a VideoAlign checkpoint folder.")
        with open(config_file) as f:
            videoalign_config = json.load(f)
        model_config = videoalign_config.get("model_config", {})
        if model_config.get("reward_token", "special") != "special" or not model_config.get(
            "use_special_tokens", True
        ):
            raise ValueError("Only VideoAlign checkpoints that read rewards at special tokens are supported.")
        output_dim = model_config.get("output_dim", 1)
        if output_dim not in (1, 3):
            raise ValueError(f"Unsupported VideoAlign output_dim {output_dim} (expected 1 or 3).")

        base_dir = local_or_hub_dir(
            self._base_model(model_config, reward_dir),
            ["*.json", "*.txt", "*.jinja"],  # config, processor and tokenizer; model.pth holds the weights
            argument="base_model_name_or_path",
        )
        processor = AutoProcessor.from_pretrained(base_dir)
        processor.tokenizer.padding_side = "right"  # as in VideoAlign; real tokens never attend to padding
        processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        special_token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))

        backbone_weights, head_weights = convert_videoalign_state_dict(
            load_state_dict(self._checkpoint_file(reward_dir)), videoalign_config.get("peft_lora_config"), dtype
        )
        model, text_config = build_qwen2_vl_backbone(base_dir, backbone_weights, device, dtype, "VideoAlign")
        head = nn.Linear(text_config.hidden_size, output_dim, bias=False)
        head.load_state_dict(head_weights, strict=True)
        return _LoadedVideoAlign(
            model=model,
            head=head.to(device=device, dtype=torch.float32).eval().requires_grad_(False),
            processor=processor,
            special_token_ids=special_token_ids,
            data_config=videoalign_config.get("data_config", {}),
            inference_config=videoalign_config.get("inference_config"),
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Scoring

    def _frames(self, loaded: _LoadedVideoAlign, videos: torch.Tensor) -> list[torch.Tensor]:
        """Sample and resize the frames of `videos` (n, F, 3, H, W) on the device: one (T, 3, h, w) tensor per video."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        video_processor = loaded.processor.video_processor
        factor = video_processor.patch_size * video_processor.merge_size
        sample_fps = self.sample_fps if self.sample_fps is not None else loaded.data_config.get("fps", 2.0)
        indices = sample_frame_indices(videos.shape[1], self.video_fps, sample_fps, self.num_frames)
        frames = videos[:, indices].to(device=self.device, dtype=torch.float32)
        max_pixels = self.max_pixels or loaded.data_config.get("max_frame_pixels", 240 * 320)
        min_pixels = self.min_pixels or 128 * factor * factor
        height, width = smart_resize(*frames.shape[-2:], factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        if (height, width) != tuple(frames.shape[-2:]):
            flat = F.interpolate(frames.flatten(0, 1), (height, width), mode="bicubic", antialias=True)
            frames = flat.clamp(0, 1).unflatten(0, frames.shape[:2])
        return list(frames)

    def _raw_scores(self, loaded: _LoadedVideoAlign, prompts: list[str], videos: torch.Tensor) -> torch.Tensor:
        """Unnormalised (VQ, MQ, TA) of a batch of videos: shape (n, 3)."""
        chats = [
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_videoalign_prompt(p)}]}]
            for p in prompts
        ]
        texts = loaded.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        videos_kwargs = {"do_resize": False, "do_rescale": False, "device": str(self.device)}
        if "cap_pixels_per_frame" in getattr(loaded.processor.video_processor.valid_kwargs, "__annotations__", {}):
            videos_kwargs["cap_pixels_per_frame"] = False  # frames are already resized
        inputs = loaded.processor(
            text=texts,
            videos=self._frames(loaded, videos),
            padding=True,
            return_tensors="pt",
            videos_kwargs=videos_kwargs,
        ).to(self.device)
        hidden = loaded.model(**inputs, use_cache=False).last_hidden_state
        input_ids = inputs["input_ids"]
        rows = torch.arange(len(input_ids), device=input_ids.device)
        scores = []
        for dimension, token_id in enumerate(loaded.special_token_ids):
            is_token = input_ids == token_id
            if not bool((is_token.sum(dim=1) == 1).all()):
                raise ValueError(f"Each VideoAlign prompt must hold {REWARD_TOKENS[dimension]} exactly once.")
            position = is_token.int().argmax(dim=1)
            output = loaded.head(hidden[rows, position].float())
            scores.append(output[:, 0] if output.shape[-1] == 1 else output[:, dimension])
        return torch.stack(scores, dim=1)

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs) -> list[float]:
        videos = check_images(images, self.__name__, allow_video=True, require_video=True)
        prompts = check_prompts(prompts, len(videos), self.__name__)
        if len(videos) == 0:
            return []
        loaded = self.loaded
        settings = (tuple(prompts), self.video_fps, self.sample_fps, self.num_frames, self.max_pixels, self.min_pixels)
        with loaded.lock, torch.no_grad():
            last = loaded.last
            if last is not None and last[0]() is images and last[1] == images._version and last[2] == settings:
                raw = last[3]
            else:
                raw = torch.cat(
                    [
                        self._raw_scores(
                            loaded, prompts[start : start + self.batch_size], videos[start : start + self.batch_size]
                        )
                        for start in range(0, len(videos), self.batch_size)
                    ]
                ).cpu()
                loaded.last = (weakref.ref(images), images._version, settings, raw)
        scores = raw.clone()
        if self.normalize and loaded.inference_config:
            for index, dimension in enumerate(DIMENSIONS):
                mean = loaded.inference_config.get(f"{dimension}_mean", 0.0)
                std = loaded.inference_config.get(f"{dimension}_std", 1.0)
                scores[:, index] = (scores[:, index] - mean) / std
        if self.dimension == "Overall":
            return scores.sum(dim=1).tolist()
        return scores[:, DIMENSIONS.index(self.dimension)].tolist()
