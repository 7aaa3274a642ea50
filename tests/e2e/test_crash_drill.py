"""The crash drill (issue 32): 100 jobs from 4 keys, the server SIGKILLed twice mid-run and
restarted on the same EASEL_HOME. Every job ends exactly once, each key sees only its own,
nothing is lost or duplicated.

Both kills land on the same long job (the worst case for attempts): with ``max_attempts`` 3
(the default) a job started, killed, started, killed, is put back twice (attempts 1 and 2 are
under the limit) and its third start succeeds. A third kill on it would fail it ("interrupted
3 times"); two kills never can, whichever jobs they hit.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from easel.config import Settings
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from tests.e2e.helpers import FINAL, read_events, submit, wait_for
from tests.e2e.server import Server, prepare_home

pytestmark = pytest.mark.slow

JOBS_PER_KEY = 25
VICTIM = 8  # the first key's 9th job runs long, and both kills hit it
SMALL = {"width": 32, "height": 32, "num_inference_steps": 2}


@contextmanager
def clients(server: Server, secrets: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    """One HTTP client per key name, each sending its key."""
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(
                httpx.Client(
                    base_url=server.url + "/api/v1",
                    headers={"Authorization": f"Bearer {secret}"},
                    timeout=30,
                )
            )
            for name, secret in secrets.items()
        }


def num_images(i: int) -> int:
    """Every third job makes two images (a duplicate of either would show)."""
    return 2 if i % 3 == 0 else 1


def submit_all(api: httpx.Client, name: str) -> list[dict[str, Any]]:
    """A key's 25 jobs, all small but the first key's victim (60 steps: a second or so)."""
    jobs = []
    for i in range(JOBS_PER_KEY):
        body: dict[str, Any] = {**SMALL, "prompt": f"{name} {i}", "num_images": num_images(i)}
        if name == "alpha" and i == VICTIM:
            body["num_inference_steps"] = 60
        jobs.append(submit(api, **body))
    return jobs


def kill_while_running(server: Server, api: httpx.Client, job_id: str, attempt: int) -> None:
    """SIGKILL the server while ``job_id`` runs its ``attempt``-th start, past its first step."""

    def mid_run(job: dict[str, Any]) -> bool:
        running = job["status"] == "running" and job["attempts"] == attempt
        return job["status"] in FINAL or (running and job["progress"]["step"] >= 1)

    job = wait_for(api, job_id, mid_run, timeout=60)
    server.kill()
    assert job["status"] == "running", f"the victim finished before the kill: {job}"


def at_kill(home: Path) -> tuple[dict[str, int], list[str]]:
    """Jobs by status, and the running jobs' ids, in the database of a killed server."""
    with sqlite3.connect(home / "easel.db") as conn:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        running = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE status = 'running'")]
    return counts, running


