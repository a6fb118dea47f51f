"""Settings: the seed's variable names, .env files, and errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dotenv import dotenv_values

from ai_platform.errors import ConfigurationError
from ai_platform.settings import SEED_OPERATION_MODEL_MAP, Settings
from support import ROOT

BASE = {"SECRET_KEY": "s" * 32, "VALID_API_KEYS": '["key-a"]'}
REAL_SECRETS = {
    "SECRET_KEY": "Zq3v9X1mK8pL2rT5wY7bN4cD6fG0hJ",
    "VALID_API_KEYS": '["client-Hk29dLq8Zp3xWm"]',
    "ADMIN_API_KEYS": '["admin-Vr84nQs1Tg6yBc"]',
}
SECRETS = ("SECRET_KEY", "VALID_API_KEYS", "ADMIN_API_KEYS")


def test_defaults_follow_the_seed() -> None:
    settings = Settings.from_mapping(BASE)
    assert settings.app_name == "AI Platform"
    assert settings.default_daily_limit == 1000
    assert settings.operation_model_map == SEED_OPERATION_MODEL_MAP
    assert settings.log_level == "INFO"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_lists_accept_json_or_commas() -> None:
    settings = Settings.from_mapping({**BASE, "ADMIN_API_KEYS": "x, y", "ENABLED_PLUGINS": '["summarize"]'})
    assert settings.admin_api_keys == ["x", "y"]
    assert settings.enabled_plugins == ["summarize"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"VALID_API_KEYS": None}, "VALID_API_KEYS"),
        ({"VALID_API_KEYS": "[]"}, "VALID_API_KEYS"),
        ({"VALID_API_KEYS": '["a"'}, "VALID_API_KEYS"),
        ({"SECRET_KEY": "short"}, "SECRET_KEY"),
        ({"DEFAULT_DAILY_LIMIT": "0"}, "DEFAULT_DAILY_LIMIT"),
        ({"DEFAULT_DAILY_LIMIT": "lots"}, "DEFAULT_DAILY_LIMIT"),
        ({"OPERATION_MODEL_MAP": "summarize=x"}, "OPERATION_MODEL_MAP"),
        ({"OPERATION_MODEL_MAP": '{"summarize": 3}'}, "OPERATION_MODEL_MAP"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"EXECUTION_PROVIDER": "tpu"}, "EXECUTION_PROVIDER"),
        ({"PORT": "70000"}, "PORT"),
        ({"STRICT_PLUGINS": "maybe"}, "STRICT_PLUGINS"),
    ],
)
def test_invalid_settings_name_the_variable(override: dict[str, str | None], named: str) -> None:
    values = {**BASE, **override}
    with pytest.raises(ConfigurationError, match=f"^{named}: "):
        Settings.from_mapping({k: v for k, v in values.items() if v is not None})


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text('SECRET_KEY=from-the-file-0123456789\nVALID_API_KEYS=["file-key"]\nDEFAULT_DAILY_LIMIT=5\n')
    settings = Settings.from_env({"DEFAULT_DAILY_LIMIT": "7"}, env_file=env_file)
    assert settings.valid_api_keys == ["file-key"]
    assert settings.default_daily_limit == 7


def test_repr_and_redacted_hide_secrets() -> None:
    settings = Settings.from_mapping({**BASE, "ADMIN_API_KEYS": '["admin-secret"]'})
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "key-a" not in text and "admin-secret" not in text and "s" * 32 not in text


def test_env_example_is_valid_and_complete() -> None:
    """Valid once its placeholder secrets are replaced (install.sh and `init-env` write real ones)."""
    example = ROOT / ".env.example"
    settings = Settings.from_env(REAL_SECRETS, env_file=example)
    assert settings.operation_model_map == SEED_OPERATION_MODEL_MAP
    text = example.read_text()
    for field in Settings.__struct_fields__:
        assert field.upper() in text, f"{field.upper()} is not documented in .env.example"


def test_redacted_hides_the_database_password() -> None:
    settings = Settings.from_mapping({**BASE, "DATABASE_URL": "postgres://app:hunter2@db:5432/ai"})
    assert "hunter2" not in repr(settings)
    assert settings.redacted()["DATABASE_URL"] == "postgres://app:***@db:5432/ai"


def _example_values() -> dict[str, str]:
    return {k: v for k, v in dotenv_values(ROOT / ".env.example").items() if v is not None}


@pytest.mark.parametrize("name", SECRETS)
def test_placeholders_of_env_example_are_refused(name: str) -> None:
    """issue 11 #14: the example's keys worked (`admin-key-change-me` changed limits)."""
    example = _example_values()[name]
    with pytest.raises(ConfigurationError, match=f"^{name}: .*placeholder") as error:
        Settings.from_mapping({**BASE, name: example})
    assert example.strip('[]"') not in str(error.value)  # the message never repeats a secret


