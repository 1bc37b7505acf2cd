# DanceGRPO on FLUX.1-dev with a LoRA and the HPS-v2.1 + CLIP score rewards (the paper's FLUX setting).
# Run: accelerate launch examples/train_flux_lora.py   (any model: python examples/train_flux_lora.py MODEL_ID)
import sys

from datasets import Dataset
from peft import LoraConfig

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer


model = sys.argv[1] if len(sys.argv) > 1 else "black-forest-labs/FLUX.1-dev"
prompts = Dataset.from_dict({"prompt": ["a lighthouse at night", "a bowl of ripe fruit", "a fox in the snow"]})
args = DanceGRPOConfig(output_dir="flux-dancegrpo", shift=3.0, height=720, width=720, learning_rate=3e-4)
trainer = DanceGRPOTrainer(
    model, ["hpsv2.1", "clip_score"], args=args, train_dataset=prompts, peft_config=LoraConfig(r=128, lora_alpha=256)
)
trainer.train()
trainer.save_model(args.output_dir)  # FluxPipeline.from_pretrained(model).load_lora_weights("flux-dancegrpo")
