"""Seconds per image of each editing task against text-to-image, on the bundled tiny-shapes model.

    .venv/bin/python bench/edit_speed.py [--repeats 10] [--size 64] [--threads 2]

Interleaves, per repeat, one image of each task at the same size and steps through the real
Engine: txt2img; inpaint (mask: the right half) at its default strength 1.0, which runs every
step like txt2img; inpaint with only_masked; outpaint adding 16 px to the right (a larger
canvas, so more pixels: its ratio is reported but is not a like-for-like cost); img2img at 0.75;
style with a content image (latent region transfer + img2img at 0.6). Prints min and median
seconds per image and each median's ratio to txt2img's. Target (the issue "Editing"): inpaint
costs at most 1.2× a txt2img of the same size and steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from easel.config import Settings
from easel.domain import GenerationParams, InputImages
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager

PROMPT = "a blue square on a white background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    side = args.size

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), preview_every=0)
        engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings)
        base = engine.generate(
            GenerationParams(
                "a red circle on a white background",
                model="tiny-shapes",
                seed=1,
                width=side,
                height=side,
            )  # fmt: skip
        ).images[0]
        mask = Image.new("L", base.size, 0)
        mask.paste(255, (side // 2, 0, side, side))
        reference = engine.generate(
            GenerationParams(
                "a green triangle on a yellow background",
                model="tiny-shapes",
                seed=2,
                width=side,
                height=side,
            )  # fmt: skip
        ).images[0]
        # name -> (request fields, inputs)
        setups: dict[str, tuple[dict[str, object], InputImages]] = {
            "txt2img": ({}, InputImages()),
            "inpaint": (
                {"task": "inpaint", "image": "i", "mask": "m"},
                InputImages(image=base, mask=mask),
            ),
            "inpaint, only masked": (
                {"task": "inpaint", "image": "i", "mask": "m", "only_masked": True},
                InputImages(image=base, mask=mask),
            ),
            "outpaint +16 px right": (
                {"task": "outpaint", "image": "i", "outpaint": {"right": 16}},
                InputImages(image=base),
            ),
            "img2img 0.75": ({"task": "img2img", "image": "i"}, InputImages(image=base)),
            "style (content + reference)": (
                {"task": "style", "image": "i", "style_image": "r"},
                InputImages(image=base, style_image=reference),
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in setups}
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, (fields, inputs) in setups.items():
                size = {} if "outpaint" in fields else {"width": side, "height": side}
                params = GenerationParams(
                    PROMPT,
                    model="tiny-shapes",
                    seed=repeat,
                    **size,
                    **fields,  # type: ignore[arg-type]
                )
                start = time.perf_counter()
                result = engine.generate(params, inputs=inputs)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        steps = result.params.num_inference_steps

    print(
        f"tiny-shapes, {side}x{side}, {steps} steps, {args.threads} threads, "
        f"{args.repeats} repeats, interleaved\n"
    )
    reference_median = statistics.median(times["txt2img"])
    print("| task | min s/image | median s/image | median / txt2img |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {min(values):.3f} | {median:.3f} | {median / reference_median:.2f} |")


if __name__ == "__main__":
    main()
