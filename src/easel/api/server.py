"""``easel serve``: the API (and the web UI when Gradio is installed) under uvicorn.

SIGTERM or Ctrl-C drains: workers claim nothing new, the running job gets
``settings.drain_timeout_s`` to finish and is otherwise put back in the queue, so nothing
accepted is lost; then every open event stream gets a ``server-stopping`` event and closes
(:mod:`easel.api.graceful`). Also runnable as ``python -m easel.api.server [--host H] [--port P]``.

Module-level imports stay light (the CLI imports :func:`register` for every command); the
server's dependencies load in :func:`serve`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from easel.api.app import MountUI
    from easel.config import Settings

log = logging.getLogger(__name__)

# After the drain has ended every event stream (easel.api.graceful), uvicorn waits this long
# for the connections still open to finish their responses before it cuts them.
CONNECTIONS_GRACE_S = 3


def find_ui() -> MountUI | None:
    """The web UI's mount function, or None when Gradio is not installed (API only)."""
    try:
        from easel.ui.app import mount_ui
    except ImportError as exc:
        log.warning("web UI disabled (%s); serving the API only", exc)
        return None
    return mount_ui


def check_binding(settings: Settings, *, insecure: bool) -> None:
    """Refuse (EaselError: exit 2) to leave loopback while no API key exists: anyone who
    reaches the port could use the server, read every image and fill the disk."""
    from easel.domain import EaselError
    from easel.jobs.db import Database
    from easel.jobs.keys import KeyStore
    from easel.services import is_loopback

    if insecure or is_loopback(settings.host):
        return
    db = Database(settings.db_path)
    try:
        has_keys = KeyStore(db).any_made()  # all revoked: it refuses everyone, also safe
    finally:
        db.close()
    if not has_keys:
        raise EaselError(
            f"refusing to serve on {settings.host} without API keys: anyone who can reach "
            "the port could use it. Make a key first (`easel keys create NAME --scope admin`), "
            "or pass --insecure if something in front of Easel checks who comes in"
        )


def serve(
    settings: Settings, *, ui: bool = True, insecure: bool = False, fresh_db: bool = False
) -> None:
    """Run the server until SIGTERM/SIGINT, then drain the queue's workers. A home that cannot
    be used (unwritable, a damaged database, a new one beside old images without ``fresh_db``)
    raises EaselError before uvicorn starts, so ``easel serve`` prints one line and exits 2."""
    import uvicorn

    from easel.api.app import create_app
    from easel.api.graceful import GracefulServer
    from easel.services import build_services, check_home

    check_home(settings, fresh_db=fresh_db)  # first: anything else would open (make) the db
    check_binding(settings, insecure=insecure)
    if not logging.getLogger().handlers:  # Easel's own INFO lines (recovery, pruning) too
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    services = build_services(settings)
    services.lock_home()
    app = create_app(services, mount_ui=find_ui() if ui else None)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=CONNECTIONS_GRACE_S,
        log_level="info",
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"Easel on http://{host}:{settings.port}/  (API docs: /docs)", flush=True)
    GracefulServer(config, app).run()


def register(commands: Any) -> None:
    """Add ``serve`` to the ``easel`` command's subparsers."""
    parser = commands.add_parser("serve", help="run the web UI and REST API")
    parser.add_argument("--host", help="address to bind (default: settings.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: settings.port, 7860)")
    parser.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without API keys (only behind something that "
        "authenticates)",
    )
    parser.add_argument(
        "--fresh-db",
        action="store_true",
        help="start a new, empty database although EASEL_HOME/images holds images from an "
        "earlier one (refused otherwise)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run generations on Ray actors: `auto` (the cluster this machine is in, else a "
        "new local one) or the cluster's HOST:PORT / ray://HOST:PORT (needs easel[ray])",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="with --ray: actors to keep (default: one per GPU of the cluster, or per "
        "ray_cpus_per_worker CPUs); without: worker threads on the CPU",
    )
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from easel.config import Settings
    from easel.domain import EaselError

    if args.workers is not None and args.workers < 1:
        raise EaselError(f"--workers must be at least 1 (got {args.workers})", field="workers")
    workers_setting = "ray_workers" if args.ray else "cpu_workers"
    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("ray_address", args.ray),
            (workers_setting, args.workers),
        )
        if v is not None
    }
    serve(Settings(**overrides), ui=not args.no_ui, insecure=args.insecure, fresh_db=args.fresh_db)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main_parser = argparse.ArgumentParser(prog="python -m easel.api.server")
    register(main_parser.add_subparsers(dest="command", required=True))
    parsed = main_parser.parse_args(["serve", *sys.argv[1:]])
    parsed.func(parsed)
