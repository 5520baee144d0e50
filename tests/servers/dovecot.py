"""A private Dovecot IMAP server for tests.

Each ``Dovecot`` runs from its own temp dir (config, base_dir, state_dir, log, Maildirs, TLS
files) on free loopback ports, so several instances (one per xdist worker) never collide with
each other or with a system-wide Dovecot.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import json
import logging
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.secret_scan import register_secret

log = logging.getLogger(__name__)

DOVECOT_BIN = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM_BIN = shutil.which("doveadm") or "/usr/bin/doveadm"
DH_PARAMS = Path("/usr/share/dovecot/dh.pem")

# Dovecot watches mailboxes with inotify while clients IDLE; the default per-uid limit (128
# instances) runs out after ~120 IDLE sessions, after which Dovecot silently polls.
INOTIFY_LIMITS = {
    "/proc/sys/fs/inotify/max_user_instances": 65536,
    "/proc/sys/fs/inotify/max_user_watches": 1048576,
}

START_TIMEOUT = 20.0


@dataclass
class MailUser:
    name: str
    password: str
    email: str

    def __repr__(self) -> str:  # the password stays out of test output
        return f"MailUser(name={self.name!r}, email={self.email!r})"


class DovecotError(RuntimeError):
    pass


def raise_inotify_limits() -> None:
    """Raise the inotify sysctls when lower than needed (root only; failures are logged)."""
    for path, wanted in INOTIFY_LIMITS.items():
        try:
            current = int(Path(path).read_text().strip())
            if current < wanted:
                Path(path).write_text(f"{wanted}\n")
        except (OSError, ValueError) as exc:
            log.warning("could not raise %s to %d: %s", path, wanted, exc)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def two_free_ports(host: str = "127.0.0.1") -> tuple[int, int]:
    """Two different free ports: both are held while the second is chosen (two calls of
    free_port once returned the same port, and Dovecot refused a duplicate listener)."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second,
    ):
        first.bind((host, 0))
        second.bind((host, 0))
        return int(first.getsockname()[1]), int(second.getsockname()[1])


