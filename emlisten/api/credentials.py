"""Creatio ``SynchronizationCredentials`` JSON -> validated :class:`emlisten.models.MailboxConfig`.

Field names are matched case-insensitively (Creatio sends PascalCase); errors always name the
field in PascalCase, prefixed with the element's index when it came from an array
(``[2].ServiceUrl``). Error messages never quote the values of ``Password``, ``AccessToken``,
``BpmEndpoint`` or ``ServiceUrl`` (a URL may carry credentials).

Fields understood
-----------------
``Id`` (GUID, required, normalised to lowercase canonical form), ``UserName`` (required),
``Password`` (required unless ``UseOAuth``), ``AccessToken`` (required when ``UseOAuth``),
``SenderEmailAddress``, ``ServiceUrl`` (required), ``Port``, ``UseSsl``, ``SecureOption``,
``BpmEndpoint`` (required, absolute http(s) URL), ``BpmUser``, ``BpmUserWorkspace``,
``BpmUserTimeZone``, ``FolderIds`` (empty or absent: the inbox), ``UseFullEmail`` (default true),
``FeatureValues`` (object, or a list of ``{"Key", "Value"}``), ``Context`` (object).

Protocol (see docs/protocols.md; first match wins)
---------------------------------------------------
1. The emlisten extension field ``Protocol`` (``"imap"``, ``"ews"`` or ``"graph"``, any case).
2. ``ServiceUrl`` is an http(s) URL (or a scheme-less ``host/path``, read as https) whose host
   is ``graph.microsoft.com`` or a national cloud's Graph host (``GRAPH_HOSTS``): Microsoft Graph.
3. Any other http(s) URL (or scheme-less ``host/path``): Exchange Web Services.
4. Otherwise (a host name): IMAP.
5. ``IsAutodiscover`` true and no ``ServiceUrl`` (with ``Protocol`` absent or "ews"): EWS through
   Autodiscover. ``service_url`` stays empty and the EWS source discovers the URL for the mailbox
   address (``SenderEmailAddress``, else ``UserName``, which must then be an email address) on
   first use. The emlisten extension field ``AutodiscoverUrl`` (an http(s) URL, kept in ``extra``)
   is asked first. The ``imap`` endpoint shows the address's domain, port 443, SSL_ON_CONNECT.

For ``ews`` and ``graph`` the mailbox's ``service_url`` is set and its ``imap`` endpoint holds the
service's host, the URL's port (default 443, or 80 for ``http://``) and ``SSL_ON_CONNECT``
(``NONE`` for ``http://``); ``Port``, ``UseSsl`` and ``SecureOption`` are ignored. EWS: the URL as
given; a URL without a path gets ``/EWS/Exchange.asmx``; a bare host name with ``Protocol`` "ews"
means ``https://host/EWS/Exchange.asmx``. Graph: only ``scheme://host[:port]`` is kept (default
``https://graph.microsoft.com``), so a test can point ``Protocol`` "graph" at a simulator.
URLs must not carry credentials or a fragment. The emlisten extension field ``ImpersonatedUser``
(EWS: act on that mailbox through ``ExchangeImpersonation``) stays in ``extra`` and is read by
the EWS adapter.

``ServiceUrl`` for IMAP: ``host``, ``host:port``, ``[v6addr]:port``, ``imap://host[:port]`` or
``imaps://host[:port]``. A port in ``ServiceUrl`` is used only when the ``Port`` field is absent.

``Port``: 1..65535. Absent, null, ``""`` and ``0`` all mean "not set" (``0`` is the .NET default of
Creatio's non-nullable ``int``); then 993 is used for SSL-on-connect and 143 otherwise (MailKit's
defaults).

Booleans (``UseSsl``, ``UseOAuth``, ``UseFullEmail``, ``VerifyCertificate``...) accept JSON
``true``/``false``, the strings ``"true"``/``"false"`` (any case) and ``0``/``1`` (also as
strings).

Security resolution (a decision: Creatio talks to mail servers through MailKit, so its
``SecureSocketOptions`` values are followed)
-------------------------------------------------------------------------------------------------
``SecureOption`` accepts the int or the name (case-insensitive)::

    0 None                  -> NONE
    1 Auto                  -> SSL_ON_CONNECT if the port is 993 (or unset: MailKit then uses 993),
                               else STARTTLS_WHEN_AVAILABLE
    2 SslOnConnect          -> SSL_ON_CONNECT
    3 StartTls              -> STARTTLS
    4 StartTlsWhenAvailable -> STARTTLS_WHEN_AVAILABLE

Precedence, first match wins:

1. ``SecureOption`` 1..4 -> the table above.
2. ``UseSsl`` true -> SSL_ON_CONNECT, except on port 143 -> STARTTLS.
3. ``imaps://`` scheme in ``ServiceUrl`` -> SSL_ON_CONNECT.
4. ``SecureOption`` 0 or ``UseSsl`` false -> NONE.
5. nothing said at all -> as ``UseSsl`` true (TLS by default).

``SecureOption`` 0 and ``UseSsl`` false are also the .NET default values of those fields, so they
may mean "not set": an explicit TLS request elsewhere (``UseSsl`` true, ``imaps://``) wins over
them instead of silently downgrading to plain text.

Certificate verification is on by default; the emlisten extension field ``VerifyCertificate``
(bool, default true) turns it off for one mailbox (IMAP and SMTP).

Outgoing mail (emlisten extension fields; Creatio sends none of them)
--------------------------------------------------------------------
``SmtpServer`` (``host``, ``host:port``, ``smtp://host[:port]`` or ``smtps://host[:port]``),
``SmtpPort``, ``SmtpSecureOption`` (same values as ``SecureOption``; ``Auto`` -> SSL_ON_CONNECT on
465, else STARTTLS_WHEN_AVAILABLE) and ``SmtpUseSsl`` (true -> SSL_ON_CONNECT, except on 25 and
587 -> STARTTLS). Same precedence as above (``smtps://`` plays the role of ``imaps://``); default
port 465 for SSL_ON_CONNECT, 587 otherwise. When none of the ``Smtp*`` fields is present,
``MailboxConfig.smtp`` is ``None`` (the sender picks its defaults from the incoming host); when only
some are, the host defaults to the IMAP host.

``extra`` keeps every received field that is not modelled above (``ServerTypeId``,
``IsAutodiscover``, ``PersonalMetrics``...) under the caller's spelling, except secrets: any key
containing "password", "token" or "secret" is dropped. ``ServerTypeId`` is kept but never
interpreted.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from emlisten.errors import ValidationError
from emlisten.models import MailboxConfig, Security, ServerEndpoint, folders_or_inbox

__all__ = [
    "AUTODISCOVER_NEEDS_ADDRESS",
    "SecureOption",
    "normalise_guid",
    "parse_credentials",
    "parse_credentials_array",
    "parse_mailbox_id_spellings",
    "parse_mailbox_ids",
    "resolve_imap_security",
    "resolve_smtp_security",
]

NOT_A_MAIL_SERVER = "must be a host, host:port or mail server URL, not an http(s) URL or a path"
AUTODISCOVER_NEEDS_ADDRESS = (
    "Autodiscover needs the mailbox address: give SenderEmailAddress (or a UserName that is an "
    "email address), or the EWS URL (https://host/EWS/Exchange.asmx) in ServiceUrl"
)
PROTOCOLS = ("imap", "ews", "graph")
GRAPH_HOST = "graph.microsoft.com"
GRAPH_DEFAULT_URL = f"https://{GRAPH_HOST}"
#: Microsoft Graph's hosts: the global service and the national clouds (US Government L4 and
#: L5/DoD, Microsoft 365 operated by 21Vianet, Germany). A ServiceUrl on one of them is Graph.
GRAPH_HOSTS = frozenset(
    {
        GRAPH_HOST,
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
        "graph.microsoft.de",
    }
)
EWS_DEFAULT_PATH = "/EWS/Exchange.asmx"

IMAP_TLS_PORT = 993
IMAP_PLAIN_PORT = 143
SMTP_TLS_PORT = 465
SMTP_SUBMISSION_PORT = 587
SMTP_RELAY_PORT = 25

#: Longest caller-supplied ``Id`` echoed back in an error report.
_MAX_ECHOED_ID = 100

_SECRET_KEY_MARKERS = ("password", "token", "secret")

#: Lowercased names of the fields turned into typed ``MailboxConfig`` attributes.
_MODELLED_FIELDS = frozenset(
    {
        "id",
        "username",
        "password",
        "accesstoken",
        "useoauth",
        "senderemailaddress",
        "serviceurl",
        "port",
        "usessl",
        "secureoption",
        "verifycertificate",
        "bpmendpoint",
        "bpmuser",
        "bpmuserworkspace",
        "bpmusertimezone",
        "folderids",
        "usefullemail",
        "featurevalues",
        "context",
        "smtpserver",
        "smtpport",
        "smtpsecureoption",
        "smtpusessl",
        "protocol",
    }
)

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class SecureOption(enum.IntEnum):
    """MailKit's ``SecureSocketOptions``, as Creatio sends them."""

    NONE = 0
    AUTO = 1
    SSL_ON_CONNECT = 2
    STARTTLS = 3
    STARTTLS_WHEN_AVAILABLE = 4


