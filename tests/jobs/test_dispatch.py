"""Model-affinity dispatch (easel.jobs.dispatch.assign), a pure function: small clusters."""

from __future__ import annotations

from easel.jobs.dispatch import Costs, WaitingJob, WorkerView, assign

COSTS = Costs(load_s=12.0, job_s=1.0)  # Z-Image-Turbo-like: a load costs 12 jobs
STARVE_S = 120.0


def job(id: str, model: str, waited_s: float = 0.0) -> WaitingJob:
    return WaitingJob(id=id, model=model, waited_s=waited_s)


def worker(id: str, *models: str, slots: int = 2, busy: int = 0, capacity: int = 1) -> WorkerView:
    return WorkerView(id=id, models=models, slots=slots, busy=busy, capacity=capacity)


def plan(waiting: list[WaitingJob], workers: list[WorkerView]) -> list[tuple[str, str]]:
    return assign(waiting, workers, lambda model: COSTS, starve_after_s=STARVE_S)


def test_a_free_holder_takes_the_job_over_an_idle_worker_without_the_model() -> None:
    workers = [worker("empty"), worker("other", "b"), worker("holder", "b", "a")]
    assert plan([job("j1", "a")], workers) == [("j1", "holder")]


def test_the_least_busy_holder_takes_the_job() -> None:
    workers = [worker("w1", "a", busy=1, capacity=2), worker("w2", "a", capacity=2)]
    assert plan([job("j1", "a")], workers) == [("j1", "w2")]


def test_a_model_nobody_holds_loads_where_it_evicts_nothing() -> None:
    workers = [worker("full", "b", "c"), worker("busy", busy=1), worker("roomy", "b")]
    assert plan([job("j1", "a")], workers) == [("j1", "roomy")]


def test_a_burst_of_a_new_model_loads_it_once_and_waits_for_that_copy() -> None:
    workers = [worker("w1"), worker("w2"), worker("w3")]
    # the second job's one holder (w1, loading) will finish it long before a copy loads
    assert plan([job("j1", "a"), job("j2", "a")], workers) == [("j1", "w1")]


def test_a_job_waits_for_its_busy_holder_when_its_backlog_is_short() -> None:
    workers = [worker("holder", "a", busy=1), worker("idle", "b", "c")]
    assert plan([job("j1", "a")], workers) == []


def test_a_backlog_longer_than_a_load_spreads_the_model_to_another_worker() -> None:
    # 13 jobs for one busy holder: 13 s of waiting for the last one > a 12 s load
    workers = [worker("holder", "a", busy=1), worker("idle", "b", "c")]
    waiting = [job(f"j{i}", "a") for i in range(13)]
    assert plan(waiting, workers) == [("j0", "idle")]
    # 12 jobs: waiting for the holder costs no more than loading
    assert plan(waiting[:12], workers) == []


def test_more_jobs_than_holders_fill_spare_slots_but_evict_nothing() -> None:
    holder = worker("holder", "a", busy=1)
    waiting = [job("j1", "a"), job("j2", "a"), job("j3", "a")]
    assert plan(waiting, [holder, worker("roomy", "b")]) == [("j1", "roomy")]
    assert plan(waiting, [holder, worker("full", "b", "c")]) == []


def test_jobs_falling_behind_for_a_load_time_drop_a_copy_nobody_waits_for() -> None:
    # three jobs of a for one busy holder, every free worker full: a's jobs wait, until the
    # oldest has waited a load's time; then a spare copy (b: no job, two holders) makes room
    workers = [
        worker("holder", "a", busy=1),
        worker("c-only", "c", slots=1),
        worker("b-spare", "b", slots=1),
        worker("b-busy", "b", busy=1),
    ]
    fresh = [job("a1", "a", waited_s=11.0), job("a2", "a"), job("a3", "a"), job("c1", "c")]
    assert plan(fresh, workers) == [("c1", "c-only")]
    behind = [job("a1", "a", waited_s=12.0), job("a2", "a"), job("a3", "a")]
    assert plan(behind, workers) == [("a1", "b-spare")]
    # b wanted: its copy stays, and a's jobs wait for their holder
    assert plan([*behind, job("b1", "b")], workers[:3]) == [("b1", "b-spare")]


def test_a_copy_never_evicts_a_model_that_waiting_jobs_need_and_nobody_else_holds() -> None:
    # "x-only" holds x alone (one slot) and x has a job waiting: a's long backlog may not take it
    workers = [worker("holder", "a", busy=1), worker("x-only", "x", slots=1)]
    waiting = [*(job(f"a{i}", "a") for i in range(20)), job("x1", "x")]
    assert plan(waiting, workers) == [("x1", "x-only")]


def test_a_copy_may_evict_a_model_another_worker_also_holds() -> None:
    workers = [
        worker("holder", "a", busy=1),
        worker("x-too", "x", slots=1),
        worker("x-busy", "x", busy=1),
    ]
    waiting = [*(job(f"a{i}", "a") for i in range(20)), job("x1", "x")]
    assert plan(waiting, workers) == [("a0", "x-too")]


def test_a_starving_job_takes_any_free_worker_whatever_it_evicts() -> None:
    workers = [worker("holder", "a", busy=1), worker("x-only", "x", slots=1)]
    assert plan([job("a1", "a", waited_s=119.0), job("x1", "x")], workers) == [("x1", "x-only")]
    starving = [job("a1", "a", waited_s=120.0), job("x1", "x")]
    assert plan(starving, workers) == [("a1", "x-only")]


def test_jobs_of_one_model_go_out_in_queue_order() -> None:
    waiting = [job("old", "a", waited_s=5.0), job("b1", "b"), job("new", "a", waited_s=1.0)]
    one_holder = [worker("w1", "a")]
    assert plan(waiting, one_holder) == [("old", "w1")]
    two = [worker("w1", "a"), worker("w2", "a"), worker("w3", "b")]
    assert plan(waiting, two) == [("old", "w1"), ("b1", "w3"), ("new", "w2")]


def test_a_worker_takes_jobs_up_to_its_capacity_in_one_call() -> None:
    workers = [worker("w1", "a", capacity=2), worker("w2", "a", busy=1)]
    waiting = [job("j1", "a"), job("j2", "a"), job("j3", "a")]
    assert plan(waiting, workers) == [("j1", "w1"), ("j2", "w1")]


def test_nothing_to_do_without_free_workers_or_waiting_jobs() -> None:
    assert plan([job("j1", "a")], [worker("w1", "a", busy=1)]) == []
    assert plan([], [worker("w1", "a")]) == []


def test_a_large_cluster_places_every_job_on_a_holder() -> None:
    # 1,000 workers, 20 models three to a worker, half of them busy: 300 jobs, no loads needed
    names = [f"m{k:02d}" for k in range(20)]
    workers = [
        worker(f"w{i:04d}", *(names[(i + k) % 20] for k in range(3)), slots=3, busy=i % 2)
        for i in range(1000)
    ]
    held = {w.id: set(w.models) for w in workers}
    waiting = [job(f"j{i}", names[i % 20]) for i in range(300)]
    result = plan(waiting, workers)
    assert len(result) == 300
    assert len({w for _, w in result}) == 300
    by_id = {j.id: j.model for j in waiting}
    assert all(by_id[j] in held[w] for j, w in result)
