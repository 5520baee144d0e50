"""Pure unit tests of the store's JSON codec and credential encryption (no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emlisten.errors import ConfigError, StoreError
from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    NodeInfo,
    Security,
    ServerEndpoint,
    WebhookEvent,
    WebhookTarget,
)
from emlisten.store._codec import (
    CodecError,
    decode_checkpoint,
    decode_mailbox,
    decode_node,
    decode_status,
    decode_webhook_event,
    encode_checkpoint,
    encode_mailbox,
    encode_node,
    encode_status,
    encode_webhook_event,
)
from emlisten.store._crypto import WRONG_KEY_MESSAGE, CredentialCipher, derive_key

text = st.text(max_size=30)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
json_mappings = st.dictionaries(st.text(max_size=12), json_values, max_size=4)

endpoints = st.builds(
    ServerEndpoint,
    host=text,
    port=st.integers(0, 65535),
    security=st.sampled_from(Security),
    verify_certificate=st.booleans(),
)

mailboxes = st.builds(
    MailboxConfig,
    id=text,
    user_name=text,
    imap=endpoints,
    bpm_endpoint=text,
    password=text,
    access_token=text,
    use_oauth=st.booleans(),
    sender_email=text,
    folders=st.lists(text, max_size=4).map(tuple),
    use_full_email=st.booleans(),
    bpm_user=text,
    bpm_user_workspace=text,
    bpm_user_time_zone=text,
    smtp=st.none() | endpoints,
    feature_values=json_mappings,
    context=json_mappings,
    extra=json_mappings,
    revision=st.integers(0, 2**31),
    webhook=st.none() | st.builds(WebhookTarget, url=text, secrets=st.lists(text, max_size=3).map(tuple)),
)

statuses = st.builds(
    MailboxStatus,
    state=st.sampled_from(MailboxState),
    last_error=st.none() | text,
    updated_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    delivered=st.integers(0, 2**53),
    node=st.none() | text,
)

checkpoints = st.builds(Checkpoint, uidvalidity=st.integers(0, 2**32 - 1), last_uid=st.integers(0, 2**32 - 1))


nodes = st.builds(
    NodeInfo,
    id=text,
    role=st.sampled_from(["primary", "secondary", "all"]),
    mailboxes=st.integers(0, 10**6),
    seen_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    started_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    version=text,
)


webhook_events = st.builds(
    WebhookEvent,
    id=text,
    endpoint=text,
    url=text,
    mailbox_id=text,
    type=text,
    payload=text,
    created_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    attempts=st.integers(0, 1000),
    next_attempt_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    last_error=text,
    dead_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    secrets=st.lists(text, max_size=3).map(tuple),
)


@settings(deadline=None)
@given(webhook_events)
def test_webhook_event_round_trip(event: WebhookEvent) -> None:
    assert decode_webhook_event(encode_webhook_event(event)) == event


def test_mailbox_without_webhook_reads_as_creatio() -> None:
    # Documents written before /v1 existed have no "webhook" key.
    minimal = {
        "id": "m",
        "user_name": "u",
        "bpm_endpoint": "https://x",
        "imap": {"host": "h", "port": 143, "security": "starttls"},
    }
    assert decode_mailbox(json.dumps(minimal)).webhook is None


@given(nodes)
def test_node_round_trip(node: NodeInfo) -> None:
    assert decode_node(encode_node(node)) == node


@settings(deadline=None)  # a shared CI machine can stall any single example past 200 ms
@given(mailboxes)
def test_mailbox_round_trip(mailbox: MailboxConfig) -> None:
    decoded = decode_mailbox(encode_mailbox(mailbox))
    assert decoded == mailbox
    assert isinstance(decoded.folders, tuple)


@given(statuses)
def test_status_round_trip(status: MailboxStatus) -> None:
    assert decode_status(encode_status(status)) == status


@given(checkpoints)
def test_checkpoint_round_trip(checkpoint: Checkpoint) -> None:
    assert decode_checkpoint(encode_checkpoint(checkpoint)) == checkpoint


def test_lone_surrogates_from_api_json_survive() -> None:
    odd = json.loads('"bad \\ud800 text"')
    mailbox = MailboxConfig(
        id="m",
        user_name=odd,
        imap=ServerEndpoint("h", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://x",
        extra={"k": odd},
    )
    assert decode_mailbox(encode_mailbox(mailbox)) == mailbox


def test_mailbox_document_shape() -> None:
    mailbox = MailboxConfig(
        id="m1",
        user_name="u",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://x",
        folders=("INBOX", "Sent"),
    )
    document = json.loads(encode_mailbox(mailbox))
    assert document["v"] == 1
    assert document["imap"] == {
        "host": "imap.example.com",
        "port": 993,
        "security": "ssl_on_connect",
        "verify_certificate": True,
    }
    assert document["folders"] == ["INBOX", "Sent"]
    assert document["smtp"] is None


def test_missing_optional_fields_take_defaults() -> None:
    minimal: dict[str, Any] = {
        "id": "m",
        "user_name": "u",
        "bpm_endpoint": "https://x",
        "imap": {"host": "h", "port": 143, "security": "starttls"},
    }
    mailbox = decode_mailbox(json.dumps(minimal))
    assert mailbox.folders == ("INBOX",)
    assert mailbox.imap.verify_certificate is True
    assert mailbox.revision == 0


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"v": 99, "id": "m"}', b'{"id": "m"}', b'{"v": 1, "imap": 3}'],
)
def test_bad_documents_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_mailbox(data)


def test_codec_error_does_not_echo_secrets() -> None:
    document = {"id": "m", "user_name": "u", "password": "hunter2-secret", "imap": {"port": "x"}}
    with pytest.raises(CodecError) as caught:
        decode_mailbox(json.dumps(document))
    assert "hunter2-secret" not in str(caught.value)


def test_unknown_state_is_rejected() -> None:
    with pytest.raises(CodecError):
        decode_status(b'{"v": 1, "state": "dancing"}')


def test_cipher_round_trip_and_fresh_nonces() -> None:
    cipher = CredentialCipher("key one")
    first = cipher.encrypt(b"secret payload", associated_data=b"m1")
    second = cipher.encrypt(b"secret payload", associated_data=b"m1")
    assert first != second
    assert b"secret payload" not in first
    assert cipher.decrypt(first, associated_data=b"m1") == b"secret payload"


def test_wrong_key_is_a_clear_store_error() -> None:
    blob = CredentialCipher("right key").encrypt(b"payload", associated_data=b"m1")
    with pytest.raises(StoreError, match="wrong EMLISTEN_SECRET_KEY"):
        CredentialCipher("wrong key").decrypt(blob, associated_data=b"m1")
    assert "wrong EMLISTEN_SECRET_KEY" in WRONG_KEY_MESSAGE


def test_blob_is_bound_to_its_mailbox_id() -> None:
    cipher = CredentialCipher("k")
    blob = cipher.encrypt(b"payload", associated_data=b"m1")
    with pytest.raises(StoreError):
        cipher.decrypt(blob, associated_data=b"m2")


@pytest.mark.parametrize("blob", [b"", b"\x01short", b"\x02" + bytes(40)])
def test_malformed_blob_is_a_store_error(blob: bytes) -> None:
    with pytest.raises(StoreError):
        CredentialCipher("k").decrypt(blob, associated_data=b"m1")


def test_tampered_blob_is_rejected() -> None:
    cipher = CredentialCipher("k")
    blob = bytearray(cipher.encrypt(b"payload", associated_data=b"m1"))
    blob[-1] ^= 1
    with pytest.raises(StoreError):
        cipher.decrypt(bytes(blob), associated_data=b"m1")


def test_key_derivation() -> None:
    assert len(derive_key("x")) == 32
    assert derive_key("x") == derive_key("x")
    assert derive_key("x") != derive_key("y")
    with pytest.raises(ConfigError):
        derive_key("")


def test_cipher_repr_hides_key() -> None:
    assert "hidden" in repr(CredentialCipher("very-secret-key"))
    assert "very-secret-key" not in repr(CredentialCipher("very-secret-key"))
