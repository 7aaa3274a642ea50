"""The Workers tab: each worker's device, state, current job, loaded models, jobs done and busy
share, and the queue's counts, refreshed every :data:`REFRESH_S` while the tab is shown.

    tab = workers_view()                                  # inside a gr.Tab, in build_ui
    wire_workers(services, tab, shown=workers_tab.select, hidden=[other_tab.select, ...])

It reads ``services.list_workers`` (what ``GET /api/v1/workers`` answers): a job's id shows
only to its owner and admins, like everywhere else.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from easel.domain import WorkerStatus
from easel.services import Services
from easel.ui.access import acting_for
from easel.ui.jobs import user_errors

REFRESH_S = 3.0  # seconds between refreshes while the tab is shown
QUEUE_STATES = ("queued", "running")  # the queue's counts shown above the table

CSS = """
#workers table { width: 100%; border-collapse: collapse; font-size: .95rem; }
#workers th, #workers td { text-align: left; padding: .35rem .6rem;
  border-bottom: 1px solid var(--border-color-primary); vertical-align: top; }
#workers td.num, #workers th.num { text-align: right; }
#workers td.num { font-variant-numeric: tabular-nums; }
#workers .easel-worker-state { padding: .05rem .45rem; border-radius: var(--radius-sm);
  background: var(--background-fill-secondary); }
#workers tr[data-state="busy"] .easel-worker-state { background: #dbeafe; color: #1e3a8a; }
#workers tr[data-state="dead"] .easel-worker-state { background: #fee2e2; color: #991b1b; }
#workers .easel-busy { display: flex; align-items: center; gap: .4rem; }
#workers .easel-busy progress { width: 4rem; height: .6rem; }
"""


@dataclass
class WorkersTab:
    """The tab's components, for wiring."""

    table: gr.HTML
    timer: gr.Timer


def workers_view() -> WorkersTab:
    """The tab's layout (inside its ``gr.Tab``); empty until :func:`wire_workers`' refresh."""
    table = gr.HTML(workers_html([], {}), elem_id="workers")
    gr.Markdown(
        f"Refreshed every {REFRESH_S:.0f} s while this tab is open. The same figures: "
        "`GET /api/v1/workers`, and `GET /metrics` for Prometheus.",
        elem_id="workers-note",
    )
    return WorkersTab(table=table, timer=gr.Timer(REFRESH_S, active=False))


def wire_workers(services: Services, tab: WorkersTab, *, shown: Any, hidden: list[Any]) -> None:
    """Refresh the table when the tab is shown (``shown``: its Tab's ``select``) and on each
    timer tick while it stays shown; ``hidden``: the other tabs' ``select``, which stop the
    timer (a page on another tab asks nothing)."""

    def refresh(request: gr.Request | None = None) -> str:
        with user_errors():
            principal = acting_for(services, request)
            counts = services.queue_summary(principal).counts
            return workers_html(services.list_workers(principal), counts)

    def start(request: gr.Request | None = None) -> tuple[str, gr.Timer]:
        return refresh(request), gr.Timer(active=True)

    shown(start, None, [tab.table, tab.timer], api_visibility="private", queue=False)
    for event in hidden:
        event(
            lambda: gr.Timer(active=False), None, tab.timer, api_visibility="private", queue=False
        )
    tab.timer.tick(
        refresh, None, tab.table, api_visibility="private", queue=False, show_progress="hidden"
    )


def workers_html(statuses: list[WorkerStatus], counts: dict[str, int]) -> str:
    """The table: one row a worker (``data-worker`` its id, ``data-state`` its state)."""
    queue = " · ".join(f"{counts.get(state, 0)} {state}" for state in QUEUE_STATES)
    head = (
        f'<p class="easel-workers-summary">{_count(len(statuses), "worker")}'
        f"{f' · queue: {queue}' if counts else ''}</p>"
    )
    if not statuses:
        return head
    columns = ("Worker", "Device", "State", "Current job", "Loaded models")
    numbers = ("Jobs done", "Busy")
    header = "".join(f"<th>{c}</th>" for c in columns) + "".join(
        f'<th class="num">{c}</th>' for c in numbers
    )
    rows = "".join(_row(s) for s in statuses)
    return f"{head}<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"


def _row(status: WorkerStatus) -> str:
    e = html.escape
    if status.job is not None:
        job = f'<code title="{e(status.job)}">{e(status.job[:8])}</code>'
    else:
        job = "busy (another key's job)" if status.state == "busy" else "—"
    models = ", ".join(e(m) for m in status.models) or "none"
    percent = round(100 * status.busy_ratio)
    busy = (
        f'<span class="easel-busy"><progress value="{percent}" max="100"></progress>'
        f"{percent}%</span>"
    )
    cells = (
        f"<td>{e(status.id)}</td><td>{e(status.device)}</td>"
        f'<td><span class="easel-worker-state">{e(status.state)}</span></td>'
        f'<td class="easel-worker-job">{job}</td><td class="easel-worker-models">{models}</td>'
        f'<td class="num easel-worker-done">{status.jobs_done}</td>'
        f'<td class="num">{busy}</td>'
    )
    return f'<tr data-worker="{e(status.id)}" data-state="{e(status.state)}">{cells}</tr>'


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
