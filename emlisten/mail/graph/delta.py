"""The Graph reader's checkpoint cursor: a delta link plus what is needed to deliver each
message once.

A delta query on a folder's messages returns pages linked by ``@odata.nextLink``; the last page
of a round carries ``@odata.deltaLink``, where the next round starts. The reader asks with the
custom option ``changeType=created`` (Graph keeps it inside the links), so later rounds report
new messages only. Two things still need care, and the cursor carries what they need:

- **The first round lists the whole folder.** A new subscription starts "now": the cursor then
  has no link and a ``floor`` (the server's clock when the subscription was made); messages of
  the first round received before the floor are not delivered.
- **A round may report a message again** (a replayed page after a crash between delivery and
  checkpoint, a sync state that expired and had to be rebuilt with a fresh first round). The
  cursor keeps short hashes of the messages delivered recently (``seen``, with their received
  time) and never delivers those twice. Entries older than ``floor`` are dropped; the floor
  follows the newest delivered message at a distance of ``window`` seconds, so a rebuilt round
  re-checks the last ``window`` seconds and delivers what is genuinely new.

The cursor is JSON, kept in ``Checkpoint.cursor``; it stays small (at most ``MAX_SEEN`` hashes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: How far behind the newest delivered message the floor stays (seconds).
DEFAULT_WINDOW_SECONDS = 15 * 60
MAX_SEEN = 1000


def item_hash(item_id: str) -> str:
    return hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:20]


def parse_time(value: object) -> float | None:
    """A Graph ``DateTimeOffset`` (``2024-05-01T10:00:00Z``) as Unix seconds."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(slots=True)
class DeltaCursor:
    #: Where the next request goes: a nextLink (inside a round) or a deltaLink; "" = a new round.
    link: str = ""
    #: The link belongs to a first round (which lists the whole folder).
    initial: bool = True
    #: Unix seconds: first-round messages received before this are not delivered.
    floor: float = 0.0
    #: Hash of a delivered message id -> its received time (Unix seconds).
    seen: dict[str, float] = field(default_factory=dict)

    def dump(self) -> str:
        return json.dumps(
            {"v": 1, "link": self.link, "initial": self.initial, "floor": self.floor, "seen": self.seen},
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, text: str) -> DeltaCursor | None:
        """None when ``text`` is empty or not a cursor of ours."""
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, Mapping) or data.get("v") != 1:
            return None
        seen = data.get("seen")
        return cls(
            link=str(data.get("link") or ""),
            initial=bool(data.get("initial", True)),
            floor=float(data.get("floor") or 0.0),
            seen={str(k): float(v) for k, v in seen.items()} if isinstance(seen, Mapping) else {},
        )

    @classmethod
    def starting_at(cls, floor: float) -> DeltaCursor:
        return cls(link="", initial=True, floor=floor)

    def restart_round(self) -> DeltaCursor:
        """The sync state expired: walk a fresh first round from the same floor."""
        return DeltaCursor(link="", initial=True, floor=self.floor, seen=dict(self.seen))

    def is_new(self, item: Mapping[str, Any], *, initial: bool) -> bool:
        if "@removed" in item or not isinstance(item.get("id"), str):
            return False
        if item_hash(item["id"]) in self.seen:
            return False
        if initial:
            received = parse_time(item.get("receivedDateTime"))
            return received is None or received >= self.floor
        # A later round only reports created messages: new, even when moved in from elsewhere
        # with an old received time (as IMAP would deliver it with a new UID).
        return True

    def after_page(
        self,
        *,
        next_link: str | None,
        delta_link: str | None,
        initial: bool,
        delivered: Iterable[tuple[str, float | None]],
        window: float = DEFAULT_WINDOW_SECONDS,
    ) -> DeltaCursor:
        seen = dict(self.seen)
        for item_id, received in delivered:
            seen[item_hash(item_id)] = received if received is not None else self.floor
        floor = self.floor
        if seen:
            floor = max(floor, max(seen.values()) - window)
        seen = {h: t for h, t in seen.items() if t >= floor}
        if len(seen) > MAX_SEEN:
            kept = sorted(seen.items(), key=lambda kv: kv[1])[-MAX_SEEN:]
            seen = dict(kept)
            floor = max(floor, kept[0][1])
        link = next_link or delta_link or self.link
        return DeltaCursor(link=link, initial=initial and bool(next_link), floor=floor, seen=seen)


__all__ = ["DEFAULT_WINDOW_SECONDS", "MAX_SEEN", "DeltaCursor", "item_hash", "parse_time"]
