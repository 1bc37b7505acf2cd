"""Vision-language models as judges, served behind an OpenAI-compatible chat-completions API (vLLM, sglang, ...).

Each sample becomes one chat request: its image (a PNG data URL; a video as a few of its frames) and a question built
from a template. Two ways to turn the answer into a reward:

- `mode="logprobs"` (default): the probability that the judge answers yes, read from the first generated token's
  `top_logprobs`: P(yes) = p(yes-variants) / (p(yes-variants) + p(no-variants)), the variants ("yes", "Yes", " YES"...)
  summed. One generated token per sample, and a smooth reward (VQAScore, Lin et al. 2024, scores alignment this way).
- `mode="numeric"`: the judge writes an answer, and a regular expression reads a number from it (for servers that do
  not return log-probs, and for judges trained to write scores, such as UnifiedReward). Never chosen silently: a server
  without log-probs is an error in `"logprobs"` mode that names this option.

The judge is an `async` reward: the trainer awaits it next to the other rewards, and up to `max_concurrency`
requests are in flight at once.
"""

import asyncio
import base64
import io
import logging
import math
import os
import random
import re
import string
from collections.abc import Sequence

import torch

from ._preprocessing import check_images, check_prompts


logger = logging.getLogger(__name__)

MODES = ("logprobs", "numeric")
ANSWER_REDUCTIONS = ("first", "mean", "sum")

# The question of VQAScore (Lin et al., 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation",
# github.com/linzhiqiu/t2v_metrics): P(yes) of this question is its text-image alignment score.
VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'

