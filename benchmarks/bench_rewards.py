"""Reward throughput: images (or videos) scored per second, model loading excluded.

By default every model reward runs on tiny random checkpoints (`trl_dancegrpo.rewards.tiny`) on the CPU: a check
that the batching and preprocessing cost little next to the models. With `--real`, the real architectures (open_clip
ViT-H-14 for HPS and CLIP score, transformers CLIP-H for PickScore, CLIP-L for the aesthetic predictor, BLIP ViT-L + BERT
for ImageReward) run with random
weights, written to a temporary folder in the real checkpoints' formats and loaded through the rewards' local-path
arguments, which is the speed of the real rewards:

    python benchmarks/bench_rewards.py                                  # tiny models, CPU
    python benchmarks/bench_rewards.py --real --device cuda             # ViT-H-14 HPS at 224 px, batch 32, bf16, ...

HPSv3 (Qwen2-VL-7B) runs only as a tiny model here; docs/rewards.md gives its size. VLM judges run in a server
(vLLM, sglang): their throughput is the server's.

Prints one line per reward and writes the results as JSON (`--output`).
"""

import argparse
import json
import os
import platform
import tempfile
import time

import torch


TINY_REWARDS = ("hps", "clip_score", "pickscore", "aesthetic", "imagereward", "hpsv3", "videoalign")
REAL_REWARDS = ("hps", "clip_score", "pickscore", "aesthetic", "imagereward")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="Real architectures with random weights.")
    parser.add_argument("--device", default="cpu", help="Device of the rewards (default: cpu).")
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, else fp32)."
    )
    parser.add_argument("--batch-size", type=int, default=32, help="The rewards' batch_size (default: 32).")
    parser.add_argument("--num-images", type=int, default=None, help="Images per call (default: 2 batches).")
    parser.add_argument("--image-size", type=int, default=None, help="Input size (default: 224 real, 32 tiny).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per reward (default: 5).")
    parser.add_argument("--rewards", nargs="+", default=None, help="Subset of rewards to run.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--output", default="benchmarks/bench_rewards.json", help="Where to write the JSON results.")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reward(reward, prompts, inputs, repeats: int, device: torch.device) -> dict:
    start = time.perf_counter()
    reward(prompts, inputs.clone())  # loads the model
    synchronize(device)
    first_call = time.perf_counter() - start
    # A fresh tensor per call: VideoAlign reuses its scores when the very same tensor is scored again.
    fresh = [inputs.clone() for _ in range(repeats)]
    synchronize(device)
    start = time.perf_counter()
    for batch in fresh:
        reward(prompts, batch)
    synchronize(device)
    elapsed = (time.perf_counter() - start) / repeats
    return {"items_per_s": len(inputs) / elapsed, "seconds_per_call": elapsed, "first_call_s": first_call}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def tiny_rewards(root: str, names, **kwargs) -> dict:
    from trl_dancegrpo.rewards import (
        AestheticReward,
        CLIPScoreReward,
        HPSReward,
        HPSv3Reward,
        ImageReward,
        PickScoreReward,
        VideoAlignReward,
        tiny,
    )

    tiny_clip = tiny.register_tiny_open_clip_config()
    rewards = {}
    if "hps" in names or "clip_score" in names:
        hps = tiny.save_tiny_hps_checkpoint(os.path.join(root, "hps.pt"))
        rewards["hps"] = HPSReward(checkpoint_path=hps, clip_model=tiny_clip, **kwargs)
        rewards["clip_score"] = CLIPScoreReward(clip_model=tiny_clip, pretrained=hps, **kwargs)
    if "pickscore" in names or "aesthetic" in names:
        clip = tiny.save_tiny_clip_model(os.path.join(root, "clip"))
        rewards["pickscore"] = PickScoreReward(clip, clip, **kwargs)
        aesthetic = tiny.save_tiny_aesthetic_checkpoint(os.path.join(root, "aesthetic.pth"))
        rewards["aesthetic"] = AestheticReward(aesthetic, clip, **kwargs)
    if "imagereward" in names:
        rewards["imagereward"] = ImageReward(**tiny.save_tiny_imagereward(os.path.join(root, "imagereward")), **kwargs)
    if "hpsv3" in names:
        hpsv3 = tiny.save_tiny_hpsv3(os.path.join(root, "hpsv3"))
        rewards["hpsv3"] = HPSv3Reward(**hpsv3, pixels=tiny.TINY_HPSV3_PIXELS, **{**kwargs, "batch_size": 8})
    if "videoalign" in names:
        videoalign = tiny.save_tiny_videoalign(os.path.join(root, "videoalign"))
        rewards["videoalign"] = VideoAlignReward("MQ", videoalign, **{**kwargs, "batch_size": 4})
    return {name: reward for name, reward in rewards.items() if name in names}


