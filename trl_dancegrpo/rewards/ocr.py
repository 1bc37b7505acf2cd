"""Text rendering: Flow-GRPO's OCR reward, with RapidOCR's PP-OCR detection and recognition models (ONNX, CPU)."""

import threading

import torch

from ._preprocessing import check_images


OCR_EXTRA_HINT = 'the OCR reward needs the `rapidocr` package: pip install "trl-dancegrpo[ocr]"'


def _import_rapidocr():
    try:
        from rapidocr import RapidOCR
    except ImportError as error:
        raise ImportError(f"{OCR_EXTRA_HINT} ({error}).") from error
    return RapidOCR


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes of `prompt` (`'a sign saying "OPEN"'` -> `OPEN`), or None."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def normalize_text(text: str) -> str:
    """As Flow-GRPO compares texts: lower case, spaces removed."""
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning `a` into `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(target: str, recognized: str) -> float:
    """Flow-GRPO's text-rendering score of the recognized text against the target (both normalized here).

    1 when the target appears in the recognized text (extra text around it costs nothing), else
    `max(0, 1 - edit_distance / len(target))`.
    """
    target, recognized = normalize_text(target), normalize_text(recognized)
    if not target:
        raise ValueError("ocr_score: the target text is empty.")
    distance = 0 if target in recognized else edit_distance(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target)


class OCRReward:
    """Flow-GRPO's text-rendering reward: does the image show the text quoted in the prompt?

    The target is the text between the first pair of double quotes of the prompt (`A shop sign that says "OPEN 24
    HOURS"`). RapidOCR reads every line of text in the image (PP-OCR detection, then recognition; its wheel ships the
    ONNX models, run by onnxruntime on the CPU, so nothing is downloaded); the lines are joined in reading order. Both
    texts are compared in lower case without spaces; the reward is 1 if the target appears in the recognized text,
    else `max(0, 1 - edit_distance(recognized, target) / len(target))`. A prompt without quoted text gets `None`
    ("not applicable"). Videos: wrap with `per_frame`.

    Args:
        text_score (`float`, *optional*, defaults to `0.5`):
            RapidOCR's confidence threshold: recognized lines scoring lower are dropped.
        num_threads (`int`, *optional*):
            onnxruntime's intra-op threads; `None` = onnxruntime's default (every core).
        use_cls (`bool`, *optional*, defaults to `False`):
            Run the text-direction classifier (upside-down text); Flow-GRPO runs without it.
    """

    __name__ = "ocr"

    def __init__(self, text_score: float = 0.5, num_threads: int | None = None, use_cls: bool = False):
        self._rapidocr_class = _import_rapidocr()  # a missing extra fails when the reward is built, not mid-training
        if not 0 <= text_score <= 1:
            raise ValueError(f"OCRReward: text_score must be in [0, 1], got {text_score}.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"OCRReward: num_threads must be positive (or None), got {num_threads}.")
        self.text_score, self.num_threads, self.use_cls = text_score, num_threads, use_cls
        self._engine = None
        self._lock = threading.Lock()  # one onnxruntime session, called from one thread at a time

    @property
    def engine(self):
        if self._engine is None:
            params = {
                "Global.text_score": self.text_score,
                "Global.use_cls": self.use_cls,
                "Global.log_level": "error",
            }
            if self.num_threads is not None:
                params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.num_threads
            self._engine = self._rapidocr_class(params=params)
        return self._engine

    def recognize(self, images: torch.Tensor) -> list[str]:
        """The text RapidOCR reads in each image (lines joined without separator; "" when none)."""
        images = check_images(images, "ocr")
        pixels = (images.detach().float().cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        texts = []
        with self._lock:
            for array in pixels:
                result = self.engine(array[..., ::-1].copy())  # RGB -> BGR, the channel order OpenCV-based OCR expects
                texts.append("".join(result.txts) if result.txts else "")
        return texts

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs) -> list[float | None]:
        targets = [quoted_text(prompt) for prompt in prompts]
        rows = [i for i, target in enumerate(targets) if target and normalize_text(target)]
        scores: list[float | None] = [None] * len(prompts)
        images = check_images(images, "ocr")
        if rows:
            recognized = self.recognize(images[rows])
            for i, text in zip(rows, recognized):
                scores[i] = ocr_score(targets[i], text)
        return scores
