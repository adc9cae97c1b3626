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


def test_logs_are_json_at_info_unless_configured() -> None:
    assert (Settings.from_env({}).log_format, Settings.from_env({}).log_level) == ("json", "INFO")
    configured = Settings.from_env({"DARKROOM_LOG_FORMAT": "Text", "DARKROOM_LOG_LEVEL": "warning"})
    assert (configured.log_format, configured.log_level) == ("text", "WARNING")


def test_workers_share_themselves_between_accounts_unless_told_first_come_first_served() -> None:
    assert Settings.from_env({}).fair_scheduling
    assert not Settings.from_env({"DARKROOM_FAIR_SCHEDULING": "off"}).fair_scheduling
    assert Settings.from_env({"DARKROOM_FAIR_SCHEDULING": "1"}).fair_scheduling


def test_workers_run_an_express_lane_and_a_lower_priority_bulk_lane_unless_told_otherwise() -> None:
    assert Settings.from_env({}).express_lane
    assert not Settings.from_env({"DARKROOM_EXPRESS_LANE": "off"}).express_lane
    assert Settings.from_env({}).bulk_nice == Settings().bulk_nice
    assert Settings.from_env({"DARKROOM_BULK_NICE": "5"}).bulk_nice == 5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DARKROOM_LOG_FORMAT", "xml"),
        ("DARKROOM_LOG_LEVEL", "loud"),
        ("DARKROOM_WEBHOOK_TIMEOUT", "0"),
        ("DARKROOM_WEBHOOK_TIMEOUT", "soon"),
        ("DARKROOM_MAX_PIXELS", "-1"),
        ("DARKROOM_RETRY_JITTER", "1.5"),
        ("DARKROOM_IMAGE_RETENTION", "0"),
        ("DARKROOM_MIN_FREE_BYTES", "plenty"),
        ("DARKROOM_MIN_FREE_BYTES", "-1"),
        ("DARKROOM_FAIR_SCHEDULING", "sometimes"),
        ("DARKROOM_EXPRESS_LANE", "sometimes"),
        ("DARKROOM_BULK_NICE", "0"),
        ("DARKROOM_BULK_NICE", "20"),
        ("DARKROOM_STORAGE_FULL_GIVE_UP", "0"),
        ("REDIS_URL", "127.0.0.1:6379"),
        ("REDIS_URL", "http://127.0.0.1:6379/0"),
    ],
)
def test_an_unusable_value_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_an_s3_storage_url_names_bucket_prefix_endpoint_and_region() -> None:
    settings = Settings.from_env(
        {
            "DARKROOM_STORAGE_URL": "s3://photos/darkroom/prod?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
        }
    )
    assert settings.uses_s3
    assert settings.s3_location == ("photos", "darkroom/prod/")
    assert (settings.s3_endpoint_url, settings.s3_region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert settings.s3_part_size == 8 * 1024 * 1024 and not settings.s3_presigned_downloads
    overridden = Settings.from_env(
        {
            "DARKROOM_STORAGE_URL": "s3://photos?region=eu-west-1",
            "DARKROOM_S3_REGION": "us-east-2",
            "DARKROOM_S3_ENDPOINT_URL": "https://r2.example",
            "DARKROOM_S3_PRESIGNED_DOWNLOADS": "1",
        }
    )
    assert overridden.s3_location == ("photos", "")
    assert (overridden.s3_endpoint_url, overridden.s3_region) == ("https://r2.example", "us-east-2")
    assert overridden.s3_presigned_downloads


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DARKROOM_STORAGE_URL": "gs://photos"}, "DARKROOM_STORAGE_URL"),
        ({"DARKROOM_STORAGE_URL": "s3:///prefix"}, "DARKROOM_STORAGE_URL"),
        ({"DARKROOM_S3_PART_SIZE": "1048576"}, "DARKROOM_S3_PART_SIZE"),
    ],
)
def test_a_storage_setting_darkroom_cannot_use_stops_start_up(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_idempotency_keys_are_kept_a_day_and_held_six_minutes_unless_configured() -> None:
    defaults = Settings.from_env({})
    assert (defaults.idempotency_ttl, defaults.idempotency_lock_timeout) == (86400, 360)
    configured = Settings.from_env(
        {
            "DARKROOM_IDEMPOTENCY_TTL": "3600",
            "DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT": "90",
            "DARKROOM_BODY_TIMEOUT": "60",
        }
    )
    assert (configured.idempotency_ttl, configured.idempotency_lock_timeout) == (3600, 90)


@pytest.mark.parametrize(
    "env",
    [
        {"DARKROOM_IDEMPOTENCY_TTL": "0"},
        {"DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT": "0"},
        # A request still receiving its body would lose its key to a retry.
        {"DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT": "300"},
        {"DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT": "60", "DARKROOM_BODY_TIMEOUT": "120"},
    ],
)
def test_an_idempotency_setting_darkroom_cannot_use_stops_start_up(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="DARKROOM_IDEMPOTENCY"):
        Settings.from_env(env)


def test_a_dashboard_sign_in_lasts_eight_hours_unless_configured() -> None:
    assert Settings.from_env({}).dashboard_session_ttl == 8 * 3600
    assert Settings.from_env({"DARKROOM_DASHBOARD_SESSION_TTL": "900"}).dashboard_session_ttl == 900
    with pytest.raises(SettingsError, match="DARKROOM_DASHBOARD_SESSION_TTL"):
        Settings.from_env({"DARKROOM_DASHBOARD_SESSION_TTL": "0"})


def test_an_address_may_fail_to_authenticate_ten_times_in_ten_minutes_unless_configured() -> None:
    default = Settings.from_env({})
    assert (default.failed_auth_limit, default.failed_auth_window) == (10, 600)
    configured = Settings.from_env({"DARKROOM_FAILED_AUTH_LIMIT": "3", "DARKROOM_FAILED_AUTH_WINDOW": "60"})
    assert (configured.failed_auth_limit, configured.failed_auth_window) == (3, 60)
    for name in ("DARKROOM_FAILED_AUTH_LIMIT", "DARKROOM_FAILED_AUTH_WINDOW"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "0"})


def test_a_long_poll_waits_25_seconds_at_most_unless_configured() -> None:
    assert Settings.from_env({}).long_poll_max_wait == 25
    assert Settings.from_env({"DARKROOM_LONG_POLL_MAX_WAIT": "10"}).long_poll_max_wait == 10
    assert Settings.from_env({"DARKROOM_LONG_POLL_MAX_WAIT": "0"}).long_poll_max_wait == 0
    for refused in ("301", "-1", "2.5", "soon", "9" * 5000):
        with pytest.raises(SettingsError, match="DARKROOM_LONG_POLL_MAX_WAIT"):
            Settings.from_env({"DARKROOM_LONG_POLL_MAX_WAIT": refused})