_SECURE_OPTION_NAMES = {
    "none": SecureOption.NONE,
    "auto": SecureOption.AUTO,
    "sslonconnect": SecureOption.SSL_ON_CONNECT,
    "starttls": SecureOption.STARTTLS,
    "starttlswhenavailable": SecureOption.STARTTLS_WHEN_AVAILABLE,
}

_EXPLICIT_SECURITY = {
    SecureOption.SSL_ON_CONNECT: Security.SSL_ON_CONNECT,
    SecureOption.STARTTLS: Security.STARTTLS,
    SecureOption.STARTTLS_WHEN_AVAILABLE: Security.STARTTLS_WHEN_AVAILABLE,
}


# --------------------------------------------------------------------------------------------
# Security resolution (pure functions, table-tested)


def resolve_imap_security(
    secure_option: SecureOption | None,
    use_ssl: bool | None,
    port: int | None,
    *,
    tls_scheme: bool = False,
) -> tuple[Security, int]:
    """Security and port of an IMAP endpoint (see the module docstring for the rules)."""

    return _resolve_security(
        secure_option,
        use_ssl,
        port,
        tls_scheme=tls_scheme,
        tls_port=IMAP_TLS_PORT,
        starttls_ports=frozenset({IMAP_PLAIN_PORT}),
        default_plain_port=IMAP_PLAIN_PORT,
    )