def _run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Create a private CA and a server cert for 127.0.0.1/localhost. Returns (ca, cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _run(
        "openssl",
        "req",
        "-x509",
        *ec,
        "-keyout",
        ca_key,
        "-out",
        ca_cert,
        "-days",
        "3650",
        "-subj",
        "/CN=emlisten test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    _run("openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _run(
        "openssl",
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca_cert,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "3650",
        "-extfile",
        ext,
    )
    for secret in (ca_key, key):
        secret.chmod(0o600)
    return ca_cert, cert, key


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def _group_running(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: their sockets are
    closed, and they stay in the group (``killpg(pgid, 0)`` finds them) until whoever adopted
    them reaps them, which PID 1 of a container may do seconds later (here about every 2 s,
    or never without an init)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no procfs: count the zombies as running
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _end_process_group(pgid: int, grace: float = 2.0) -> None:
    """SIGTERM what is left of a process group, then SIGKILL what outlives ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_running(pgid):
                return
            time.sleep(0.02)


class Dovecot:
    """A private Dovecot: ``start()``, then add users and talk IMAP to ``host``/``imap_port``."""

    host: str
    imap_port: int
    imaps_port: int
    ca_file: Path

    def __init__(
        self,
        root: Path | None = None,
        *,
        host: str = "127.0.0.1",
        domain: str = "example.test",
        extra_config: str = "",
        hibernate_timeout: str | None = None,
        oauth2_tokeninfo_url: str | None = None,
    ) -> None:
        """``extra_config`` is appended to the generated dovecot.conf. ``hibernate_timeout``
        (e.g. "1s") moves IDLE sessions into imap-hibernate after that long, which keeps
        thousands of IDLE connections cheap (a process per connection otherwise).

        ``oauth2_tokeninfo_url`` (e.g. ``TokenInfoServer.url``) adds XOAUTH2 and OAUTHBEARER
        logins checked by an ``oauth2`` passdb against that URL (the token is appended), next to
        the usual password users. Any user name with a valid token can log in."""
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="emlisten-dovecot-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        # The login and mail processes run as other users; they must be able to walk the tree.
        self.root.chmod(0o755)
        self.host = host
        self.domain = domain
        self.extra_config = extra_config
        self.hibernate_timeout = hibernate_timeout
        self.oauth2_tokeninfo_url = oauth2_tokeninfo_url
        self.oauth2_config_file = self.root / "dovecot-oauth2.conf.ext"
        self.imap_port, self.imaps_port = two_free_ports(host)
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.mail_root = self.root / "mail"
        self.config_file = self.root / "dovecot.conf"
        # One JSON file per user, read by Dovecot's dict passdb (fs:posix) on every login, so
        # users added or changed at runtime work at once. (passwd-file re-reads its file at most
        # once per second, which loses users added in quick succession.)
        self.users_dir = self.root / "users"
        self.auth_dict_file = self.root / "auth-dict.conf"
        self.log_file = self.root / "dovecot.log"
        self.ca_file, self.cert_file, self.key_file = make_tls_files(self.root / "tls")
        self.users: dict[str, MailUser] = {}
        self._users_lock = threading.Lock()
        self._counter = itertools.count(1)
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._mail_uid, self._mail_gid = self._mail_owner()

    # -- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def _mail_owner() -> tuple[int, int]:
        """Dovecot refuses mail access as root; mail is owned by the package's `dovecot` user."""
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        entry = pwd.getpwnam("dovecot")
        return entry.pw_uid, entry.pw_gid

    def _write_config(self) -> None:
        login_user = "dovenull" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        internal_user = "dovecot" if os.geteuid() == 0 else login_user
        dh = f"ssl_dh = <{DH_PARAMS}\n" if DH_PARAMS.exists() else ""
        config = f"""\
            # Generated by tests/servers/dovecot.py
            protocols = imap
            listen = {self.host}
            base_dir = {self.base_dir}
            state_dir = {self.state_dir}
            instance_name = emlisten-test-{self.imap_port}
            log_path = {self.log_file}
            info_log_path = {self.log_file}
            debug_log_path = {self.log_file}
            default_login_user = {login_user}
            default_internal_user = {internal_user}
            first_valid_uid = 0
            first_valid_gid = 0
            mail_uid = {self._mail_uid}
            mail_gid = {self._mail_gid}
            mail_location = maildir:~/Maildir
            mail_max_userip_connections = 10000
            mailbox_idle_check_interval = 1 secs
            disable_plaintext_auth = no
            auth_mechanisms = plain login
            auth_failure_delay = 0
            login_trusted_networks = 127.0.0.0/8
            default_process_limit = 1000
            default_client_limit = 10000
            default_vsz_limit = 1G
            ssl = yes
            ssl_cert = <{self.cert_file}
            ssl_key = <{self.key_file}
            {dh}
            passdb {{
              driver = dict
              args = {self.auth_dict_file}
            }}
            userdb {{
              driver = static
              args = uid={self._mail_uid} gid={self._mail_gid} home={self.mail_root}/%u allow_all_users=yes
            }}

            namespace inbox {{
              inbox = yes
              separator = /
              mailbox Sent {{
                special_use = \\Sent
                auto = subscribe
              }}
              mailbox Drafts {{
                special_use = \\Drafts
                auto = subscribe
              }}
              mailbox Trash {{
                special_use = \\Trash
                auto = subscribe
              }}
              mailbox Junk {{
                special_use = \\Junk
                auto = subscribe
              }}
            }}

            service imap-login {{
              inet_listener imap {{
                address = {self.host}
                port = {self.imap_port}
              }}
              inet_listener imaps {{
                address = {self.host}
                port = {self.imaps_port}
                ssl = yes
              }}
              service_count = 0
              process_min_avail = 2
              client_limit = 10000
            }}
            service imap {{
              process_limit = 10000
            }}
            service anvil {{
              # No auth penalty (growing delays after failed logins from one IP): tests fail
              # logins on purpose, all from 127.0.0.1.
              unix_listener anvil-auth-penalty {{
                mode = 0
              }}
            }}
            """
        if self.hibernate_timeout is not None:
            # The hibernate sockets must be reachable by the mail uid's imap processes.
            config += f"""
            imap_hibernate_timeout = {self.hibernate_timeout}
            service imap-hibernate {{
              unix_listener imap-hibernate {{
                mode = 0666
              }}
            }}
            service imap {{
              unix_listener imap-master {{
                mode = 0666
              }}
            }}
            """
        text = textwrap.dedent(config)
        if self.oauth2_tokeninfo_url is not None:
            text = self._with_oauth2(text)
        text += self.extra_config + "\n"
        self.config_file.write_text(text)

    def _with_oauth2(self, config: str) -> str:
        """OAuth logins (Dovecot 2.3 ``oauth2`` passdb) next to the password users.

        The mechanisms verify the token as a "password" through the passdb chain: the dict
        passdb is limited to PLAIN/LOGIN so a token is never compared with a user's password,
        and the oauth2 passdb to the OAuth mechanisms so a password is never sent to tokeninfo.
        """
        self.oauth2_config_file.write_text(
            f"tokeninfo_url = {self.oauth2_tokeninfo_url}\n"
            "introspection_mode = get\n"
            "username_attribute = email\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "scope = https://mail.example.test/\n"
        )
        config = config.replace(
            "auth_mechanisms = plain login\n",
            "auth_mechanisms = plain login oauthbearer xoauth2\n",
        )
        config = config.replace(
            f"passdb {{\n  driver = dict\n  args = {self.auth_dict_file}\n}}\n",
            f"passdb {{\n  driver = dict\n  args = {self.auth_dict_file}\n"
            "  mechanisms = plain login\n}\n"
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {self.oauth2_config_file}\n}}\n",
        )
        if "driver = oauth2" not in config:
            raise DovecotError("could not add the oauth2 passdb to the generated config")
        return config

    def _prepare_dirs(self) -> None:
        for directory in (self.base_dir, self.state_dir):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)
        if not self.mail_root.exists():
            self.mail_root.mkdir()
            os.chown(self.mail_root, self._mail_uid, self._mail_gid)
        (self.users_dir / "passdb").mkdir(parents=True, exist_ok=True)
        self.auth_dict_file.write_text(
            f"uri = fs:posix:prefix={self.users_dir}/\n"
            "key passdb {\n  key = passdb/%u\n  format = json\n}\n"
            "passdb_objects = passdb\n"
            "iterate_disable = yes\n"
            "default_pass_scheme = PLAIN\n"
        )

    def start(self) -> None:
        """Start Dovecot and return once both ports greet. On the first start, ports taken
        meanwhile by someone else are replaced; later starts keep the ports."""
        if self._process is not None:
            raise DovecotError("Dovecot is already running")
        raise_inotify_limits()
        self._prepare_dirs()
        attempts = 1 if self._started_once else 3
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
            except DovecotError:
                self.stop()
                if attempt == attempts or "Address already in use" not in self.diagnostics():
                    raise
                log.warning("dovecot ports were taken, retrying with new ones")
                self.imap_port, self.imaps_port = two_free_ports(self.host)
            else:
                self._started_once = True
                return

    def _start_once(self) -> None:
        self._write_config()
        _raise_fd_limit()  # inherited by Dovecot: many test connections need many fds
        with (self.root / "dovecot.stderr").open("ab") as stderr:
            self._process = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C in the test runner must not hit it half-way
            )
        deadline = time.monotonic() + START_TIMEOUT
        for port in (self.imap_port, self.imaps_port):
            self._wait_for_greeting(port, deadline, tls=port == self.imaps_port)

    def _wait_for_greeting(self, port: int, deadline: float, *, tls: bool) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise DovecotError(f"dovecot exited with {self._process.returncode}:\n{self.diagnostics()}")
            try:
                with socket.create_connection((self.host, port), timeout=2) as raw:
                    sock: socket.socket = raw
                    if tls:
                        sock = self.client_ssl_context().wrap_socket(raw, server_hostname=self.host)
                    if sock.recv(100).startswith(b"* OK"):
                        return
            except (OSError, ssl.SSLError) as exc:
                last_error = exc
            time.sleep(0.02)
        raise DovecotError(f"dovecot did not answer on port {port}: {last_error}\n{self.diagnostics()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # The master exits within a second, but its children (imap-login proxies, imap
        # processes) linger for up to ten seconds more, holding their clients' connections
        # open: a "stopped" server whose sessions stay up is not what a test that stops it
        # means (nor what systemd, which stops the whole cgroup, does).
        _end_process_group(process.pid)

    def restart(self) -> None:
        """Stop and start again on the same ports with the same users and mail."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temp dir (when this instance created it)."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def process_group(self) -> int:
        """The id of the process group of every Dovecot process (the master leads it)."""
        if self._process is None:
            raise DovecotError("Dovecot is not running")
        return self._process.pid

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        stderr = self.root / "dovecot.stderr"
        err = stderr.read_text(errors="replace") if stderr.exists() else ""
        return f"--- stderr ---\n{err}\n--- log (tail) ---\n{self.log_text()[-4000:]}"

    # -- users -----------------------------------------------------------------------------

    def _write_user(self, user: MailUser) -> None:
        # Written to a temp file and renamed, so Dovecot never reads a half-written file.
        path = self.users_dir / "passdb" / user.name
        tmp = path.with_name(f".{user.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"password": user.password}))
        tmp.replace(path)

    def add_user(self, name: str | None = None, password: str | None = None) -> MailUser:
        """Create a mail user (unique name and password when None); it can log in at once.

        The password is registered with the secret scan: it must never appear in a log."""
        if password is None:
            password = f"pw-{uuid.uuid4().hex[:16]}"
        register_secret(password)
        if name is None:
            name = f"u{os.getpid()}x{next(self._counter)}x{uuid.uuid4().hex[:6]}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", name) or ".." in name:
            raise ValueError(f"unsupported test user name {name!r}")
        if not password or re.search(r"[\r\n]", password):
            raise ValueError("passwords must be non-empty single lines")
        user = MailUser(name=name, password=password, email=f"{name}@{self.domain}")
        with self._users_lock:
            self.users[name] = user
            self._write_user(user)
        return user

    def set_password(self, user: MailUser, password: str) -> MailUser:
        register_secret(password)
        """Change a user's password (e.g. to provoke auth failures); returns the updated user."""
        updated = MailUser(name=user.name, password=password, email=user.email)
        with self._users_lock:
            self.users[user.name] = updated
            self._write_user(updated)
        return updated

    def remove_user(self, user: MailUser) -> None:
        """Make the user unknown to Dovecot (its mail stays on disk)."""
        with self._users_lock:
            self.users.pop(user.name, None)
            (self.users_dir / "passdb" / user.name).unlink(missing_ok=True)

    def kick(self, user: str | MailUser) -> None:
        name = user.name if isinstance(user, MailUser) else user
        self.doveadm("kick", name)

    def doveadm(self, *args: str) -> str:
        result = subprocess.run(
            [DOVEADM_BIN, "-c", str(self.config_file), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        output = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise DovecotError(f"doveadm {' '.join(args)} failed ({result.returncode}): {output}")
        return output

    # -- IMAP helpers (a second, independent client: stdlib imaplib) -----------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    @contextlib.contextmanager
    def imap(self, user: MailUser) -> Iterator[imaplib.IMAP4]:
        """A logged-in stdlib IMAP client on the plain port (logged out on exit)."""
        conn = imaplib.IMAP4(self.host, self.imap_port, timeout=30)
        try:
            conn.login(user.name, user.password)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def append(self, user: MailUser, message: bytes, folder: str = "INBOX") -> int:
        """APPEND ``message`` to ``folder``; returns its UID (from UIDPLUS's APPENDUID)."""
        with self.imap(user) as conn:
            typ, data = conn.append(_quote(folder), None, None, message)
            _check(typ, data, "APPEND")
            match = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
            if match is None:
                raise DovecotError(f"no APPENDUID in {data!r}")
            return int(match.group(1))

    def create_folder(self, user: MailUser, name: str) -> None:
        with self.imap(user) as conn:
            typ, data = conn.create(_quote(name))
            _check(typ, data, "CREATE")

    def uids(self, user: MailUser, folder: str = "INBOX") -> list[int]:
        with self.imap(user) as conn:
            typ, data = conn.select(_quote(folder), readonly=True)
            _check(typ, data, "EXAMINE")
            typ, data = conn.uid("SEARCH", "ALL")
            _check(typ, data, "UID SEARCH")
            return [int(x) for x in (data[0] or b"").split()]

    async def aappend(self, user: MailUser, message: bytes, folder: str = "INBOX") -> int:
        return await trio.to_thread.run_sync(self.append, user, message, folder)

    async def acreate_folder(self, user: MailUser, name: str) -> None:
        await trio.to_thread.run_sync(self.create_folder, user, name)

    async def auids(self, user: MailUser, folder: str = "INBOX") -> list[int]:
        return await trio.to_thread.run_sync(self.uids, user, folder)

    async def akick(self, user: str | MailUser) -> None:
        await trio.to_thread.run_sync(self.kick, user)


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(typ: str, data: list[Any], what: str) -> None:
    if typ != "OK":
        raise DovecotError(f"{what} failed: {typ} {data!r}")


def make_message(
    subject: str = "Test message",
    body: str = "Hello from the tests.\r\n",
    sender: str = "sender@example.test",
    to: str = "rcpt@example.test",
    message_id: str | None = None,
) -> bytes:
    """A small, valid RFC 5322 message (CRLF line ends), unique Message-ID by default."""
    message_id = message_id or f"<{uuid.uuid4().hex}@example.test>"
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Mon, 02 Jan 2023 10:00:00 +0000",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        body,
    ]
    return "\r\n".join(lines).encode()


def mailbox_for(
    dovecot: Dovecot,
    user: MailUser,
    security: Security = Security.SSL_ON_CONNECT,
    **changes: object,
) -> MailboxConfig:
    """The emlisten mailbox of ``user`` on this Dovecot (implicit TLS port unless ``security``
    says otherwise), with ``changes`` applied."""
    port = dovecot.imaps_port if security is Security.SSL_ON_CONNECT else dovecot.imap_port
    mailbox = MailboxConfig(
        id=f"mb-{user.name}",
        user_name=user.name,
        password=user.password,
        imap=ServerEndpoint(dovecot.host, port, security),
        bpm_endpoint="http://127.0.0.1:1/",
    )
    return mailbox.replace(**changes) if changes else mailbox
