"""Easel against diffusers and OpenVINO on the CPU, side by side in one run (issue 33's table).

    .venv/bin/python bench/compare.py [SIZE ...] [--repeats 3] [--steps 4] [--engines ...]

SIZE defaults to 256 512. The model is SD 1.5's architecture at full size with random (seeded)
weights, built from the published configs below and saved once, fp32 safetensors, to a cache
folder (``--cache``, default ~/.cache/easel/bench), so every engine loads the same weights:

  easel        Easel's engine: ``Engine.generate`` on a catalog entry (models.toml in a temporary
               EASEL_HOME) naming the folder, through the real ModelManager and its CPU defaults
               (UNet, VAE decoder and text encoder through OpenVINO when it is installed: the
               warm-up converts them, in the background as a server would, and waits for them)
  easel-torch  the same with ``cpu_backend="torch"``: Easel's PyTorch path
  fp32         ``StableDiffusionPipeline.from_pretrained(folder)``: diffusers' defaults
  bf16         the same in bfloat16, UNet and VAE in channels_last
  openvino     optimum-intel's ``OVStableDiffusionPipeline`` exported from the folder (once, kept
               beside it), static shapes, in its own virtual environment (bench/openvino_worker.py;
               ``--openvino-python``, default .venv-openvino/bin/python; skipped when missing)

Each makes one image per call: the same prompt, 4 steps of Euler with classifier-free guidance
7.5, the noise from a CPU generator with the same seed. After one warm-up call each per size
(OpenVINO compiles its static shapes then, untimed), the engines run interleaved, A B C D, A B C
D, ..., and the table gives the fastest of ``--repeats`` calls (seconds per image, the whole
pipeline call: text encoder, denoising, VAE decode). The build machine is shared: before each
timed call the script waits until the CPUs are ``--idle`` (default 90 %) idle over 2 s, at most
``--max-wait`` seconds, and prints the idle share it saw. Then the ratios (Easel / OpenVINO, diffusers
fp32 / Easel) and the PSNR of Easel's image against the eager fp32 and bf16 diffusers images.

``--tiny`` swaps in a small UNet/VAE/CLIP of the same classes, to check the script in seconds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PROMPT = "a red circle on a grey background"
SEED = 1234
GUIDANCE = 7.5
REPO = Path(__file__).resolve().parent.parent

# --- SD 1.5's published configs -----------------------------------------------------------------
# Source: the model repository stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face hub
# (formerly runwayml/stable-diffusion-v1-5), files unet/config.json, vae/config.json,
# text_encoder/config.json and scheduler/scheduler_config.json; the same values as diffusers'
# own conversion script (scripts/convert_original_stable_diffusion_to_diffusers.py with
# v1-inference.yaml). Keys the class sets to the same default are left out.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,  # AutoencoderKL's default, SD 1.x's latent scale
}
SD15_TEXT = {  # CLIP ViT-L/14's text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_SCHEDULER = {  # PNDMScheduler's config; every engine here swaps in Euler built from it
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# --tiny: the same classes, small, to check this script
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "layers_per_block": 1,
    "sample_size": 32,
}
TINY_VAE = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "sample_size": 64,
}
TINY_TEXT = {
    **SD15_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 64,
}


def configs(tiny: bool) -> dict[str, dict[str, Any]]:
    if tiny:
        return {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "sched": SD15_SCHEDULER}
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT, "sched": SD15_SCHEDULER}


def clip_tokenizer() -> Any:
    """A character-level CLIP tokenizer (no hub access): every character alone and as a word
    end. Its ids are a small part of the text encoder's 49,408 rows, which changes nothing in
    the arithmetic (77 tokens are embedded and encoded whatever they are)."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?-'"
    # the markers last, as in CLIP's vocabulary: with eos_token_id 2 (the published config's
    # value) CLIPTextModel pools at the highest id, the end marker
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def model_folder(cache: Path, tiny: bool) -> Path:
    """The saved random-weights pipeline for these configs, built on first use."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = configs(tiny)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"sd15-random-{'tiny-' if tiny else ''}{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"]))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(spec["sched"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    published_text_keys(partial / "text_encoder" / "model.safetensors")
    partial.rename(folder)
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def published_text_keys(file: Path) -> None:
    """Rename the text encoder's weights to the published checkpoint's names (``text_model.``
    first). transformers 5.2x saves CLIPTextModel without that prefix and reads both; the
    transformers that optimum-intel allows (< 5.6) reads only the prefixed names and would
    export a freshly initialised encoder instead."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    if all(name.startswith("text_model.") for name in tensors):
        return
    renamed = {
        n if n.startswith("text_model.") else f"text_model.{n}": t for n, t in tensors.items()
    }
    save_file(renamed, file, metadata={"format": "pt"})