def test_sigkill_twice_with_four_keys_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    home = tmp_path / "easel-home"
    prepare_home(home, tiny_sd_path)
    db = Database(Settings(home=home).db_path)
    keys = KeyStore(db)
    key_ids, secrets = {}, {}
    # three plain generate keys and one with a job quota (above its 25: it must not refuse one)
    for name, quota in (("alpha", None), ("beta", None), ("gamma", None), ("delta", 50)):
        record, secrets[name] = keys.create(name, max_jobs=quota)
        key_ids[name] = record.id
    db.close()
    names = list(secrets)

    server = Server(home).start()
    try:
        with clients(server, secrets) as api, ThreadPoolExecutor(4) as pool:
            jobs_of = pool.map(lambda n: submit_all(api[n], n), names)
            submitted = dict(zip(names, jobs_of, strict=True))
            victim = submitted["alpha"][VICTIM]["id"]
            kill_while_running(server, api["alpha"], victim, attempt=1)
        # some done (alpha's first 8 at least ran before it), the victim running, the rest waiting
        counts, running = at_kill(home)
        assert running == [victim] and counts["succeeded"] >= VICTIM and counts["queued"] >= 1
        assert sum(counts.values()) == 100

        server = Server(home).start()
        with clients(server, secrets) as api:
            kill_while_running(server, api["alpha"], victim, attempt=2)
        # the requeued victim kept its place (its owner's oldest waiting job): it ran first again
        counts, running = at_kill(home)
        assert running == [victim] and counts["queued"] >= 1

        server = Server(home).start()
        with clients(server, secrets) as api, ThreadPoolExecutor(4) as pool:
            deadline = time.monotonic() + 90
            while True:
                listed = {n: api[n].get("/jobs", params={"limit": 500}).json() for n in names}
                if all(j["status"] in FINAL for jobs in listed.values() for j in jobs):
                    break
                assert time.monotonic() < deadline, "jobs still unfinished after 90 s"
                time.sleep(0.2)

            # each key lists exactly its own 25, all succeeded; only the victim ran again
            owner_of = {j["id"]: n for n in names for j in submitted[n]}
            wanted = {j["id"]: num_images(i) for n in names for i, j in enumerate(submitted[n])}
            jobs = {j["id"]: j for n in names for j in listed[n]}
            for name in names:
                ids = [j["id"] for j in listed[name]]
                assert sorted(ids) == sorted(j["id"] for j in submitted[name])
                assert {j["owner"] for j in listed[name]} == {key_ids[name]}
            assert len(jobs) == 100
            assert {j["status"] for j in jobs.values()} == {"succeeded"}
            attempts = {i: j["attempts"] for i, j in jobs.items()}
            assert attempts.pop(victim) == 3 and set(attempts.values()) == {1}

            # another key's job is a 404, the same as a missing one (its events too)
            for job_id, name in owner_of.items():
                other = api[names[(names.index(name) + 1) % 4]]
                assert other.get(f"/jobs/{job_id}").status_code == 404
                assert other.get(f"/jobs/{job_id}/events").status_code == 404

            # one final event per job, last in its stream, naming the job's images; a start per
            # attempt; the victim's two requeues came from the restarts
            streams = dict(
                zip(jobs, pool.map(lambda i: read_events(api[owner_of[i]], i), jobs), strict=True)
            )
            for job_id, events in streams.items():
                types = [e["type"] for e in events]
                assert [t for t in types if t in FINAL] == ["succeeded"], (job_id, types)
                assert types[0] == "queued" and types[-1] == "succeeded", (job_id, types)
                assert types.count("started") == jobs[job_id]["attempts"], (job_id, types)
                assert [e["id"] for e in events] == sorted({e["id"] for e in events})
                final_images = [i["id"] for i in events[-1]["images"]]
                assert final_images == [i["id"] for i in jobs[job_id]["images"]]
            requeued = [e for e in streams[victim] if e["type"] == "requeued"]
            started = [e for e in streams[victim] if e["type"] == "started"]
            assert [e["attempt"] for e in started] == [1, 2, 3]
            assert [e["reason"] for e in requeued] == ["server restarted"] * 2
            others = [e["type"] for i, ev in streams.items() if i != victim for e in ev]
            assert "requeued" not in others

            # each job has its num_images images, ids unique; a file only for its owner
            images = {i["id"]: job_id for job_id, j in jobs.items() for i in j["images"]}
            assert all(len(jobs[i]["images"]) == n for i, n in wanted.items())
            assert len(images) == sum(wanted.values())
            for image_id, job_id in images.items():
                for name in names:
                    response = api[name].get(f"/images/{image_id}")
                    if name == owner_of[job_id]:
                        assert response.status_code == 200, response.text
                        assert response.content.startswith(b"\x89PNG")
                    else:
                        assert response.status_code == 404, (name, image_id)
            for name in names:
                mine = {i["id"] for i in api[name].get("/images", params={"limit": 500}).json()}
                assert mine == {i for i, job_id in images.items() if owner_of[job_id] == name}
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()

    # the database and the disk agree: one row and one file per image, no half-written file
    with sqlite3.connect(home / "easel.db") as conn:
        rows = conn.execute("SELECT id, path, owner FROM images").fetchall()
        finals = conn.execute(
            "SELECT job_id, COUNT(*) FROM events WHERE type IN ('succeeded', 'failed', 'canceled')"
            " GROUP BY job_id"
        ).fetchall()
    assert len(rows) == sum(wanted.values()) == len(images)
    assert {r[0] for r in rows} == set(images)
    assert all(r[2] == key_ids[owner_of[images[r[0]]]] for r in rows)
    assert sorted(finals) == sorted((job_id, 1) for job_id in jobs)
    images_dir = home / "images"
    assert not list(images_dir.rglob("*.tmp"))
    assert sorted(p.relative_to(images_dir).as_posix() for p in images_dir.rglob("*.png")) == (
        sorted(r[1] for r in rows)
    )
