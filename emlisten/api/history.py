"""Creatio's ``StartSynchronization``: ``POST /api/email/synchronize`` starts a history load.

Body: ``{"Credentials": SynchronizationCredentials, "Filters": <start date>}`` (field names
case-insensitive). The mailbox must be registered (``/api/listeners/create`` first); the stored
registration is used to reach the server, the request only names the mailbox (``Credentials.Id``)
and the start date. The load runs in the background (:mod:`emlisten.service.history`); the
answer comes at once. See ``docs/api.md`` for the ``Filters`` forms understood.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from quart import Blueprint, Response

from emlisten.abc import Store
from emlisten.api.app import _BadRequest, _error_item, _json_response, _read_json_body
from emlisten.api.credentials import parse_credentials
from emlisten.errors import ValidationError
from emlisten.service.history import HistoryLoads, HistoryNotRunningError, HistoryUnsupportedError

__all__ = ["history_blueprint", "parse_filters", "ticks_to_datetime"]

logger = logging.getLogger(__name__)

#: .NET ``DateTime`` ticks: 100 ns units since 0001-01-01 00:00 (taken as UTC).
_TICKS_EPOCH = datetime(1, 1, 1, tzinfo=UTC)
#: ``DateTime.MaxValue.Ticks``.
_MAX_TICKS = 3_155_378_975_999_999_999
#: Field names (any case) whose value is the start date in a JSON ``Filters`` object.
_DATE_FIELDS = ("startdate", "sincedate", "date")
#: Microsoft's JSON date, ``/Date(1700000000000)/`` or ``/Date(1700000000000+0100)/``
#: (milliseconds since 1970; the offset is informational).
_MS_JSON_DATE = re.compile(r"/?Date\((-?\d+)(?:[+-]\d{4})?\)/?")
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FiltersError(ValueError):
    """``Filters`` holds no start date emlisten understands (the message says why)."""


def ticks_to_datetime(ticks: int) -> datetime:
    if not 0 <= ticks <= _MAX_TICKS:
        raise FiltersError(f"{ticks} is outside the range of .NET ticks")
    return _TICKS_EPOCH + timedelta(microseconds=ticks // 10)


def parse_filters(value: Any) -> datetime:
    """The start date in Creatio's ``Filters`` (an aware UTC datetime).

    Understood: a tick count (JSON number or digit string); a JSON object, or a string holding
    one, with ``StartDate``, ``SinceDate`` or ``Date`` (any case) holding ticks, an ISO 8601
    date or a Microsoft JSON date; an ISO 8601 date or date-time (no offset: UTC); a Microsoft
    JSON date ``/Date(ms)/``.
    """

    if isinstance(value, bool) or value is None:
        raise FiltersError("a start date is required")
    if isinstance(value, int):
        return ticks_to_datetime(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise FiltersError("ticks must be a whole number")
        return ticks_to_datetime(int(value))
    if isinstance(value, Mapping):
        lowered = {str(k).lower(): v for k, v in value.items()}
        for name in _DATE_FIELDS:
            if name in lowered:
                return parse_filters(lowered[name])
        raise FiltersError("no StartDate, SinceDate or Date field")
    if not isinstance(value, str):
        raise FiltersError("expected a string, a number or an object")
    text = value.strip()
    if not text:
        raise FiltersError("a start date is required")
    if text.isdigit():
        return ticks_to_datetime(int(text))
    if text[0] in '{"':
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as error:
            raise FiltersError(f"malformed JSON ({error.msg})") from None
        if isinstance(decoded, str) and decoded.strip() == text:
            raise FiltersError("not a date")
        return parse_filters(decoded)
    match = _MS_JSON_DATE.fullmatch(text)
    if match is not None:
        try:
            return _UNIX_EPOCH + timedelta(milliseconds=int(match.group(1)))
        except OverflowError:  # beyond year 1..9999
            raise FiltersError("date out of range") from None
    try:
        moment = datetime.fromisoformat(text)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise FiltersError("not a tick count, a JSON object or an ISO 8601 date") from None
    except OverflowError:  # e.g. 0001-01-01T00:00-01:00 moved to UTC
        raise FiltersError("date out of range") from None


def _field(body: Mapping[Any, Any], name: str) -> Any:
    lowered = {str(k).lower(): v for k, v in body.items()}
    return lowered.get(name.lower())


def history_blueprint(loads: HistoryLoads, store: Store) -> Blueprint:
    blueprint = Blueprint("history", __name__)

    @blueprint.errorhandler(_BadRequest)
    async def bad_request(error: _BadRequest) -> Response:
        return _json_response({"Message": error.message, "Errors": error.errors}, 400)

    @blueprint.post("/api/email/synchronize")
    async def synchronize() -> Response:
        body = await _read_json_body()
        if not isinstance(body, Mapping):
            raise _BadRequest("Invalid body", [_error_item("body", "expected a JSON object")])
        credentials = _field(body, "Credentials")
        if isinstance(credentials, list) and len(credentials) == 1:
            credentials = credentials[0]
        if credentials is None:
            raise _BadRequest("Invalid body", [_error_item("Credentials", "required")])
        try:
            requested = parse_credentials(credentials)
        except ValidationError as error:
            field = "Credentials" if error.field in ("", "body") else f"Credentials.{error.field}"
            raise _BadRequest("Invalid credentials", [_error_item(field, error.message)]) from None
        try:
            since = parse_filters(_field(body, "Filters"))
        except FiltersError as error:
            raise _BadRequest("Invalid Filters", [_error_item("Filters", str(error))]) from None

        # The stored registration reaches the server: the request must not redirect a running
        # subscription's mail elsewhere.
        mailbox = await store.get_mailbox(requested.id)
        if mailbox is None:
            return _json_response(
                {"Message": f"mailbox {requested.id} is not registered: call /api/listeners/create first"},
                404,
            )
        try:
            started = await loads.start(mailbox, since)
        except HistoryUnsupportedError as error:
            return _json_response({"Message": str(error)}, 501)
        except HistoryNotRunningError as error:
            return _json_response({"Message": str(error)}, 503)
        if not started:
            logger.info("synchronize: a history load already runs for %s", mailbox.id)
            return _json_response(
                {"Started": False, "Message": "a history load is already running for this mailbox"}
            )
        logger.info("synchronize: history load of %s since %s started", mailbox.id, since.isoformat())
        return _json_response({"Started": True, "Since": since.isoformat()})

    return blueprint
