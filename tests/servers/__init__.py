"""Real servers for tests: a private Dovecot and a Creatio stand-in."""

from tests.servers.creatio import CreatioStandIn, RecordedCall
from tests.servers.dovecot import Dovecot, DovecotError, MailUser, make_message

__all__ = [
    "CreatioStandIn",
    "Dovecot",
    "DovecotError",
    "MailUser",
    "RecordedCall",
    "make_message",
]
