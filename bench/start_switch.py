"""Start-up and model switching, as a user sees them: ``easel serve`` in a subprocess, HTTP only.

    .venv/bin/python bench/start_switch.py [--starts 3] [--rounds 5] [--large FOLDER]

1. **Start**: from launching ``easel serve`` (a fresh temporary EASEL_HOME, a free loopback port)
   to the first finished image of the bundled model (tiny-shapes, its default request) through
   the API: ``POST /api/v1/jobs``, its events followed to ``succeeded``, the PNG fetched. Split
   into "listening" (the first ``GET /api/v1/health`` answered) and the first job, then a second
   job for comparison. With the web UI (Gradio mounted, the default) and with ``--no-ui``,
   alternately, ``--starts`` times each; the server is stopped with SIGTERM in between.
2. **Switch**: one server, two models: the bundled tiny-shapes and a small random SD model built
   here, saved to disk and added to the catalog (models.toml). Jobs (64x64, 8 steps) go in the
   order A A B B, A A B B, ...: a job on the model the last job used ("same") and one right after
   the other model ("switch"), interleaved. Once with both models kept in memory
   (``EASEL_MODEL_CACHE_GB=8``: cached), once with a budget too small for two
   (``EASEL_MODEL_CACHE_GB=0.001``: every switch evicts the other model and loads from disk, the
   files in the OS page cache after the first load). The switch cost is switch minus same.
   ``--large FOLDER`` (a diffusers SD folder, e.g. bench/compare.py's SD1.5-architecture one)
   adds a third run: tiny-shapes and that model, uncached, at 256x256, 4 steps.

Times are wall-clock from the client's first byte to the image's last byte (each job's own
time, claim to stored image, from the job record, is printed too). The build machine is shared:
before each start and each timed job the script waits until the CPUs are ``--idle`` idle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import wait_for_idle  # noqa: E402

PROMPT = "a red circle on a grey background"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def easel_command() -> list[str]:
    script = Path(sys.executable).parent / "easel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "easel.cli"]


class Server:
    """``easel serve`` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, home: Path, *, ui: bool, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = (home / "serve.log").open("ab")
        environment = {
            **os.environ,
            "EASEL_HOME": str(home),
            "EASEL_HOST": "127.0.0.1",
            "EASEL_PORT": str(self.port),
            **(env or {}),
        }
        command = [*easel_command(), "serve", *([] if ui else ["--no-ui"])]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            command, env=environment, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300)

    def wait_listening(self, timeout: float = 300) -> float:
        """Seconds from launch to the first health answer."""
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"easel serve ended with {self.proc.returncode}: see serve.log")
            try:
                if self.http.get("/api/v1/health").status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        raise TimeoutError("easel serve did not answer")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def image_job(http: httpx.Client, body: dict[str, Any]) -> tuple[float, float]:
    """Submit, follow the events to the end, fetch the PNG: (wall seconds, and the job's own
    from started_at to finished_at: claim to stored image)."""
    begin = time.perf_counter()
    job = http.post("/api/v1/jobs", json=body)
    if job.status_code != 202:
        raise RuntimeError(f"job refused: {job.status_code} {job.text}")
    job_id = job.json()["id"]
    done = None
    with http.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
        kind = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "succeeded":
                done = json.loads(line[6:])
                break
            elif line.startswith("data: ") and kind in ("failed", "canceled"):
                raise RuntimeError(f"job {kind}: {line[6:]}")
    assert done is not None
    png = http.get(done["images"][0]["url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    wall = time.perf_counter() - begin
    record = http.get(f"/api/v1/jobs/{job_id}").json()
    started, finished = (
        datetime.fromisoformat(record[k].replace("Z", "+00:00"))
        for k in ("started_at", "finished_at")
    )
    return wall, (finished - started).total_seconds()


# --- 1. start -----------------------------------------------------------------------------------


@dataclass
class Start:
    ui: bool
    listening: float
    first_image: float  # from launch
    first_job: float  # the first job alone (submit to PNG)
    second_job: float


def measure_start(ui: bool, idle: float, max_wait: float) -> Start:
    wait_for_idle(idle, max_wait)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), ui=ui)
        try:
            listening = server.wait_listening()
            first_job, _ = image_job(server.http, {"prompt": PROMPT})
            first_image = time.perf_counter() - server.started
            second_job, _ = image_job(server.http, {"prompt": PROMPT, "seed": 2})
        finally:
            server.stop()
    return Start(ui, listening, first_image, first_job, second_job)


# --- 2. switch ----------------------------------------------------------------------------------


def build_small_sd(folder: Path) -> Path:
    """A small SD-architecture pipeline with random weights (a few MB, like tiny-shapes)."""
    import string

    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?-'"
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            layers_per_block=1,
            sample_size=32,
        ),
        vae=AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            sample_size=64,
        ),
        text_encoder=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokens),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            )
        ),
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@dataclass
class Switching:
    label: str
    models: tuple[str, str]
    sizes: dict[str, int]  # each model's image side (tiny-shapes makes at most 128)
    steps: int
    same: dict[str, list[float]] = field(default_factory=dict)
    switch: dict[str, list[float]] = field(default_factory=dict)
    job_seconds: dict[str, list[float]] = field(default_factory=dict)


