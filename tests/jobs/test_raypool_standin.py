"""Ray actors with the stand-in generator: a cancel reaches a running job within one step; the
pool follows nodes joining and leaving the cluster. (A module of its own: one Ray driver per
process, and test_raypool's actors live for its whole module.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from easel.config import Settings
from easel.domain import JobStatus
from easel.jobs.standin import StandInGenerator
from easel.services import build_services
from tests.jobs.ray_helpers import params, ready, until, wait_jobs


def test_a_cancel_reaches_a_running_job_on_an_actor_within_one_step(
    ray_cluster: str, easel_home: Path
) -> None:
    services = build_services(
        Settings(home=easel_home, ray_address=ray_cluster, ray_workers=1, ray_cpus_per_worker=1),
        generator=StandInGenerator(seconds_per_step=0.25),
    )
    services.start()
    try:
        ready(services, count=1)
        job_id = services.submit_job(params("tiny-shapes", seed=1, steps=40)).id
        services.wakeup.set()
        until(lambda: services.queue.get(job_id).step >= 2, 30, "two steps")
        asked_at = services.queue.get(job_id).step
        services.cancel_job(job_id)
        wait_jobs(services, [job_id], timeout=10)
        job = services.queue.get(job_id)
        assert job.status is JobStatus.CANCELED
        assert job.step <= asked_at + 1, (asked_at, job.step)
    finally:
        services.stop()


def raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet"], capture_output=True)
    return {int(pid) for pid in found.stdout.split()}


def test_the_pool_follows_nodes_joining_and_leaving(ray_cluster: str, easel_home: Path) -> None:
    # no ray_workers: one actor per 4 CPUs; the session cluster has 8
    services = build_services(
        Settings(home=easel_home, ray_address=ray_cluster, ray_cpus_per_worker=4),
        generator=StandInGenerator(),
    )
    services.start()
    assert services.pool is not None
    pool = services.pool
    before = raylets()
    try:
        ready(services, count=2)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        # the head's token, where it wrote one (Ray 2.5x; 2.60 does not): join with it
        if (Path.home() / ".ray" / "auth_token").exists():
            env["RAY_AUTH_MODE"] = "token"
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "start", f"--address={ray_cluster}",
             "--num-cpus=4", "--disable-usage-stats"],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        (joined,) = raylets() - before
        until(lambda: pool.ready_workers == 3, 60, "an actor on the new node")

        os.kill(joined, signal.SIGKILL)  # the node is gone, and its actor with it
        until(lambda: len(pool.slots) == 2 and pool.ready_workers == 2, 60, "two actors again")
        job = services.submit_job(params("tiny-shapes", seed=1)).id
        services.wakeup.set()
        wait_jobs(services, [job], timeout=30)
        assert services.queue.get(job).status is JobStatus.SUCCEEDED
    finally:
        services.stop()
        for pid in raylets() - before:  # whatever is left of the joined node
            os.kill(pid, signal.SIGKILL)