def resolve_smtp_security(
    secure_option: SecureOption | None,
    use_ssl: bool | None,
    port: int | None,
    *,
    tls_scheme: bool = False,
) -> tuple[Security, int]:
    """Security and port of an SMTP endpoint (see the module docstring for the rules)."""

    return _resolve_security(
        secure_option,
        use_ssl,
        port,
        tls_scheme=tls_scheme,
        tls_port=SMTP_TLS_PORT,
        starttls_ports=frozenset({SMTP_SUBMISSION_PORT, SMTP_RELAY_PORT}),
        default_plain_port=SMTP_SUBMISSION_PORT,
    )


def _resolve_security(
    secure_option: SecureOption | None,
    use_ssl: bool | None,
    port: int | None,
    *,
    tls_scheme: bool,
    tls_port: int,
    starttls_ports: frozenset[int],
    default_plain_port: int,
) -> tuple[Security, int]:
    security: Security
    if secure_option is SecureOption.AUTO:
        if port is None:
            port = tls_port
        security = Security.SSL_ON_CONNECT if port == tls_port else Security.STARTTLS_WHEN_AVAILABLE
    elif secure_option is not None and secure_option in _EXPLICIT_SECURITY:
        security = _EXPLICIT_SECURITY[secure_option]
    elif use_ssl is True or (use_ssl is None and secure_option is None and not tls_scheme):
        # Rule 2, and rule 5 (nothing said: TLS by default).
        security = Security.STARTTLS if port in starttls_ports else Security.SSL_ON_CONNECT
    elif tls_scheme:
        security = Security.SSL_ON_CONNECT
    else:
        security = Security.NONE
    if port is None:
        port = tls_port if security is Security.SSL_ON_CONNECT else default_plain_port
    return security, port


