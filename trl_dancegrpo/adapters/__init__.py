"""Per-family pipeline adapters and the lookup from a pipeline to its adapter."""

from .base import DDIMAdapter, FlowMatchAdapter, PipelineAdapter
from .flux import FluxAdapter
from .flux2 import Flux2KleinAdapter
from .flux2_dev import Flux2Adapter
from .flux_kontext import FluxKontextAdapter
from .hunyuan_video import HunyuanVideoAdapter, SkyReelsImageToVideoAdapter
from .hunyuan_video15 import HunyuanVideo15Adapter, HunyuanVideo15ImageToVideoAdapter
from .image_base import PackedLatentAdapter, ReferenceImageMixin
from .ltx2 import LTX2Adapter
from .ltx2_condition import LTX2ConditionAdapter
from .qwen_image import QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter
from .qwen_image21 import QwenImage21Adapter
from .sd3 import StableDiffusion3Adapter
from .stable_diffusion import StableDiffusionAdapter
from .video_base import VideoAdapter
from .wan import WanAdapter, WanImageToVideoAdapter
from .wan22 import Wan22Adapter
from .wan_v2v import WanVideoToVideoAdapter
from .z_image import ZImageAdapter


ADAPTERS: list[type[PipelineAdapter]] = [
    FluxAdapter,
    StableDiffusionAdapter,
    StableDiffusion3Adapter,
    HunyuanVideoAdapter,
    SkyReelsImageToVideoAdapter,
    HunyuanVideo15Adapter,
    HunyuanVideo15ImageToVideoAdapter,
    WanAdapter,
    Wan22Adapter,
    WanImageToVideoAdapter,
    WanVideoToVideoAdapter,
    ZImageAdapter,
    Flux2KleinAdapter,
    Flux2Adapter,
    QwenImageAdapter,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    QwenImage21Adapter,
    FluxKontextAdapter,
    LTX2Adapter,
    LTX2ConditionAdapter,
]


def supported_pipelines() -> list[str]:
    return list(dict.fromkeys(name for adapter in ADAPTERS for name in adapter.pipeline_class_names))


def get_adapter_class(pipeline) -> type[PipelineAdapter]:
    """The adapter for `pipeline`'s class; a clear error listing the supported pipelines otherwise."""
    name = type(pipeline).__name__
    for adapter in ADAPTERS:
        if name in adapter.pipeline_class_names and adapter.accepts(pipeline):
            return adapter
    raise ValueError(
        f"{name} is not supported by DanceGRPOTrainer. Supported pipelines: {', '.join(supported_pipelines())}. "
        "To add one, write a PipelineAdapter (see docs/adding_a_model.md) and append it to "
        "trl_dancegrpo.adapters.ADAPTERS."
    )


__all__ = [
    "ADAPTERS",
    "DDIMAdapter",
    "FlowMatchAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "HunyuanVideo15Adapter",
    "HunyuanVideo15ImageToVideoAdapter",
    "HunyuanVideoAdapter",
    "LTX2Adapter",
    "LTX2ConditionAdapter",
    "PackedLatentAdapter",
    "PipelineAdapter",
    "QwenImage21Adapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "QwenImageEditPlusAdapter",
    "ReferenceImageMixin",
    "SkyReelsImageToVideoAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "VideoAdapter",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "Wan22Adapter",
    "WanAdapter",
    "WanImageToVideoAdapter",
    "WanVideoToVideoAdapter",
    "ZImageAdapter",
    "get_adapter_class",
    "supported_pipelines",
]
