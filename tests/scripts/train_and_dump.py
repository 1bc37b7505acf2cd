"""Train one step on a tiny pipeline and dump this process's advantages and the final weights (for test_distributed)."""

import sys

import torch
import transformers
from datasets import Dataset

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.rewards import brightness


transformers.logging.set_verbosity_error()
pipeline_path, out_dir, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
args = DanceGRPOConfig(
    output_dir=out_dir,
    num_generations=4,
    num_inference_steps=3,
    per_device_train_batch_size=per_device,
    rollout_batch_size=2,  # the same forward shapes whatever the number of processes
    max_steps=1,
    height=32,
    width=32,
    learning_rate=1e-1,
    optim="sgd",
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
trainer = DanceGRPOTrainer(
    pipeline_path,
    brightness,
    args=args,
    train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a car", "a tree"]}),
)
captured = {}
generate_and_score = trainer._generate_and_score
trainer._generate_and_score = lambda inputs: captured.setdefault("batch", generate_and_score(inputs))
trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {
        "advantages": captured["batch"]["advantages"].cpu(),
        "params": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).cpu(),
    },
    f"{out_dir}/rank{rank}.pt",
)