# --- engines ------------------------------------------------------------------------------------


class OpenVinoEngine:
    """bench/openvino_worker.py in optimum-intel's interpreter, one JSON line each way."""

    def __init__(
        self, python: Path, folder: Path, steps: int, scratch: Path, threads: int = 0
    ) -> None:
        self.steps = steps
        self.scratch = scratch
        self.calls = 0
        worker = REPO / "bench" / "openvino_worker.py"
        self.proc = subprocess.Popen(
            [str(python), str(worker), str(folder), f"{folder}-ov", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._read()
        self.version = f"openvino {hello['openvino']}, CPU precision {hello['precision']}"

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the OpenVINO worker ended (exit {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error", "the OpenVINO worker failed"))
        return answer

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def prepare(self, size: int) -> float:
        return float(self.ask({"op": "prepare", "size": size})["seconds"])

    def run(self, size: int) -> tuple[float, float, Image.Image]:
        self.calls += 1
        out = self.scratch / f"openvino-{self.calls}.png"
        request = {
            "op": "run",
            "size": size,
            "prompt": PROMPT,
            "steps": self.steps,
            "guidance": GUIDANCE,
            "seed": SEED,
            "out": str(out),
        }
        answer = self.ask(request)
        with Image.open(out) as image:
            return float(answer["seconds"]), float(answer["cpu"]), image.convert("RGB")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"op": "quit"})
            except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def easel_engine(
    folder: Path, steps: int, home: Path, backend: str
) -> tuple[Callable[[int], Image.Image], str]:
    """Easel's engine with ``cpu_backend`` ``backend`` (size -> one image), and its dtype. The
    first image of a size waits for the background OpenVINO compile of that size (in the
    warm-up), so timed calls measure the path a warm server takes."""
    from easel.config import Settings
    from easel.domain import GenerationParams
    from easel.engine.generate import Engine
    from easel.models.catalog import ModelCatalog
    from easel.models.loader import ModelManager

    settings = Settings(home=home, preview_every=0, cpu_backend=backend)
    catalog = ModelCatalog(settings)
    catalog.add("sd15-random", str(folder), description="bench/compare.py")
    engine = Engine(ModelManager(settings, catalog), settings)
    settled: set[int] = set()

    def easel(size: int) -> Image.Image:
        params = GenerationParams(
            prompt=PROMPT,
            model="sd15-random",
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            width=size,
            height=size,
            seed=SEED,
            scheduler="euler",
        )
        image: Image.Image = engine.generate(params).images[0]
        if size not in settled:
            unet = engine.models.get_pipeline("sd15-random").pipeline.unet
            graphs = getattr(vars(unet).get("forward"), "graphs", None)
            if hasattr(graphs, "settle"):
                graphs.settle(timeout=900)
            settled.add(size)
        return image

    return easel, str(engine.models.dtype).removeprefix("torch.")


def bare(pipe: Any, steps: int) -> Callable[[int], Image.Image]:
    """A bare diffusers pipeline as an engine: Euler, the prompt, guidance and seed above."""
    import torch
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(size: int) -> Image.Image:
        image: Image.Image = pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
        return image

    return run


def in_process_engines(
    names: list[str], folder: Path, steps: int, home: Path
) -> tuple[dict[str, Callable[[int], Image.Image]], str]:
    """The torch engines in this process: name -> (size -> one image), and Easel's dtype."""
    import torch
    from diffusers import StableDiffusionPipeline

    engines: dict[str, Callable[[int], Image.Image]] = {}
    easel_dtype = ""
    for name, backend in (("easel", "auto"), ("easel-torch", "torch")):
        if name in names:
            engines[name], easel_dtype = easel_engine(folder, steps, home / name, backend)

    if "fp32" in names:
        engines["fp32"] = bare(StableDiffusionPipeline.from_pretrained(folder), steps)
    if "bf16" in names:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        engines["bf16"] = bare(pipe, steps)
    return engines, easel_dtype


# --- report -------------------------------------------------------------------------------------

LABELS = {
    "easel": "Easel engine (OpenVINO UNet when installed)",
    "easel-torch": "Easel engine, cpu_backend torch",
    "fp32": "diffusers defaults (fp32)",
    "bf16": "diffusers, bf16 + channels_last",
    "openvino": "OpenVINO (optimum-intel, static shapes)",
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def cpu_idle(window: float) -> float:
    """Share of the machine's CPU time that was idle over the next ``window`` seconds."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(share: float, max_wait: float) -> tuple[float, float]:
    """Wait until the CPUs are at least ``share`` idle over 2 s (others' work: this process is
    idle meanwhile), at most ``max_wait`` seconds: (seconds waited, idle share at the end)."""
    if share <= 0 or not Path("/proc/stat").exists():
        return 0.0, math.nan
    begin = time.perf_counter()
    while True:
        idle = cpu_idle(2.0)
        waited = time.perf_counter() - begin
        if idle >= share or waited >= max_wait:
            return waited, idle


def stopped(number: int, frame: Any) -> None:
    """A signal ends the run: say so (a shared machine's long runs do get stopped)."""
    print(f"\nstopped by signal {signal.Signals(number).name} at {time.ctime()}", flush=True)
    sys.exit(128 + number)


def machine() -> str:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"]
    have = " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    return f"{model}, {os.cpu_count()} CPUs ({have})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[256, 512], metavar="SIZE")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine and size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=list(LABELS),
        choices=list(LABELS),
        help="which engines to run (default: all; openvino only where its interpreter exists)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/easel/bench")
    parser.add_argument(
        "--openvino-python",
        type=Path,
        default=Path(
            os.environ.get("EASEL_BENCH_OPENVINO_PYTHON", REPO / ".venv-openvino/bin/python")
        ),
        help="interpreter with optimum-intel[openvino] (default .venv-openvino/bin/python)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for torch and OpenVINO alike (default: torch's default, all cores)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.9,
        help="before each timed call, wait until the CPUs are this idle over 2 s (others' "
        "work; 0: do not wait), at most --max-wait seconds",
    )
    parser.add_argument("--max-wait", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the calls a stopped run with the same settings recorded (in the cache "
        "folder) and measure only the rest; without it, a run starts afresh",
    )
    parser.add_argument("--tiny", action="store_true", help="small UNet/VAE/CLIP: check the script")
    args = parser.parse_args()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, stopped)

    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder = model_folder(args.cache, args.tiny)
    names = [n for n in LABELS if n in args.engines]
    if "openvino" in names and not args.openvino_python.exists():
        print(f"openvino: skipped, no interpreter at {args.openvino_python}", flush=True)
        names.remove("openvino")

    # every timed call is appended to a record, so a run stopped on a shared machine can go on
    record = folder.with_name(f"{folder.name}-runs") / (
        f"steps{args.steps}-threads{args.threads}-{'-'.join(names)}"
    )
    if not args.resume:
        shutil.rmtree(record, ignore_errors=True)
    record.mkdir(parents=True, exist_ok=True)
    calls_file = record / "calls.jsonl"
    recorded: list[dict[str, Any]] = []
    if calls_file.exists():
        recorded = [json.loads(line) for line in calls_file.read_text().splitlines() if line]
        print(f"resuming: {len(recorded)} calls recorded in {record}", flush=True)

    def measured(size: int) -> dict[str, list[dict[str, Any]]]:
        return {n: [r for r in recorded if r["size"] == size and r["engine"] == n] for n in names}

    with tempfile.TemporaryDirectory() as tmp:
        engines, easel_dtype = in_process_engines(names, folder, args.steps, Path(tmp) / "home")
        gc.collect()
        openvino = None
        if "openvino" in names:
            openvino = OpenVinoEngine(
                args.openvino_python, folder, args.steps, Path(tmp), args.threads
            )
        print(f"loaded in {time.perf_counter() - started:.0f} s", flush=True)

        def call(name: str, size: int) -> tuple[float, float, Image.Image]:
            """One image: (wall seconds, CPU seconds of the engine's process, the image)."""
            if name == "openvino":
                assert openvino is not None
                return openvino.run(size)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            image = engines[name](size)
            return time.perf_counter() - begin, time.process_time() - cpu_begin, image

        times: dict[int, dict[str, list[float]]] = {}
        cpu_times: dict[int, dict[str, list[float]]] = {}
        images: dict[int, dict[str, Image.Image]] = {}
        loads: dict[int, tuple[float, float]] = {}
        warmup: dict[int, dict[str, float]] = {}
        try:
            for size in args.sizes:
                load_before = os.getloadavg()[0]
                warmup[size], images[size] = {}, {}
                done = measured(size)
                pictures = {n: record / f"{size}-{n}.png" for n in names}
                finished = all(len(done[n]) >= args.repeats for n in names)
                if not (finished and all(p.exists() for p in pictures.values())):
                    for name in names:  # warm-up (OpenVINO: reshape + compile), untimed
                        if openvino is not None and name == "openvino":
                            openvino.prepare(size)
                        warmup[size][name], _, images[size][name] = call(name, size)
                        images[size][name].save(pictures[name])
                        print(f"{size}px warm-up {name}: {warmup[size][name]:.2f} s", flush=True)
                for round_ in range(args.repeats):
                    idles = []
                    for name in names:
                        if len(done[name]) > round_:
                            continue  # recorded by the run this one resumes
                        waited, idle = wait_for_idle(args.idle, args.max_wait)
                        idles.append(idle)
                        seconds, cpu, image = call(name, size)
                        # quality from a timed image: Easel's warm-up may run before its
                        # OpenVINO models are ready
                        images[size][name] = image
                        image.save(pictures[name])
                        entry = {
                            "size": size,
                            "engine": name,
                            "round": round_,
                            "seconds": seconds,
                            "cpu": cpu,
                            "idle": idle,
                            "load": os.getloadavg()[0],
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        }
                        recorded.append(entry)
                        with calls_file.open("a") as out:
                            out.write(json.dumps(entry) + "\n")
                    done = measured(size)
                    print(
                        f"{size}px round {round_ + 1}: "
                        + ", ".join(
                            f"{n} {done[n][round_]['seconds']:.2f} s "
                            f"({done[n][round_]['cpu']:.2f} CPU-s)"
                            for n in names
                        )
                        + "; CPUs idle before each: "
                        + ", ".join(f"{done[n][round_]['idle']:.0%}" for n in names),
                        flush=True,
                    )
                done = measured(size)
                times[size] = {n: [r["seconds"] for r in done[n][: args.repeats]] for n in names}
                cpu_times[size] = {n: [r["cpu"] for r in done[n][: args.repeats]] for n in names}
                for name in names:
                    if name not in images[size]:
                        with Image.open(pictures[name]) as picture:
                            images[size][name] = picture.convert("RGB")
                    warmup[size].setdefault(name, math.nan)
                loads[size] = (load_before, os.getloadavg()[0])
        finally:
            if openvino is not None:
                openvino.close()

    # the table
    print(
        f"\nSD1.5-architecture {'(tiny) ' if args.tiny else ''}model, random weights, "
        f"{args.steps} steps Euler, CFG {GUIDANCE}; seconds per image, min of {args.repeats} "
        f"interleaved calls after a warm-up; {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Easel dtype {easel_dtype or '-'}"
        + (f"; {openvino.version}" if openvino is not None else "")
    )
    print(
        "load average (1 min) before/after each size: "
        + ", ".join(f"{s}px {a:.1f}/{b:.1f}" for s, (a, b) in loads.items())
    )
    for metric, data in (("wall-clock seconds", times), ("CPU-seconds", cpu_times)):
        print(f"\n{metric} per image (min of {args.repeats}):\n")
        print("| engine | " + " | ".join(f"{s}²" for s in args.sizes) + " |")
        print("|---|" + "---|" * len(args.sizes))
        for name in names:
            cells = [f"{min(data[s][name]):.2f}" for s in args.sizes]
            print(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    print()
    results: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads()}
    results["sizes"] = {}
    for size in args.sizes:
        lines = []
        for metric, data in (("wall", times), ("CPU", cpu_times)):
            best = {n: min(t) for n, t in data[size].items()}
            if "easel" in best and "openvino" in best:
                lines.append(
                    f"{metric}: Easel / OpenVINO {best['easel'] / best['openvino']:.2f}x "
                    "(goal <= 0.8)"
                )
            if "easel" in best and "fp32" in best:
                lines.append(
                    f"{metric}: diffusers fp32 / Easel {best['fp32'] / best['easel']:.2f}x "
                    "(goal >= 4)"
                )
            if "easel" in best and "bf16" in best:
                lines.append(
                    f"{metric}: Easel / diffusers bf16 {best['easel'] / best['bf16']:.2f}x"
                )
        quality = {}
        for other in ("fp32", "bf16", "openvino"):
            if "easel" in images[size] and other in images[size] and other != "easel":
                quality[f"easel_vs_{other}"] = psnr(images[size]["easel"], images[size][other])
        if "openvino" in images[size] and "fp32" in images[size]:
            quality["openvino_vs_fp32"] = psnr(images[size]["openvino"], images[size]["fp32"])
        lines += [f"PSNR {k.replace('_vs_', ' vs ')} {v:.1f} dB" for k, v in quality.items()]
        print(f"{size}²:\n  " + "\n  ".join(lines))
        for name in names:
            runs = ", ".join(
                f"{t:.2f} ({c:.2f})"
                for t, c in zip(times[size][name], cpu_times[size][name], strict=True)
            )
            print(
                f"  {name}: runs s (CPU-s) {runs}; median {statistics.median(times[size][name]):.2f} "
                f"s; warm-up {warmup[size][name]:.2f} s"
            )
        results["sizes"][str(size)] = {
            "seconds": times[size],
            "cpu_seconds": cpu_times[size],
            "warmup": warmup[size],
            "psnr_db": quality,
            "load": loads[size],
        }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
