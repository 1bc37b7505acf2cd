"""Image rewards built on CLIP models: HPS-v2/v2.1 and CLIP score (open_clip), PickScore and the LAION aesthetic
predictor (transformers `CLIPModel`).

All of them score a batch of images `(N, 3, H, W)` in [0, 1]; preprocessing (resize, crop or pad, normalise) runs on
tensors on the reward's device. To score videos frame by frame, wrap them with
[`~trl_dancegrpo.rewards.per_frame`].
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import ModelReward
from ._loading import hub_file, hub_snapshot, load_state_dict, local_or_hub_dir, local_or_hub_file, source_key
from ._preprocessing import RESIZE_MODES, as_size, preprocess


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class _LoadedCLIP:
    """A loaded CLIP model with what its preprocessing and tokenisation need."""

    model: nn.Module
    tokenizer: object
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"
    shortest_edge: int | None = None
    head: nn.Module | None = None


def _unique_index(prompts: list[str]) -> tuple[list[str], list[int]]:
    # A GRPO batch repeats each prompt once per sample of its group: encode each distinct prompt once.
    positions: dict[str, int] = {}
    index = [positions.setdefault(prompt, len(positions)) for prompt in prompts]
    return list(positions), index


# --------------------------------------------------------------------------------------------------------------------
# open_clip rewards


def _drop_random_init_warning(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


class _OpenCLIPReward(ModelReward):
    """An open_clip model that scores images against their prompts by the cosine of the normalised embeddings."""

    def __init__(self, clip_model: str, resize_mode: str | None, device, dtype, batch_size: int):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if resize_mode is not None and resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES} or None, got {resize_mode!r}.")
        self.clip_model = clip_model
        self.resize_mode = resize_mode

    def _checkpoint(self) -> tuple[str, dict]:
        """Local path of the weights, and the open_clip pretrained config (quick_gelu, mean, std...) if any."""
        raise NotImplementedError

    def check_weights(self) -> None:
        """Find (or download) the checkpoint now: the trainer calls this before it loads the pipeline."""
        self._checkpoint()

    def _load_weights(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state_dict, strict=True)

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedCLIP:
        import open_clip

        if open_clip.get_model_config(self.clip_model) is None:
            raise ValueError(
                f"{self.__name__}: unknown open_clip architecture {self.clip_model!r}; choose one of "
                "`open_clip.list_models()` or register a config with `open_clip.add_model_config`."
            )
        path, pretrained_cfg = self._checkpoint()
        state_dict = load_state_dict(path)  # before building the model: a bad file fails at once
        # The checkpoint holds every weight: build the bare architecture (no download) and fill it. open_clip warns
        # that the model is "initialized randomly", which is true only until the weights are loaded.
        root_logger = logging.getLogger()
        root_logger.addFilter(_drop_random_init_warning)
        try:
            model = open_clip.create_model(
                self.clip_model,
                pretrained=None,
                force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)),
                pretrained_hf=False,  # no base text-tower download for architectures with a transformers text tower
            )
        finally:
            root_logger.removeFilter(_drop_random_init_warning)
        self._load_weights(model, state_dict)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        preprocess_cfg = {**open_clip.get_model_preprocess_cfg(model), **pretrained_cfg}
        resize_mode = self.resize_mode or preprocess_cfg.get("resize_mode", "shortest")
        return _LoadedCLIP(
            model=model,
            tokenizer=open_clip.get_tokenizer(self.clip_model),
            size=as_size(model.visual.image_size),
            mean=tuple(preprocess_cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(preprocess_cfg.get("std", OPENAI_CLIP_STD)),
            resize_mode=resize_mode if resize_mode in RESIZE_MODES else "shortest",
        )

    def _text_features(self, loaded: _LoadedCLIP, prompts: list[str]) -> torch.Tensor:
        unique, index = _unique_index(prompts)
        tokens = loaded.tokenizer(unique).to(self.device)
        features = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
        return features[index]

    def _score(self, loaded: _LoadedCLIP, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(
            images, loaded.size, loaded.mean, loaded.std, loaded.resize_mode, device=self.device, dtype=self.dtype
        )
        image_features = F.normalize(loaded.model.encode_image(pixels).float(), dim=-1)
        return (image_features * self._text_features(loaded, prompts)).sum(dim=-1)


HPS_REPO_ID = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_HPS_VERSIONS = {"v2": "v2.0", "2": "v2.0", "2.0": "v2.0", "v2.0": "v2.0", "2.1": "v2.1", "v2.1": "v2.1"}


class HPSReward(_OpenCLIPReward):
    r"""
    Human Preference Score v2 / v2.1 (Wu et al., 2023): how much people would prefer the image for its prompt.

    HPS is an open_clip ViT-H-14 fine-tuned on human preferences. Its checkpoint (`HPS_v2.1_compressed.pt` in the Hub
    repository `xswu/HPSv2`, a `{"state_dict": ...}` of the whole CLIP model) holds every weight, so no base CLIP
    weights are downloaded. The score is the cosine similarity of the normalised image and prompt embeddings, as HPS
    defines it (typically 0.2 to 0.35). Images are preprocessed like HPS's own evaluation: the longest edge resized to
    224 and the rest padded with black (no crop), bicubic.

    The DanceGRPO paper trains on HPS-v2.1 (FLUX: 0.304 -> 0.372).

    Args:
        version (`str`, *optional*, defaults to `"v2.1"`):
            `"v2.1"` or `"v2.0"` (also `"v2"`).
        checkpoint_path (`str`, *optional*):
            Local HPS checkpoint file. `None` downloads it from the Hub (or takes it from the cache).
        clip_model (`str`, *optional*, defaults to `"ViT-H-14"`):
            open_clip architecture of the checkpoint.
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model. `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Images per forward pass; does not change the scores.
        resize_mode (`str`, *optional*, defaults to `"longest"`):
            `"longest"` (HPS's evaluation transform: fit and pad), `"shortest"` (resize and center crop) or
            `"squash"`. Square images are treated the same by all three.

    Example:

    ```python
    >>> from trl_dancegrpo.rewards import HPSReward
    >>> reward = HPSReward()  # or HPSReward(checkpoint_path="HPS_v2.1_compressed.pt") offline
    >>> reward(["a photo of a cat"], images)  # images: (1, 3, H, W) in [0, 1]
    [0.27]
    ```
    """

    __name__ = "hpsv2.1"

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint_path: str | None = None,
        clip_model: str = "ViT-H-14",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        resize_mode: str = "longest",
    ):
        if str(version) not in _HPS_VERSIONS:
            raise ValueError(f"version must be 'v2.1' or 'v2.0', got {version!r}.")
        super().__init__(clip_model, resize_mode, device, dtype, batch_size)
        self.version = _HPS_VERSIONS[str(version)]
        self.checkpoint_path = checkpoint_path
        self.__name__ = "hpsv2.1" if self.version == "v2.1" else "hpsv2"

    def _cache_key(self) -> tuple:
        return (self.clip_model, source_key(self.checkpoint_path) or f"{HPS_REPO_ID}/{HPS_CHECKPOINTS[self.version]}")

    def _checkpoint(self) -> tuple[str, dict]:
        path = local_or_hub_file(
            self.checkpoint_path, HPS_REPO_ID, HPS_CHECKPOINTS[self.version], argument="checkpoint_path"
        )
        return path, {}


class CLIPScoreReward(_OpenCLIPReward):
    r"""
    CLIP score: the cosine similarity of an open_clip model's normalised image and prompt embeddings.

    Reported raw (not scaled by 100 nor clipped at 0), as in the DanceGRPO paper (SD 1.4: 0.363 -> 0.395). Weights
    come from open_clip's registry of pretrained tags (downloaded from the Hub) or from a local checkpoint file;
    preprocessing follows the tag's configuration (mean, std; resize the shortest edge and center crop by default).

    Args:
        clip_model (`str`, *optional*, defaults to `"ViT-H-14"`):
            open_clip architecture (`open_clip.list_models()`).
        pretrained (`str`, *optional*, defaults to `"laion2b_s32b_b79k"`):
            Pretrained tag of `clip_model` (`open_clip.list_pretrained_tags_by_model(clip_model)`) or the path of a
            local checkpoint file (`.safetensors`, `.bin`, `.pt`). Weights trained with QuickGELU from a local file
            need a `-quickgelu` architecture name (e.g. `"ViT-L-14-quickgelu"`).
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model. `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Images per forward pass; does not change the scores.
        resize_mode (`str`, *optional*):
            `"shortest"`, `"longest"` or `"squash"`. `None` uses the tag's setting (`"shortest"` for most).
    """

    __name__ = "clip_score"

    def __init__(
        self,
        clip_model: str = "ViT-H-14",
        pretrained: str = "laion2b_s32b_b79k",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        resize_mode: str | None = None,
    ):
        super().__init__(clip_model, resize_mode, device, dtype, batch_size)
        self.pretrained = pretrained

    def _cache_key(self) -> tuple:
        return (self.clip_model, source_key(self.pretrained))

    def _checkpoint(self) -> tuple[str, dict]:
        import open_clip

        path = os.path.expanduser(self.pretrained)
        if os.path.isfile(path):
            return path, {}
        cfg = open_clip.get_pretrained_cfg(self.clip_model, self.pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(self.clip_model)
            raise ValueError(
                f"clip_score: `pretrained={self.pretrained!r}` is neither a file nor a pretrained tag of "
                f"{self.clip_model!r} (tags: {', '.join(tags) or 'none'})."
            )
        # open_clip's convention: "org/name/file" names a file, "org/name/" the repository's default weights.
        repo_id, filename = os.path.split(cfg["hf_hub"])
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return hub_file(repo_id, candidates, argument="pretrained"), cfg


# --------------------------------------------------------------------------------------------------------------------
# transformers CLIPModel rewards


def _clip_model_dir(name_or_path: str, argument: str) -> str:
    """Local folder of a transformers CLIP model: the given folder, or its config and weights from the Hub."""
    folder = local_or_hub_dir(name_or_path, ["*.json", "*.txt", "*.safetensors"], argument=argument)
    is_local = os.path.isdir(os.path.expanduser(name_or_path))
    if not is_local and not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(folder)):
        # A repository without safetensors: take its PyTorch weights (transformers reads them with weights_only).
        folder = hub_snapshot(name_or_path, ["*.json", "*.txt", "*.bin"], argument=argument)
    return folder


def _field(config, name: str):
    # Image processor sizes are dicts in older transformers, `SizeDict`s in newer ones.
    if config is None or isinstance(config, int):
        return config
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _load_transformers_clip(model_dir: str, processor_dir: str, device, dtype) -> _LoadedCLIP:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir, dtype=dtype).to(device).eval().requires_grad_(False)
    # Only the image processor's settings are used: the preprocessing itself runs on tensors (`preprocess`).
    image_processor = AutoImageProcessor.from_pretrained(processor_dir)
    size = image_processor.size
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
    shortest_edge = size if isinstance(size, int) else _field(size, "shortest_edge")
    if shortest_edge:  # CLIP's transform: resize the shortest edge, then center crop
        target = (_field(crop, "height"), _field(crop, "width")) if crop else (shortest_edge, shortest_edge)
        resize_mode = "shortest"
    elif _field(size, "height") and _field(size, "width") and not crop:
        target, shortest_edge, resize_mode = (_field(size, "height"), _field(size, "width")), None, "squash"
    else:
        raise ValueError(f"Unsupported image processor size/crop configuration in {processor_dir!r}: {size}, {crop}.")
    return _LoadedCLIP(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(processor_dir),
        size=as_size(target),
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        resize_mode=resize_mode,
        shortest_edge=shortest_edge,
    )


def _pooled(output) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings, >= 5 a model output holding them as `pooler_output`.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _TransformersCLIPReward(ModelReward):
    def _image_embeddings(self, loaded: _LoadedCLIP, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(
            images,
            loaded.size,
            loaded.mean,
            loaded.std,
            loaded.resize_mode,
            device=self.device,
            dtype=self.dtype,
            shortest_edge=loaded.shortest_edge,
        )
        return F.normalize(_pooled(loaded.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def _text_embeddings(self, loaded: _LoadedCLIP, prompts: list[str]) -> torch.Tensor:
        unique, index = _unique_index(prompts)
        max_length = min(77, loaded.model.config.text_config.max_position_embeddings)
        tokens = loaded.tokenizer(
            unique, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        features = _pooled(loaded.model.get_text_features(**tokens))
        return F.normalize(features.float(), dim=-1)[index]


class PickScoreReward(_TransformersCLIPReward):
    r"""
    PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on the Pick-a-Pic human preferences.

    The score is PickScore's own: the model's logit scale (about 100) times the cosine similarity of the normalised
    image and prompt embeddings (typically 18 to 23). Loaded with transformers `CLIPModel`; preprocessing uses the
    processor's configuration (resize the shortest edge, center crop, mean/std), computed on tensors.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`):
            Hub id or local folder of the `CLIPModel`.
        processor_name_or_path (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            Hub id or local folder of the processor (tokenizer and `preprocessor_config.json`); only its small files
            are downloaded.
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model. `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Images per forward pass; does not change the scores.
    """

    __name__ = "pickscore"

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path

    def _cache_key(self) -> tuple:
        return (source_key(self.model_name_or_path), source_key(self.processor_name_or_path))

    def check_weights(self) -> None:
        """Find (or download) the model and processor files now: the trainer calls this before it loads the pipeline."""
        _clip_model_dir(self.model_name_or_path, "model_name_or_path")
        local_or_hub_dir(self.processor_name_or_path, ["*.json", "*.txt"], argument="processor_name_or_path")

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedCLIP:
        model_dir = _clip_model_dir(self.model_name_or_path, "model_name_or_path")
        processor_dir = local_or_hub_dir(
            self.processor_name_or_path, ["*.json", "*.txt"], argument="processor_name_or_path"
        )
        return _load_transformers_clip(model_dir, processor_dir, device, dtype)

    def _score(self, loaded: _LoadedCLIP, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        cosine = (self._image_embeddings(loaded, images) * self._text_embeddings(loaded, prompts)).sum(dim=-1)
        return loaded.model.logit_scale.float().exp() * cosine


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor's head (`sac+logos+ava1-l14-linearMSE.pth`): an MLP on CLIP embeddings."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


AESTHETIC_REPO_ID = "camenduru/improved-aesthetic-predictor"
AESTHETIC_CHECKPOINT = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticReward(_TransformersCLIPReward):
    r"""
    LAION aesthetic score (improved aesthetic predictor, "sac+logos+ava1-l14-linearMSE"): how good the image looks,
    about 1 to 10, regardless of the prompt.

    An MLP over the L2-normalised image embedding of OpenAI's CLIP ViT-L/14, here loaded with transformers
    (`openai/clip-vit-large-patch14`, the same weights the predictor was trained on, as in DDPO). The MLP weights come
    from the Hub repository `camenduru/improved-aesthetic-predictor` or a local file.

    Args:
        checkpoint_path (`str`, *optional*):
            Local `sac+logos+ava1-l14-linearMSE.pth`. `None` downloads it from the Hub (or takes it from the cache).
        clip_model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id or local folder of the `CLIPModel` (with its processor files).
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the CLIP model (the small MLP always runs in float32). `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Images per forward pass; does not change the scores.
    """

    __name__ = "aesthetic"
    uses_prompts = False

    def __init__(
        self,
        checkpoint_path: str | None = None,
        clip_model_name_or_path: str = "openai/clip-vit-large-patch14",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.checkpoint_path = checkpoint_path
        self.clip_model_name_or_path = clip_model_name_or_path

    def _cache_key(self) -> tuple:
        source = source_key(self.checkpoint_path) or f"{AESTHETIC_REPO_ID}/{AESTHETIC_CHECKPOINT}"
        return (source_key(self.clip_model_name_or_path), source)

    def check_weights(self) -> None:
        """Find (or download) the predictor and its CLIP now: the trainer calls this before it loads the pipeline."""
        local_or_hub_file(self.checkpoint_path, AESTHETIC_REPO_ID, AESTHETIC_CHECKPOINT, argument="checkpoint_path")
        _clip_model_dir(self.clip_model_name_or_path, "clip_model_name_or_path")

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedCLIP:
        path = local_or_hub_file(
            self.checkpoint_path, AESTHETIC_REPO_ID, AESTHETIC_CHECKPOINT, argument="checkpoint_path"
        )
        state_dict = load_state_dict(path)
        if "layers.0.weight" not in state_dict:
            raise ValueError(f"{path!r} is not an aesthetic predictor MLP (no `layers.0.weight`).")
        head = AestheticMLP(state_dict["layers.0.weight"].shape[1])
        head.load_state_dict(state_dict, strict=True)
        clip_dir = _clip_model_dir(self.clip_model_name_or_path, "clip_model_name_or_path")
        loaded = _load_transformers_clip(clip_dir, clip_dir, device, dtype)
        loaded.head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return loaded

    def _score(self, loaded: _LoadedCLIP, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        return loaded.head(self._image_embeddings(loaded, images)).squeeze(-1)
