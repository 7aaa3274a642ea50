"""Hostile clients against the real server (with its web UI; tiny SD on CPU; raw sockets):
thousands of event streams from one client are held to the caps (429/503 with Retry-After,
before a stream starts) with bounded memory; trickled, chunked and oversized bodies are cut off
(408/411/413), on the UI's upload route too, leaving no file; and SIGTERM ends every open
stream (job events, the UI's heartbeat) with a last event and a clean, quick exit."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import submit, wait_for
from tests.e2e.server import Server, prepare_home

pytestmark = pytest.mark.slow

PER_CLIENT = 50
TOTAL = 80
UPLOAD_CAP = 100_000  # max_upload_bytes and max_dataset_upload_bytes: also the UI's file cap
TIMEOUT_S = 2  # request_timeout_s
ATTEMPTS = 10_000  # streams one client tries to open
DRAIN_S = 1.0
# runs until the server stops: everything queued behind it waits, so its streams stay open
ENDLESS = {
    "prompt": "endless",
    "num_inference_steps": 150,
    "width": 128,
    "height": 128,
    "num_images": 8,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("hostile") / "easel-home"
    prepare_home(home, tiny_sd_path)
    env = {
        "EASEL_MAX_STREAMS": str(TOTAL),
        "EASEL_MAX_STREAMS_PER_CLIENT": str(PER_CLIENT),
        "EASEL_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
        "EASEL_MAX_DATASET_UPLOAD_BYTES": str(UPLOAD_CAP),
        "EASEL_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "GRADIO_TEMP_DIR": str(home.parent / "gradio"),
    }
    server = Server(home, drain_timeout_s=DRAIN_S, env=env, ui=True).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def jobs(server: Server) -> dict[str, str]:
    """A job that runs until the server stops, and one queued behind it."""
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
        running = submit(api, **ENDLESS)["id"]
        queued = submit(api, prompt="behind", num_inference_steps=1, width=32, height=32)["id"]
        wait_for(api, running, lambda j: j["progress"]["step"] >= 1, timeout=120)
    return {"running": running, "queued": queued}


def rss_mib(server: Server) -> float:
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) / 1024


@dataclass
class Streams:
    """What a burst of stream requests got: status counts, the streams that opened (still
    connected), the Retry-After of each refusal and the slowest answer."""

    statuses: Counter[int] = field(default_factory=Counter)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    retry_after: Counter[str | None] = field(default_factory=Counter)
    slowest_s: float = 0.0

    def close(self) -> None:
        for _, writer in self.held:
            writer.close()
        self.held.clear()


async def open_streams(
    port: int, job_id: str, attempts: int, *, source: str = "127.0.0.1", concurrency: int = 500
) -> Streams:
    """Ask for ``attempts`` event streams of ``job_id`` over as many connections from
    ``source``, ``concurrency`` at a time; keep the ones that open."""
    result = Streams()
    gate = asyncio.Semaphore(concurrency)
    request = (
        f"GET /api/v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    ).encode()

    async def one() -> None:
        async with gate:
            began = time.monotonic()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            result.slowest_s = max(result.slowest_s, time.monotonic() - began)
            result.statuses[status] += 1
            if status == 200:
                result.held.append((reader, writer))
            else:
                result.retry_after[headers.get("retry-after")] += 1
                writer.close()

    await asyncio.gather(*(one() for _ in range(attempts)))
    return result


async def read_sse(reader: asyncio.StreamReader, timeout: float) -> list[dict[str, str]]:
    """An open stream's events (chunked body, read raw) until the server closes it."""
    body = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            body += chunk
    events = []
    for block in re.sub(rb"\r\n[0-9a-f]+\r\n", b"", body).decode().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "event" in fields:
            events.append(fields)
    return events


def test_ten_thousand_streams_from_one_client_are_capped(
    server: Server, jobs: dict[str, str]
) -> None:
    before = rss_mib(server)

    async def scenario() -> tuple[Streams, Streams, Streams, float]:
        began = time.monotonic()
        flood = await open_streams(server.port, jobs["queued"], ATTEMPTS)
        flood_s = time.monotonic() - began
        # a second client (another loopback address) fills the server's total
        other = await open_streams(server.port, jobs["queued"], 40, source="127.0.0.2")
        flood.close()
        other.close()
        # the slots come back once the server sees the connections go: the cap is free again
        deadline = time.monotonic() + 10
        while True:
            again = await open_streams(server.port, jobs["queued"], PER_CLIENT)
            if again.statuses[200] == PER_CLIENT or time.monotonic() > deadline:
                break
            again.close()
            await asyncio.sleep(0.2)
        again.close()
        return flood, other, again, flood_s

    flood, other, again, flood_s = asyncio.run(scenario())
    during = rss_mib(server)
    assert flood.statuses == {200: PER_CLIENT, 429: ATTEMPTS - PER_CLIENT}
    assert set(flood.retry_after) == {"5"}
    assert other.statuses == {200: TOTAL - PER_CLIENT, 503: 40 - (TOTAL - PER_CLIENT)}
    assert set(other.retry_after) == {"5"}
    assert again.statuses == {200: PER_CLIENT}
    print(
        f"{ATTEMPTS} stream requests in {flood_s:.1f} s (slowest answer {flood.slowest_s:.2f} s);"
        f" server RSS {before:.0f} -> {during:.0f} MiB"
    )
    assert flood_s < 40 and flood.slowest_s < 10
    assert during - before < 64, (before, during)
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
        assert api.get("/health").status_code == 200
        assert submit(api, prompt="after the flood", num_inference_steps=1)["status"] == "queued"