# --------------------------------------------------------------------------------------------
# Public parsers


def normalise_guid(value: Any, field: str) -> str:
    """Lowercase canonical GUID, or ``ValidationError(field, ...)``."""

    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "required: a mailbox GUID string")
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise ValidationError(field, "must be a GUID") from None


def parse_credentials(data: Any, *, index: int | None = None) -> MailboxConfig:
    """Validate one ``SynchronizationCredentials`` object. ``index`` prefixes error fields."""

    prefix = "" if index is None else f"[{index}]."
    if not isinstance(data, Mapping):
        field = "body" if index is None else f"[{index}]"
        raise ValidationError(field, "must be a JSON object")
    return _CredentialsReader(data, prefix).read()


def parse_credentials_array(body: Any) -> tuple[list[MailboxConfig], list[dict[str, Any]]]:
    """Validate an array of credentials (a single object counts as a one-element array).

    Returns the valid mailboxes (a repeated ``Id``: the last one wins) and one error report per
    invalid element: ``{"Index": int, "Id": str | None, "Field": str, "Message": str}``. Raises
    ``ValidationError("body", ...)`` only when the body is neither an array nor an object.
    """

    elements = _as_array(body, "an array of SynchronizationCredentials objects")
    accepted: dict[str, MailboxConfig] = {}
    errors: list[dict[str, Any]] = []
    for position, element in enumerate(elements):
        try:
            mailbox = parse_credentials(element, index=position)
        except ValidationError as error:
            errors.append(
                {
                    "Index": position,
                    "Id": _echoable_id(element),
                    "Field": error.field,
                    "Message": error.message,
                }
            )
            continue
        accepted.pop(mailbox.id, None)
        accepted[mailbox.id] = mailbox
    return list(accepted.values()), errors


def parse_mailbox_id_spellings(body: Any) -> list[tuple[str, str]]:
    """``[(caller's spelling, normalised GUID)]`` from an array of ids, in order, without repeats.

    Elements may be GUID strings or, leniently, objects with an ``Id``. A single string or object
    counts as a one-element array.
    """

    if isinstance(body, str):
        body = [body]
    elements = _as_array(body, "an array of mailbox GUID strings")
    spellings: dict[str, str] = {}
    for position, element in enumerate(elements):
        field, spelling = f"[{position}]", element
        if isinstance(element, Mapping):
            field, spelling = f"[{position}].Id", _lower_keys(element).get("id")
        normalised = normalise_guid(spelling, field)
        spellings.setdefault(spelling, normalised)
    return list(spellings.items())


def parse_mailbox_ids(body: Any) -> list[str]:
    """Normalised (lowercase canonical) GUIDs from an array of ids, in order, without repeats."""

    return list(dict.fromkeys(normalised for _, normalised in parse_mailbox_id_spellings(body)))


# --------------------------------------------------------------------------------------------
# Internals


def _as_array(body: Any, expected: str) -> list[Any]:
    if isinstance(body, Mapping):
        return [body]
    if isinstance(body, list):
        return body
    raise ValidationError("body", f"expected {expected}")


def _lower_keys(data: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(key).lower(): value for key, value in data.items()}


def _echoable_id(element: Any) -> str | None:
    if not isinstance(element, Mapping):
        return None
    value = _lower_keys(element).get("id")
    if isinstance(value, str):
        return value[:_MAX_ECHOED_ID]
    return None


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_KEY_MARKERS)


def _valid_host(host: str) -> str | None:
    """The host in canonical form (IP literal or ASCII name), or None when it is not one."""

    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    ascii_host = ascii_host.rstrip(".")
    if not ascii_host or len(ascii_host) > 253:
        return None
    if not all(_HOST_LABEL.match(label) for label in ascii_host.split(".")):
        return None
    return ascii_host.lower()


@dataclass(frozen=True, slots=True)
class _ServerAddress:
    host: str
    port: int | None
    tls_scheme: bool


