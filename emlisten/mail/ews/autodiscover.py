"""POX Autodiscover: the EWS URL of a mailbox from its SMTP address.

Request (Microsoft's "Autodiscover for Exchange", POX flavour): ``POST`` to a candidate URL with::

    <Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
      <Request><EMailAddress>addr</EMailAddress>
        <AcceptableResponseSchema>...outlook/responseschema/2006a</AcceptableResponseSchema>
      </Request></Autodiscover>

Answer: ``Response/Account`` with ``Action`` ``settings`` (``Protocol`` of ``Type`` ``EXCH`` or
``EXPR`` carrying ``EwsUrl``; EXCH is preferred, then EXPR), ``redirectAddr`` (``RedirectAddr``:
start again with that address and its domain) or ``redirectUrl`` (``RedirectUrl``: post the same
request there). HTTP 301/302/307/308 with ``Location`` are followed like ``redirectUrl``.

Candidates for domain D, in order: the emlisten extension field ``AutodiscoverUrl`` (when given),
then ``https://D/autodiscover/autodiscover.xml`` and
``https://autodiscover.D/autodiscover/autodiscover.xml`` - or, when ``EwsSource`` was given a base
URL list for D (``autodiscover_bases``), those bases + ``/autodiscover/autodiscover.xml`` instead of
the two DNS names (tests, and sites whose Autodiscover lives elsewhere).

Rules: at most ``MAX_REDIRECTS`` (10) redirects of any kind per discovery; a redirect never goes
from https to http; a candidate that cannot be reached, answers another HTTP status, or answers
something that is not an Autodiscover document is skipped for the next one. HTTP 401/403 stop at
once with ``MailAuthError`` (``MailTokenRejectedError`` with a bearer token; the message names the
schemes the server offers): the same credentials
would be refused elsewhere too, and repeating them only counts towards an account lockout. When
every candidate fails: ``MailConnectError("Autodiscover found no EWS URL for <domain>: tried ...")``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

import httpx
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from emlisten.errors import MailAuthError, MailConnectError, MailProtocolError, MailTokenRejectedError
from emlisten.mail.ews._auth import offered

log = logging.getLogger(__name__)

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
AUTODISCOVER_PATH = "/autodiscover/autodiscover.xml"
#: Redirects (redirectAddr, redirectUrl, HTTP 3xx) followed in one discovery.
MAX_REDIRECTS = 10
#: Largest Autodiscover answer read (a real one is a few KiB).
MAX_ANSWER_BYTES = 1024 * 1024
_HTTP_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Preferred protocol sections, in order: internal Exchange, then Outlook Anywhere (external).
_PROTOCOL_TYPES = ("EXCH", "EXPR")


class AutodiscoverError(MailConnectError):
    """No candidate gave an EWS URL."""


def autodiscover_url_hint(extra: Mapping[str, object]) -> str:
    """The ``AutodiscoverUrl`` extension field (any case), or ""."""
    for key, value in extra.items():
        if key.lower() == "autodiscoverurl" and isinstance(value, str):
            return value.strip()
    return ""


def domain_of(address: str) -> str:
    _, at, domain = address.strip().rpartition("@")
    if not at or not domain:
        raise MailProtocolError(
            "Autodiscover needs the mailbox's SMTP address (SenderEmailAddress or UserName)"
        )
    return domain.lower().rstrip(".")


def candidate_urls(
    domain: str, *, hint: str = "", bases: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Where to ask for ``domain``, in order (see the module docstring)."""
    found: list[str] = [hint] if hint else []
    mapped = (bases or {}).get(domain)
    if mapped is not None:
        found += [base.rstrip("/") + AUTODISCOVER_PATH for base in mapped]
    else:
        found += [f"https://{domain}{AUTODISCOVER_PATH}", f"https://autodiscover.{domain}{AUTODISCOVER_PATH}"]
    return list(dict.fromkeys(found))


def request_body(address: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<Autodiscover xmlns="{REQUEST_NS}"><Request>'
        f"<EMailAddress>{escape(address)}</EMailAddress>"
        f"<AcceptableResponseSchema>{RESPONSE_SCHEMA}</AcceptableResponseSchema>"
        "</Request></Autodiscover>"
    ).encode()


@dataclass(frozen=True, slots=True)
class AutodiscoverAnswer:
    """One parsed answer: exactly one of the three is set (or ``error`` for an error answer)."""

    ews_url: str = ""
    redirect_address: str = ""
    redirect_url: str = ""
    error: str = ""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: Element, name: str) -> list[Element]:
    return [child for child in element if _local(child.tag) == name]


def _child_text(element: Element, name: str) -> str:
    for child in _children(element, name):
        return (child.text or "").strip()
    return ""