def measure_switch(
    label: str,
    sources: dict[str, str],
    cache_gb: str,
    rounds: int,
    sizes: dict[str, int],
    steps: int,
    idle: tuple[float, float],
) -> Switching:
    from easel.config import Settings
    from easel.models.catalog import ModelCatalog

    names = tuple(sources)
    assert len(names) == 2
    result = Switching(label, (names[0], names[1]), sizes, steps)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        catalog = ModelCatalog(Settings(home=home))
        for name, source in sources.items():
            if source != "builtin":
                catalog.add(name, source, description="bench/start_switch.py")
        server = Server(home, ui=False, env={"EASEL_MODEL_CACHE_GB": cache_gb})
        try:
            server.wait_listening()
            last = None
            body = {"prompt": PROMPT, "num_inference_steps": steps}
            side = {name: {"width": sizes[name], "height": sizes[name]} for name in names}
            for name in names:  # warm-up: load both, trace their graphs
                image_job(server.http, {**body, **side[name], "model": name})
                last = name
            for round_ in range(rounds):
                for name in (names[0], names[0], names[1], names[1]):
                    wait_for_idle(*idle)
                    request = {**body, **side[name], "model": name, "seed": round_}
                    wall, own = image_job(server.http, request)
                    kind = result.same if name == last else result.switch
                    kind.setdefault(name, []).append(wall)
                    result.job_seconds.setdefault(name, []).append(own)
                    last = name
        finally:
            server.stop()
    return result


def print_switches(runs: list[Switching]) -> None:
    print("| models kept | model | size, steps | same model | after a switch | switch cost |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        for name in run.models:
            same, switch = min(run.same[name]), min(run.switch[name])
            print(
                f"| {run.label} | {name} | {run.sizes[name]}², {run.steps} | {same:.3f} s | "
                f"{switch:.3f} s | {switch - same:+.3f} s |"
            )
    print("\n(min of each; medians:)")
    for run in runs:
        for name in run.models:
            print(
                f"  {run.label} {name}: same {statistics.median(run.same[name]):.3f} s, "
                f"switch {statistics.median(run.switch[name]):.3f} s; the jobs' own time "
                f"(claim to stored image): " + ", ".join(f"{x:.3f}" for x in run.job_seconds[name]),
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="cold starts per configuration")
    parser.add_argument("--rounds", type=int, default=5, help="A A B B rounds per switch run")
    parser.add_argument("--large", type=Path, help="a diffusers SD folder for a third run")
    parser.add_argument(
        "--idle",
        type=float,
        default=0.9,
        help="before each start and each timed job, wait until the CPUs are this idle over 2 s "
        "(0: do not wait), at most --max-wait seconds",
    )
    parser.add_argument("--max-wait", type=float, default=300.0)
    parser.add_argument("--skip-start", action="store_true")
    parser.add_argument("--skip-switch", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    load_before = os.getloadavg()[0]

    starts: list[Start] = []
    if not args.skip_start:
        for i in range(args.starts):
            for ui in (True, False):
                start = measure_start(ui, args.idle, args.max_wait)
                starts.append(start)
                print(
                    f"start {i + 1} {'ui' if ui else 'no-ui'}: listening {start.listening:.2f} s, "
                    f"first image {start.first_image:.2f} s (job {start.first_job:.2f} s), "
                    f"second job {start.second_job:.2f} s",
                    flush=True,
                )

    runs: list[Switching] = []
    idle = (args.idle, args.max_wait)
    if not args.skip_switch:
        with tempfile.TemporaryDirectory() as tmp:
            small = str(build_small_sd(Path(tmp) / "sd-small"))
            pair = {"tiny-shapes": "builtin", "sd-small": small}
            for label, cache in (("cached (in memory)", "8"), ("uncached (evicted)", "0.001")):
                sizes = dict.fromkeys(pair, 64)
                runs.append(measure_switch(label, pair, cache, args.rounds, sizes, 8, idle))
                print_switches(runs[-1:])
            if args.large is not None:
                big = {"tiny-shapes": "builtin", "sd15-large": str(args.large.resolve())}
                sizes = {"tiny-shapes": 64, "sd15-large": 256}
                runs.append(
                    measure_switch("uncached, large SD", big, "0.001", args.rounds, sizes, 4, idle)
                )
                print_switches(runs[-1:])

    # report
    print(
        f"\nload average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end; {time.perf_counter() - began:.0f} s in all\n"
    )
    if starts:
        print("| easel serve | listening | first image (from launch) | first job | second job |")
        print("|---|---|---|---|---|")
        for ui in (True, False):
            mine = [s for s in starts if s.ui == ui]
            if not mine:
                continue

            def cell(values: list[float]) -> str:
                return f"{min(values):.2f} s (median {statistics.median(values):.2f})"

            print(
                f"| {'with web UI' if ui else '--no-ui'} | {cell([s.listening for s in mine])} | "
                f"{cell([s.first_image for s in mine])} | {cell([s.first_job for s in mine])} | "
                f"{cell([s.second_job for s in mine])} |"
            )
        print()
    if runs:
        print_switches(runs)


if __name__ == "__main__":
    main()
