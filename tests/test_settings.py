"""Settings: the seed's variable names, .env files, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_platform.errors import ConfigurationError
from ai_platform.settings import SEED_OPERATION_MODEL_MAP, Settings
from support import ROOT

BASE = {"SECRET_KEY": "s" * 32, "VALID_API_KEYS": '["key-a"]'}


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
    example = ROOT / ".env.example"
    settings = Settings.from_env({}, env_file=example)
    assert settings.operation_model_map == SEED_OPERATION_MODEL_MAP
    text = example.read_text()
    for field in Settings.__struct_fields__:
        assert field.upper() in text, f"{field.upper()} is not documented in .env.example"


def test_redacted_hides_the_database_password() -> None:
    settings = Settings.from_mapping({**BASE, "DATABASE_URL": "postgres://app:hunter2@db:5432/ai"})
    assert "hunter2" not in repr(settings)
    assert settings.redacted()["DATABASE_URL"] == "postgres://app:***@db:5432/ai"
