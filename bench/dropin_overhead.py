"""Drop-in overhead: the same job through Easel's own API and through each drop-in protocol.

A real uvicorn server on loopback with the stand-in generator (no model, no torch: a flat 64x64
image after 4 steps of ``--step-ms`` sleeping each, like torch kernels that release the GIL);
clients in another process, one request at a time, so the queue is empty and each job starts
at once. Each round times every protocol once, in turn (interleaved, so drift hits all alike),
from the first byte sent to the image bytes in hand:

- ``api_v1``: ``POST /api/v1/jobs`` (202), follow ``GET /api/v1/jobs/{id}/events`` to
  ``succeeded``, ``GET /api/v1/images/{id}`` (the PNG): submit and wait, as a client of
  Easel's own API does it;
- ``openai``: ``POST /v1/images/generations``, one request that waits for the job and answers
  the PNG as ``b64_json`` (decoded here).
- ``a1111``: ``POST /sdapi/v1/txt2img``, one request that waits for the job and answers the
  PNG in ``images`` (base64, decoded here) with ``info``.

Target: a drop-in request costs at most 5 ms more than ``api_v1`` (median).

    .venv/bin/python bench/dropin_overhead.py                # 200 rounds
    .venv/bin/python bench/dropin_overhead.py --rounds 50    # quicker
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import ModelCatalog
from easel.services import build_services

STEPS = 4
SIZE = 64
PROMPT = "a red circle"


# --- one request-to-image per protocol (run in the client process) ----------------------------


def api_v1(http: httpx.Client, seed: int) -> bytes:
    """Easel's own API: submit, follow the events to the end, fetch the image."""
    body = {"prompt": PROMPT, "num_inference_steps": STEPS, "width": SIZE, "height": SIZE}
    job = http.post("/api/v1/jobs", json={**body, "seed": seed})
    assert job.status_code == 202, job.text
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
                raise AssertionError(line)
    assert done is not None
    image = http.get(done["images"][0]["url"])
    assert image.status_code == 200
    return image.content


def openai_images(http: httpx.Client, seed: int) -> bytes:
    """OpenAI's Images API: one request, the image in the answer."""
    body = {
        "prompt": PROMPT,
        "size": f"{SIZE}x{SIZE}",
        "num_inference_steps": STEPS,  # Easel's own parameters, as the SDK's extra_body sends
        "seed": seed,
    }
    answer = http.post("/v1/images/generations", json=body)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["data"][0]["b64_json"])


def a1111_txt2img(http: httpx.Client, seed: int) -> bytes:
    """AUTOMATIC1111's txt2img: one request, the image (base64 PNG) in the answer."""
    body = {"prompt": PROMPT, "steps": STEPS, "width": SIZE, "height": SIZE, "seed": seed}
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["images"][0])


PROTOCOLS: dict[str, Callable[[httpx.Client, int], bytes]] = {
    "api_v1": api_v1,
    "openai": openai_images,
    "a1111": a1111_txt2img,
}


def run_rounds(port: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per request-to-image of each protocol, ``rounds`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for round_ in range(warmup + rounds):
            for name, call in PROTOCOLS.items():
                start = time.perf_counter()
                png = call(http, round_)
                seconds = time.perf_counter() - start
                assert png.startswith(b"\x89PNG")
                if round_ >= warmup:
                    times[name].append(seconds)
    return times


# --- the server (this process) ------------------------------------------------------------------


def make_settings(home: Path) -> Settings:
    """A home with a stand-in model entry: a diffusers folder with no weights (never loaded)."""
    folder = home / "standin-model"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    settings = Settings(home=home, default_model="standin")
    ModelCatalog(settings).add(
        "standin", str(folder), defaults={"width": SIZE, "height": SIZE, "min_size": 32}
    )
    return settings


def bench(rounds: int, warmup: int, step_s: float) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        generator = StandInGenerator(seconds_per_step=step_s)
        services = build_services(make_settings(Path(tmp)), generator=generator)
        server = uvicorn.Server(
            uvicorn.Config(create_app(services), host="127.0.0.1", port=0, log_level="warning")
        )
        thread = threading.Thread(target=server.run)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            # the client runs in another process, like a real one: it does not share our GIL
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as proc:
                return proc.submit(run_rounds, port, rounds, warmup).result()
        finally:
            server.should_exit = True
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=2.0, help="stand-in sleep per step")
    args = parser.parse_args()

    times = bench(args.rounds, args.warmup, args.step_ms / 1000)
    base = statistics.median(times["api_v1"]) * 1000
    print(
        f"Request to image bytes, {args.rounds} interleaved rounds, stand-in {STEPS} steps × "
        f"{args.step_ms:g} ms, {SIZE}×{SIZE}:\n"
    )
    print("| protocol | min | median | p90 | median − api_v1 | target |")
    print("|---|---|---|---|---|---|")
    for name, seconds in times.items():
        ms = sorted(s * 1000 for s in seconds)
        median = statistics.median(ms)
        p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
        extra = "—" if name == "api_v1" else f"{median - base:+.2f} ms"
        target = "—" if name == "api_v1" else "≤ +5 ms"
        print(f"| {name} | {ms[0]:.2f} ms | {median:.2f} ms | {p90:.2f} ms | {extra} | {target} |")


if __name__ == "__main__":
    main()
