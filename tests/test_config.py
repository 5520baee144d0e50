from __future__ import annotations

import pytest

from emlisten.config import Role, Settings, load_settings
from emlisten.errors import ConfigError


def test_defaults_are_single_process_mode() -> None:
    settings = load_settings({})
    assert settings.role is Role.ALL
    assert settings.redis_url is None and settings.amqp_url is None
    assert settings.port == 8080


def test_environment_then_flags() -> None:
    env = {"EMLISTEN_PORT": "9000", "EMLISTEN_ROLE": "primary", "EMLISTEN_HOST": "127.0.0.1"}
    assert load_settings(env).port == 9000
    assert load_settings(env).role is Role.PRIMARY
    assert load_settings(env, port=9100, role=None).port == 9100
    assert load_settings(env, role=Role.ALL).role is Role.ALL


def test_vendor_aliases() -> None:
    env = {
        "PodName": "emlisten-2",
        "ExchangeListenerRedisHost": "redis:6380",
        "ExchangeListenerRedisDatabase": "3",
    }
    settings = load_settings(env)
    assert settings.node_id == "emlisten-2"
    assert settings.redis_url == "redis://redis:6380/3"
    # Our own names win over the vendor's.
    assert load_settings({**env, "EMLISTEN_NODE_ID": "mine"}).node_id == "mine"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"EMLISTEN_PORT": "x"}, "EMLISTEN_PORT"),
        ({"EMLISTEN_PORT": "70000"}, "port"),
        ({"EMLISTEN_ROLE": "boss"}, "EMLISTEN_ROLE"),
        ({"EMLISTEN_LOG_FORMAT": "xml"}, "EMLISTEN_LOG_FORMAT"),
        ({"EMLISTEN_IDLE_RENEW_SECONDS": "1800"}, "29 minutes"),
        ({"EMLISTEN_WORKER_CONCURRENCY": "0"}, "EMLISTEN_WORKER_CONCURRENCY"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings(env)


def test_secrets_hidden_from_repr() -> None:
    settings = Settings(secret_key="k-123456", api_token="t-abcdef")
    assert "k-123456" not in repr(settings) and "t-abcdef" not in repr(settings)