class _CredentialsReader:
    """Reads one credentials object; every accessor raises a ValidationError naming its field."""

    def __init__(self, data: Mapping[Any, Any], prefix: str) -> None:
        self._raw = data
        self._fields = _lower_keys(data)
        self._prefix = prefix

    def _error(self, field: str, message: str) -> ValidationError:
        return ValidationError(self._prefix + field, message)

    def _get(self, field: str) -> Any:
        return self._fields.get(field.lower())

    # -- scalar readers ----------------------------------------------------------------------

    def _string(self, field: str, *, required: bool = False) -> str:
        value = self._get(field)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise self._error(field, "must be a string")
        if required and not value.strip():
            raise self._error(field, "required")
        return value

    def _bool(self, field: str) -> bool | None:
        value = self._get(field)
        if value is None or value == "":
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
        raise self._error(field, 'must be a boolean (true/false, "true"/"false" or 0/1)')

    def _port(self, field: str) -> int | None:
        value = self._get(field)
        if isinstance(value, bool):
            raise self._error(field, "must be an integer port number")
        if value is None or value in ("", 0):
            return None  # 0 is the .NET default of a non-nullable int: "not set".
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
            if value == 0:
                return None
        if not isinstance(value, int):
            raise self._error(field, "must be an integer port number")
        if not 1 <= value <= 65535:
            raise self._error(field, "must be between 1 and 65535")
        return value

    def _secure_option(self, field: str) -> SecureOption | None:
        value = self._get(field)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.isdigit():
                value = int(stripped)
            else:
                name = stripped.lower().replace("_", "").replace("-", "")
                if name in _SECURE_OPTION_NAMES:
                    return _SECURE_OPTION_NAMES[name]
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return SecureOption(value)
            except ValueError:
                pass
        raise self._error(
            field,
            "must be one of 0/None, 1/Auto, 2/SslOnConnect, 3/StartTls, 4/StartTlsWhenAvailable",
        )

    def _object(self, field: str) -> dict[str, Any]:
        value = self._get(field)
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        raise self._error(field, "must be a JSON object")

    def _feature_values(self) -> dict[str, Any]:
        field = "FeatureValues"
        value = self._get(field)
        if isinstance(value, list):
            # .NET dictionaries sometimes arrive serialised as [{"Key": k, "Value": v}].
            features: dict[str, Any] = {}
            for position, item in enumerate(value):
                pair = _lower_keys(item) if isinstance(item, Mapping) else {}
                key = pair.get("key")
                if not isinstance(key, str):
                    raise self._error(f"{field}[{position}]", 'must be {"Key": str, "Value"}')
                features[key] = pair.get("value")
            return features
        return self._object(field)

    def _folders(self) -> tuple[str, ...]:
        field = "FolderIds"
        value = self._get(field)
        if value is None:
            return folders_or_inbox(())
        if not isinstance(value, list):
            raise self._error(field, "must be an array of folder names")
        for position, folder in enumerate(value):
            if not isinstance(folder, str):
                raise self._error(f"{field}[{position}]", "must be a string")
        return folders_or_inbox([folder.strip() for folder in value])

    def _bpm_endpoint(self) -> str:
        field = "BpmEndpoint"
        value = self._string(field, required=True).strip()
        try:
            parts = urlsplit(value)
            hostname = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise self._error(field, "must be an absolute http(s) URL") from None
        if parts.scheme.lower() not in ("http", "https") or not hostname:
            raise self._error(field, "must be an absolute http(s) URL")
        return value

    # -- server addresses --------------------------------------------------------------------

    def _server_address(
        self, field: str, value: str, *, plain_scheme: str, tls_scheme: str
    ) -> _ServerAddress:
        text = value.strip()
        if not text:
            raise self._error(field, "required")
        if "://" in text:
            return self._server_url(field, text, plain_scheme=plain_scheme, tls_scheme=tls_scheme)
        if "/" in text or "\\" in text:
            raise self._error(field, NOT_A_MAIL_SERVER)
        if "@" in text:
            raise self._error(field, "must not contain credentials")
        host_text, port_text = text, ""
        if text.startswith("["):
            closing = text.find("]")
            if closing < 0:
                raise self._error(field, "malformed IPv6 address")
            host_text, rest = text[1:closing], text[closing + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise self._error(field, "expected host, host:port or a URL")
                port_text = rest[1:]
        elif text.count(":") == 1:
            host_text, port_text = text.split(":")
        host = _valid_host(host_text)
        if host is None:
            raise self._error(field, "must be a host name or IP address")
        port: int | None = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise self._error(field, "port must be between 1 and 65535")
            port = int(port_text)
        return _ServerAddress(host, port, tls_scheme=False)

    def _server_url(self, field: str, text: str, *, plain_scheme: str, tls_scheme: str) -> _ServerAddress:
        scheme = text.split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            raise self._error(field, NOT_A_MAIL_SERVER)
        if scheme not in (plain_scheme, tls_scheme):
            raise self._error(field, f"unsupported scheme: expected {plain_scheme}:// or {tls_scheme}://")
        try:
            parts: SplitResult = urlsplit(text)
            port = parts.port
        except ValueError:
            raise self._error(field, "port must be between 1 and 65535") from None
        if parts.username is not None or parts.password is not None:
            raise self._error(field, "must not contain credentials")
        if parts.path not in ("", "/"):
            raise self._error(field, NOT_A_MAIL_SERVER)
        if parts.query or parts.fragment:
            raise self._error(field, "must not have a query or fragment")
        host = _valid_host(parts.hostname or "")
        if host is None:
            raise self._error(field, "must be a host name or IP address")
        if port == 0:
            raise self._error(field, "port must be between 1 and 65535")
        return _ServerAddress(host, port, tls_scheme=scheme == tls_scheme)

    def _imap_endpoint(self, verify_certificate: bool) -> ServerEndpoint:
        address = self._server_address(
            "ServiceUrl",
            self._string("ServiceUrl", required=True),
            plain_scheme="imap",
            tls_scheme="imaps",
        )
        port = self._port("Port")
        security, resolved_port = resolve_imap_security(
            self._secure_option("SecureOption"),
            self._bool("UseSsl"),
            port if port is not None else address.port,
            tls_scheme=address.tls_scheme,
        )
        return ServerEndpoint(address.host, resolved_port, security, verify_certificate)

    def _smtp_endpoint(self, imap_host: str, verify_certificate: bool) -> ServerEndpoint | None:
        smtp_fields = ("SmtpServer", "SmtpPort", "SmtpSecureOption", "SmtpUseSsl")
        if all(self._get(field) in (None, "") for field in smtp_fields):
            return None
        server = self._string("SmtpServer").strip()
        if server:
            address = self._server_address("SmtpServer", server, plain_scheme="smtp", tls_scheme="smtps")
        else:
            address = _ServerAddress(imap_host, None, tls_scheme=False)
        port = self._port("SmtpPort")
        security, resolved_port = resolve_smtp_security(
            self._secure_option("SmtpSecureOption"),
            self._bool("SmtpUseSsl"),
            port if port is not None else address.port,
            tls_scheme=address.tls_scheme,
        )
        return ServerEndpoint(address.host, resolved_port, security, verify_certificate)

    # -- protocol and Exchange service URLs -----------------------------------------------

    def _protocol(self) -> str | None:
        value = self._get("Protocol")
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().lower() in PROTOCOLS:
            return value.strip().lower()
        raise self._error("Protocol", 'must be one of "imap", "ews", "graph"')

    def _exchange_service(
        self, protocol: str | None, raw: str, verify: bool
    ) -> tuple[str, str, ServerEndpoint]:
        """(protocol, service_url, endpoint) of an EWS or Graph mailbox."""
        field = "ServiceUrl"
        if not raw:
            if protocol == "graph":
                raw = GRAPH_DEFAULT_URL
            elif self._bool("IsAutodiscover"):
                return self._autodiscover(verify)
            else:
                raise self._error(field, "required")
        text = raw if "://" in raw else f"https://{raw}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise self._error(field, "port must be between 1 and 65535") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise self._error(field, "must be an http(s) URL for Exchange (EWS or Graph)")
        if parts.username is not None or parts.password is not None:
            raise self._error(field, "must not contain credentials")
        if parts.fragment:
            raise self._error(field, "must not have a fragment")
        host = _valid_host(parts.hostname or "")
        if host is None:
            raise self._error(field, "must be a host name or IP address")
        if port == 0:
            raise self._error(field, "port must be between 1 and 65535")
        if protocol is None:
            protocol = "graph" if host in GRAPH_HOSTS else "ews"
        netloc = parts.netloc
        if protocol == "graph":
            service_url = f"{scheme}://{netloc}"
        else:
            path = parts.path if parts.path not in ("", "/") else EWS_DEFAULT_PATH
            service_url = f"{scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")
        tls = scheme == "https"
        endpoint = ServerEndpoint(
            host,
            port if port is not None else (443 if tls else 80),
            Security.SSL_ON_CONNECT if tls else Security.NONE,
            verify,
        )
        return protocol, service_url, endpoint

    def _autodiscover(self, verify: bool) -> tuple[str, str, ServerEndpoint]:
        """EWS with the URL left to Autodiscover: checks the address and ``AutodiscoverUrl``."""
        address = self._string("SenderEmailAddress").strip() or self._string("UserName").strip()
        _, at, domain = address.rpartition("@")
        host = _valid_host(domain) if at else None
        if host is None:
            raise self._error("ServiceUrl", AUTODISCOVER_NEEDS_ADDRESS)
        field = "AutodiscoverUrl"
        hint = self._string(field).strip()
        if hint:
            try:
                parts = urlsplit(hint)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise self._error(field, "must be an absolute http(s) URL") from None
            if parts.scheme.lower() not in ("http", "https") or not _valid_host(parts.hostname or ""):
                raise self._error(field, "must be an absolute http(s) URL")
            if parts.username is not None or parts.password is not None:
                raise self._error(field, "must not contain credentials")
            if parts.fragment:
                raise self._error(field, "must not have a fragment")
        return "ews", "", ServerEndpoint(host, 443, Security.SSL_ON_CONNECT, verify)

    def _mail_service(self, verify: bool) -> tuple[str, str, ServerEndpoint]:
        """(protocol, service_url, incoming endpoint) by the rules in the module docstring."""
        protocol = self._protocol()
        raw = self._string("ServiceUrl").strip()
        looks_like_url = raw.lower().startswith(("http://", "https://")) or ("://" not in raw and "/" in raw)
        if protocol in ("ews", "graph") or (protocol is None and looks_like_url):
            return self._exchange_service(protocol, raw, verify)
        if protocol is None and not raw and self._bool("IsAutodiscover"):
            return self._autodiscover(verify)
        return "imap", "", self._imap_endpoint(verify)

    # -- the whole object --------------------------------------------------------------------

    def read(self) -> MailboxConfig:
        mailbox_id = normalise_guid(self._get("Id"), self._prefix + "Id")
        user_name = self._string("UserName", required=True)
        use_oauth = bool(self._bool("UseOAuth"))
        if use_oauth:
            access_token = self._string("AccessToken", required=True)
            password = self._string("Password")
        else:
            password = self._string("Password", required=True)
            access_token = self._string("AccessToken")
        verify = self._bool("VerifyCertificate")
        verify_certificate = True if verify is None else verify
        protocol, service_url, imap = self._mail_service(verify_certificate)
        smtp = self._smtp_endpoint(imap.host, verify_certificate)
        bpm_endpoint = self._bpm_endpoint()
        use_full_email = self._bool("UseFullEmail")
        extra = {
            str(key): value
            for key, value in self._raw.items()
            if str(key).lower() not in _MODELLED_FIELDS and not _is_secret_key(str(key))
        }
        return MailboxConfig(
            id=mailbox_id,
            user_name=user_name,
            imap=imap,
            bpm_endpoint=bpm_endpoint,
            password=password,
            access_token=access_token,
            use_oauth=use_oauth,
            sender_email=self._string("SenderEmailAddress").strip(),
            folders=self._folders(),
            use_full_email=True if use_full_email is None else use_full_email,
            bpm_user=self._string("BpmUser"),
            bpm_user_workspace=self._string("BpmUserWorkspace"),
            bpm_user_time_zone=self._string("BpmUserTimeZone"),
            smtp=smtp,
            feature_values=self._feature_values(),
            context=self._object("Context"),
            extra=extra,
            protocol=protocol,
            service_url=service_url,
        )
