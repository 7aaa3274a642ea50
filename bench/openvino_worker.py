"""OpenVINO side of bench/compare.py, run under the interpreter that has optimum-intel.

    .venv-openvino/bin/python bench/openvino_worker.py FOLDER EXPORT_DIR [THREADS]

optimum-intel pins transformers < 5.6 and huggingface-hub < 1.22, older than Easel's, so it
lives in its own virtual environment (docs/BENCHMARKS.md, "CPU backends", gives the command)
and this worker runs there as a subprocess of compare.py: only the standard library, torch,
diffusers and optimum-intel, never ``easel``. compare.py drives it one JSON line at a time on
stdin, and it answers one JSON line on stdout (its logs go to stderr):

    {"op": "prepare", "size": 256}  ->  {"ok": true, "seconds": ...}   reshape (static) + compile
    {"op": "run", "size": 256, "prompt": ..., "steps": 4, "guidance": 7.5, "seed": 1234,
     "out": "/tmp/x.png"}            ->  {"ok": true, "seconds": ..., "cpu": ...}   one image,
                                         saved to "out"; "cpu": this process's CPU seconds
    {"op": "quit"}

The model is exported from the diffusers FOLDER once (``OVStableDiffusionPipeline``,
``export=True``, fp32 IR, no weight compression) and kept in EXPORT_DIR; later runs load the IR.
Shapes are static: the UNet, VAE decoder and text encoder are reshaped to batch 1 (2 in the UNet,
for classifier-free guidance) at the image size, then compiled. The scheduler is Euler, built
from the folder's scheduler config, like Easel's ``scheduler="euler"``; the noise comes from a
CPU ``torch.Generator`` seeded the same way, so the images can be compared by PSNR.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[openvino] {message}", file=sys.stderr, flush=True)


def load(folder: Path, export_dir: Path, config: dict[str, str]) -> Any:
    from optimum.intel import OVStableDiffusionPipeline

    if (export_dir / "model_index.json").is_file():
        started = time.perf_counter()
        pipe = OVStableDiffusionPipeline.from_pretrained(
            export_dir, compile=False, ov_config=config
        )
        log(f"loaded the exported IR from {export_dir} in {time.perf_counter() - started:.1f} s")
        return pipe
    started = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(
        folder, export=True, compile=False, load_in_8bit=False, ov_config=config
    )
    partial = export_dir.with_name(export_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    partial.rename(export_dir)
    log(f"exported {folder} to {export_dir} in {time.perf_counter() - started:.1f} s")
    return pipe


def main() -> None:
    folder, export_dir = Path(sys.argv[1]), Path(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # 0: OpenVINO's default (all cores)
    config = {"INFERENCE_NUM_THREADS": str(threads)} if threads else {}
    # the answers go out on the original stdout; whatever the libraries print goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import openvino
    import torch
    from diffusers import EulerDiscreteScheduler

    pipe = load(folder, export_dir, config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    core = openvino.Core()
    hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    log(f"openvino {openvino.__version__}, CPU inference precision {hint}")
    size = None
    hello = {"ok": True, "openvino": openvino.__version__, "precision": str(hint)}
    print(json.dumps(hello), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            started = time.perf_counter()
            if request["op"] == "quit":
                break
            if request["size"] != size:
                size = request["size"]
                pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
                pipe.compile()
            cpu = 0.0
            if request["op"] == "run":
                started = time.perf_counter()
                cpu_started = time.process_time()
                image = pipe(
                    request["prompt"],
                    num_inference_steps=request["steps"],
                    guidance_scale=request["guidance"],
                    height=size,
                    width=size,
                    generator=torch.Generator("cpu").manual_seed(request["seed"]),
                ).images[0]
                seconds = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
                image.save(request["out"])
            else:
                seconds = time.perf_counter() - started
            answer: dict[str, Any] = {"ok": True, "seconds": seconds, "cpu": cpu}
        except Exception as exc:  # report to the driver, which prints it and drops the engine
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
