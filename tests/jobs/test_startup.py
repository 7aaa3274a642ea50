"""Start-up checks of EASEL_HOME: each fault (unwritable home or database, a file that is not
SQLite, a truncated or page-damaged database, one newer than the code, a new database beside an
earlier one's images) ends `easel serve` (and `easel keys`, `easel backup`) with one line on
stderr and exit code 2, before anything is written: the home is byte for byte as it was.

The databases are real ones made by Easel's own code, then damaged as a disk or an operator
would: cut short, a page overwritten, replaced by other bytes. The unwritable cases run the real
`python -m easel serve` in a subprocess: as root (this machine's user) permissions bind only
without CAP_DAC_OVERRIDE, so the process runs under `setpriv` with those capabilities dropped
from its bounding set, and the kernel itself answers EACCES.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

import easel.api.server
from easel.cli import main
from easel.config import Settings
from easel.jobs.db import MIGRATIONS, Database, DatabaseUnusable
from easel.jobs.images import DiskImageStore
from easel.jobs.standin import StandInGenerator
from easel.services import HomeUnusable, build_services, check_home
from tests.e2e.server import free_port

EVENT_ROWS = 400  # ~90 pages of 4 KiB: a page in the middle holds events


def make_home(home: Path) -> Path:
    """A real home: a job with an image (file and row) and enough events for many pages.
    Returns the database's path, closed (its WAL checkpointed into the file)."""
    db = Database(home / "easel.db")
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, task, model, params, width, height, status, created_at)"
            " VALUES ('j1', 'txt2img', 'tiny', '{}', 32, 32, 'succeeded', '2025-01-01')"
        )
        conn.executemany(
            "INSERT INTO events (job_id, type, data, created_at) VALUES ('j1', 'progress', ?, ?)",
            [(f'{{"step": {i}, "note": "{"x" * 500}"}}', "2025-01-01") for i in range(EVENT_ROWS)],
        )
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    DiskImageStore(db, home / "images").save(
        job_id="j1", index=0, seed=1, png=buffer.getvalue(), width=32, height=32, prompt="a"
    )
    db.close()
    assert not (home / "easel.db-wal").exists()
    return home / "easel.db"


def snapshot(home: Path) -> dict[str, str]:
    """Every path under ``home`` with its mode and its bytes' hash (folders: mode only)."""
    state = {}
    for path in sorted(home.rglob("*")):
        mode = oct(path.stat().st_mode)
        if path.is_file():
            state[str(path.relative_to(home))] = (
                mode + " " + hashlib.sha256(path.read_bytes()).hexdigest()
            )
        else:
            state[str(path.relative_to(home))] = mode
    return state


# --- the faults: each turns a good home (or the path of its database) into a damaged one -------


def truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def damage_page(db: Path) -> None:
    """Overwrite the whole page in the middle of the file, as a bad sector would (SQLite
    stops at its header: "database disk image is malformed")."""
    data = bytearray(db.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    middle = len(data) // page_size // 2 * page_size
    data[middle : middle + page_size] = b"\xa5" * page_size
    db.write_bytes(bytes(data))


def scramble_cells(db: Path) -> None:
    """Keep that page's header but scramble its cell pointers and cells, as a stray write
    (quick_check reads on and reports the page)."""
    data = bytearray(db.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    middle = len(data) // page_size // 2 * page_size
    data[middle + 8 : middle + page_size] = random.Random(36).randbytes(page_size - 8)
    db.write_bytes(bytes(data))


def not_sqlite(db: Path) -> None:
    db.write_bytes(b"<html><body>a page saved over the database</body></html>\n" * 100)


def newer(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")


def directory(db: Path) -> None:
    db.unlink()
    db.mkdir()


def zero_length(db: Path) -> None:
    db.write_bytes(b"")


def missing(db: Path) -> None:
    db.unlink()


Fault = Callable[[Path], None]
FAULTS: dict[Fault, list[str]] = {
    # fault: words the one line must hold
    truncate: ["easel.db is damaged (truncated: ", "restore", "easel backup"],
    damage_page: ["easel.db is damaged (SQLite: database disk image is malformed)", "restore"],
    scramble_cells: ["easel.db is damaged (PRAGMA quick_check: On tree page ", "restore"],
    not_sqlite: ["easel.db is not an SQLite database", "move it away", "easel backup"],
    newer: [f"newer Easel (schema version {len(MIGRATIONS) + 1}", "upgrade Easel"],
    directory: ["easel.db is not a file", "move it away"],
    # a new database while images/ has PNGs: the earlier queue's rows would be gone
    zero_length: ["easel.db is empty but", "holds images", "easel backup", "--fresh-db"],
    missing: ["easel.db is missing but", "holds images", "easel backup", "--fresh-db"],
}


@pytest.fixture
def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that wrongly passes would go on to start the server and hang the test: fail at
    the step after the checks instead."""

    def passed(settings: Settings, *, insecure: bool) -> None:
        raise AssertionError("the start-up checks passed on a home they should refuse")

    monkeypatch.setattr(easel.api.server, "check_binding", passed)


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("fault", list(FAULTS), ids=[f.__name__ for f in FAULTS])
def test_serve_refuses_a_faulty_home_with_one_line_and_changes_nothing(
    fault: Fault,
    easel_home: Path,
    capsys: pytest.CaptureFixture[str],
    never_serve: None,
) -> None:
    fault(make_home(easel_home))
    before = snapshot(easel_home)

    code = main(["serve", "--no-ui", "--port", "0"])

    out, err = capsys.readouterr()
    line = one_line(err)
    assert code == 2 and out == ""
    for words in FAULTS[fault]:
        assert words in line, line
    assert snapshot(easel_home) == before


@pytest.mark.parametrize(
    "fault", [damage_page, scramble_cells, not_sqlite, newer], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    "command",
    [["keys", "list"], ["keys", "create", "bob"], ["backup"]],
    ids=["keys-list", "keys-create", "backup"],
)
def test_keys_and_backup_give_the_same_line(
    fault: Fault,
    command: list[str],
    easel_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    never_serve: None,
) -> None:
    fault(make_home(easel_home))
    before = snapshot(easel_home)
    target = tmp_path / "backup"
    argv = [*command, str(target)] if command == ["backup"] else command

    assert main(argv) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert FAULTS[fault][0] in one_line(err)
    assert snapshot(easel_home) == before
    assert not target.exists()


def test_keys_refuse_to_make_a_new_database_beside_old_images(
    easel_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `easel keys create` would otherwise make (and migrate) the database the server then takes
    missing(make_home(easel_home))
    before = snapshot(easel_home)

    assert main(["keys", "create", "alice"]) == 2
    assert "--fresh-db" in one_line(capsys.readouterr().err)
    assert snapshot(easel_home) == before


@pytest.mark.parametrize("fault", [zero_length, missing], ids=lambda f: f.__name__)
def test_fresh_db_starts_a_new_queue_beside_old_images(fault: Fault, easel_home: Path) -> None:
    db = make_home(easel_home)
    fault(db)
    old_images = sorted((easel_home / "images").rglob("*.png"))
    settings = Settings(home=easel_home)
    with pytest.raises(HomeUnusable, match="--fresh-db"):
        check_home(settings)

    check_home(settings, fresh_db=True)

    services = build_services(settings, generator=StandInGenerator())
    services.start()
    try:
        assert services.db.version == len(MIGRATIONS)
        assert services.list_jobs() == [] and services.list_images() == []
    finally:
        services.stop()
    assert sorted((easel_home / "images").rglob("*.png")) == old_images  # left as they were
    check_home(settings)  # from now on it is the home's database: no flag needed


@pytest.mark.parametrize("fault", [zero_length, missing], ids=lambda f: f.__name__)
def test_a_new_database_without_images_needs_no_flag(fault: Fault, easel_home: Path) -> None:
    db = easel_home / "easel.db"
    db.write_bytes(b"")
    fault(db)
    settings = Settings(home=easel_home)

    check_home(settings)

    assert Database(db).version == len(MIGRATIONS)


def test_a_home_a_crash_left_passes_with_its_wal(easel_home: Path, tmp_path: Path) -> None:
    """After a crash the last commits are only in easel.db-wal: the check reads them without
    writing the database or the WAL, and passes; the server then finds every row."""
    make_home(easel_home)
    db = Database(easel_home / "easel.db")
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, task, model, params, width, height, status, created_at)"
            " VALUES ('j2', 'txt2img', 'tiny', '{}', 32, 32, 'running', '2025-01-02')"
        )
    crashed = tmp_path / "crashed"  # the files as a SIGKILL leaves them: db open, WAL full
    shutil.copytree(easel_home, crashed)
    db.close()
    assert (crashed / "easel.db-wal").stat().st_size > 0
    before = snapshot(crashed)

    check_home(Settings(home=crashed))

    # -shm is SQLite's shared-memory index of the WAL (any reader writes its read marks there)
    assert {k: v for k, v in snapshot(crashed).items() if not k.endswith("-shm")} == {
        k: v for k, v in before.items() if not k.endswith("-shm")
    }
    rows = Database(crashed / "easel.db").query("SELECT id FROM jobs ORDER BY id")
    assert [row["id"] for row in rows] == ["j1", "j2"]


def test_a_missing_home_is_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "new" / "easel-home"
    check_home(Settings(home=home))
    assert home.is_dir() and list(home.iterdir()) == []  # the write probe left nothing


def test_a_home_that_cannot_be_made_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    never_serve: None,
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("EASEL_HOME", str(tmp_path / "a-file" / "easel-home"))

    assert main(["serve", "--no-ui", "--port", "0"]) == 2

    line = one_line(capsys.readouterr().err)
    assert "cannot create EASEL_HOME=" in line and "Not a directory" in line


def test_database_refuses_bad_files_itself(easel_home: Path) -> None:
    # for code that opens the database without check_home (create_app over build_services)
    db = make_home(easel_home)
    not_sqlite(db)
    with pytest.raises(DatabaseUnusable, match="not an SQLite database"):
        Database(db)
    make_home(easel_home / "other")
    newer(easel_home / "other" / "easel.db")
    with pytest.raises(DatabaseUnusable, match="newer Easel"):
        Database(easel_home / "other" / "easel.db")


# --- the real command in a subprocess ---------------------------------------------------------


def run_serve(home: Path, *, drop_root: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m easel serve` on ``home``; ``drop_root``: without the capabilities that let
    root ignore file permissions (as root; another user is bound by them anyway)."""
    command = [sys.executable, "-m", "easel", "serve", "--no-ui", "--port", str(free_port())]
    if drop_root and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be made to bind")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    env = {**os.environ, "EASEL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_serve_on_a_damaged_database_exits_2_with_one_line(easel_home: Path) -> None:
    damage_page(make_home(easel_home))
    before = snapshot(easel_home)

    result = run_serve(easel_home)

    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "easel.db is damaged (SQLite: database disk image is malformed)" in line
    assert result.stdout == ""
    assert snapshot(easel_home) == before


@pytest.fixture
def read_only(easel_home: Path) -> Iterator[list[Path]]:
    """Paths to chmod read-only for one test; their modes are put back afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize(
    ("target", "words"),
    [(".", "cannot write to EASEL_HOME="), ("easel.db", "easel.db (Permission denied)")],
    ids=["home", "database"],
)
def test_serve_on_a_read_only_home_exits_2_with_one_line(
    target: str, words: str, easel_home: Path, read_only: list[Path]
) -> None:
    make_home(easel_home)
    path = easel_home / target
    path.chmod(0o555 if path.is_dir() else 0o444)
    read_only.append(path)
    before = snapshot(easel_home)

    result = run_serve(easel_home, drop_root=True)

    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert words in line and "Permission denied" in line and "writable" in line
    assert snapshot(easel_home) == before
