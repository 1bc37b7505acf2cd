"""Input checks and image preprocessing on tensors (on the reward's device; no PIL, no files).

The resize and crop/pad helpers reproduce the evaluation transforms of open_clip and of the transformers CLIP image
processor (bicubic, antialiased, center crop or center pad); on images already at the model's input size they are
the identity, so scores then match the libraries' own preprocessing exactly.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


RESIZE_MODES = ("shortest", "longest", "squash")

# Values a float image may exceed [0, 1] by (rounding in VAE decoding and dtype casts) before it is refused.
RANGE_TOLERANCE = 1e-3


def check_images(images, reward_name: str, allow_video: bool = False, require_video: bool = False) -> torch.Tensor:
    """Check that `images` is a float tensor in [0, 1] of shape `(N, 3, H, W)` (or `(N, F, 3, H, W)` for videos).

    Returns the tensor, clamped to [0, 1] if needed (values within `RANGE_TOLERANCE` outside it are rounding, not
    errors).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"{reward_name}: `images` must be a torch.Tensor, got {type(images).__name__}. Convert PIL images or "
            "arrays with e.g. `torchvision.transforms.functional.to_tensor`."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{reward_name}: `images` must be a float tensor in [0, 1], got dtype {images.dtype}. For uint8 images "
            "use `images.float() / 255`."
        )
    is_video = images.ndim == 5 and images.shape[2] == 3
    is_image = images.ndim == 4 and images.shape[1] == 3
    if require_video and not is_video:
        raise ValueError(
            f"{reward_name}: `images` must be a batch of videos of shape (N, F, 3, H, W), got {tuple(images.shape)}."
        )
    if is_video and not allow_video:
        raise ValueError(
            f"{reward_name}: `images` is a batch of videos {tuple(images.shape)} but this reward scores images. Wrap "
            "it to score every frame and average: `per_frame(reward)` (from trl_dancegrpo.rewards)."
        )
    if not (is_image or is_video):
        expected = (
            "(N, F, 3, H, W)" if require_video else "(N, 3, H, W)" + (" or (N, F, 3, H, W)" if allow_video else "")
        )
        raise ValueError(
            f"{reward_name}: `images` must have shape {expected} with 3 RGB channels, got {tuple(images.shape)}. "
            "Channels-last images need `images.permute(0, 3, 1, 2)`."
        )
    if images.numel() == 0:
        return images
    low, high = (value.item() for value in torch.aminmax(images.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{reward_name}: `images` contains NaN or infinite values.")
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{reward_name}: `images` must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]. Images "
            "in [-1, 1] (a VAE's output) need `(images + 1) / 2`; uint8-range images need `images / 255`."
        )
    return images if low >= 0 and high <= 1 else images.clamp(0, 1)  # no copy of a (large) video batch if in range


def check_prompts(prompts, num_images: int, reward_name: str) -> list[str]:
    """Check that `prompts` is a list of `num_images` strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"{reward_name}: `prompts` must be a list of strings (one per image), got {type(prompts).__name__}."
        )
    if len(prompts) != num_images:
        raise ValueError(
            f"{reward_name}: got {len(prompts)} prompts for {num_images} images; pass one prompt per image (repeat "
            "a group's prompt for each of its samples)."
        )
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"{reward_name}: every prompt must be a string.")
    return list(prompts)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # Bicubic overshoots; PIL's resize (which the reference transforms use) saturates at the value range.
    resized = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 1)


def resize_shortest_and_center_crop(
    images: torch.Tensor, size: tuple[int, int], shortest_edge: int | None = None
) -> torch.Tensor:
    """Resize the shortest edge (to `shortest_edge`, default: cover `size`), then center crop to `size`.

    open_clip's and the transformers CLIP image processor's eval transform.
    """
    height, width = images.shape[-2:]
    target_h, target_w = size
    if shortest_edge is not None or target_h == target_w:
        # torchvision `Resize(int)`: the short side becomes `size`, the long one int(size * long / short).
        edge = shortest_edge if shortest_edge is not None else target_h
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = edge, int(edge * long / short)
        new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        ratio = min(height / target_h, width / target_w)
        new_h, new_w = round(height / ratio), round(width / ratio)
    images = _resize(images, (new_h, new_w))
    top = int(round((new_h - target_h) / 2.0))
    left = int(round((new_w - target_w) / 2.0))
    return images[..., top : top + target_h, left : left + target_w]


def resize_longest_and_center_pad(images: torch.Tensor, size: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """Resize so the image fits in `size` (longest edge), then pad the rest with `fill` (black) around the center.

    This is open_clip's `resize_mode="longest"` eval transform, which HPS-v2 evaluates with (`resize_longest_max`).
    """
    height, width = images.shape[-2:]
    target_h, target_w = size
    ratio = max(height / target_h, width / target_w)
    new_h, new_w = round(height / ratio), round(width / ratio)
    images = _resize(images, (new_h, new_w))
    pad_h, pad_w = max(target_h - new_h, 0), max(target_w - new_w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
    return images[..., :target_h, :target_w]


def preprocess(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    shortest_edge: int | None = None,
) -> torch.Tensor:
    """Move `images` (N, 3, H, W) in [0, 1] to `device`, resize to `size`, normalise, and cast to `dtype`.

    `resize_mode` is `"shortest"` (resize the shortest edge, to `shortest_edge` if given, then center crop),
    `"longest"` (resize the longest edge, then center pad with black) or `"squash"` (resize to `size`, ignoring the
    aspect ratio). The resize runs in float32 whatever the model's dtype.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
    images = images.to(device=device, dtype=torch.float32)
    if resize_mode == "shortest":
        images = resize_shortest_and_center_crop(images, size, shortest_edge)
    elif resize_mode == "longest":
        images = resize_longest_and_center_pad(images, size)
    else:
        images = _resize(images, size)
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(-1, 1, 1)
    return ((images - mean) / std).to(dtype)


def as_size(size) -> tuple[int, int]:
    """`224`, `(224, 224)` or `[224, 224]` as a `(height, width)` tuple."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))
