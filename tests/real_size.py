"""The real-size estimates of the recipes (`trl-dancegrpo estimate-memory`, about a minute of one core each), started in
the background as soon as the tests are collected, so that they run on the core the other tests leave free; the tests
that check them wait for their results."""

import glob
import os
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor


RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "recipes", "*.yaml")))
GOAL = "goal-flux-lora-512"  # FLUX.1-dev LoRA r=128 (default targets), 512x512, one sample per forward, HPS-v2.1
TESTS = {"test_every_recipe_at_real_size", "test_goal_flux_lora_512_under_40_gb"}
# started first, so that the short ones fill in at the end
_LONGEST = ("hunyuan", "skyreels", "wan", "qwen", "full", "flux2_dev", "ltx2")


def command(name: str, out_dir: str) -> list[str]:
    """The command line of one estimate: a recipe as written, or the FLUX goal (its recipe at 512x512, one sample per
    forward, HPS-v2.1, both savers)."""
    recipe = os.path.join(os.path.dirname(RECIPES[0]), "flux_lora.yaml" if name == GOAL else name)
    argv = [sys.executable, "-m", "trl_dancegrpo", "estimate-memory", "--config", recipe]
    if name == GOAL:
        argv += ["--height", "512", "--width", "512", "--rollout_batch_size", "1", "--reward_funcs", "hpsv2.1"]
        argv += ["--offload_text_encoders", "true", "--offload_reward_models", "true"]
    return [*argv, "--json", os.path.join(out_dir, "estimate.json"), "--output_dir", os.path.join(out_dir, "o")]


def _run(name: str, root: str) -> tuple[int, str, str]:
    out_dir = os.path.join(root, name.replace(".", "-"))
    os.makedirs(out_dir)
    done = subprocess.run(command(name, out_dir), capture_output=True, text=True, timeout=3600)
    return done.returncode, done.stdout + done.stderr, out_dir


class RealSizeRuns:
    """Starts the estimates the selected tests need: `result(name)` waits for one (exit code, output, JSON folder)."""

    def __init__(self, items):
        names = []
        for item in items:
            if getattr(item, "originalname", None) == "test_every_recipe_at_real_size":
                names.append(os.path.basename(item.callspec.params["recipe"]))
            elif getattr(item, "originalname", None) == "test_goal_flux_lora_512_under_40_gb":
                names.append(GOAL)
        names.sort(key=lambda name: not any(word in name for word in _LONGEST))
        # one core is the other tests'; when only these tests run, all cores are theirs
        cores = os.cpu_count() or 1
        only_these = all(getattr(item, "originalname", None) in TESTS for item in items)
        workers = max(1, min(4, cores if only_these else cores - 1))
        self._root = tempfile.TemporaryDirectory(prefix="dancegrpo-real-size-")
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures: dict[str, Future] = {name: self._pool.submit(_run, name, self._root.name) for name in names}

    def result(self, name: str) -> tuple[int, str, str]:
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._root.cleanup()
