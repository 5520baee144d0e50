"""Settings: defaults, overridden by the environment, overridden by command-line flags.

Every setting has an ``EMLISTEN_*`` environment variable; docs/configuration.md lists them all.
Names of the vendor's service are accepted as aliases where they mean the same thing.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from emlisten._egress import AllowList
from emlisten.errors import ConfigError


class Role(enum.StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    ALL = "all"

    @property
    def listens(self) -> bool:
        return self in (Role.PRIMARY, Role.ALL)

    @property
    def works(self) -> bool:
        return self in (Role.SECONDARY, Role.ALL)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter: delay n is uniform in [base*2^n/2, base*2^n]."""

    base: float
    cap: float


@dataclass(frozen=True)
class Settings:
    role: Role = Role.ALL
    #: Loopback unless told otherwise: the container image and the chart set 0.0.0.0.
    host: str = "127.0.0.1"
    port: int = 8080
    node_id: str = field(default_factory=socket.gethostname)
    redis_url: str | None = None
    #: Every Redis key starts with this, so several deployments can share one database.
    redis_prefix: str = "emlisten:"
    amqp_url: str | None = None
    amqp_queue: str = "emlisten.sync"
    #: Declare the queue as a quorum queue (replicated; needs a RabbitMQ cluster to pay off).
    amqp_quorum: bool = False
    #: Without Redis: keep mailboxes, checkpoints and statuses in SQLite in this directory, so a
    #: restart resumes every mailbox (docs/deployment.md). Unset: in memory, lost at exit.
    data_dir: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    #: Start although our own routes (/v1, the console, dead letters) are open to anyone who
    #: reaches a non-loopback address without a token. Not for production.
    allow_unauthenticated: bool = False
    #: Creatio's routes (/api/..., /apiv2/...) need the token too: for a reverse proxy that adds
    #: it. Off by default: Creatio itself sends none.
    creatio_routes_need_token: bool = False
    #: Outbound allow-lists (host names, *.domain, CIDRs; comma or space separated): Creatio
    #: callback and webhook URLs, and mail servers (IMAP, SMTP, EWS, Graph). Unset: anything but
    #: link-local and cloud-metadata addresses.
    callback_allow: str | None = None
    mail_allow: str | None = None
    #: Per client address: registration requests (/api/listeners/create, recreate, update) per
    #: minute, and the burst above it (0: no limit). Generous: Creatio's failover job re-creates
    #: every closed mailbox at once, one request each.
    rate_limit_per_minute: float = 6000.0
    rate_limit_burst: int = 2000
    #: The same for /api/mailbox/validate and /api/mailbox/folders, which probe servers for
    #: their caller (people checking a mailbox, not Creatio's bulk re-registration).
    validate_rate_limit_per_minute: float = 60.0
    validate_rate_limit_burst: int = 20
    #: Largest API request body: a /apiv2/email/send with base64 attachments is the big one.
    max_request_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "text"
    #: Seconds in-flight deliveries get to finish on SIGTERM before they are cut.
    shutdown_grace_seconds: float = 10.0
    #: Long-lived objects are kept out of Python's garbage collector, whose full collection
    #: stops the process for about 1.3 s at 10,000 mailboxes; everything is collected once per
    #: this many seconds (the one such pause left). 0: Python's own collector policy.
    gc_full_collect_seconds: float = 3600.0
    #: Log a warning for every task step that holds the event loop this long (ms); 0: off.
    #: A diagnosis aid: the check costs a little on every step.
    slow_step_ms: float = 0.0
    #: Extra CA bundle trusted for IMAP/SMTP TLS (in addition to the system CAs).
    tls_ca_file: str | None = None
    #: Base URL where Microsoft Graph reaches this node's API (change notifications), e.g.
    #: https://emlisten.example.com. Unset: the address the API listens on (local use only).
    public_url: str | None = None
    #: Microsoft Graph app-only access (client-credentials grant) for mailboxes without an
    #: AccessToken; all three must be set to use it.
    graph_tenant_id: str | None = None
    graph_client_id: str | None = None
    graph_client_secret: str | None = field(default=None, repr=False)
    #: Microsoft Graph endpoint for Graph mailboxes whose ServiceUrl is the global
    #: https://graph.microsoft.com (or empty): a national cloud (e.g.
    #: https://microsoftgraph.chinacloudapi.cn, https://graph.microsoft.us) or a test server.
    graph_base_url: str = "https://graph.microsoft.com"
    #: Login authority of the client-credentials grant (national clouds: e.g.
    #: https://login.chinacloudapi.cn, https://login.microsoftonline.us).
    graph_authority: str = "https://login.microsoftonline.com"

    # Listening
    idle_renew_seconds: float = 25 * 60.0
    keepalive_seconds: float = 240.0
    poll_seconds: float = 30.0
    connect_timeout_seconds: float = 30.0
    command_timeout_seconds: float = 120.0
    reconnect_base_seconds: float = 1.0
    reconnect_cap_seconds: float = 300.0
    auth_retry_base_seconds: float = 60.0
    auth_retry_cap_seconds: float = 1800.0
    #: OAuth: how long to wait for Creatio's new token (via /update) after a RefreshToken call
    #: before the mailbox is reported unavailable.
    token_refresh_wait_seconds: float = 120.0
    #: Concurrent connection attempts per process, so a cold start with thousands of mailboxes
    #: does not flood the mail servers (or our own CPU with TLS handshakes).
    max_concurrent_connects: int = 64
    #: Connection attempts started per second per process, at most (0: no limit); halved while
    #: attempts fail to connect, climbing back as they succeed.
    max_connects_per_second: float = 500.0
    #: IMAP sessions ending IDLE at once per process (to fetch new mail, renew or probe). A
    #: server that parks idle sessions (Dovecot's imap-hibernate) must start a process for each
    #: one woken: after an outage thousands wake at once, and Dovecot then drops sessions it
    #: failed to wake. Uncontended in normal traffic.
    max_concurrent_wakeups: int = 128
    #: Safety net for notifications a server drops (Dovecot while hibernating a session): this
    #: long after new mail on a listening session, the listener looks at the folder once on a
    #: short session of its own (0: never). About twice the server's imap_hibernate_timeout:
    #: see docs/architecture.md for why not just above it.
    recheck_seconds: float = 4.0
    #: EWS with user name + password: "auto" (as the server's WWW-Authenticate challenge asks:
    #: Negotiate, else NTLM, else Basic), or "basic", "ntlm", "negotiate" only.
    ews_auth: str = "auto"
    #: EWS connections per credential group (EWS URL + credentials) for requests; streaming
    #: responses get one each beyond these (a stream carries up to 200 subscriptions).
    ews_connections_per_account: int = 4
    #: /api/mailbox/validate for EWS and Graph: the whole check, and connecting to the server.
    validate_timeout_seconds: float = 10.0
    validate_connect_timeout_seconds: float = 5.0
    #: A second look this long after the last new mail (0: none), for a server that hands the
    #: session to hibernation late, under load, after the first look (Dovecot at times 4-5 s).
    recheck_late_seconds: float = 12.0
    #: One look after the first IDLE of every IMAP session (after a connect or reconnect): mail
    #: landing in that IDLE's hibernation hand-off window has no new mail before it to schedule
    #: a look. Costs one short session per connect (a cold start of N mailboxes: N).
    recheck_after_connect: bool = True

    # Ownership (several primaries sharing one store)
    #: A node's mailbox leases and heartbeat expire this long after its last renewal; a dead
    #: node's mailboxes are taken over within about this time.
    lease_ttl_seconds: float = 5.0
    lease_renew_seconds: float = 1.5
    #: How often a primary re-reads the checkpoints of the mailboxes it runs, to restore them
    #: if the store loses its data (docs/reliability.md): after a wipe, mail delivered within
    #: this long before it is delivered again (same Email.Id). 0: only what sessions read at
    #: connect (each wipe repeats the mail since then).
    checkpoint_refresh_seconds: float = 30.0
    #: Most mailboxes one node listens to (0: no cap beyond the fair share).
    max_mailboxes: int = 0

    # Delivery
    worker_concurrency: int = 256
    batch_max_count: int = 20
    batch_max_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 25 * 1024 * 1024
    delivery_timeout_seconds: float = 300.0
    #: Concurrent callbacks to one Creatio (kept-alive connections). httpx's pool walks all its
    #: connections for each one on every request: 100 cost 10 % of a backlog drain's CPU.
    callback_max_connections: int = 32
    delivery_retry_base_seconds: float = 1.0
    #: Longest wait between delivery retries: also how late mail can be once Creatio is back
    #: (the chaos soak found mail 158-226 s late after 30-60 s outages with a 300 s cap).
    delivery_retry_cap_seconds: float = 60.0
    #: How long a reading session stays open after its last use, to fetch the next mail fast.
    reader_idle_seconds: float = 60.0
    #: New mail up to this size is fetched on the listening session and carried to the worker
    #: in the task (no second session); larger mail is read by the worker. 0: always the worker.
    prefetch_max_bytes: int = 256 * 1024

    # Webhooks: mailboxes registered through /v1 (docs/webhooks.md)
    #: Receiver of the mailboxes registered without a webhook URL of their own.
    webhook_url: str | None = None
    #: Standard Webhooks signing secret ("whsec_..."; several, space-separated, during a
    #: rotation) of the mailboxes registered without one.
    webhook_secret: str | None = field(default=None, repr=False)
    #: Seconds to wait before each retry, comma-separated (each delay jittered +-20 %); an event
    #: whose last retry fails becomes a dead letter. The default spans 27.7 hours.
    webhook_retry_schedule: str = "5,30,120,600,1800,3600,7200,14400,28800,43200"
    webhook_timeout_seconds: float = 30.0
    #: Calls in flight at once per receiver (a mailbox's own events still go one at a time).
    webhook_concurrency: int = 8
    #: Attachments up to this size travel base64-encoded in message.new events; larger ones as
    #: metadata only.
    webhook_inline_attachment_bytes: int = 1024 * 1024

    @property
    def reconnect_backoff(self) -> Backoff:
        return Backoff(self.reconnect_base_seconds, self.reconnect_cap_seconds)

    @property
    def auth_backoff(self) -> Backoff:
        return Backoff(self.auth_retry_base_seconds, self.auth_retry_cap_seconds)

    @property
    def delivery_backoff(self) -> Backoff:
        return Backoff(self.delivery_retry_base_seconds, self.delivery_retry_cap_seconds)

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        """``webhook_retry_schedule`` as seconds (ConfigError when it is not a list of them)."""
        try:
            delays = tuple(float(part) for part in self.webhook_retry_schedule.split(",") if part.strip())
        except ValueError:
            raise ConfigError(
                f"{env_name('webhook_retry_schedule')} must be comma-separated seconds, e.g. 5,30,120"
            ) from None
        if any(not 0 <= delay < 30 * 86400 for delay in delays):
            raise ConfigError(f"{env_name('webhook_retry_schedule')}: each delay must be 0..30 days")
        return delays

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