def _random_transformers_clip(path: str, vision: dict, text: dict, projection_dim: int) -> str:
    """A transformers CLIPModel with random weights (half precision on disk) and a CLIP image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from trl_dancegrpo.rewards.tiny import _clip_tokenizer

    config = CLIPConfig(
        text_config={**text, "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**vision, "image_size": 224, "patch_size": 14},
        projection_dim=projection_dim,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is faster on a GPU
        model = CLIPModel(config)
    model.half().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    _clip_tokenizer().save_pretrained(path)  # a character-level tokenizer: prompts are padded to 77 tokens anyway
    return path


def real_rewards(root: str, names, **kwargs) -> dict:
    import open_clip

    from trl_dancegrpo.rewards import AestheticReward, CLIPScoreReward, HPSReward, ImageReward, PickScoreReward
    from trl_dancegrpo.rewards.image import AestheticMLP

    rewards = {}
    if "hps" in names or "clip_score" in names:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = open_clip.create_model("ViT-H-14", pretrained=None)
        hps = os.path.join(root, "HPS_v2.1_compressed.pt")
        torch.save({"state_dict": {k: v.half().cpu() for k, v in model.state_dict().items()}}, hps)
        del model
        rewards["hps"] = HPSReward(checkpoint_path=hps, **kwargs)
        rewards["clip_score"] = CLIPScoreReward("ViT-H-14", pretrained=hps, **kwargs)
    if "pickscore" in names:  # CLIP-ViT-H-14 in transformers
        vision = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16}
        text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        pickscore = _random_transformers_clip(os.path.join(root, "pickscore"), vision, text, 1024)
        rewards["pickscore"] = PickScoreReward(pickscore, pickscore, **kwargs)
    if "aesthetic" in names:  # openai/clip-vit-large-patch14 + the 768-input MLP
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
        clip = _random_transformers_clip(os.path.join(root, "clip-l"), vision, text, 768)
        mlp = os.path.join(root, "sac+logos+ava1-l14-linearMSE.pth")
        torch.save(AestheticMLP(768).state_dict(), mlp)
        rewards["aesthetic"] = AestheticReward(mlp, clip, **kwargs)
    if "imagereward" in names:  # BLIP ViT-L/16 at 224 px + BERT-base with cross-attention + the MLP
        rewards["imagereward"] = ImageReward(**_random_imagereward(os.path.join(root, "imagereward")), **kwargs)
    return {name: reward for name, reward in rewards.items() if name in names}


def _random_imagereward(path: str) -> dict:
    """ImageReward.pt (real sizes, random weights, half precision on disk), med_config.json and a BERT vocabulary."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from trl_dancegrpo.rewards import tiny
    from trl_dancegrpo.rewards.imagereward import ImageRewardMLP

    files = tiny.save_tiny_imagereward(path)  # the tokenizer folder; the checkpoint and config are replaced
    med_config = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 512, "vocab_size": 30524, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": 0, "encoder_width": 768, "add_cross_attention": True,
    }  # fmt: skip
    with open(files["med_config_path"], "w") as f:
        json.dump(med_config, f)
    vision_config = BlipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=16, layer_norm_eps=1e-6,
    )  # fmt: skip
    text_config = BlipTextConfig(
        vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=512, is_decoder=True,
    )  # fmt: skip
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    state_dict = {tiny._imagereward_original_key("vision", k): v for k, v in vision.state_dict().items()}
    state_dict.update({tiny._imagereward_original_key("text", k): v for k, v in text.state_dict().items()})
    state_dict.update({f"mlp.{k}": v for k, v in ImageRewardMLP(768).state_dict().items()})
    torch.save(
        {k: v.half().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()},
        files["checkpoint_path"],
    )
    return files


# --------------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    names = args.rewards or (REAL_REWARDS if args.real else TINY_REWARDS)
    image_size = args.image_size or (224 if args.real else 32)
    num_images = args.num_images or 2 * args.batch_size
    torch.manual_seed(0)
    prompts = [f"a photo of a cat number {i}" for i in range(num_images)]
    images = torch.rand(num_images, 3, image_size, image_size, device=device)
    results = []
    with tempfile.TemporaryDirectory() as root:
        build = real_rewards if args.real else tiny_rewards
        rewards = build(root, names, device=device, dtype=dtype, batch_size=args.batch_size)
        for name, reward in rewards.items():
            if name == "videoalign":  # tiny videos of 4 frames, already on the tiny model's patch grid
                from trl_dancegrpo.rewards.tiny import TINY_VIDEOALIGN_FRAME_SIZE as size

                inputs = torch.rand(8, 4, 3, size, size, device=device)
                unit = "videos/s"
            else:
                inputs, unit = images, "images/s"
            timing = time_reward(reward, prompts[: len(inputs)], inputs, args.repeats, device)
            record = {
                "reward": name,
                "architecture": "real (random weights)" if args.real else "tiny",
                "device": str(device),
                "dtype": dtype,
                "batch_size": reward.batch_size,
                "inputs_per_call": len(inputs),
                "input_shape": list(inputs.shape[1:]),
                "unit": unit,
                **timing,
            }
            results.append(record)
            print(
                f"{name:12s} {record['items_per_s']:10.1f} {unit:9s} ({record['seconds_per_call'] * 1000:.1f} ms per "
                f"call of {len(inputs)}, batch {reward.batch_size}, {tuple(inputs.shape[1:])}, {dtype}, {device}; "
                f"first call incl. loading {record['first_call_s']:.2f} s)",
                flush=True,
            )
    environment = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"environment": environment, "results": results}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
