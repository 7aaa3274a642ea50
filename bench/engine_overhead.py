"""Engine overhead and Easel's CPU defaults, measured side by side in one process.

    .venv/bin/python bench/engine_overhead.py [--repeats 3] [--size 256] [--steps 4] [--tiny]

Builds an SD1.5-architecture pipeline with random weights (the real UNet and VAE configs, a
2-layer CLIP text encoder with a character vocabulary: random weights are fine for speed, and the
UNet dominates), saves it as a diffusers folder, and times, interleaved, per image:

  A. engine         Engine.generate through the real ModelManager (Easel's defaults: bf16 weights
                    + channels_last on a CPU with native bf16, else fp32)
  B. bare (same)    a bare diffusers call on the same loaded components, generator and arguments
  C. bare fp32      StableDiffusionPipeline.from_pretrained(folder) at diffusers' defaults (fp32)

It prints min and median seconds per image, the engine/bare ratio (target <= 1.03), whether A and
B give identical pixels, the speed-up of A over C and the PSNR between their images. ``--tiny``
swaps in a small UNet/VAE to check the script itself in seconds.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from easel.config import Settings
from easel.domain import GenerationParams
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager

PROMPT = "a red circle on a grey background"
SEED = 1234
GUIDANCE = 7.5


def build_sd15_like(path: Path, *, tiny: bool) -> Path:
    """An SD1.5-architecture StableDiffusionPipeline with random (seeded) weights, saved fp32."""
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            sample_size=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
    else:
        # UNet2DConditionModel's defaults are SD 1.x's UNet except for the text width (768)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
            scaling_factor=0.18215,
        )
    # a character-level CLIP vocabulary: every character alone and as a word end
    chars = string.ascii_lowercase + string.digits + ",.!?-'"
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokens),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=2,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed images per configuration")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="small UNet/VAE: check the script")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # 1. build and save the model; load it the Easel way and the bare-diffusers way
        started = time.perf_counter()
        folder = build_sd15_like(Path(tmp) / "sd15-random", tiny=args.tiny)
        gc.collect()
        settings = Settings(home=Path(tmp) / "home", preview_every=0)
        engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings)
        loaded = engine.models.get_pipeline(str(folder))
        same = type(loaded.pipeline)(
            **{
                **loaded.pipeline.components,
                "scheduler": EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            }
        )
        fp32 = StableDiffusionPipeline.from_pretrained(folder)
        for pipe in (same, fp32):
            pipe.set_progress_bar_config(disable=True)
        print(f"built and loaded in {time.perf_counter() - started:.0f} s")

        # 2. the three ways to make one image, with the same request
        params = GenerationParams(
            prompt=PROMPT,
            model=str(folder),
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            width=args.size,
            height=args.size,
            seed=SEED,
            scheduler="euler",
        )
        call = dict(
            prompt=PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            width=args.size,
            height=args.size,
        )

        def bare(pipe: StableDiffusionPipeline) -> Callable[[], Image.Image]:
            def run() -> Image.Image:
                generator = torch.Generator().manual_seed(SEED)
                return pipe(**call, generator=generator).images[0]

            return run

        runs: dict[str, Callable[[], Image.Image]] = {
            "engine": lambda: engine.generate(params).images[0],
            "bare (same)": bare(same),
            "bare fp32": bare(fp32),
        }

        # 3. warm up once each, then time interleaved: A B C, A B C, ...
        images = {name: run() for name, run in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    # 4. report
    stats = {name: (min(t), statistics.median(t)) for name, t in times.items()}
    kind = "tiny UNet/VAE" if args.tiny else "SD1.5-architecture UNet + VAE"
    print(
        f"\n{kind}, random weights, {args.size}x{args.size}, {args.steps} steps, CFG "
        f"{GUIDANCE}, euler; {args.repeats} timed runs each after a warm-up, interleaved; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; Easel dtype "
        f"{str(loaded.dtype).removeprefix('torch.')}\n"
    )
    print("| configuration | s/image min | s/image median |")
    print("|---|---|---|")
    labels = {
        "engine": f"Easel engine (defaults: {str(loaded.dtype).removeprefix('torch.')}"
        + (" + channels_last)" if loaded.dtype == torch.bfloat16 else ")"),
        "bare (same)": "bare diffusers, same components and arguments",
        "bare fp32": "bare diffusers at its defaults (fp32)",
    }
    for name, (low, mid) in stats.items():
        print(f"| {labels[name]} | {low:.2f} | {mid:.2f} |")
    print()
    for name, t in times.items():
        print(f"{name} runs (s): {', '.join(f'{x:.2f}' for x in t)}")
    ratio_min = stats["engine"][0] / stats["bare (same)"][0]
    ratio_median = stats["engine"][1] / stats["bare (same)"][1]
    identical = np.array_equal(np.asarray(images["engine"]), np.asarray(images["bare (same)"]))
    speedup_min = stats["bare fp32"][0] / stats["engine"][0]
    speedup_median = stats["bare fp32"][1] / stats["engine"][1]
    print()
    print(f"engine / bare diffusers: {ratio_min:.3f}x (min), {ratio_median:.3f}x (median)")
    print(f"engine and bare pixels identical: {'yes' if identical else 'NO'}")
    print(
        f"Easel defaults vs diffusers fp32: {speedup_min:.2f}x faster (min), "
        f"{speedup_median:.2f}x (median); PSNR {psnr(images['engine'], images['bare fp32']):.1f} dB"
    )


if __name__ == "__main__":
    main()