# UnifiedReward 2.0's point-wise image prompt (Wang et al., 2025, "Unified Reward Model for Multimodal Understanding
# and Generation", github.com/CodeGoat24/UnifiedReward; models CodeGoat24/UnifiedReward-2.0-qwen-*), kept byte for byte.
UNIFIEDREWARD_QUESTION = (
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image "
    "across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
# The three "(1-5): X" lines of its answer.
UNIFIEDREWARD_ANSWER_PATTERN = r"(?:Alignment|Coherence|Style) Score \(1-5\):\s*([0-9]+(?:\.[0-9]+)?)"

# Instruction following of an image-editing model, asked as a yes/no question about the source and the edited image
# (the yes/no form of the instruction-following criterion of VIEScore, Ku et al., 2024, and of EditReward's rubric).
INSTRUCTION_FOLLOWING_QUESTION = (
    "The first image is the original image and the second image is the result of editing it with the instruction: "
    '"{prompt}". Does the second image follow the instruction while keeping the rest of the original image unchanged? '
    "Please answer yes or no."
)

_NUMBER_PATTERN = r"(-?[0-9]+(?:\.[0-9]+)?)"


class VLMJudgeError(RuntimeError):
    """The judge's server could not be used: unreachable, wrong model name, or no log-probs."""


class VLMServerError(VLMJudgeError, ValueError):
    """The judge's server, checked before training (`VLMJudge.check_server`), is down or does not serve the model: bad
    input, reported as the other bad input is (a `ValueError`, one line on the command line)."""


def image_to_data_url(image: torch.Tensor) -> str:
    """A float image (3, H, W) in [0, 1] as a PNG data URL, rounded to 8 bits."""
    from PIL import Image

    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _reference_image_url(value, column: str) -> str:
    """A dataset column's image (PIL image, float tensor (3, H, W) in [0, 1], URL or data URL) as an image URL."""
    if isinstance(value, str) and value.startswith(("http://", "https://", "data:")):
        return value
    if isinstance(value, str) and os.path.isfile(value):  # a path, as an image column of an editing dataset holds
        from PIL import Image

        with Image.open(value) as image:
            value = image.convert("RGB")
    if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[0] == 3 and value.is_floating_point():
        return image_to_data_url(value)
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        import numpy as np

        return image_to_data_url(torch.from_numpy(np.asarray(value.convert("RGB")).copy()).permute(2, 0, 1) / 255)
    raise ValueError(
        f"The column {column!r} must hold images (PIL images, float tensors (3, H, W) in [0, 1], image files or URLs), got "
        f"{type(value).__name__}."
    )


def template_fields(template: str) -> list[str]:
    """The names a `str.format` template uses (`{prompt}`, `{category}`...)."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier():
                raise ValueError(
                    f"question: the template field {{{name}}} is not a plain name; use column names such as "
                    "{prompt}, and write literal braces as {{ and }}."
                )
            fields.append(name)
    return fields


class VLMJudge:
    r"""
    A vision-language model served behind an OpenAI-compatible API (vLLM, sglang, TGI...), asked a question about each
    image; its answer is the reward.

    ```python
    # vllm serve Qwen/Qwen2.5-VL-7B-Instruct --max-logprobs 20
    from trl_dancegrpo.rewards import VLMJudge

    judge = VLMJudge("http://localhost:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                     question='Does this image show "{prompt}"? Please answer yes or no.')
    trainer = DanceGRPOTrainer(..., reward_funcs=[judge])
    ```

    Calling the judge returns a coroutine (`await judge(prompts, images)`, or `asyncio.run(...)` outside a trainer);
    the trainer awaits it. Before the first request it checks once that the server answers and serves `model`.

    Args:
        base_url (`str`):
            The server's OpenAI API root, e.g. `"http://localhost:8000/v1"`.
        model (`str`):
            The model name the server serves (as listed by its `/v1/models`).
        question (`str`, *optional*, defaults to [`VQASCORE_QUESTION`]):
            The question, a `str.format` template: `{prompt}` is the sample's prompt, any other `{name}` the value of
            the dataset column `name` for that sample.
        mode (`str`, *optional*, defaults to `"logprobs"`):
            `"logprobs"`: the reward is P(yes) from the first generated token's `top_logprobs`. `"numeric"`: the
            judge writes an answer (up to `max_tokens` tokens, greedy) and `answer_pattern` reads a number from it.
        yes_tokens (`list[str]`, *optional*, defaults to `["yes"]`):
            Answers counted as yes (compared after stripping spaces, ignoring case), `"logprobs"` mode.
        no_tokens (`list[str]`, *optional*, defaults to `["no"]`):
            Answers counted as no, `"logprobs"` mode.
        top_logprobs (`int`, *optional*, defaults to `20`):
            How many of the most likely first tokens the server returns (vLLM caps it at its `--max-logprobs`, 20 by
            default). Yes or no outside them count as probability 0.
        answer_pattern (`str`, *optional*):
            `"numeric"` mode: a regular expression whose first group (or whole match) is a number. `None` takes the
            first number in the answer.
        answer_reduce (`str`, *optional*, defaults to `"first"`):
            `"numeric"` mode: `"first"`, `"mean"` or `"sum"` of the pattern's matches.
        max_tokens (`int`, *optional*, defaults to `64`):
            `"numeric"` mode: the longest answer generated.
        unanswered (`float`, *optional*):
            The reward of a sample whose answer holds neither yes nor no (`"logprobs"` mode) or no number
            (`"numeric"`); `None` marks it not applicable (the trainer leaves it out of its group's statistics). Such
            samples are logged as warnings.
        system_prompt (`str`, *optional*):
            A system message sent before the question.
        reference_image_column (`str`, *optional*):
            A dataset column whose image (PIL image, float tensor or URL) is sent before the scored one, e.g. the
            source image of an editing dataset.
        video_frames (`int`, *optional*, defaults to `4`):
            Videos `(N, F, 3, H, W)` are sent as this many evenly spaced frames, each an image of the same message
            (the server must accept that many images per prompt: vLLM's `--limit-mm-per-prompt`).
        max_concurrency (`int`, *optional*, defaults to `16`):
            Requests in flight at once.
        timeout (`float`, *optional*, defaults to `60.0`):
            Seconds one request may take before it is retried.
        retries (`int`, *optional*, defaults to `2`):
            Retries of a request that timed out, could not connect or got a 5xx or 429 answer (exponential backoff).
        api_key (`str`, *optional*, defaults to `"EMPTY"`):
            The API key (local vLLM servers accept any).
        extra_body (`dict`, *optional*):
            Extra fields of every request (server-specific sampling options).
        name (`str`, *optional*, defaults to `"vlm_judge"`):
            The name the reward is logged under.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        question: str = VQASCORE_QUESTION,
        mode: str = "logprobs",
        yes_tokens: Sequence[str] = ("yes",),
        no_tokens: Sequence[str] = ("no",),
        top_logprobs: int = 20,
        answer_pattern: str | None = None,
        answer_reduce: str = "first",
        max_tokens: int = 64,
        unanswered: float | None = None,
        system_prompt: str | None = None,
        reference_image_column: str | None = None,
        video_frames: int = 4,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        retries: int = 2,
        api_key: str = "EMPTY",
        extra_body: dict | None = None,
        name: str = "vlm_judge",
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://localhost:8000/v1', got {base_url!r}.")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be the name of the model the server serves (see its /v1/models).")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if answer_reduce not in ANSWER_REDUCTIONS:
            raise ValueError(f"answer_reduce must be one of {ANSWER_REDUCTIONS}, got {answer_reduce!r}.")
        for argument, value in (("top_logprobs", top_logprobs), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{argument} must be a positive integer, got {value!r}.")
        for argument, value in (("max_concurrency", max_concurrency), ("video_frames", video_frames)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{argument} must be a positive integer, got {value!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}.")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if mode == "logprobs" and (not yes_tokens or not no_tokens):
            raise ValueError("yes_tokens and no_tokens must each name at least one answer.")
        self.fields = template_fields(question)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.question = question
        self.mode = mode
        self.yes_tokens = {token.strip().lower() for token in yes_tokens}
        self.no_tokens = {token.strip().lower() for token in no_tokens}
        self.top_logprobs = top_logprobs
        self.answer_pattern = re.compile(answer_pattern or _NUMBER_PATTERN)
        self.answer_reduce = answer_reduce
        self.max_tokens = max_tokens
        self.unanswered = unanswered
        self.system_prompt = system_prompt
        self.reference_image_column = reference_image_column
        self.video_frames = video_frames
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.api_key = api_key
        self.extra_body = dict(extra_body or {})
        self.__name__ = name
        self._server_checked = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, base_url={self.base_url!r}, model={self.model!r})"

    # ---------------------------------------------------------------------------------------------------------------
    # Requests

    def _messages(self, question: str, image_urls: list[str]) -> list[dict]:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _request(self, messages: list[dict]) -> dict:
        request = {"model": self.model, "messages": messages, "temperature": 0.0}
        if self.mode == "logprobs":
            request.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            request.update(max_tokens=self.max_tokens)
        if self.extra_body:
            request["extra_body"] = self.extra_body
        return request

    def _unreachable(self, error: BaseException) -> VLMJudgeError:
        return VLMJudgeError(
            f"{self.__name__}: cannot reach the OpenAI-compatible server at {self.base_url} ({type(error).__name__}: "
            f"{error}). Start it (e.g. `vllm serve {self.model}`) or fix base_url."
        )

    def _not_served(self, models: list[str]) -> VLMServerError:
        return VLMServerError(
            f"{self.__name__}: the server at {self.base_url} does not serve the model {self.model!r}; it serves "
            f"{models}. Pass one of them as model=."
        )

    def check_server(self, timeout: float = 10.0) -> None:
        """Check, before anything loads, that the server answers `GET /models` within `timeout` seconds (at most the
        judge's own timeout) and serves `self.model`; else raise a [`VLMServerError`] (a `ValueError`) in one line.

        The trainer calls it at construction and the command line before it loads the pipeline, so a server that is
        down or serves another model is reported at once, not after the first rollout.
        """
        import openai

        client = openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=min(timeout, self.timeout), max_retries=0
        )
        try:
            models = [entry.id for entry in client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise VLMServerError(str(self._unreachable(error))) from None
        except openai.APIStatusError as error:
            raise VLMServerError(
                f"{self.__name__}: the server at {self.base_url} answered {error.status_code} to GET {self.base_url}"
                "/models: is base_url the root of an OpenAI-compatible API (usually ending in /v1), and api_key "
                "right?"
            ) from None
        finally:
            client.close()
        if self.model not in models:
            raise self._not_served(models)
        self._server_checked = True

    async def _check_server(self, client) -> None:
        """Once per judge: the server answers and serves `self.model` (else an error listing what it serves)."""
        import openai

        try:
            models = [entry.id async for entry in client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise self._unreachable(error) from None
        except openai.APIStatusError:  # a server without /v1/models: the first request will tell
            models = None
        if models is not None and self.model not in models:
            raise self._not_served(models)
        self._server_checked = True

    async def _complete(self, client, request: dict):
        """One chat completion, retried on timeouts, connection errors, 429 and 5xx answers."""
        import openai

        retryable = (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        for attempt in range(self.retries + 1):
            try:
                return await client.chat.completions.create(**request)
            except retryable as error:
                if attempt == self.retries:
                    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
                        raise self._unreachable(error) from None
                    raise
                await asyncio.sleep(0.5 * 2**attempt * (1 + random.random()))
            except openai.NotFoundError as error:
                raise VLMJudgeError(
                    f"{self.__name__}: the server at {self.base_url} answered 404 for the model {self.model!r}: {error}"
                ) from None
            except openai.BadRequestError as error:
                if self.mode == "logprobs" and "logprob" in str(error).lower():
                    raise VLMJudgeError(
                        f"{self.__name__}: the server at {self.base_url} refused top_logprobs={self.top_logprobs} "
                        f"({error}). Lower top_logprobs, raise the server's limit (vLLM: --max-logprobs), or score "
                        "from a written answer with mode='numeric'."
                    ) from None
                raise

    # ---------------------------------------------------------------------------------------------------------------
    # Answers

    def _p_yes(self, response) -> float | None:
        choice = response.choices[0]
        content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
        if not content or not content[0].top_logprobs:
            raise VLMJudgeError(
                f"{self.__name__}: the server at {self.base_url} returned no log-probs for the model {self.model!r}. "
                "Use a server that returns them (vLLM, sglang: `logprobs`/`top_logprobs` of chat completions), or "
                "score from a written answer with VLMJudge(..., mode='numeric') (parses a number; see answer_pattern)."
            )
        p_yes = p_no = 0.0
        for candidate in content[0].top_logprobs:
            token = candidate.token.strip().lower()
            if token in self.yes_tokens:
                p_yes += math.exp(candidate.logprob)
            elif token in self.no_tokens:
                p_no += math.exp(candidate.logprob)
        if p_yes + p_no == 0.0:
            return None
        return p_yes / (p_yes + p_no)

    def _number(self, response) -> float | None:
        text = response.choices[0].message.content or ""
        values = []
        for match in self.answer_pattern.finditer(text):
            try:
                values.append(float(match.group(1) if match.groups() else match.group(0)))
            except (TypeError, ValueError):
                continue
        if not values:
            return None
        if self.answer_reduce == "first":
            return values[0]
        return sum(values) if self.answer_reduce == "sum" else sum(values) / len(values)

    # ---------------------------------------------------------------------------------------------------------------
    # Scoring

    def _questions(self, prompts: list[str], columns: dict, num: int) -> list[str]:
        values = {"prompt": prompts, **columns}
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise ValueError(
                f"{self.__name__}: the question uses {{{missing[0]}}}, which is neither `prompt` nor a dataset column "
                f"(columns: {sorted(columns)})."
            )
        return [self.question.format(**{name: values[name][i] for name in self.fields}) for i in range(num)]

    def _image_urls(self, images: torch.Tensor, columns: dict) -> list[list[str]]:
        images = images.detach().cpu()  # one device-to-host copy for the whole batch
        if images.ndim == 5:  # videos: evenly spaced frames
            count = min(self.video_frames, images.shape[1])
            index = torch.linspace(0, images.shape[1] - 1, count).round().long()
            urls = [[image_to_data_url(frame) for frame in video[index]] for video in images]
        else:
            urls = [[image_to_data_url(image)] for image in images]
        if self.reference_image_column is not None:
            column = self.reference_image_column
            if column not in columns:
                raise ValueError(
                    f"{self.__name__}: reference_image_column={column!r} is not a dataset column "
                    f"(columns: {sorted(columns)})."
                )
            urls = [[_reference_image_url(columns[column][i], column), *u] for i, u in enumerate(urls)]
        return urls

    async def __call__(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float | None]:
        images = check_images(images, self.__name__, allow_video=True)
        prompts = check_prompts(prompts, len(images), self.__name__)
        if len(images) == 0:
            return []
        questions = self._questions(prompts, columns, len(images))
        image_urls = self._image_urls(images, columns)

        import openai

        semaphore = asyncio.Semaphore(self.max_concurrency)
        # A client per call: the trainer runs each step's rewards in a fresh event loop, which a pooled connection
        # of an earlier loop cannot be used from.
        async with openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0
        ) as client:
            if not self._server_checked:
                await self._check_server(client)

            async def score(i: int) -> float | None:
                async with semaphore:
                    response = await self._complete(client, self._request(self._messages(questions[i], image_urls[i])))
                return self._p_yes(response) if self.mode == "logprobs" else self._number(response)

            scores = await asyncio.gather(*(score(i) for i in range(len(images))))
        unanswered = sum(score is None for score in scores)
        if unanswered:
            what = (
                "yes nor no among its top log-probs"
                if self.mode == "logprobs"
                else "no number matching answer_pattern"
            )
            logger.warning(
                "%s: %d of %d answers had %s; scored %s.",
                self.__name__,
                unanswered,
                len(scores),
                what,
                self.unanswered,
            )
            scores = [self.unanswered if score is None else score for score in scores]
        return scores


def vqascore_judge(base_url: str, model: str, **kwargs) -> VLMJudge:
    """Text-image alignment as VQAScore measures it: P(yes) of 'Does this figure show "{prompt}"?'."""
    kwargs.setdefault("name", "vqascore")
    return VLMJudge(base_url, model, question=kwargs.pop("question", VQASCORE_QUESTION), **kwargs)


def unifiedreward_judge(base_url: str, model: str = "CodeGoat24/UnifiedReward-2.0-qwen-7b", **kwargs) -> VLMJudge:
    """UnifiedReward 2.0's point-wise score: the mean of its Alignment, Coherence and Style scores (1 to 5), read from
    its written answer."""
    kwargs.setdefault("name", "unifiedreward")
    kwargs.setdefault("mode", "numeric")
    kwargs.setdefault("answer_pattern", UNIFIEDREWARD_ANSWER_PATTERN)
    kwargs.setdefault("answer_reduce", "mean")
    kwargs.setdefault("max_tokens", 64)
    return VLMJudge(base_url, model, question=kwargs.pop("question", UNIFIEDREWARD_QUESTION), **kwargs)


def instruction_following_judge(base_url: str, model: str, **kwargs) -> VLMJudge:
    """Editing: P(yes) that the edited image follows the instruction (the prompt), shown after the source image taken
    from the dataset column `reference_image_column` (default `"image"`)."""
    kwargs.setdefault("name", "vlm_instruction_following")
    kwargs.setdefault("reference_image_column", "image")
    return VLMJudge(base_url, model, question=kwargs.pop("question", INSTRUCTION_FOLLOWING_QUESTION), **kwargs)
