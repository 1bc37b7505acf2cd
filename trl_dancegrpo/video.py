"""Helpers for video, image-to-video and editing training: conditioning images, a weight-free motion reward, sample
files.

- [`load_image`]: the `image` column of an image-to-video or editing dataset (PIL image, path, array, tensor, or the
  dict `datasets` stores undecoded images as) to an RGB PIL image, with an error that names the row when it cannot;
- [`frame_difference`]: a weight-free motion reward (mean absolute change between consecutive frames);
- [`save_sample`] and [`log_sample_to_integrations`]: the trainer's sample logging (a GIF per logged step for videos,
  a PNG for images, in `output_dir/_samples/` and through the `report_to` integrations that take media);
  [`side_by_side`] puts an edit's source image next to its result.
"""

import io
import os

import torch


def load_image(value, row: str = "the row"):
    """The conditioning image `value` as an RGB `PIL.Image.Image`.

    Accepts a PIL image, a file path, a `{"bytes": ..., "path": ...}` dict (a `datasets` image column read without
    decoding), a `(H, W, 3)` uint8 array, or a tensor `(3, H, W)` / `(1, 3, H, W)` (float in [0, 1] or uint8). `row`
    names the sample in error messages.
    """
    from PIL import Image, UnidentifiedImageError

    if value is None:
        raise ValueError(
            f"{row} has no image (the 'image' column is None); image-to-video and editing need an image per row."
        )
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        if value is None:
            raise ValueError(f"{row} has an empty image entry (no bytes and no path).")
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            name = "its bytes" if isinstance(value, io.BytesIO) else repr(str(value))
            raise ValueError(f"{row}: the image {name} could not be read ({type(error).__name__}: {error}).") from None
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        tensor = torch.as_tensor(value)
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim == 3 and tensor.shape[0] == 3 and isinstance(value, torch.Tensor):
            tensor = tensor.permute(1, 2, 0)  # tensors are channels-first, arrays channels-last (PIL's layout)
        if tensor.ndim != 3 or tensor.shape[-1] != 3:
            raise ValueError(
                f"{row}: an image tensor must be (3, H, W) (or an array (H, W, 3)), got shape {tuple(tensor.shape)}."
            )
        if tensor.is_floating_point():
            if tensor.min() < 0 or tensor.max() > 1:
                raise ValueError(f"{row}: a float image tensor must have values in [0, 1].")
            tensor = (tensor * 255).round()
        return Image.fromarray(tensor.to(torch.uint8).cpu().numpy())
    raise ValueError(
        f"{row}: cannot use an image of type {type(value).__name__}; give a PIL image, a path, an array or a tensor."
    )


def image_key(image) -> tuple:
    """A key identifying a conditioning image by its content (rows of a group are decoded to distinct objects)."""
    import hashlib

    return (image.size, hashlib.sha1(image.tobytes()).hexdigest())


