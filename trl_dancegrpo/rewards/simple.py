"""Weight-free rewards: brightness and JPEG (in)compressibility (DDPO's two sanity-check rewards)."""

import io

import torch

from ._preprocessing import check_images


def brightness(prompts, images, **kwargs) -> list[float]:
    """Mean pixel value of each image (or video) in [0, 1]: a weight-free reward for tests and demos."""
    return images.float().flatten(1).mean(dim=1).tolist()


def _jpeg_kilobytes(images: torch.Tensor, reward_name: str, quality: int = 95) -> list[float]:
    from PIL import Image

    images = check_images(images, reward_name)
    pixels = (images.detach().float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(prompts, images, **kwargs) -> list[float]:
    """Minus the size of each image as a JPEG at quality 95, in kB (DDPO): rewards simple, smooth images.

    Encoding a JPEG is the definition of this reward, so it runs on the CPU with Pillow.
    """
    return [-size for size in _jpeg_kilobytes(images, "jpeg_compressibility")]


def jpeg_incompressibility(prompts, images, **kwargs) -> list[float]:
    """The size of each image as a JPEG at quality 95, in kB (DDPO): rewards detailed, busy images."""
    return _jpeg_kilobytes(images, "jpeg_incompressibility")
