"""Where emlisten may connect to: outbound allow-lists, checked after DNS resolution.

Two lists, both ``EMLISTEN_*`` settings holding host names and CIDRs separated by commas or
spaces: ``callback`` (Creatio callback and webhook URLs, ``/api/availability/app``) and ``mail``
(IMAP, SMTP, EWS, Graph). An entry ``example.com`` allows that name, ``*.example.com`` (or
``.example.com``) every name under it, ``10.0.0.0/8`` or ``192.0.2.7`` every address inside.

- A list set: a connection goes ahead only to a resolved address inside one of its networks, or
  when the name asked for matches one of its host entries (and then never to a link-local or
  cloud-metadata address unless a network entry names it).
- No list (the default): everything but link-local (169.254/16, fe80::/10) and cloud-metadata
  addresses, so an on-premises Creatio on a private or loopback address works unchanged.

The name is resolved once and the connection made to the checked address itself (no second
lookup that a DNS rebinding could answer differently). Every connection is checked, so a
redirect, were one followed, is checked too. Call :func:`resolve_checked` (addresses),
:func:`open_tcp_stream` (a Trio stream) or :func:`http_transport` (an httpx transport).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpcore
import httpx
import trio

__all__ = [
    "AllowList",
    "EgressDenied",
    "Kind",
    "check_addresses",
    "configure",
    "configured",
    "denial",
    "http_transport",
    "open_tcp_stream",
    "policy",
    "resolve_checked",
    "setting_name",
]

Kind = Literal["callback", "mail"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Never reached unless a network entry of an allow-list names them.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",  # IPv4 link-local, incl. 169.254.169.254 (AWS, Azure, GCP, OpenStack...)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
)
#: Metadata service names refused before any lookup (they may resolve through search domains).
BLOCKED_HOSTS = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
        "metadata.tencentyun.com",
    }
)


def setting_name(kind: Kind) -> str:
    return "EMLISTEN_CALLBACK_ALLOW" if kind == "callback" else "EMLISTEN_MAIL_ALLOW"


class EgressDenied(OSError):
    """The destination is outside the allow-list (an OSError: callers treat it as a failed connect)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _blocked(address: IPAddress) -> bool:
    return any(address in network for network in BLOCKED_NETWORKS)


