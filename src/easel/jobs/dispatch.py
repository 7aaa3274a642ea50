"""Which waiting job goes to which worker: model-affinity dispatch, one pure function.

Loading a model costs seconds to minutes; a denoising job, seconds. So a job goes to a worker
that already holds its model whenever one has room, and a worker loads a model it does not hold
only when that pays:

1. A free worker holding the job's model takes it (the least busy such worker).
2. Nobody holds the model: a free worker loads it, preferring one with nothing to do, then one
   with a spare model slot, and one whose least recently used model (the one it evicts) no
   waiting job needs or another worker also holds; failing that, any free worker.
3. Holders exist but all are busy: the job waits for them, unless waiting costs more than
   loading, which is so when
   a. ``backlog * job_s / holders > load_s`` (the model's jobs waiting from this one on, shared
      by its holders): then a free worker loads a copy, if doing so evicts no model that other
      waiting jobs need and nobody else holds; or
   b. more of the model's jobs wait (from this one on) than it has holders, so they fall
      behind: then a free worker with a spare slot loads a copy, which evicts nothing; once the
      job has waited ``load_s``, a free worker may also drop for it a model that no job waits
      for and another worker also holds.
   Popular models spread over more workers this way, rare ones stay on one. Without (b) a model
   spreads only as far as its visible queue pays for at ``load_s / job_s`` jobs per holder (12
   with 12 s loads and 1 s jobs): a 1,000-worker cluster whose dispatcher sees 2,000 waiting
   jobs used ~170 workers and thrashed once jobs starved (``bench/dispatch_sim.py``,
   docs/BENCHMARKS.md). (b) evicts only copies nobody waits for: it did not thrash there.
4. Fairness: a job that has waited ``starve_after_s`` goes to any free worker, whatever it evicts.

Jobs are looked at in queue order (priority, owners' turns, age), so within one model the order
is the queue's; a job skipped in step 3 keeps its place. One call costs a pass over the workers'
held models plus, per waiting job, work in the free workers only. The server's Ray pool
(:mod:`easel.jobs.raypool`) and the simulation in ``bench/dispatch_sim.py`` both call
:func:`assign`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WaitingJob:
    id: str
    model: str
    waited_s: float


@dataclass(frozen=True)
class WorkerView:
    """What the dispatcher knows of a worker."""

    id: str
    models: tuple[str, ...]  # held (loaded or on their way), least recently used first
    slots: int  # models that fit in its memory at once
    busy: int  # jobs in flight
    capacity: int = 1  # jobs in flight at most


@dataclass(frozen=True)
class Costs:
    load_s: float  # seconds to load the model on a worker
    job_s: float  # seconds one of its jobs takes


def assign(
    waiting: Sequence[WaitingJob],
    workers: Sequence[WorkerView],
    costs: Callable[[str], Costs],
    *,
    starve_after_s: float,
) -> list[tuple[str, str]]:
    """(job id, worker id) for each job to dispatch now, in queue order."""
    free = {w.id: w for w in workers if w.busy < w.capacity}
    if not free or not waiting:
        return []
    holders = Counter(model for w in workers for model in w.models)  # busy or free
    # only free workers change in this call: their state, updated as jobs are placed
    busy = {w: view.busy for w, view in free.items()}
    slots = {w: view.slots for w, view in free.items()}
    models = {w: list(view.models) for w, view in free.items()}
    free_holders: dict[str, set[str]] = {}
    for w, held in models.items():
        for model in held:
            free_holders.setdefault(model, set()).add(w)
    backlog = Counter(job.model for job in waiting)  # jobs of each model not yet placed
    plan: list[tuple[str, str]] = []

    def victim(worker: str) -> str | None:
        """The model that loading one more on ``worker`` would evict (its least recently
        used), or None when it has a spare slot."""
        held = models[worker]
        return held[0] if len(held) >= slots[worker] else None

    def anything(model: str) -> bool:
        return True

    def not_needed_alone(model: str) -> bool:
        """No waiting job needs it, or another worker holds it too."""
        return backlog[model] == 0 or holders[model] > 1

    def spare_copy(model: str) -> bool:
        """No waiting job needs it, and another worker holds it too."""
        return backlog[model] == 0 and holders[model] > 1

    def nothing(model: str) -> bool:
        return False

    def newcomer(may_evict: Callable[[str], bool]) -> str | None:
        """The free worker to load a model it does not hold, among those whose victim (if
        any) may go: one with nothing to do first, then one with a spare slot."""
        candidates = [w for w in free if (v := victim(w)) is None or may_evict(v)]
        return min(
            candidates,
            key=lambda w: (busy[w] > 0, victim(w) is not None, busy[w], w),
            default=None,
        )

    for job in waiting:
        if not free:
            break
        model = job.model
        pick = min(free_holders.get(model, ()), key=lambda w: (busy[w], w), default=None)
        if pick is None and not holders[model]:
            pick = newcomer(not_needed_alone) or newcomer(anything)
        elif pick is None:
            cost = costs(model)
            if job.waited_s >= starve_after_s:
                pick = newcomer(anything)
            elif backlog[model] * cost.job_s / holders[model] > cost.load_s:
                pick = newcomer(not_needed_alone)
            elif backlog[model] > holders[model]:
                pick = newcomer(nothing)
                if pick is None and job.waited_s >= cost.load_s:
                    pick = newcomer(spare_copy)
        backlog[model] -= 1
        if pick is None:
            continue
        plan.append((job.id, pick))
        busy[pick] += 1
        held = models[pick]
        for m in held:
            free_holders[m].discard(pick)
        if model in held:
            held.remove(model)
        else:
            if (dropped := victim(pick)) is not None:
                held.remove(dropped)
                holders[dropped] -= 1
            holders[model] += 1
        held.append(model)  # most recently used last
        if busy[pick] >= free[pick].capacity:
            del free[pick]
        else:
            for m in held:
                free_holders.setdefault(m, set()).add(pick)
    return plan
