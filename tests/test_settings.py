"""Settings come from the environment once; a value Darkroom cannot use stops start-up with its name."""

from __future__ import annotations

import pytest

from jobs.settings import Settings, SettingsError


def test_images_are_kept_30_days_unless_configured() -> None:
    assert Settings.from_env({}).image_retention == 30 * 24 * 3600
    assert Settings.from_env({"DARKROOM_IMAGE_RETENTION": "86400"}).image_retention == 86400


def test_webhook_attempts_time_out_as_configured() -> None:
    assert Settings.from_env({}).webhook_timeout == 15
    assert Settings.from_env({"DARKROOM_WEBHOOK_TIMEOUT": "30"}).webhook_timeout == 30


def test_readiness_wants_free_storage_as_configured() -> None:
    assert Settings.from_env({}).min_free_bytes == 200_000_000
    assert Settings.from_env({"DARKROOM_MIN_FREE_BYTES": "0"}).min_free_bytes == 0
    assert Settings.from_env({"DARKROOM_MIN_FREE_BYTES": "1_000_000"}).min_free_bytes == 1_000_000


def test_a_full_storage_is_waited_out_as_long_as_configured() -> None:
    assert Settings.from_env({}).storage_full_give_up == 6 * 3600
    assert Settings.from_env({"DARKROOM_STORAGE_FULL_GIVE_UP": "600"}).storage_full_give_up == 600


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DARKROOM_WEBHOOK_TIMEOUT", "0"),
        ("DARKROOM_WEBHOOK_TIMEOUT", "soon"),
        ("DARKROOM_MAX_PIXELS", "-1"),
        ("DARKROOM_RETRY_JITTER", "1.5"),
        ("DARKROOM_IMAGE_RETENTION", "0"),
        ("DARKROOM_MIN_FREE_BYTES", "plenty"),
        ("DARKROOM_MIN_FREE_BYTES", "-1"),
        ("DARKROOM_STORAGE_FULL_GIVE_UP", "0"),
    ],
)
def test_an_unusable_value_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})
