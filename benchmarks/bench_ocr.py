"""Speed of the OCR reward (`ocr`, RapidOCR's PP-OCR ONNX models on the CPU): images scored per second.

    python benchmarks/bench_ocr.py                      # 512 px images with rendered text, 1 thread, then all cores
    python benchmarks/bench_ocr.py --size 1024 --num-images 16

Each image shows a short line of text drawn with PIL (the reward's cost depends on how much text it finds: a blank
image is timed too). The engine's first call (loading the models) is excluded and reported apart.
"""

import argparse
import os
import time

import numpy as np
import torch


WORDS = ["HELLO WORLD", "OPEN 24 HOURS", "DanceGRPO", "SALE 50% OFF", "Coffee & Tea", "EXIT", "Flow Matching", "2026"]


def render(text: str, size: int) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text(
        (size // 16, size // 2), text, fill="black", font=ImageFont.load_default(size=size // 12)
    )
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels (default: 512).")
    parser.add_argument("--num-images", type=int, default=16, help="Images per timed call (default: 16).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls (default: 2).")
    parser.add_argument(
        "--threads",
        type=lambda value: None if value == "all" else int(value),
        nargs="+",
        default=[1, None],
        help="onnxruntime threads per run, 'all' = every core (default: 1 all).",
    )
    args = parser.parse_args()

    from trl_dancegrpo.rewards import OCRReward

    words = [WORDS[i % len(WORDS)] for i in range(args.num_images)]
    images = torch.stack([render(word, args.size) for word in words])
    prompts = [f'a sign that says "{word}"' for word in words]
    blank = torch.ones_like(images)
    print(f"{args.num_images} images of {args.size}x{args.size} px per call, {os.cpu_count()} CPU cores")
    for threads in args.threads:
        reward = OCRReward(num_threads=threads)
        start = time.perf_counter()
        reward(prompts[:1], images[:1])
        first = time.perf_counter() - start
        for name, batch in (("text", images), ("blank", blank)):
            start = time.perf_counter()
            for _ in range(args.repeats):
                scores = reward(prompts, batch)
            elapsed = (time.perf_counter() - start) / args.repeats
            mean = sum(scores) / len(scores)
            print(
                f"threads={threads or 'all'} {name:5s}: {args.num_images / elapsed:6.2f} images/s "
                f"({1000 * elapsed / args.num_images:.0f} ms per image; mean score {mean:.3f}; first call incl. "
                f"loading {first:.2f} s)"
            )


if __name__ == "__main__":
    main()
