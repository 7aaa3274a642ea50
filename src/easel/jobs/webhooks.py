"""Webhooks: a job that names a ``webhook`` URL is POSTed there once it ends (succeeded, failed,
canceled), signed, from a durable outbox, retried with backoff, only to allowed hosts.

The outbox. A job's final event and its delivery row commit in one transaction
(:meth:`Webhooks.enqueue` runs as the event bus's final-event hook, inside the transaction
that records the job's end), so a crash can never end a job without its delivery, nor queue a
delivery for an end that rolled back. A sender thread posts due rows; each try is counted in
the database before it is made, so after a restart the pending rows go on where they were.

Delivery is at least once: a crash after the receiver answered but before the row is marked
delivered sends it again. Every try of a delivery carries the same ``Easel-Delivery`` id, so a
receiver that keeps the ids it has seen processes each delivery once.

The request::

    POST <webhook>
    Content-Type: application/json
    Easel-Delivery: 3f2c...            one id per delivery, the same on every retry
    Easel-Event: job.succeeded         job.failed, job.canceled
    Easel-Signature: t=1733500000,v1=5d41...   HMAC-SHA256(secret, f"{t}." + body), hex

    {...the job, exactly as GET /api/v1/jobs/{id} shows it at its end...}

The secret. Each key has its own, derived from one server secret (``webhook_secret``, or one
generated once and kept in the database, so backups carry it): ``HMAC-SHA256(server secret,
"easel-webhook:" + key id)``, so one key's receiver cannot be sent deliveries signed as
another's. A key reads its own with ``GET /api/v1/webhooks/secret``.

Safety (what a job's author must not be able to make the server do):

- only hosts in ``webhook_hosts`` (empty: webhooks off): a name, an IP address,
  ``*.example.com`` or ``*``;
- a host matched only by a wildcard must resolve to public addresses: loopback, private,
  link-local and reserved ones are refused (SSRF) unless ``webhook_hosts`` names the host
  itself; the connection goes to the address that was checked (no second lookup to rebind);
- http and https only, no user name or password in the URL, no redirect followed (a 3xx is
  a failed try), ``webhook_timeout_s`` per connect and read, at most 4 KiB of a response read.

    webhooks = Webhooks(db, queue, WebhookPolicy.from_settings(settings))
    events.final_hooks.append(webhooks.enqueue)
    webhooks.start()    # the sender thread; stop() ends it
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx

from easel.domain import InvalidParams, JobRecord, check_text
from easel.jobs.db import Database
from easel.jobs.queue import JobQueue, utcnow

if TYPE_CHECKING:
    from easel.config import Settings
    from easel.jobs.events import JobEvent

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Easel-Signature"
DELIVERY_HEADER = "Easel-Delivery"
EVENT_HEADER = "Easel-Event"
USER_AGENT = "Easel-Webhooks/1"
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048
MAX_RESPONSE_BYTES = 4096  # read of a receiver's answer (for the log), never more
MAX_WAIT_S = 3600.0  # the longest pause between two tries of one delivery
IDLE_WAIT_S = 60.0  # how long the sender sleeps when nothing is due and nobody wakes it
BATCH = 20  # due deliveries read at once
SIGNATURE_TOLERANCE_S = 300  # what verify() accepts by default (receivers: the same)

Match = Literal["named", "wildcard"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """The delivery may not be made at all (no retry): its host is no longer allowed, or
    resolves to an address only an explicitly named host may have."""


@dataclass(frozen=True)
class WebhookPolicy:
    """Where and how deliveries go (from ``Settings.webhook_*``)."""

    hosts: tuple[str, ...] = ()  # lower case, IPv6 without brackets; empty: webhooks off
    attempts: int = 8
    backoff_s: float = 30.0  # the wait after the first failed try; doubles after each
    timeout_s: float = 10.0
    # the server secret (None: generated, kept in the database); never in a repr or log
    secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(
            hosts=tuple(normal_host(h) for h in settings.webhook_hosts if h.strip()),
            attempts=settings.webhook_attempts,
            backoff_s=settings.webhook_backoff_s,
            timeout_s=settings.webhook_timeout_s,
            secret=settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    def wait_after(self, attempts: int) -> float:
        """Seconds between try ``attempts`` (1 = the first) and the next."""
        return min(self.backoff_s * 2 ** (attempts - 1), MAX_WAIT_S)

    def match(self, host: str) -> Match | None:
        """How ``webhook_hosts`` allows ``host``: "named" (the host or address itself is
        listed), "wildcard" (``*`` or ``*.domain``), or None (not allowed)."""
        host = normal_host(host)
        if host in self.hosts:
            return "named"
        address = _address(host)
        if address is not None and any(_address(h) == address for h in self.hosts):
            return "named"  # the same address written another way (::1, 0:0:0:0:0:0:0:1)
        if "*" in self.hosts:
            return "wildcard"
        if address is None and any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts):
            return "wildcard"
        return None


def normal_host(host: str) -> str:
    """A host as ``webhook_hosts`` compares it: lower case, no trailing dot, no brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def _address(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def is_public(address: IPAddress) -> bool:
    """Whether a wildcard-allowed host may resolve to ``address``: not loopback, private,
    link-local, shared (CGNAT), multicast, reserved or unspecified."""
    return address.is_global and not address.is_multicast


def check_url(url: object, policy: WebhookPolicy) -> str:
    """The ``webhook`` field of a job, checked: InvalidParams naming ``webhook`` unless it is
    an http(s) URL without credentials whose host ``policy`` allows (and, for an address
    written in the URL, one a wildcard may reach). Host names are resolved only when a
    delivery is made."""
    if not isinstance(url, str):
        raise InvalidParams("webhook must be a URL (text)", field="webhook")
    check_text(url, "webhook")
    if not policy.enabled:
        raise InvalidParams(
            "webhook: webhooks are off on this server; its owner turns them on by listing the "
            "hosts jobs may call in the webhook_hosts setting (EASEL_WEBHOOK_HOSTS)",
            field="webhook",
        )
    if len(url) > MAX_URL_CHARS:
        raise InvalidParams(
            f"webhook must be at most {MAX_URL_CHARS} characters (got {len(url)})",
            field="webhook",
        )
    try:
        parsed = httpx.URL(url)
        host, scheme, port = parsed.host, parsed.scheme, parsed.port
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise InvalidParams(f"webhook is not a valid URL: {url!r}", field="webhook") from None
    if port is not None and not 0 < port < 65536:
        raise InvalidParams(f"webhook: port {port} is out of range", field="webhook")
    if scheme not in ("http", "https") or not host:
        raise InvalidParams(
            f"webhook must be an http:// or https:// URL with a host (got {url!r})",
            field="webhook",
        )
    if parsed.userinfo:
        raise InvalidParams(
            "webhook may not hold a user name or password; verify deliveries by their "
            "signature (or put a token in the path or query)",
            field="webhook",
        )
    match = policy.match(host)
    if match is None:
        raise InvalidParams(
            f"webhook: host {host!r} is not one this server calls; its owner allows hosts in "
            "the webhook_hosts setting (EASEL_WEBHOOK_HOSTS)",
            field="webhook",
        )
    address = _address(normal_host(host))
    if match == "wildcard" and address is not None and not is_public(address):
        raise InvalidParams(
            f"webhook: {host} is not a public address; only a host that webhook_hosts names "
            "itself may be loopback or private",
            field="webhook",
        )
    return url


# --- what is sent -------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    """A time as the API's JSON writes it (pydantic: ISO 8601, UTC as Z)."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def job_document(job: JobRecord) -> dict[str, Any]:
    """The job as ``GET /api/v1/jobs/{id}`` shows it once it has ended (``JobPublic``; a test
    keeps the two the same)."""
    return {
        "id": job.id,
        "status": job.status.value,
        "task": job.task,
        "model": job.model,
        "priority": job.priority,
        "owner": job.owner,
        "position": None,  # an ended job has no place in the queue, no ETA
        "eta_seconds": None,
        "progress": {"step": job.step, "total": job.total_steps},
        "images": [
            {
                "id": i.id,
                "url": f"/api/v1/images/{i.id}",
                "seed": i.seed,
                "width": i.width,
                "height": i.height,
            }
            for i in job.images
        ],
        "error": job.error,
        "attempts": job.attempts,
        "params": job.params.to_dict(),
        "webhook": job.webhook,
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
    }


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Easel-Signature`` header value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver does (docs/WEBHOOKS.md has the same in a dozen lines): the signature
    is ``secret``'s over ``body`` and its timestamp is within ``tolerance_s`` of ``now``."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        parts.setdefault(name, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))


# --- the outbox and its sender ------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One row of the outbox."""

    id: str
    job_id: str
    owner: str | None
    url: str
    event: str
    body: str
    status: str  # pending, delivered, dead
    attempts: int
    last_error: str | None


COLUMNS = ", ".join(f.name for f in fields(Delivery))


class Webhooks:
    """The outbox (table ``webhook_deliveries``) and the thread that sends it."""

    def __init__(
        self,
        db: Database,
        queue: JobQueue,
        policy: WebhookPolicy,
        *,
        transport: httpx.BaseTransport | None = None,
        resolve: Callable[[str, int], list[IPAddress]] | None = None,
    ) -> None:
        self.db = db
        self.queue = queue
        self.policy = policy
        self._resolve = resolve or resolve_host
        self._client = httpx.Client(
            follow_redirects=False,  # a redirect could lead anywhere: it is a failed try
            trust_env=False,  # no proxy from the environment: the checked address is called
            timeout=httpx.Timeout(policy.timeout_s),
            # no connection kept: one made for one host's name (TLS checked against it) must
            # not carry a request for another name at the same address
            limits=httpx.Limits(max_keepalive_connections=0),
            transport=transport,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server_secret: str | None = policy.secret

    # --- the secret -----------------------------------------------------------------------------

    def secret_for(self, owner: str | None) -> str:
        """The signing secret of ``owner``'s deliveries (a key id; None: the keyless user)."""
        key = self._master().encode()
        mac = hmac.new(key, f"easel-webhook:{owner or 'local'}".encode(), hashlib.sha256)
        return SECRET_PREFIX + mac.hexdigest()

    def _master(self) -> str:
        """The server secret: the setting, or the one this database keeps (made on first use;
        INSERT OR IGNORE, so two processes agree on the first)."""
        if self._server_secret is None:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO webhook_secret (id, secret, created_at)"
                    " VALUES (1, ?, ?)",
                    (secrets.token_hex(32), utcnow()),
                )
                (self._server_secret,) = conn.execute(
                    "SELECT secret FROM webhook_secret WHERE id = 1"
                ).fetchone()
        assert self._server_secret is not None
        return self._server_secret

    # --- the outbox -----------------------------------------------------------------------------

    def enqueue(self, event: JobEvent) -> None:
        """The final-event hook: inside the transaction that records the job's end, queue a
        delivery when the job names a webhook (at most one per job)."""
        rows = self.db.query("SELECT webhook FROM jobs WHERE id = ?", (event.job_id,))
        if not rows or not rows[0][0]:
            return
        job = self.queue.get(event.job_id)  # as it is now, in this transaction: ended
        body = json.dumps(job_document(job), ensure_ascii=False, separators=(",", ":"))
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (id, job_id, owner, url, event, body,"
                " status, attempts, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0,"
                " ?, ?)",
                (
                    uuid.uuid4().hex,
                    job.id,
                    job.owner,
                    job.webhook,
                    f"job.{job.status.value}",
                    body,
                    time.time(),
                    utcnow(),
                ),
            )
            self.db.after_commit(self._wake.set)

    def deliveries(self, job_id: str | None = None) -> list[Delivery]:
        """The outbox's rows (one job's), oldest first."""
        where, args = ("WHERE job_id = ?", (job_id,)) if job_id else ("", ())
        rows = self.db.query(
            f"SELECT {COLUMNS} FROM webhook_deliveries {where} ORDER BY created_at", args
        )
        return [Delivery(**dict(row)) for row in rows]

    # --- the sender -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender; pending deliveries (of an earlier run too) go out when due."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="easel-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the sender after the try it is making (at most about ``timeout_s``); what is
        left stays pending for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.policy.timeout_s * 2 + 1)
            if self._thread.is_alive():
                log.warning("the webhook sender did not stop in time")
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.send_due()
                wait = 0.0 if sent else self._until_due()
            except Exception:  # a locked or full database must not end the thread
                log.exception("webhooks: could not read the outbox; trying again")
                wait = self.policy.backoff_s
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()

    def _until_due(self) -> float:
        rows = self.db.query("SELECT MIN(next_at) FROM webhook_deliveries WHERE status = 'pending'")
        first = rows[0][0]
        return IDLE_WAIT_S if first is None else min(max(first - time.time(), 0.0), IDLE_WAIT_S)

    def send_due(self) -> int:
        """Try each delivery that is due (up to :data:`BATCH`); returns how many were tried."""
        tried = 0
        for delivery_id in self._due():
            if self._stop.is_set():
                break
            delivery = self._take(delivery_id)
            if delivery is not None:
                self._attempt(delivery)
                tried += 1
        return tried

    def _due(self) -> list[str]:
        rows = self.db.query(
            "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_at <= ?"
            " ORDER BY next_at LIMIT ?",
            (time.time(), BATCH),
        )
        return [row[0] for row in rows]

    def _take(self, delivery_id: str) -> Delivery | None:
        """Count the try before making it, and set when the next one is due: a crash during
        it counts as a failed try, and a restart waits out the backoff as this run would."""
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM webhook_deliveries WHERE id = ? AND status = 'pending'",
                (delivery_id,),
            ).fetchone()
            if row is None:
                return None
            delivery = replace(Delivery(**dict(row)), attempts=row["attempts"] + 1)
            conn.execute(
                "UPDATE webhook_deliveries SET attempts = ?, next_at = ? WHERE id = ?",
                (
                    delivery.attempts,
                    time.time() + self.policy.wait_after(delivery.attempts),
                    delivery_id,
                ),
            )
        return delivery

    def _attempt(self, delivery: Delivery) -> None:
        """One try: post, then record delivered, a failure (retried while tries are left),
        or a refusal (dead at once)."""
        error: str | None
        try:
            status = self._post(delivery)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except Refused as exc:
            self._finish(delivery, "dead", str(exc))
            return
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except OSError as exc:  # name resolution
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            self._finish(delivery, "delivered", None)
        elif delivery.attempts >= self.policy.attempts:
            self._finish(delivery, "dead", error)
        else:
            self._finish(delivery, "pending", error)

    def _finish(self, delivery: Delivery, status: str, error: str | None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE webhook_deliveries SET status = ?, last_error = ?,"
                " finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE id = ?",
                (status, error, status, utcnow(), delivery.id),
            )
        where = _safe_url(delivery.url)
        if status == "dead":
            log.warning(
                "webhook delivery %s (job %s) to %s given up after %d tries: %s",
                delivery.id,
                delivery.job_id,
                where,
                delivery.attempts,
                error,
            )
        elif status == "pending":
            log.info(
                "webhook delivery %s (job %s) to %s failed (try %d of %d): %s; retrying in %g s",
                delivery.id,
                delivery.job_id,
                where,
                delivery.attempts,
                self.policy.attempts,
                error,
                self.policy.wait_after(delivery.attempts),
            )

    def _post(self, delivery: Delivery) -> int:
        """POST the delivery to the address its host resolves to (checked first); returns
        the response's status after reading at most :data:`MAX_RESPONSE_BYTES` of it."""
        url = httpx.URL(delivery.url)
        match = self.policy.match(url.host)
        if match is None:
            raise Refused(f"host {url.host!r} is no longer in webhook_hosts")
        port = url.port or (443 if url.scheme == "https" else 80)
        name = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS want it
        addresses = self._resolve(name, port)
        for address in addresses:
            if match == "wildcard" and not is_public(address):
                raise Refused(
                    f"{url.host} resolves to {address}, which is not public; name the host "
                    "itself in webhook_hosts to allow it"
                )
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Host": url.netloc.decode("ascii"),
            DELIVERY_HEADER: delivery.id,
            EVENT_HEADER: delivery.event,
            SIGNATURE_HEADER: sign(self.secret_for(delivery.owner), body, int(time.time())),
        }
        extensions = {"sni_hostname": name} if url.scheme == "https" else {}
        last: Exception | None = None
        for address in addresses:  # the first that takes the connection
            target = url.copy_with(host=str(address))
            try:
                with self._client.stream(
                    "POST", target, content=body, headers=headers, extensions=extensions
                ) as response:
                    _read_some(response.iter_raw(), MAX_RESPONSE_BYTES)
                    return response.status_code
            except httpx.ConnectError as exc:
                last = exc
        if last is None:
            raise httpx.ConnectError(f"{url.host} has no address")
        raise last

    def close(self) -> None:
        self._client.close()


def _read_some(chunks: Iterable[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of a response body; the rest is never read."""
    data = b""
    for chunk in chunks:
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


def _safe_url(url: str) -> str:
    """A delivery URL for the log: without its query, which may hold a token."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return "?"
    return str(parsed.copy_with(query=None, fragment=None))


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (an address stays itself), in the resolver's order,
    each once. Raises OSError when it does not resolve."""
    literal = _address(normal_host(host))
    if literal is not None:
        return [literal]
    found: list[IPAddress] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = _address(str(sockaddr[0]).split("%", 1)[0])
        if address is not None and address not in found:
            found.append(address)
    return found