#: Vendor (Creatio Email Listener) environment names accepted as aliases.
_ALIASES: dict[str, tuple[str, ...]] = {
    "node_id": ("PodName",),
}

_LOG_FORMATS = ("text", "json")


def env_name(setting: str) -> str:
    return "EMLISTEN_" + setting.upper()


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if "Role" in kind_name:
            return Role(raw.strip().lower())
        if kind_name.startswith("int"):
            return int(raw)
        if kind_name.startswith("float"):
            return float(raw)
        if kind_name.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{env_name(name)}: cannot read {raw!r} as {kind_name}") from None
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults < environment < ``overrides`` (the command-line flags; None means not given)."""

    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        candidates = (env_name(f.name), *_ALIASES.get(f.name, ()))
        for candidate in candidates:
            raw = env.get(candidate)
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw, f.type)
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "redis_url" not in values:
        vendor_redis = _vendor_redis_url(env)
        if vendor_redis:
            values["redis_url"] = vendor_redis
    settings = Settings(**values)
    _check(settings)
    return settings


def _vendor_redis_url(env: Mapping[str, str]) -> str | None:
    host = env.get("ExchangeListenerRedisHost")
    if not host:
        return None
    database = env.get("ExchangeListenerRedisDatabase", "0") or "0"
    return f"redis://{host}/{database}" if ":" in host else f"redis://{host}:6379/{database}"


def is_loopback(host: str) -> bool:
    """Does binding ``host`` keep the API on this machine?"""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def _check(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {settings.port}")
    if settings.log_format not in _LOG_FORMATS:
        raise ConfigError(f"{env_name('log_format')} must be one of {', '.join(_LOG_FORMATS)}")
    if not settings.node_id:
        raise ConfigError(f"{env_name('node_id')} must not be empty")
    positive = (
        "shutdown_grace_seconds",
        "idle_renew_seconds",
        "keepalive_seconds",
        "poll_seconds",
        "connect_timeout_seconds",
        "command_timeout_seconds",
        "worker_concurrency",
        "batch_max_count",
        "batch_max_bytes",
        "max_message_bytes",
        "max_concurrent_connects",
        "max_concurrent_wakeups",
        "max_request_bytes",
        "callback_max_connections",
        "lease_ttl_seconds",
        "lease_renew_seconds",
    )
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{env_name(name)} must be positive")
    if settings.lease_renew_seconds * 2 > settings.lease_ttl_seconds:
        raise ConfigError(
            f"{env_name('lease_renew_seconds')} must be at most half of {env_name('lease_ttl_seconds')}"
        )
    for name in (
        "recheck_seconds",
        "recheck_late_seconds",
        "prefetch_max_bytes",
        "max_connects_per_second",
        "checkpoint_refresh_seconds",
        "gc_full_collect_seconds",
        "slow_step_ms",
    ):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{env_name(name)} must be 0 (off) or positive")
    if settings.ews_auth.strip().lower() not in ("auto", "basic", "ntlm", "negotiate"):
        raise ConfigError(f"{env_name('ews_auth')} must be one of auto, basic, ntlm, negotiate")
    for name in (
        "ews_connections_per_account",
        "validate_timeout_seconds",
        "validate_connect_timeout_seconds",
    ):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{env_name(name)} must be positive")
    if settings.max_mailboxes < 0:
        raise ConfigError(f"{env_name('max_mailboxes')} must be 0 (no cap) or positive")
    if settings.public_url and not settings.public_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"{env_name('public_url')} must be an http(s) URL")
    for name in ("graph_base_url", "graph_authority"):
        if not str(getattr(settings, name)).lower().startswith(("http://", "https://")):
            raise ConfigError(f"{env_name(name)} must be an http(s) URL")
    graph_app = (settings.graph_tenant_id, settings.graph_client_id, settings.graph_client_secret)
    if any(graph_app) and not all(graph_app):
        raise ConfigError(
            "Graph app-only access needs EMLISTEN_GRAPH_TENANT_ID, EMLISTEN_GRAPH_CLIENT_ID and "
            "EMLISTEN_GRAPH_CLIENT_SECRET together"
        )
    for kind in ("callback", "mail"):
        try:
            AllowList.parse(getattr(settings, f"{kind}_allow"), env_name(f"{kind}_allow"))
        except ValueError as error:
            raise ConfigError(str(error)) from None
    for prefix in ("rate_limit", "validate_rate_limit"):
        if getattr(settings, f"{prefix}_per_minute") < 0 or getattr(settings, f"{prefix}_burst") < 0:
            raise ConfigError(f"{env_name(prefix + '_per_minute')} and _BURST must be 0 (off) or positive")
    if not settings.api_token and not settings.allow_unauthenticated and not is_loopback(settings.host):
        raise ConfigError(
            f"listening on {settings.host} (beyond loopback) needs {env_name('api_token')} for "
            f"emlisten's own routes (/v1, the console); set {env_name('allow_unauthenticated')}=true "
            "to start without one (anyone who reaches the port could then use them)"
        )
    settings.webhook_retry_delays  # noqa: B018 - raises ConfigError when malformed
    for name in ("webhook_timeout_seconds", "webhook_concurrency"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{env_name(name)} must be positive")
    if settings.webhook_inline_attachment_bytes < 0:
        raise ConfigError(f"{env_name('webhook_inline_attachment_bytes')} must be 0 (never) or positive")
    if settings.webhook_url and not settings.webhook_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"{env_name('webhook_url')} must be an http(s) URL")
    for secret in (settings.webhook_secret or "").split():
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:  # binascii.Error among them
            key = b""
        if not secret.startswith("whsec_") or not key:
            # The message never quotes the value: it is a secret.
            raise ConfigError(
                f"{env_name('webhook_secret')} must be whsec_ secrets (whsec_ + base64), space-separated"
            )
    if settings.idle_renew_seconds >= 29 * 60:
        raise ConfigError(f"{env_name('idle_renew_seconds')} must be under 29 minutes (RFC 2177)")