def test_env_example_as_it_is_stops_startup_naming_every_placeholder() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env({}, env_file=ROOT / ".env.example")
    message = str(error.value)
    assert "\n" not in message
    for name in SECRETS:
        assert f"{name}: " in message, message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SECRET_KEY", "your-64-char-random-string-here"),  # the seed guide's .env
        ("VALID_API_KEYS", '["key-for-service-a","key-for-service-b"]'),  # the seed guide's .env
        ("VALID_API_KEYS", '["local-dev-key-001"]'),  # the seed guide's curl examples
        ("VALID_API_KEYS", '["real-key-0123456789", "CHANGE_ME"]'),
        ("ADMIN_API_KEYS", "changeme-admin-0123456789"),
        ("SECRET_KEY", "please-change-me-0123456789"),
    ],
)
def test_other_known_placeholders_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name}: .*placeholder"):
        Settings.from_mapping({**BASE, name: value})


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("SECRET_KEY", " " * 16, "blank"),
        ("SECRET_KEY", "\t" * 20, "blank"),
        ("SECRET_KEY", "  " + "s" * 32, "whitespace"),
        ("SECRET_KEY", "s" * 32 + " ", "whitespace"),
        ("SECRET_KEY", '"' + "s" * 32 + '"', "quote"),
        ("VALID_API_KEYS", '"k1"', "quote"),  # VALID_API_KEYS='"k1"': a key with the quotes in it
        ("VALID_API_KEYS", "'k1-0123456789'", "quote"),
        ("VALID_API_KEYS", '["\\"k1\\""]', "quote"),
        ("VALID_API_KEYS", '[" k1-0123456789"]', "whitespace"),
        ("VALID_API_KEYS", '["k1-0123456789\\t"]', "whitespace"),
        ("VALID_API_KEYS", '["   "]', "blank"),
        ("ADMIN_API_KEYS", '["admin-0123456789 "]', "whitespace"),
        ("ADMIN_API_KEYS", '["\\"admin-0123456789\\""]', "quote"),
        ("ADMIN_API_KEYS", '["adm\\u0000in-0123456789"]', "control"),
    ],
)
def test_blank_quoted_or_padded_secrets_are_refused(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name}: .*{why}") as error:
        Settings.from_mapping({**BASE, name: value})
    assert "k1" not in str(error.value) and "admin-0123456789" not in str(error.value)


def test_ordinary_secrets_and_keys_are_accepted() -> None:
    settings = Settings.from_mapping(
        {**REAL_SECRETS, "VALID_API_KEYS": "client-Hk29dLq8Zp3xWm, other-Jd73kQp0Lx", "SECRET_KEY": "a b" * 8}
    )
    assert settings.valid_api_keys == ["client-Hk29dLq8Zp3xWm", "other-Jd73kQp0Lx"]


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:hunter2@db:3306/ai",
        "notaurl",
        "data/ai_platform.sqlite3",
        "http://db/ai",
        "sqlite://",
        "sqlite:",
        "postgres://user:hunter2@db:notaport/ai",
        "postgres://user:hunter2@db:5432/",
    ],
)
def test_invalid_database_url_names_the_variable(url: str) -> None:
    """issue 11 #15: these ended in a 65-95-line traceback at startup."""
    with pytest.raises(ConfigurationError, match=r"^DATABASE_URL: ") as error:
        Settings.from_mapping({**BASE, "DATABASE_URL": url})
    assert "hunter2" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://data/ai_platform.sqlite3",
        "sqlite:///var/lib/ai/usage.sqlite3?synchronous=FULL",
        "sqlite://:memory:",
        "postgres://app:secret@db-host:5432/ai_platform",
        "postgresql://app:secret@db-host/ai_platform",
    ],
)
def test_supported_database_urls_are_accepted(url: str) -> None:
    assert Settings.from_mapping({**BASE, "DATABASE_URL": url}).database_url == url


def test_remote_engine_values_are_checked_as_settings_are_read(tmp_path: Path) -> None:
    """OPERATION_MODEL_MAP and DEFAULT_MODEL may name a remote engine; a malformed one names its setting."""
    from ai_platform.testing import platform_env

    env = platform_env(tmp_path)
    good = "openai+https://gpu-01:8443/v1?key_env=GPU01_API_KEY&timeout=120#Qwen2.5-7B-Instruct"
    settings = Settings.from_mapping({**env, "OPERATION_MODEL_MAP": json.dumps({"translate": good})})
    assert settings.operation_model_map["translate"] == good
    with pytest.raises(ConfigurationError, match=r"^DEFAULT_MODEL: no model id"):
        Settings.from_mapping({**env, "DEFAULT_MODEL": "openai+http://gpu-01:8000/v1"})
