"""A private MIT Kerberos KDC for tests: its own realm, database and ports in a temp dir.

``Kdc.start()`` creates the realm's database (``kdb5_util``), starts ``krb5kdc`` in the
foreground on a free loopback port (TCP and UDP) and writes a ``krb5.conf`` naming it as the
realm's only KDC (no DNS: ``dns_lookup_kdc`` and ``rdns`` off, so a host name is used as given
in service principals). ``add_user`` creates a principal with a password (what a Windows user
is in Active Directory), ``add_service`` a service principal with a random key exported to the
KDC's keytab (what an Exchange server's ``HTTP/<host>`` is: its acceptor reads the keytab named
by ``KRB5_KTNAME``).

Processes find the KDC through ``KRB5_CONFIG`` (``use()`` sets it, with ``KRB5_KTNAME``, in
this process's environment, which subprocesses inherit). The tests pin ``KRB5_CONFIG`` to a
private file for the whole session (``tests/conftest.py``), so no test ever reads the machine's
``/etc/krb5.conf`` and its realms.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from tests.secret_scan import register_secret

log = logging.getLogger(__name__)

REALM = "EMLISTEN.TEST"
KRB5KDC_BIN = shutil.which("krb5kdc") or "/usr/sbin/krb5kdc"
KDB5_UTIL_BIN = shutil.which("kdb5_util") or "/usr/sbin/kdb5_util"
KADMIN_LOCAL_BIN = shutil.which("kadmin.local") or "/usr/sbin/kadmin.local"
START_TIMEOUT = 20.0


class KdcError(RuntimeError):
    pass


def installed() -> bool:
    return all(os.path.exists(path) for path in (KRB5KDC_BIN, KDB5_UTIL_BIN, KADMIN_LOCAL_BIN))


def krb5_conf(realm: str, port: int | None) -> str:
    """A ``krb5.conf`` for ``realm``, its KDC on 127.0.0.1:``port`` (None: no KDC yet, so a
    Kerberos attempt fails at once instead of looking a realm up in DNS)."""
    kdc = f"kdc = 127.0.0.1:{port}" if port is not None else ""
    return textwrap.dedent(
        f"""\
        [libdefaults]
            default_realm = {realm}
            dns_lookup_kdc = false
            dns_lookup_realm = false
            dns_canonicalize_hostname = false
            rdns = false
            # Over TCP: the tests see a refused connection, not UDP retries, when the KDC is down.
            udp_preference_limit = 1
            kdc_timeout = 3s
            max_retries = 1
            ticket_lifetime = 1h
            permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96
        [realms]
            {realm} = {{
                {kdc}
            }}
        [domain_realm]
            127.0.0.1 = {realm}
            localhost = {realm}
        """
    )


def free_port() -> int:
    """A loopback port free for both TCP and UDP (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise KdcError("no free port for the KDC")


class Kdc:
    """One realm's KDC. ``start()`` then ``close()`` (or ``with Kdc() as kdc``)."""

    def __init__(self, realm: str = REALM) -> None:
        self.realm = realm
        self.dir = Path(tempfile.mkdtemp(prefix="emlisten-kdc-"))
        self.port = 0
        self.krb5_conf = self.dir / "krb5.conf"
        self.kdc_conf = self.dir / "kdc.conf"
        #: The acceptor keytab with every service principal's key (``KRB5_KTNAME``).
        self.keytab = self.dir / "services.keytab"
        self.log_file = self.dir / "kdc.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Kdc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        """Environment for the Kerberos tools and for processes that use this realm."""
        return {
            **os.environ,
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5_KTNAME": f"FILE:{self.keytab}",
        }

    def start(self) -> None:
        if not installed():
            raise KdcError(
                "the MIT KDC is not installed (krb5-kdc, krb5-admin-server): run scripts/install-test-deps"
            )
        self.port = free_port()
        self.krb5_conf.write_text(krb5_conf(self.realm, self.port))
        self.kdc_conf.write_text(
            textwrap.dedent(
                f"""\
                [kdcdefaults]
                    kdc_ports = {self.port}
                    kdc_tcp_listen = 127.0.0.1:{self.port}
                    kdc_listen = 127.0.0.1:{self.port}
                [realms]
                    {self.realm} = {{
                        database_name = {self.dir}/principal
                        key_stash_file = {self.dir}/stash
                        acl_file = {self.dir}/kadm5.acl
                        max_life = 10h
                        max_renewable_life = 1d
                        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
                    }}
                [logging]
                    kdc = FILE:{self.log_file}
                """
            )
        )
        (self.dir / "kadm5.acl").write_text("")
        master = secrets.token_urlsafe(16)
        self._run(KDB5_UTIL_BIN, "create", "-s", "-r", self.realm, "-P", master)
        self._process = subprocess.Popen(
            [KRB5KDC_BIN, "-n", "-r", self.realm, "-P", str(self.dir / "krb5kdc.pid")],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise KdcError(f"krb5kdc exited with {self._process.returncode}: {stderr}{self._log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline:
                self.close()
                raise KdcError(f"krb5kdc did not listen on {self.port} within {START_TIMEOUT} s")
            time.sleep(0.05)
        log.info("KDC for %s on 127.0.0.1:%d (%s)", self.realm, self.port, self.dir)

    def add_user(self, name: str, password: str, *, max_life: str = "") -> str:
        """Create ``name@REALM`` with ``password`` (pre-authentication required, as in AD);
        return the principal. ``max_life``: its tickets' longest life (kadmin's ``4m``)."""
        register_secret(password)
        principal = self.principal(name)
        life = f"-maxlife {max_life} " if max_life else ""
        self._kadmin(f"addprinc +requires_preauth {life}-pw {password} {principal}")
        return principal

    def add_service(self, service: str, host: str) -> str:
        """Create ``service/host@REALM`` with a random key, exported to ``keytab``."""
        principal = f"{service}/{host}@{self.realm}"
        self._kadmin(f"addprinc -randkey {principal}")
        self._kadmin(f"ktadd -k {self.keytab} {principal}")
        return principal

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    def use(self) -> None:
        """Point this process (and the subprocesses it starts) at this realm."""
        os.environ["KRB5_CONFIG"] = str(self.krb5_conf)
        os.environ["KRB5_KTNAME"] = f"FILE:{self.keytab}"

    def requests(self) -> list[str]:
        """The KDC's log lines for ticket requests (AS_REQ, TGS_REQ), for assertions."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if "AS_REQ" in line or "TGS_REQ" in line]

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kadmin(self, query: str) -> None:
        self._run(KADMIN_LOCAL_BIN, "-r", self.realm, "-q", query)

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, timeout=60, check=False)
        # kadmin.local exits 0 on a failed query: its complaints are on stderr.
        stderr = result.stderr.decode(errors="replace")
        if result.returncode != 0 or "error" in stderr.lower() or "cannot" in stderr.lower():
            # The command line may carry a password: name the tool only.
            raise KdcError(f"{Path(command[0]).name} failed ({result.returncode}): {stderr.strip()}")

    def _log_tail(self) -> str:
        try:
            return "\n" + "\n".join(self.log_file.read_text(errors="replace").splitlines()[-10:])
        except FileNotFoundError:
            return ""


__all__ = ["REALM", "Kdc", "KdcError", "free_port", "installed", "krb5_conf"]
