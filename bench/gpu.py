"""Full-size Z-Image-Turbo and SDXL on a GPU: Easel's engine against bare diffusers, eager and
compiled, with model FLOPs utilisation and peak memory (issue 33, item 4). Never run by CI.

    .venv/bin/python bench/gpu.py                      # on a machine with an NVIDIA GPU
    .venv/bin/python bench/gpu.py --tiny               # tiny configs on the CPU: checks the script

Builds, with random (seeded) weights, the Z-Image-Turbo transformer and the SDXL UNet from their
published configs (below, with their source), each in a complete pipeline saved as a diffusers
folder in bf16 and added to the catalog of a temporary EASEL_HOME, then for each model:

  1. loads it through Easel's real ModelManager (``Engine.generate`` on the catalog entry), and
     makes a bare diffusers pipeline of the same loaded components (same scheduler, arguments and
     CPU generator as the engine's call, no step callback);
  2. counts the FLOPs of one image (``torch.utils.flop_counter`` around one bare pipeline call:
     text encoder, every denoiser call, VAE decode) and of one denoiser forward;
  3. times, for each variant, the engine and bare diffusers interleaved (E B E B ...) after two
     warm-up calls each (compiling, and recording CUDA graphs, happen there): seconds per image
     (min and median of ``--repeats``), engine / bare, whether their pixels are identical, MFU
     (FLOPs of one image / seconds / the GPU's peak dense bf16 FLOP/s, looked up from its name),
     the peak memory allocated during the timed calls, and the first call's time (compile cost).

Variants: ``eager``; ``regional`` (``compile_repeated_blocks(fullgraph=True)``: only the
repeated transformer blocks are compiled, once per distinct block, which cuts compile time);
``regional-cudagraphs`` (the same with ``mode="reduce-overhead"``: each compiled block replays as
a CUDA graph; shapes are static here); ``whole-cudagraphs`` (``torch.compile`` of the whole
denoiser in ``reduce-overhead`` mode; slow to compile, so not in the default set). Each variant is
guarded: a failure is recorded and the next one runs. ``--budget`` seconds (default 450) bounds
the run: a variant not started by then is skipped and says so, so that the whole script stays
under 8 minutes on an H100/H200.

Sizes and steps: Z-Image 1024x1024, 8 steps (the family's defaults, guidance 0, flow Euler);
SDXL 1024x1024, 4 steps, guidance 0 (SDXL-Turbo-class: no classifier-free guidance), Euler. The
text encoders have their published widths but 2 layers unless ``--full-text-encoders`` (they run
once per image; Qwen3-4B alone would add 8 GB to build, save and load). The tokenizers are built in
memory with character vocabularies (no hub access), so a prompt is a few more tokens than with the
real tokenizers (Z-Image: ~80 caption tokens against ~25; under 2 % of its 4,096 image tokens).

Results: a markdown table on stdout, and ``gpu.json`` + ``gpu.md`` in ``--out`` (default $OUT
when set).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "a red circle on a grey background"
SEED = 1234

# --- published configs --------------------------------------------------------------------------
# Z-Image-Turbo's transformer: Tongyi-MAI/Z-Image-Turbo on the Hugging Face hub,
# transformer/config.json ("_class_name": "ZImageTransformer2DModel"); the values agree with the
# defaults of diffusers' ZImageTransformer2DModel except axes_lens (the hub file: [1536, 512, 512];
# the class: [1024, 512, 512]). About 6.15B parameters.
ZIMAGE_TRANSFORMER = {
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
# Tongyi-MAI/Z-Image-Turbo vae/config.json (FLUX.1's autoencoder: 16 latent channels)
ZIMAGE_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json (Qwen3-4B)
ZIMAGE_TEXT = {
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

# SDXL's UNet: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (SDXL-Turbo's UNet,
# stabilityai/sdxl-turbo, has the same architecture). About 2.57B parameters.
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json (CLIP ViT-L/14) and
# text_encoder_2/config.json (OpenCLIP ViT-bigG/14, CLIPTextModelWithProjection)
SDXL_TEXT = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
SDXL_TEXT_2 = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# --tiny: the same classes, small enough to run on a CPU in seconds
TINY = {
    "zimage_transformer": {
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": 64,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": 32,
        "axes_dims": [8, 12, 12],
        "axes_lens": [256, 64, 64],
    },
    "zimage_text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
    },
    "sdxl_unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "sample_size": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [4, 8],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": [1, 2],
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
    },
    "sdxl_text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    },
    "sdxl_text_2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    },
    "vae": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    },
}

# peak dense bf16 tensor FLOP/s (no sparsity), from NVIDIA's data sheets; the first name
# fragment found in torch.cuda.get_device_name() wins, so the specific ones come first
PEAK_BF16_TFLOPS = [
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
]

VARIANTS = ["eager", "regional", "regional-cudagraphs", "whole-cudagraphs"]
DEFAULT_VARIANTS = ["eager", "regional", "regional-cudagraphs"]


@dataclass
class ModelSpec:
    key: str  # catalog id
    label: str
    steps: int
    guidance: float
    scheduler: str  # Easel's scheduler name
    size: int


MODELS = {
    "zimage": ModelSpec("zimage-turbo-random", "Z-Image-Turbo", 8, 0.0, "flow_euler", 1024),
    "sdxl": ModelSpec("sdxl-random", "SDXL (Turbo-class)", 4, 0.0, "euler", 1024),
}


@dataclass
class Row:
    model: str
    variant: str
    engine: str  # "easel" or "bare"
    seconds: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    error: str | None = None

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


# --- building the models ------------------------------------------------------------------------


def char_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits + ",.!?-'"
    return [*chars, *(c + "</w>" for c in chars)]


def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    tokens = [*char_vocab(), "<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def qwen_tokenizer() -> Any:
    """Byte-level BPE over the 256 byte symbols, with Qwen's chat markers and a chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.model_max_length = 512
    return tokenizer