def parse_answer(data: bytes) -> AutodiscoverAnswer:
    """Read an Autodiscover (POX) answer; ``MailProtocolError`` when it is not one."""
    try:
        root = fromstring(data.strip(), forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError):
        raise MailProtocolError("Autodiscover answer is not well-formed XML") from None
    if _local(root.tag) != "Autodiscover":
        raise MailProtocolError("Autodiscover answer has no Autodiscover root element")
    for response in _children(root, "Response"):
        for error in _children(response, "Error"):
            code = _child_text(error, "ErrorCode")
            message = _child_text(error, "Message")
            return AutodiscoverAnswer(error=f"error {code}: {message}".strip(": "))
        for account in _children(response, "Account"):
            action = _child_text(account, "Action").lower()
            if action == "redirectaddr":
                target = _child_text(account, "RedirectAddr")
                if target:
                    return AutodiscoverAnswer(redirect_address=target)
            elif action == "redirecturl":
                target = _child_text(account, "RedirectUrl")
                if target:
                    return AutodiscoverAnswer(redirect_url=target)
            else:
                by_type = {
                    _child_text(protocol, "Type").upper(): _child_text(protocol, "EwsUrl")
                    for protocol in _children(account, "Protocol")
                }
                for kind in _PROTOCOL_TYPES:
                    if by_type.get(kind):
                        return AutodiscoverAnswer(ews_url=by_type[kind])
            return AutodiscoverAnswer(error=f"Action {action or '(none)'} without a usable EWS URL")
    raise MailProtocolError("Autodiscover answer has no Response/Account")


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else url


def _downgrade(source: str, target: str) -> bool:
    return urlsplit(source).scheme.lower() == "https" and urlsplit(target).scheme.lower() != "https"


async def discover_ews_url(
    http: httpx.AsyncClient,
    address: str,
    headers: Mapping[str, str],
    *,
    bearer: bool,
    hint: str = "",
    bases: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The EWS URL for ``address`` (see the module docstring). ``http`` authenticates (its
    transport is an ``AuthenticatedPool``: Basic, NTLM or Negotiate as the server asks); ``headers``
    are added to each request (``X-AnchorMailbox``)."""
    redirects = 0
    tried: list[str] = []
    domain = domain_of(address)
    queue = candidate_urls(domain, hint=hint, bases=bases)
    while queue:
        url = queue.pop(0)
        tried.append(_where(url))
        try:
            response = await http.post(
                url,
                content=request_body(address),
                headers={**headers, "Content-Type": "text/xml; charset=utf-8"},
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            log.info("Autodiscover %s: %s", _where(url), type(exc).__name__)
            continue
        status = response.status_code
        if status in (401, 403):
            what = "OAuth token" if bearer else "credentials"
            message = f"Autodiscover {urlsplit(url).netloc} rejected the {what} (HTTP {status}"
            message += f"; it offers {offered(response)})" if status == 401 and not bearer else ")"
            raise MailTokenRejectedError(message) if bearer else MailAuthError(message)
        if status in _HTTP_REDIRECTS and response.headers.get("location"):
            target = urljoin(url, response.headers["location"])
            redirects = _count_redirect(redirects, domain, tried)
            if not _downgrade(url, target):
                queue.insert(0, target)
            continue
        if status != 200:
            log.info("Autodiscover %s answered HTTP %d", _where(url), status)
            continue
        if len(response.content) > MAX_ANSWER_BYTES:
            continue
        try:
            answer = parse_answer(response.content)
        except MailProtocolError as exc:
            log.info("Autodiscover %s: %s", _where(url), exc)
            continue
        if answer.ews_url:
            scheme = urlsplit(answer.ews_url).scheme.lower()
            if scheme in ("http", "https") and not _downgrade(url, answer.ews_url):
                log.info("Autodiscover: EWS URL of %s is %s", address, _where(answer.ews_url))
                return answer.ews_url
            log.info("Autodiscover %s: unusable EWS URL ignored", _where(url))
        elif answer.redirect_url:
            redirects = _count_redirect(redirects, domain, tried)
            target = urljoin(url, answer.redirect_url)
            if not _downgrade(url, target):
                queue.insert(0, target)
        elif answer.redirect_address:
            redirects = _count_redirect(redirects, domain, tried)
            address = answer.redirect_address
            # A new address means a new domain and its own candidates (the hint applies to all).
            queue = candidate_urls(domain_of(address), hint=hint, bases=bases)
        else:
            log.info("Autodiscover %s: %s", _where(url), answer.error)
    raise AutodiscoverError(f"Autodiscover found no EWS URL for {domain}: tried {', '.join(tried)}")


def _count_redirect(redirects: int, domain: str, tried: Sequence[str]) -> int:
    redirects += 1
    if redirects > MAX_REDIRECTS:
        raise AutodiscoverError(
            f"Autodiscover found no EWS URL for {domain}: more than {MAX_REDIRECTS} redirects "
            f"(tried {', '.join(dict.fromkeys(tried))})"
        )
    return redirects


__all__ = [
    "MAX_REDIRECTS",
    "AutodiscoverAnswer",
    "AutodiscoverError",
    "autodiscover_url_hint",
    "candidate_urls",
    "discover_ews_url",
    "domain_of",
    "parse_answer",
    "request_body",
]
