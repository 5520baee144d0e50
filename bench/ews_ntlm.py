"""Scenario ``ews-ntlm``: EWS mailboxes on a server that accepts only NTLM/Negotiate.

The EWS server is the project's EWS simulator (tests/servers/ews.py) with Windows
authentication only (``auth=("negotiate", "ntlm")``: Basic refused, pyspnego the acceptor) and
Creatio the stand-in, both in this process's Trio loop; emlisten runs as its own process
(in-memory store, default settings, log level WARNING, ``EMLISTEN_EWS_AUTH=auto``).

1. Memory (``--memory-mailboxes``, default 1,000): the same number of mailboxes (each its own
   account) registered on a Basic-only server and, in a fresh process, on an NTLM-only server;
   emlisten's RSS growth from before the create call to all listening (plus 2 s), per mailbox.
   Target: NTLM within 10 % of Basic.
2. Cold start (``--mailboxes``, default 1,000) on one NTLM-only server: one create call with all
   of them, time until ``/api/listeners/status`` says all listen (target under 15 s); then the
   authenticated connections: handshakes the server completed, and connections it holds
   authenticated. ``--identity users``: each mailbox its own account (its own credentials, so its
   own connections, as Exchange requires); ``service``: one service account impersonating every
   mailbox (``ImpersonatedUser``), whose connections are shared.
3. A mail to each of 20 mailboxes: delivered (callback at the stand-in) after the cold start.

``--tls``: the EWS server over https (a private CA that emlisten trusts through
``EMLISTEN_TLS_CA_FILE``), NTLM and Negotiate bound to its certificate (Extended Protection).
``--hide-kerberos``: emlisten runs as installed without the ``kerberos`` extra.

The simulator (NTLM acceptor included) and the stand-in share this process's single core with
the measurement; the machine is shared with other work while it runs, so figures are upper
bounds on cost.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from bench._harness import RESULTS_DIR, BenchError, EmlistenProcess, Progress, Result, parse_env, say
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import make_tls_files
from tests.servers.ews import EwsSimulator

COLD_START_TARGET = 15.0
MEMORY_MARGIN = 0.10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mailboxes", type=int, default=1000, help="mailboxes for the cold start, 0 to skip (1000)"
    )
    parser.add_argument(
        "--memory-mailboxes", type=int, default=1000, help="mailboxes per memory run, 0 to skip (1000)"
    )
    parser.add_argument(
        "--identity",
        choices=("users", "service"),
        default="users",
        help="cold start: each mailbox its own account, or one impersonating service account",
    )
    parser.add_argument(
        "--cold-auth",
        choices=("ntlm", "basic"),
        default="ntlm",
        help="the cold start's server: NTLM-only (the scenario) or Basic-only (for comparison)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the EWS server over https with a private CA, NTLM/Negotiate bound to its certificate"
        " (Extended Protection, as Exchange 2019 CU14+ requires)",
    )
    parser.add_argument(
        "--hide-kerberos",
        action="store_true",
        help="run emlisten as without the kerberos extra (gssapi, krb5 not importable): NTLM only",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this long (s)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra emlisten environment"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def run(args: argparse.Namespace) -> Result:
    return trio.run(_measure, args)


def _credentials(
    sim: EwsSimulator, standin: CreatioStandIn, count: int, identity: str
) -> list[dict[str, Any]]:
    found = []
    service = sim.add_account(can_impersonate=True) if identity == "service" else None
    for _ in range(count):
        account = sim.add_account()
        login = service or account
        body: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "UserName": login.user,
            "Password": login.password,
            "SenderEmailAddress": account.address,
            "ServiceUrl": sim.url,
            "BpmEndpoint": standin.endpoint(),
            "BpmUser": "Supervisor",
            "FolderIds": [],
        }
        if service is not None:
            body["ImpersonatedUser"] = account.address
        found.append(body)
    return found


def _kerberos_hidden(log_dir: Path) -> str:
    """A directory whose ``gssapi`` and ``krb5`` fail to import, for the front of PYTHONPATH: the
    emlisten process then runs as installed without the kerberos extra (pyspnego's Negotiate
    carries NTLM only), whatever this environment has installed."""
    root = log_dir / "no-kerberos"
    for name in ("gssapi", "krb5"):
        package = root / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            'raise ImportError("hidden by bench ews-ntlm --hide-kerberos")\n'
        )
    return str(root)


def _kerberos_installed() -> bool:
    try:
        import gssapi  # noqa: F401
        import krb5  # noqa: F401
    except ImportError:
        return False
    return True


async def _listening(http: httpx.AsyncClient, base: str) -> int:
    response = await http.get(f"{base}/api/listeners/status", timeout=30)
    response.raise_for_status()
    return int(response.json().get("Connections", {}).get("listening", 0))


async def _start(
    http: httpx.AsyncClient,
    emlisten: EmlistenProcess,
    credentials: list[dict[str, Any]],
    limit: float,
) -> tuple[float, float]:
    """One create call; (seconds until all listen, seconds of the create call)."""
    started = time.monotonic()
    response = await http.post(f"{emlisten.url}/api/listeners/create", json=credentials, timeout=120)
    if response.status_code != 200:
        raise BenchError(f"create refused: {response.status_code} {response.text[:300]}")
    created = time.monotonic() - started
    progress = Progress("listening", len(credentials))
    with trio.move_on_after(limit):
        while True:
            listening = await _listening(http, emlisten.url)
            progress.update(listening)
            if listening >= len(credentials):
                progress.close(listening)
                return time.monotonic() - started, created
            await trio.sleep(0.05)
    raise BenchError(f"not all listening after {limit:.0f}s:\n{emlisten.log_tail()}")


async def _one_process(
    args: argparse.Namespace, auth: tuple[str, ...], count: int, identity: str, log_dir: Path
) -> dict[str, Any]:
    env = {"EMLISTEN_LOG_LEVEL": "WARNING", "EMLISTEN_NODE_ID": "bench", **parse_env(args.env)}
    if args.hide_kerberos:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [_kerberos_hidden(log_dir), os.environ.get("PYTHONPATH")])
        )
    standin = CreatioStandIn()
    tls: tuple[str, str] | None = None
    if args.tls:
        ca, cert, key = make_tls_files(log_dir / "tls")
        tls = (str(cert), str(key))
        env["EMLISTEN_TLS_CA_FILE"] = str(ca)
    windows = any(a in ("ntlm", "negotiate") for a in auth)
    sim = EwsSimulator(keepalive_seconds=30.0, auth=auth, tls=tls, channel_binding=args.tls and windows)
    emlisten = EmlistenProcess(env, log_dir, name=f"emlisten-{'-'.join(auth)}-{count}")
    figures: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(standin.serve)
        await nursery.start(sim.serve)
        credentials = _credentials(sim, standin, count, identity)
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=2)
        async with httpx.AsyncClient(limits=limits) as http:
            emlisten.spawn()
            try:
                await emlisten.wait_ready(http)
                await trio.sleep(1.0)
                rss_before = emlisten.rss_kib()
                cpu_before = emlisten.cpu_seconds()
                server_cpu_before = time.process_time()
                seconds, created = await _start(http, emlisten, credentials, args.timeout)
                # The simulator and the stand-in: this process.
                figures["server_cpu_seconds"] = round(time.process_time() - server_cpu_before, 2)
                figures["cold_start_seconds"] = round(seconds, 2)
                figures["create_call_seconds"] = round(created, 2)
                figures["emlisten_cpu_seconds"] = round(emlisten.cpu_seconds() - cpu_before, 2)
                await trio.sleep(2.0)
                figures["rss_growth_kib_per_mailbox"] = round((emlisten.rss_kib() - rss_before) / count, 1)
                figures["handshakes"] = sim.handshakes
                # What each mailbox cost the server: HTTP requests (401 handshake legs included).
                figures["requests_per_mailbox"] = round(len(sim.requests) / count, 2)
                figures["requests_401_per_mailbox"] = round(
                    sum(1 for r in sim.requests if r.status == 401) / count, 2
                )
                figures["requests_by_operation"] = dict(
                    collections.Counter(r.operation or f"HTTP {r.status}" for r in sim.requests)
                )
                figures["authenticated_connections"] = sim.authenticated_connections()
                figures["open_streams"] = len(sim._streams)
                figures["connections_from_emlisten"] = emlisten.connections_to([sim.port])
                # Delivery still works after the cold start: one mail to each of 20 mailboxes.
                sample = credentials[:20]
                tag = uuid.uuid4().hex[:8]
                for body in sample:
                    sim.add_message(
                        body["SenderEmailAddress"],
                        f"From: a@example.test\r\nTo: {body['SenderEmailAddress']}\r\n"
                        f"Subject: ntlm-{tag}\r\n\r\nhello\r\n".encode(),
                    )
                sent_at = time.monotonic()
                with trio.move_on_after(60):
                    for body in sample:
                        await standin.wait_for_emails(body["Id"], 1, timeout=60)
                figures["sample_delivered"] = sum(len(standin.emails_for(b["Id"])) for b in sample)
                figures["sample_delivery_seconds"] = round(time.monotonic() - sent_at, 2)
            finally:
                await emlisten.stop()
        nursery.cancel_scope.cancel()
    return figures


async def _measure(args: argparse.Namespace) -> Result:
    result = Result(
        "ews-ntlm",
        {
            "mailboxes": args.mailboxes,
            "memory_mailboxes": args.memory_mailboxes,
            "identity": args.identity,
            "cold_auth": args.cold_auth,
            "hide_kerberos": args.hide_kerberos,
            "tls": args.tls,
            "emlisten_env": list(args.env),
        },
    )
    log_dir = Path(tempfile.mkdtemp(prefix="emlisten-bench-"))
    if args.hide_kerberos:
        kerberos = "hidden (--hide-kerberos: as installed without the kerberos extra, NTLM only)"
    elif _kerberos_installed():
        kerberos = "the kerberos extra is installed: Negotiate tries Kerberos before NTLM"
    else:
        kerberos = "the kerberos extra is not installed: Negotiate carries NTLM"
    result.notes.append(f"emlisten's Kerberos: {kerberos}.")
    ntlm = ("negotiate", "ntlm")
    if args.memory_mailboxes > 0:
        say(f"memory: {args.memory_mailboxes} mailboxes on a Basic-only server")
        basic = await _one_process(args, ("basic",), args.memory_mailboxes, "users", log_dir)
        say(f"memory: {args.memory_mailboxes} mailboxes on an NTLM-only server")
        windows = await _one_process(args, ntlm, args.memory_mailboxes, "users", log_dir)
        result.metrics["memory_basic"] = basic
        result.metrics["memory_ntlm"] = windows
        per_basic = basic["rss_growth_kib_per_mailbox"]
        per_ntlm = windows["rss_growth_kib_per_mailbox"]
        ratio = per_ntlm / per_basic if per_basic else float("inf")
        result.row("RSS per mailbox, Basic-only server", f"{per_basic:.1f} KiB")
        result.row(
            "RSS per mailbox, NTLM-only server",
            f"{per_ntlm:.1f} KiB ({100 * (ratio - 1):+.1f} %)",
            "within 10 % of Basic",
            abs(ratio - 1) <= MEMORY_MARGIN,
        )
    if args.mailboxes <= 0:
        say(f"emlisten logs: {log_dir}")
        return result
    server = ntlm if args.cold_auth == "ntlm" else ("basic",)
    say(f"cold start: {args.mailboxes} mailboxes ({args.identity}) on a {args.cold_auth}-only server")
    cold = await _one_process(args, server, args.mailboxes, args.identity, log_dir)
    result.metrics["cold_start"] = cold
    result.row(
        f"cold start, {args.mailboxes} mailboxes ({args.identity}), {args.cold_auth}-only server",
        f"{cold['cold_start_seconds']:.2f} s (create call {cold['create_call_seconds']:.2f} s,"
        f" emlisten CPU {cold['emlisten_cpu_seconds']:.1f} s,"
        f" EWS simulator CPU {cold['server_cpu_seconds']:.1f} s)",
        f"< {COLD_START_TARGET:.0f} s",
        cold["cold_start_seconds"] < COLD_START_TARGET,
    )
    result.row(
        "NTLM handshakes / connections held authenticated / TCP connections",
        f"{cold['handshakes']} / {cold['authenticated_connections']} / {cold['connections_from_emlisten']}",
        "bounded by settings, not by mailboxes",
    )
    result.row("open streaming responses", str(cold["open_streams"]))
    result.row(
        "CPU per mailbox: emlisten / EWS simulator and stand-in",
        f"{1000 * cold['emlisten_cpu_seconds'] / args.mailboxes:.1f} ms"
        f" / {1000 * cold['server_cpu_seconds'] / args.mailboxes:.1f} ms",
    )
    result.row(
        "HTTP requests per mailbox at the server (of them 401)",
        f"{cold['requests_per_mailbox']:.2f} ({cold['requests_401_per_mailbox']:.2f})",
    )
    result.row(
        "sample mails delivered after the cold start",
        f"{cold['sample_delivered']}/20 in {cold['sample_delivery_seconds']:.2f} s",
        "20/20",
        cold["sample_delivered"] == 20,
    )
    result.notes.append(
        "The EWS simulator (with pyspnego's NTLM acceptor) and the Creatio stand-in run in the bench"
        " process; the machine is shared with other engineers' work: figures are upper bounds on cost."
    )
    say(f"emlisten logs: {log_dir}")
    return result
