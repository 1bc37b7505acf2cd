"""Audio rewards, for pipelines that generate a sound track with the video (LTX-2).

They read the `audio` and `audio_sample_rate` keyword arguments the trainer passes along with the images: `audio` is
a float tensor `(N, channels, samples)` in [-1, 1] (or a list of `(channels, samples)` / `(samples,)` tensors or
arrays), `audio_sample_rate` its rate in Hz.

- [`audio_loudness`]: the RMS loudness in dBFS, weight-free (for tests and demos);
- [`CLAPScoreReward`] (`"clap_score"`): text-audio agreement, the cosine similarity of the prompt's and the audio's
  CLAP embeddings (transformers `ClapModel` and `ClapProcessor`).
"""

import torch

from ._base import ModelReward
from ._loading import local_or_hub_dir, source_key


def check_audio(audio, audio_sample_rate, num: int, reward_name: str) -> list[torch.Tensor]:
    """The batch's audio as a list of float32 `(channels, samples)` tensors; a clear error when it is missing."""
    if audio is None or audio_sample_rate is None:
        raise ValueError(
            f"The reward {reward_name!r} scores audio, but no `audio` / `audio_sample_rate` came with the samples: use "
            "it with a pipeline that generates sound (LTX2Pipeline), or pass them when calling it."
        )
    if not isinstance(audio_sample_rate, int) or audio_sample_rate < 1:
        raise ValueError(f"audio_sample_rate must be a positive integer (Hz), got {audio_sample_rate!r}.")
    tracks = list(audio)
    if len(tracks) != num:
        raise ValueError(f"The reward {reward_name!r} got {len(tracks)} audio tracks for {num} samples.")
    result = []
    for track in tracks:
        track = torch.as_tensor(track).detach().float().cpu()
        if track.ndim == 1:
            track = track[None]
        if track.ndim != 2 or track.shape[-1] == 0:
            raise ValueError(
                f"The reward {reward_name!r} takes audio tracks of shape (channels, samples) or (samples,), got "
                f"{tuple(track.shape)}."
            )
        result.append(track)
    return result


def audio_loudness(prompts, images, audio=None, audio_sample_rate=None, **kwargs) -> list[float]:
    """The RMS loudness of each audio track over all its channels, in dBFS (0 for a full-scale square wave, floored at
    -100 for silence): a weight-free audio reward for tests and demos."""
    tracks = check_audio(audio, audio_sample_rate, len(prompts), "audio_loudness")
    return [20 * torch.log10(track.pow(2).mean().sqrt().clamp_min(1e-5)).item() for track in tracks]


def resample(waveform: torch.Tensor, rate: int, target_rate: int) -> torch.Tensor:
    """A mono waveform `(samples,)` at `target_rate`: linear interpolation, antialiased when the rate goes down."""
    if rate == target_rate:
        return waveform
    length = max(1, round(waveform.shape[-1] * target_rate / rate))
    resampled = torch.nn.functional.interpolate(
        waveform[None, None, None], size=(1, length), mode="bilinear", antialias=True, align_corners=False
    )
    return resampled[0, 0, 0]


class CLAPScoreReward(ModelReward):
    r"""
    CLAP score: how well the audio matches its prompt, the cosine similarity (-1 to 1) of the CLAP text embedding of
    the prompt and the CLAP audio embedding of the sound track (LAION CLAP through transformers `ClapModel`).

    Each track is mixed down to mono, resampled to the processor's sampling rate (48 kHz for LAION's checkpoints) and
    turned into the model's log-mel features by `ClapProcessor` (tracks shorter than its `max_length_s` are repeated
    to fill it; longer ones are cut as its `truncation` says). Video frames are not looked at.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"laion/clap-htsat-unfused"`):
            Hub id or local folder of the `ClapModel` and its processor files.
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model. `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Tracks per forward pass; does not change the scores.
    """

    __name__ = "clap_score"
    scores_videos = True

    def __init__(
        self,
        model_name_or_path: str = "laion/clap-htsat-unfused",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.model_name_or_path = model_name_or_path

    def _cache_key(self) -> tuple:
        return (source_key(self.model_name_or_path),)

    def _folder(self) -> str:
        return local_or_hub_dir(
            self.model_name_or_path, ["*.json", "*.txt", "*.safetensors"], argument="model_name_or_path"
        )

    def check_weights(self) -> None:
        """Find (or download) the model and processor files now: the trainer calls this before it loads the pipeline."""
        self._folder()

    def _load(self, device: torch.device, dtype: torch.dtype):
        from transformers import ClapModel, ClapProcessor

        folder = self._folder()
        model = ClapModel.from_pretrained(folder, dtype=dtype).to(device).eval().requires_grad_(False)
        return {"model": model, "processor": ClapProcessor.from_pretrained(folder)}

    def __call__(self, prompts, images, audio=None, audio_sample_rate=None, **kwargs) -> list[float]:
        from ._preprocessing import check_prompts

        prompts = check_prompts(prompts, len(prompts), self.__name__)
        tracks = check_audio(audio, audio_sample_rate, len(prompts), self.__name__)
        loaded = self.loaded
        processor, model = loaded["processor"], loaded["model"]
        rate = processor.feature_extractor.sampling_rate
        scores = []
        with torch.no_grad():
            for start in range(0, len(tracks), self.batch_size):
                batch = [
                    resample(track.mean(dim=0), audio_sample_rate, rate).numpy()
                    for track in tracks[start : start + self.batch_size]
                ]
                inputs = processor(
                    text=prompts[start : start + self.batch_size],
                    audio=batch,
                    sampling_rate=rate,
                    return_tensors="pt",
                    padding=True,
                )
                inputs = {key: value.to(self.device) for key, value in inputs.items()}
                inputs["input_features"] = inputs["input_features"].to(self.dtype)
                output = model(**inputs)
                cosine = torch.nn.functional.cosine_similarity(output.text_embeds, output.audio_embeds, dim=-1)
                scores.append(cosine.float().cpu())
        return torch.cat(scores).tolist()