@contextmanager
def built_on(device: str) -> Any:
    """Modules made inside are created on ``device`` (random init there is fast)."""
    with torch.device(device):
        yield


def build_zimage(folder: Path, *, tiny: bool, text_layers: int | None, device: str) -> None:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    transformer_config = TINY["zimage_transformer"] if tiny else ZIMAGE_TRANSFORMER
    text_config = {**ZIMAGE_TEXT, **(TINY["zimage_text"] if tiny else {})}
    if text_layers is not None:
        text_config["num_hidden_layers"] = text_layers
    text_config["vocab_size"] = len(tokenizer)  # the character tokenizer's ids
    vae_config = {**ZIMAGE_VAE, **(TINY["vae"] if tiny else {})}
    with built_on(device):
        torch.manual_seed(0)
        transformer = ZImageTransformer2DModel(**transformer_config).to(torch.bfloat16)
        torch.manual_seed(1)
        vae = AutoencoderKL(**vae_config).to(torch.bfloat16)
        torch.manual_seed(2)
        text_encoder = Qwen3Model(Qwen3Config(**text_config)).to(torch.bfloat16)
    pipe = ZImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl(folder: Path, *, tiny: bool, text_layers: int | None, device: str) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(config: dict[str, Any], tiny_changes: dict[str, Any]) -> CLIPTextConfig:
        values = {**config, **(tiny_changes if tiny else {})}
        if text_layers is not None:
            values["num_hidden_layers"] = text_layers
        values |= {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
        return CLIPTextConfig(**values)

    unet_config = TINY["sdxl_unet"] if tiny else SDXL_UNET
    vae_config = {**SDXL_VAE, **(TINY["vae"] if tiny else {})}
    with built_on(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config).to(torch.bfloat16)
        torch.manual_seed(1)
        vae = AutoencoderKL(**vae_config).to(torch.bfloat16)
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(text(SDXL_TEXT, TINY["sdxl_text"])).to(torch.bfloat16)
        torch.manual_seed(3)
        text_encoder_2 = CLIPTextModelWithProjection(text(SDXL_TEXT_2, TINY["sdxl_text_2"])).to(
            torch.bfloat16
        )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


BUILDERS: dict[str, Callable[..., None]] = {"zimage": build_zimage, "sdxl": build_sdxl}


# --- measuring ----------------------------------------------------------------------------------


def peak_tflops(device: str, override: float | None) -> tuple[str, float | None]:
    if override is not None:
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        return name, override
    if not device.startswith("cuda"):
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name()
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return name, tflops
    return name, None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def denoiser_of(pipe: Any) -> torch.nn.Module:
    module: torch.nn.Module = getattr(pipe, "transformer", None) or pipe.unet
    return module


def count_flops(call: Callable[[], Any], denoiser: torch.nn.Module) -> tuple[float, float, int]:
    """FLOPs of one image (everything ``call`` runs), of one denoiser forward, and the number
    of denoiser calls per image."""
    from torch.utils.flop_counter import FlopCounterMode

    captured: dict[str, Any] = {}
    calls = 0

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        captured.setdefault("inputs", (args, kwargs))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with FlopCounterMode(display=False) as counter:
            call()
    finally:
        handle.remove()
    per_image = float(counter.get_total_flops())
    args, kwargs = captured["inputs"]
    with torch.no_grad(), FlopCounterMode(display=False) as one:
        denoiser(*args, **kwargs)
    return per_image, float(one.get_total_flops()), calls


def uncompile(module: torch.nn.Module) -> None:
    """Undo ``Module.compile`` on ``module`` and every submodule, and drop dynamo's caches."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
    torch._dynamo.reset()


def apply_variant(denoiser: Any, variant: str, device: str) -> None:
    uncompile(denoiser)
    if variant == "eager":
        return
    if variant.endswith("cudagraphs") and not device.startswith("cuda"):
        raise RuntimeError("CUDA graphs need a CUDA device")
    mode = "reduce-overhead" if variant.endswith("cudagraphs") else None
    if variant.startswith("regional"):
        denoiser.compile_repeated_blocks(fullgraph=True, mode=mode)
    else:
        denoiser.compile(mode=mode)


def identical(a: Any, b: Any) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def run_model(
    name: str,
    spec: ModelSpec,
    engine: Any,
    args: argparse.Namespace,
    device: str,
    peak: float | None,
    deadline: float,
    log: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    from easel.domain import GenerationParams

    size = args.size or spec.size
    params = GenerationParams(
        prompt=PROMPT,
        model=spec.key,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        width=size,
        height=size,
        seed=SEED,
        scheduler=spec.scheduler,
    )
    started = time.perf_counter()
    first_image = engine.generate(params).images[0]  # loads through the ModelManager
    loaded = engine.models.get_pipeline(spec.key)
    log(f"{name}: loaded and first image through Easel in {time.perf_counter() - started:.1f} s")
    pipe = loaded.pipeline
    bare = type(pipe)(**pipe.components)
    bare.set_progress_bar_config(disable=True)
    # the scheduler the engine made for the request, fresh (same class and config)
    bare.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)

    def run_bare() -> Any:
        return bare(
            prompt=PROMPT,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            width=size,
            height=size,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]

    def run_easel() -> Any:
        return engine.generate(params).images[0]

    denoiser = denoiser_of(pipe)
    flops, denoiser_flops, calls = count_flops(run_bare, denoiser)
    info = {
        "size": size,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "scheduler": spec.scheduler,
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "flops_per_image": flops,
        "denoiser_flops_per_call": denoiser_flops,
        "denoiser_calls_per_image": calls,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    log(
        f"{name}: {si(info['denoiser_parameters'])}denoiser parameters; {si(flops)}FLOP per "
        f"image, {si(denoiser_flops)}FLOP per denoiser call x {calls}"
    )
    runs = {"easel": run_easel, "bare": run_bare}
    rows: list[Row] = []
    for variant in args.variants:
        variant_rows = {e: Row(spec.label, variant, e) for e in runs}
        rows += variant_rows.values()
        if time.perf_counter() > deadline:
            for row in variant_rows.values():
                row.error = "skipped: --budget reached"
            log(f"{name} {variant}: skipped, the budget is spent")
            continue
        try:
            apply_variant(denoiser, variant, device)
            images: dict[str, Any] = {}
            for engine_name, run in runs.items():  # warm-up: compile, record graphs
                for attempt in range(2):
                    sync(device)
                    begin = time.perf_counter()
                    images[engine_name] = run()
                    sync(device)
                    if attempt == 0:
                        variant_rows[engine_name].first_call_s = time.perf_counter() - begin
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats):
                for engine_name, run in runs.items():
                    sync(device)
                    begin = time.perf_counter()
                    run()
                    sync(device)
                    variant_rows[engine_name].seconds.append(time.perf_counter() - begin)
            for row in variant_rows.values():
                if device.startswith("cuda"):
                    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                if peak is not None and row.best:
                    row.mfu = flops / row.best / (peak * 1e12)
            same = identical(images["easel"], images["bare"])
            easel_row, bare_row = variant_rows["easel"], variant_rows["bare"]
            assert easel_row.best is not None and bare_row.best is not None
            log(
                f"{name} {variant}: easel {easel_row.best:.3f} s, bare {bare_row.best:.3f} s "
                f"(easel/bare {easel_row.best / bare_row.best:.3f}x), pixels "
                f"{'identical' if same else 'DIFFER'}; first call {easel_row.first_call_s:.1f} s"
            )
            info.setdefault("identical", {})[variant] = same
            if variant == "eager":
                info["eager_matches_first_image"] = identical(images["easel"], first_image)
        except Exception as exc:  # record it, go on with the next variant
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            for row in variant_rows.values():
                row.error = message[:300]
            log(f"{name} {variant}: FAILED {message[:300]}")
    uncompile(denoiser)
    return rows, info


def si(value: float) -> str:
    """1.23e12 -> "1.23 T", 4.5e6 -> "4.50 M"."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}"
    return f"{value:.0f} "


def markdown(rows: list[Row], infos: dict[str, dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| model | variant | engine | s/image min | median | easel/bare | MFU | peak GiB "
        "| first call s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    bare_best = {(r.model, r.variant): r.best for r in rows if r.engine == "bare"}
    for row in rows:
        if row.error:
            lines.append(f"| {row.model} | {row.variant} | {row.engine} | {row.error} ||||||")
            continue
        assert row.best is not None
        other = bare_best.get((row.model, row.variant))
        ratio = f"{row.best / other:.3f}" if row.engine == "easel" and other else ""
        lines.append(
            f"| {row.model} | {row.variant} | {row.engine} | {row.best:.3f} | "
            f"{statistics.median(row.seconds):.3f} | {ratio} | "
            + (f"{row.mfu:.1%}" if row.mfu is not None else "-")
            + " | "
            + (f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-")
            + f" | {row.first_call_s:.1f} |"
        )
    lines.append("")
    for model, info in infos.items():
        lines.append(
            f"- {model}: {info['size']}², {info['steps']} steps, guidance {info['guidance']}, "
            f"{info['scheduler']}; denoiser {si(info['denoiser_parameters'])}parameters; "
            f"{si(info['flops_per_image'])}FLOP per image ({info['denoiser_calls_per_image']} "
            f"denoiser calls of {si(info['denoiser_flops_per_call'])}FLOP); engine and bare "
            f"pixels identical: {info.get('identical', {})}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS, metavar="VARIANT"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed images per engine")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; see above")
    parser.add_argument("--size", type=int, help="image size (default 1024; --tiny 64)")
    parser.add_argument("--full-text-encoders", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s, if unknown")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (runs on a CPU)")
    parser.add_argument("--work", type=Path, help="where to save the models (default: a temp dir)")
    out_default = os.environ.get("OUT")
    parser.add_argument("--out", type=Path, default=Path(out_default) if out_default else None)
    args = parser.parse_args()
    if args.tiny and args.size is None:
        args.size = 64

    import diffusers
    import transformers

    from easel.config import Settings
    from easel.engine.generate import Engine
    from easel.models.catalog import ModelCatalog
    from easel.models.loader import ModelManager, pick_device

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    deadline = started + args.budget

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    device = pick_device("auto")
    gpu_name, peak = peak_tflops(device, args.peak_tflops)
    log(
        f"device {device} ({gpu_name}); peak bf16 "
        + (f"{peak:.0f} TFLOP/s" if peak else "unknown (no MFU)")
        + f"; torch {torch.__version__}, diffusers {diffusers.__version__}"
    )
    text_layers = None if args.full_text_encoders else (None if args.tiny else 2)
    rows: list[Row] = []
    infos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        home = Path(tmp) / "home"
        settings = Settings(home=home, preview_every=0, model_cache_gb=1000.0)
        catalog = ModelCatalog(settings)
        engine = Engine(ModelManager(settings, catalog), settings)
        for name in args.models:
            spec = MODELS[name]
            folder = Path(tmp) / name
            begin = time.perf_counter()
            BUILDERS[name](folder, tiny=args.tiny, text_layers=text_layers, device=device)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            catalog.add(spec.key, str(folder), description="bench/gpu.py, random weights")
            log(f"{name}: built and saved in {time.perf_counter() - begin:.1f} s")
            model_rows, info = run_model(name, spec, engine, args, device, peak, deadline, log)
            rows += model_rows
            infos[spec.label] = info
            engine.models.unload(spec.key)
    header = (
        f"bench/gpu.py{' --tiny' if args.tiny else ''} on {gpu_name} ({device}); torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}; peak bf16 "
        + (f"{peak:.0f} TFLOP/s" if peak else "unknown")
        + f"; {args.repeats} timed images per engine after 2 warm-ups; total "
        f"{time.perf_counter() - started:.0f} s"
    )
    table = markdown(rows, infos, header)
    print("\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.md").write_text(table)
        payload = {
            "header": header,
            "device": gpu_name,
            "peak_bf16_tflops": peak,
            "models": infos,
            "rows": [asdict(r) | {"best": r.best} for r in rows],
            "argv": sys.argv[1:],
        }
        (args.out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'}")
    if any(math.isnan(r.best or 0.0) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