async def exchange(port: int, head: str, body: bytes = b"", *, wait_s: float = 15) -> str:
    """Send a request head (and part of a body, perhaps) on one connection; the status line
    and headers of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"\r\n" + body)
    async with asyncio.timeout(wait_s):
        answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return answer.decode()


def test_trickled_chunked_and_oversized_bodies_are_cut_off(server: Server) -> None:
    host = f"Host: 127.0.0.1:{server.port}\r\n"
    json_head = f"POST /api/v1/jobs HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
    upload = f"POST /gradio_api/upload HTTP/1.1\r\n{host}"
    multipart = "Content-Type: multipart/form-data; boundary=xx\r\n"

    async def scenario() -> list[tuple[str, float]]:
        answers = []
        for head, body in [
            # a JSON body that stops half-way: 408 once request_timeout_s has passed
            (json_head + "Content-Length: 100\r\n", b'{"prompt": '),
            # the same on the UI's upload route: no chunked bodies, no bodies over its cap
            (upload + multipart + "Transfer-Encoding: chunked\r\n", b""),
            (upload + multipart + f"Content-Length: {UPLOAD_CAP + 2_000_001}\r\n", b""),
            (f"POST /gradio_api/queue/join HTTP/1.1\r\n{host}Content-Length: 1000001\r\n", b""),
        ]:
            began = time.monotonic()
            answers.append((await exchange(server.port, head, body), time.monotonic() - began))
        return answers

    (trickled, took), *rest = asyncio.run(scenario())
    assert trickled.startswith("HTTP/1.1 408") and TIMEOUT_S <= took < TIMEOUT_S + 3, trickled
    assert [a.split()[1] for a, _ in rest] == ["411", "413", "413"]
    assert all(took < 1 for _, took in rest)
    # Gradio's own cap on each file (max_file_size), under the request's: 413, no file kept
    files = {"files": ("big.png", b"\x89PNG" + b"x" * UPLOAD_CAP, "image/png")}
    answer = httpx.post(server.url + "/gradio_api/upload", files=files, timeout=30)
    assert answer.status_code == 413, answer.text
    kept = [p for p in (server.home.parent / "gradio").rglob("*") if p.is_file()]
    assert kept == []
    # from another web origin, not even a small one; from the page's own, it is kept
    small = {"files": ("small.png", b"\x89PNG", "image/png")}
    foreign = {"Origin": "https://evil.example"}
    answer = httpx.post(server.url + "/gradio_api/upload", files=small, headers=foreign)
    assert answer.status_code == 403
    assert [p for p in (server.home.parent / "gradio").rglob("*") if p.is_file()] == []
    answer = httpx.post(
        server.url + "/gradio_api/upload", files=small, headers={"Origin": server.url}
    )
    assert answer.status_code == 200
    assert [p.name for p in (server.home.parent / "gradio").rglob("*") if p.is_file()] == [
        "small.png"
    ]
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
        assert api.get("/health").status_code == 200


def test_sigterm_ends_every_stream_with_a_last_event(server: Server, jobs: dict[str, str]) -> None:
    Seen = list[list[dict[str, str]]]

    async def scenario() -> tuple[Seen, Seen, float, float]:
        running = await open_streams(server.port, jobs["running"], 10)
        queued = await open_streams(server.port, jobs["queued"], 10)
        assert running.statuses == {200: 10} and queued.statuses == {200: 10}
        # an open page of the web UI holds a heartbeat stream
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"GET /gradio_api/heartbeat/hostile HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "\r\n".encode()
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        seen_running = [await read_sse(r, 30) for r, _ in running.held]
        seen_queued = [await read_sse(r, 30) for r, _ in queued.held]
        async with asyncio.timeout(30):
            while await reader.read(65536):  # the heartbeat stream ends too
                pass
        return seen_running, seen_queued, began, time.monotonic() - began

    seen_running, seen_queued, began, ended_s = asyncio.run(scenario())
    assert server.process is not None
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    exited_s = time.monotonic() - began
    for events in seen_running:
        types = [e["event"] for e in events]
        # the drain put the running job back, then the stream ended
        assert types[-2:] == ["requeued", "server-stopping"], types
        assert "id" not in events[-1] and '"reason"' in events[-1]["data"]
    for events in seen_queued:
        assert [e["event"] for e in events][-1] == "server-stopping"
    # the drain, then the streams' last events: no wait for uvicorn's grace period to cut them
    print(f"streams ended {ended_s:.2f} s, process exited {exited_s:.2f} s after SIGTERM")
    assert ended_s < DRAIN_S + 2 and exited_s < DRAIN_S + 3
    log = server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "timeout graceful shutdown exceeded" not in log