@dataclass(frozen=True)
class AllowList:
    """A parsed allow-list; ``AllowList.parse(None)`` is the default (no list)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[str, ...] = ()
    #: False: no list was given (only link-local and metadata are refused).
    restricted: bool = False

    @classmethod
    def parse(cls, text: str | None, setting: str = "allow-list") -> AllowList:
        """``text`` as in the setting; raises ValueError naming the bad entry."""
        if text is None or not text.strip():
            return cls()
        networks: list[IPNetwork] = []
        hosts: list[str] = []
        for entry in text.replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(entry.replace("[", "").replace("]", ""), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            label = name.removeprefix("*.").removeprefix(".")
            if not label or "/" in label or ":" in label or "*" in label:
                raise ValueError(f"{setting}: {entry!r} is neither a host name nor a CIDR")
            hosts.append("." + label if name != label else label)
        return cls(tuple(networks), tuple(hosts), restricted=True)

    def _host_matches(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host.endswith(entry) if entry.startswith(".") else host == entry for entry in self.hosts)

    def permits(self, host: str, address: IPAddress) -> bool:
        """May ``host`` (the name asked for) be reached at ``address`` (what it resolved to)?"""
        if any(address in network for network in self.networks):
            return True
        if _blocked(address):
            return False
        return not self.restricted or self._host_matches(host)


_policies: dict[Kind, AllowList] = {"callback": AllowList(), "mail": AllowList()}


def configure(*, callback_allow: str | None, mail_allow: str | None) -> None:
    """Set both lists for this process (at start-up, from the settings)."""
    _policies["callback"] = AllowList.parse(callback_allow, setting_name("callback"))
    _policies["mail"] = AllowList.parse(mail_allow, setting_name("mail"))


def policy(kind: Kind) -> AllowList:
    return _policies[kind]


@contextmanager
def configured(*, callback_allow: str | None = None, mail_allow: str | None = None) -> Iterator[None]:
    """Tests: the lists for the duration of a ``with`` block."""
    saved = dict(_policies)
    configure(callback_allow=callback_allow, mail_allow=mail_allow)
    try:
        yield
    finally:
        _policies.update(saved)


def check_addresses(host: str, addresses: Iterable[str], kind: Kind) -> list[str]:
    """The ``addresses`` of ``host`` that ``kind``'s list allows, in order (pure; no lookup).
    Raises EgressDenied when none is."""
    allow = _policies[kind]
    if host.lower().rstrip(".") in BLOCKED_HOSTS and not allow._host_matches(host):
        raise EgressDenied(f"{_shown(host)} is a cloud metadata service (not allowed)")
    allowed = [a for a in dict.fromkeys(addresses) if allow.permits(host, _address(a))]
    if not allowed:
        reason = f"not in {setting_name(kind)}" if allow.restricted else "a link-local or metadata address"
        raise EgressDenied(f"{_shown(host)} is not allowed ({reason})")
    return allowed


async def resolve_checked(host: str, port: int, kind: Kind) -> list[str]:
    """The addresses of ``host`` that ``kind`` may connect to, in resolver order.

    Raises ``socket.gaierror`` when the name does not resolve and EgressDenied when no address
    is allowed. Connect to these addresses (not to ``host`` again) to keep what was checked.
    """
    host = host.strip("[]")
    try:
        literal: IPAddress | None = _address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return check_addresses(host, [str(literal)], kind)
    if host.lower().rstrip(".") in BLOCKED_HOSTS:
        check_addresses(host, [], kind)  # raises unless the list names it
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # IDNA refuses it (a label over 63 characters...): no such host
        raise socket.gaierror(socket.EAI_NONAME, "invalid host name") from None
    return check_addresses(host, [str(info[4][0]) for info in infos], kind)


async def open_tcp_stream(host: str, port: int, kind: Kind) -> trio.SocketStream:
    """``trio.open_tcp_stream`` to a checked address of ``host`` (tried in order)."""
    addresses = await resolve_checked(host, port, kind)
    last: OSError | None = None
    for address in addresses:
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError as error:
            last = error
    assert last is not None  # resolve_checked never returns an empty list
    raise last


def _shown(host: str) -> str:
    # Log and error texts quote the host, which comes from API callers: bound it.
    return host if len(host) <= 100 else host[:100] + "..."


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to checked addresses."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, kind: Kind) -> None:
        self._inner = inner
        self._kind = kind

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(timeout) if timeout is not None else _no_deadline():
                addresses = await resolve_checked(host, port, self._kind)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"DNS lookup of {_shown(host)} timed out") from None
        except EgressDenied as error:
            raise httpcore.ConnectError(error.strerror) from error
        except OSError as error:
            raise httpcore.ConnectError(error.strerror or str(error)) from error
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@contextmanager
def _no_deadline() -> Iterator[None]:
    yield


def http_transport(
    kind: Kind,
    *,
    verify: Any = True,
    limits: httpx.Limits | None = None,
    http2: bool = False,
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection (redirects included) is checked for ``kind``.

    Pass it as ``httpx.AsyncClient(transport=...)``; ``verify`` and ``limits`` then belong here,
    not on the client. Proxies from the environment are not used.
    """
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits or httpx.Limits(), http2=http2)
    pool = transport._pool
    if not isinstance(pool, httpcore.AsyncConnectionPool):  # pragma: no cover - no proxy given
        raise TypeError("unexpected httpx connection pool")
    pool._network_backend = _CheckedBackend(pool._network_backend, kind)
    return transport


def denial(error: BaseException) -> EgressDenied | None:
    """The EgressDenied behind an httpx/httpcore error, if that is why it failed."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, EgressDenied):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