def load_video(value, row: str = "the row") -> list:
    """The source video `value` of a video-to-video row as a list of RGB `PIL.Image.Image` frames.

    Accepts a list of frames (each anything [`load_image`] takes), a `(F, 3, H, W)` tensor (float in [0, 1] or uint8),
    or a file path: an animated GIF / WebP / TIFF read with PIL, other formats (MP4, ...) with diffusers' `load_video`
    (which needs `imageio` with its ffmpeg plugin). `row` names the sample in error messages.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if value is None:
        raise ValueError(f"{row} has no video (the 'video' column is None); video-to-video needs a video per row.")
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        value = list(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{row}: its video has no frames.")
        return [load_image(frame, f"{row} (frame {i})") for i, frame in enumerate(value)]
    if isinstance(value, (str, os.PathLike)):
        path = str(value)
        if not os.path.isfile(path):
            raise ValueError(f"{row}: the video file {path!r} does not exist.")
        try:
            with Image.open(path) as video:
                if getattr(video, "n_frames", 1) > 1:
                    return [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]
        except (OSError, UnidentifiedImageError):
            pass  # not an image format: a video container
        from diffusers.utils import load_video as diffusers_load_video

        try:
            return diffusers_load_video(path)
        except (ImportError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"{row}: the video {path!r} could not be read ({type(error).__name__}: {error}); give its frames, an "
                "animated GIF, or install imageio with imageio-ffmpeg for other formats."
            ) from None
    raise ValueError(
        f"{row}: cannot use a video of type {type(value).__name__}; give a list of frames, a (F, 3, H, W) tensor or a "
        "file path."
    )


def video_key(frames: list) -> tuple:
    """A key identifying a source video by its content."""
    return tuple(image_key(frame) for frame in frames)


def frame_difference(prompts, images, **kwargs) -> list[float]:
    """Motion score of each video: the mean absolute difference between consecutive frames, in [0, 1].

    A weight-free video reward for tests and demos (its negation rewards static videos). `images` is `(N, F, 3, H, W)`.
    """
    if images.ndim != 5 or images.shape[1] < 2:
        raise ValueError(
            f"frame_difference scores videos (N, F, 3, H, W) with F >= 2, got shape {tuple(images.shape)}."
        )
    return (images[:, 1:].float() - images[:, :-1].float()).abs().flatten(1).mean(dim=1).tolist()


def image_to_tensor(image, height: int, width: int) -> torch.Tensor:
    """A PIL image (or anything [`load_image`] takes) as a `(3, height, width)` float tensor in [0, 1]."""
    import numpy as np
    from PIL import Image

    image = load_image(image).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def side_by_side(source, result: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """An edit for display: the source image (resized to the result's size) left of the result `(3, H, W)`, a white
    gap between them; `(3, H, 2 W + gap)` in [0, 1]."""
    height, width = result.shape[-2:]
    source = image_to_tensor(source, height, width)
    return torch.cat([source, torch.ones(3, height, gap), result.detach().float().cpu().clamp(0, 1)], dim=2)


def to_uint8_frames(sample: torch.Tensor) -> list:
    """A video `(F, 3, H, W)` or an image `(3, H, W)` in [0, 1] as a list of `(H, W, 3)` uint8 arrays."""
    frames = sample.unsqueeze(0) if sample.ndim == 3 else sample
    return list((frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def first_audio(extras: dict) -> tuple[torch.Tensor, int] | None:
    """The first sample's audio track `(channels, samples)` (on the CPU) and its sample rate, from what an adapter
    decodes besides the images (`decode_extras`); `None` for families without audio."""
    if "audio" not in extras:
        return None
    return extras["audio"][0].detach().float().cpu(), int(extras["audio_sample_rate"])


def save_audio(waveform: torch.Tensor, sample_rate: int, path: str) -> str:
    """Write a waveform `(channels, samples)` in [-1, 1] as a 16-bit PCM WAV file; returns the path."""
    import wave

    pcm = (waveform.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).t().contiguous().cpu().numpy()
    with wave.open(path, "wb") as handle:
        handle.setnchannels(waveform.shape[0])
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return path


def save_sample(sample: torch.Tensor, path_without_suffix: str, fps: int = 8, audio=None) -> str:
    """Write a video `(F, 3, H, W)` as an animated GIF (looping) or an image `(3, H, W)` as a PNG; returns the path.

    `audio` (`(waveform (channels, samples), sample_rate)`, LTX-2) is written beside it as a `.wav` of the same name.
    """
    from PIL import Image

    frames = [Image.fromarray(frame) for frame in to_uint8_frames(sample)]
    os.makedirs(os.path.dirname(path_without_suffix) or ".", exist_ok=True)
    if sample.ndim == 3:
        path = path_without_suffix + ".png"
        frames[0].save(path)
    else:
        path = path_without_suffix + ".gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    if audio is not None:
        save_audio(*audio, path_without_suffix + ".wav")
    return path


def log_sample_to_integrations(
    callbacks, path: str, sample: torch.Tensor, caption: str, step: int, fps: int = 8, audio=None
):
    """Send a saved sample to the Trainer's reporting integrations that take media (wandb, TensorBoard, MLflow, Trackio).

    The integrations are found among the Trainer's callbacks (what `report_to` set up), so a sample goes exactly where
    the scalars go. Integrations without media support are skipped. `audio` (`(waveform, sample_rate)`, saved by
    `save_sample` beside `path`) goes along as `samples_audio` to wandb (`wandb.Audio`, every channel) and TensorBoard
    (`add_audio`, which takes one channel: the channels' mean).
    """
    audio_path = os.path.splitext(path)[0] + ".wav" if audio is not None else None
    is_video = sample.ndim == 4
    for callback in callbacks:
        name = type(callback).__name__
        if name == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
            wandb = callback._wandb
            if getattr(wandb, "run", None) is None:
                continue
            media = wandb.Video(path, caption=caption) if is_video else wandb.Image(path, caption=caption)
            logged = {"samples": media, "train/global_step": step}
            if audio is not None:
                logged["samples_audio"] = wandb.Audio(audio_path, caption=caption)
            wandb.log(logged)
        elif name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
            if is_video:
                _add_tensorboard_gif(callback.tb_writer, "samples", path, sample, step)
            else:
                callback.tb_writer.add_image("samples", to_uint8_frames(sample)[0], step, dataformats="HWC")
            if audio is not None:
                waveform, sample_rate = audio
                callback.tb_writer.add_audio("samples_audio", waveform.mean(dim=0), step, sample_rate=sample_rate)
        elif name == "MLflowCallback" and getattr(callback, "_initialized", False):
            callback._ml_flow.log_artifact(path, artifact_path="samples")
        elif name == "TrackioCallback" and getattr(callback, "_initialized", False):
            trackio = callback._trackio
            media_class = getattr(trackio, "Video" if is_video else "Image", None)
            if media_class is not None:
                trackio.log({"samples": media_class(path, caption=caption)}, step=step)


def _add_tensorboard_gif(writer, tag: str, gif_path: str, sample: torch.Tensor, step: int) -> None:
    """Write the saved GIF as a TensorBoard image summary: TensorBoard shows it animated.

    `SummaryWriter.add_video` does the same but needs moviepy (and its 1.x API) to encode the GIF; it is encoded already.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    with open(gif_path, "rb") as handle:
        gif = handle.read()
    height, width = sample.shape[-2:]
    image = Summary.Image(height=int(height), width=int(width), colorspace=3, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
