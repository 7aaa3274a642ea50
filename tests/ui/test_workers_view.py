"""The Workers tab's table (a pure function over WorkerStatus, no browser)."""

from __future__ import annotations

from easel.domain import WorkerStatus
from easel.ui.workers import workers_html


def test_rows_show_each_worker_and_hide_nothing_but_what_services_hid() -> None:
    statuses = [
        WorkerStatus(
            id="cuda:0-0",
            node="box",
            device="cuda:0",
            pid=7,
            state="busy",
            models=["sd-turbo", "<b>odd</b>"],
            job="0123456789abcdef",
            jobs_done=12,
            busy_s=30,
            up_s=120,
        ),
        # busy with a job the page's key may not see (Services.list_workers set job=None)
        WorkerStatus(id="cuda:1-1", node="box", device="cuda:1", pid=7, state="busy"),
        WorkerStatus(id="cpu-2", node="box", device="cpu", pid=7, state="stopped"),
    ]
    page = workers_html(statuses, {"queued": 3, "running": 2, "succeeded": 9})
    assert "3 workers · queue: 3 queued · 2 running" in page
    first, second, third = page.split("<tr data-worker=")[1:]
    assert '"cuda:0-0" data-state="busy"' in first
    assert 'title="0123456789abcdef">01234567</code>' in first
    assert "sd-turbo, &lt;b&gt;odd&lt;/b&gt;" in first  # names are escaped
    assert ">12</td>" in first and ">25%</span>" in first
    assert "another key's job" in second and "<code" not in second
    assert 'data-state="stopped"' in third and "—" in third and ">none</td>" in third


def test_no_workers_is_one_line() -> None:
    assert workers_html([], {}) == '<p class="easel-workers-summary">0 workers</p>'
