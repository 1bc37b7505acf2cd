#!/usr/bin/env bash
# One short GPU session (about 10 minutes on one H100/H200): measured peak memory of three recipes with random weights
# next to their `estimate-memory` figures, the seconds per iteration of the FLUX LoRA recipe at 512x512, and the
# trainer and SDE-window benchmarks at FLUX.1-dev size. Results go to benchmarks/gpu_check.jsonl (one JSON line per run) and
# benchmarks/bench_trainer_flux_dev.json; copy the figures, with the GPU named, into benchmarks/RESULTS.md.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv
rm -f benchmarks/gpu_check.jsonl
check() { timeout 240 python benchmarks/gpu_memory_check.py "$@" || echo "FAILED or timed out: $*"; }

# 1. FLUX.1-dev LoRA r=128 at 512x512, one sample per forward: memory and s/it (the first step is warm-up)
check --config examples/recipes/flux_lora.yaml --height 512 --width 512 --rollout_batch_size 1 \
      --reward_funcs brightness --max_steps 3
# 2. the FLUX LoRA recipe as written (720x720, 4 samples per forward): memory
check --config examples/recipes/flux_lora.yaml --reward_funcs brightness --max_steps 1
# 3. Stable Diffusion 1.4, full fine-tuning with CFG: memory
check --config examples/recipes/sd14.yaml --reward_funcs brightness --max_steps 1
# 4. the trainer benchmark at FLUX.1-dev size (rollout vs pipeline call, batched vs per-sample, loss overhead)
timeout 300 python benchmarks/bench_trainer.py --preset flux-dev --device cuda --bf16 --lora_rank 128 \
      --gradient_checkpointing --repeats 1 --json benchmarks/bench_trainer_flux_dev.json || echo "bench_trainer FAILED"
# 5. SDE windows at FLUX.1-dev size: full trajectory vs random 2-step vs sliding 4-step window, s/it side by side
timeout 300 python benchmarks/bench_sampler.py --preset flux-dev --device cuda --bf16 --lora_rank 128 --size 512 \
      --G 4 --repeats 1 --skip_learning --json benchmarks/bench_sampler_flux_dev.json || echo "bench_sampler FAILED"
# 6. context parallelism (needs 2 GPUs; skipped on one): 1 GPU vs 2 splitting one sample's sequence, Ulysses and ring
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  for type in ulysses ring; do
    timeout 300 python benchmarks/bench_context_parallel.py --device cuda --tokens 16384 --repeats 3 --type $type \
      || echo "bench_context_parallel $type FAILED"
  done
else
  echo "bench_context_parallel: skipped (one GPU)"
fi
cat benchmarks/gpu_check.jsonl
