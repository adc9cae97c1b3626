"""Standard Webhooks signatures: the spec's vector, interop with the reference package, and rejections."""

from __future__ import annotations

import ast
import base64
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import darkroom_client.webhooks
import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from webhooks import signing
from webhooks.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    WebhookVerificationError,
    generate_secret,
    sign,
    sign_headers,
    signature_header,
    verify,
)

# https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

WEBHOOKS_PACKAGE = Path(signing.__file__).resolve().parent
BODY = b'{"type":"image.completed","timestamp":"2026-01-01T00:00:00Z","data":{"id":"img_1"}}'


def spec_headers(**changes: str) -> dict[str, str]:
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    headers.update(changes)
    return headers


def test_spec_vector_signs() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_spec_vector_headers() -> None:
    assert sign_headers([SPEC_SECRET], SPEC_ID, SPEC_BODY, timestamp=SPEC_TIMESTAMP) == spec_headers()


def test_spec_vector_verifies_at_its_time() -> None:
    verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP)


def test_sign_headers_stamps_the_current_time() -> None:
    before = int(time.time())
    headers = sign_headers([SPEC_SECRET], "msg_now", BODY)
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    verify(SPEC_SECRET, headers, BODY)


def test_reference_package_verifies_our_signature() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_ours", BODY)
    assert Webhook(secret).verify(BODY, headers) == {
        "type": "image.completed",
        "timestamp": "2026-01-01T00:00:00Z",
        "data": {"id": "img_1"},
    }


def test_reference_package_verifies_our_rotation_header() -> None:
    """During a rotation we send one signature per secret; a receiver holding either one verifies."""
    old, new = generate_secret(), generate_secret()
    headers = sign_headers([old, new], "msg_rotating", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers)
    with pytest.raises(ReferenceVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_we_verify_the_reference_package_signature() -> None:
    secret = generate_secret()
    now = int(time.time())
    signature = Webhook(secret).sign("msg_theirs", datetime.fromtimestamp(now, tz=UTC), BODY.decode())
    headers = {"webhook-id": "msg_theirs", "webhook-timestamp": str(now), "webhook-signature": signature}
    verify(secret, headers, BODY)
    assert signature == sign(secret, "msg_theirs", now, BODY)


def test_generated_secrets_are_whsec_base64_of_32_bytes() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert generate_secret() != secret


def test_header_names_are_case_insensitive() -> None:
    headers = {name.upper(): value for name, value in spec_headers().items()}
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_one_matching_signature_among_several_is_enough() -> None:
    other = sign(generate_secret(), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    unknown_version = "v1a,bm90IGEgc2lnbmF0dXJl"
    for sent in (
        f"{other} {SPEC_SIGNATURE}",
        f"{SPEC_SIGNATURE} {other}",
        f"{unknown_version} {other} {SPEC_SIGNATURE}",
    ):
        verify(SPEC_SECRET, spec_headers(**{"webhook-signature": sent}), SPEC_BODY, now=SPEC_TIMESTAMP)


def test_signature_header_signs_with_every_secret_in_order() -> None:
    first, second = generate_secret(), generate_secret()
    header = signature_header([first, second], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert header.split(" ") == [
        sign(first, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY),
        sign(second, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY),
    ]


def test_tampered_body_is_rejected() -> None:
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SPEC_SECRET, spec_headers(), b'{"test": 2432232315}', now=SPEC_TIMESTAMP)
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY + b" ", now=SPEC_TIMESTAMP)


def test_tampered_id_or_timestamp_is_rejected() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(**{"webhook-id": "msg_other"}), SPEC_BODY, now=SPEC_TIMESTAMP)
    moved = str(SPEC_TIMESTAMP + 1)
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(**{"webhook-timestamp": moved}), SPEC_BODY, now=SPEC_TIMESTAMP)


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(generate_secret(), spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP)


@pytest.mark.parametrize(
    "offset", [DEFAULT_TOLERANCE_SECONDS + 1, -(DEFAULT_TOLERANCE_SECONDS + 1), 86_400, -86_400]
)
def test_stale_or_future_timestamp_is_rejected(offset: int) -> None:
    """`offset` is how far the receiver's clock is from the signed timestamp."""
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + offset)


@pytest.mark.parametrize("offset", [DEFAULT_TOLERANCE_SECONDS, -DEFAULT_TOLERANCE_SECONDS])
def test_timestamp_at_the_edge_of_tolerance_passes(offset: int) -> None:
    verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + offset)


def test_tolerance_is_adjustable() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 10, tolerance=5)
    verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 10, tolerance=10)


def test_real_clock_rejects_the_2021_spec_vector() -> None:
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_rejected(missing: str) -> None:
    headers = spec_headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)


@pytest.mark.parametrize("empty", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_empty_header_is_rejected(empty: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(**{empty: ""}), SPEC_BODY, now=SPEC_TIMESTAMP)


@pytest.mark.parametrize(
    "timestamp",
    ["yesterday", "1614265330.0", "1_614_265_330", "+1614265330", " 1614265330", "١٦١٤٢٦٥٣٣٠"],
)
def test_timestamp_that_is_not_plain_unix_seconds_is_rejected(timestamp: str) -> None:
    """The signed text carries the timestamp as sent, so only its canonical digits can match."""
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(**{"webhook-timestamp": timestamp}), SPEC_BODY, now=SPEC_TIMESTAMP)


@pytest.mark.parametrize(
    "sent",
    [
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # right digest, no version
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,",
        "v1,not base64 at all",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OÉ=",  # a Latin-1 character, as HTTP headers allow
        "v1,\u2603",
    ],
)
def test_malformed_signature_is_rejected_not_crashed(sent: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SPEC_SECRET, spec_headers(**{"webhook-signature": sent}), SPEC_BODY, now=SPEC_TIMESTAMP)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not*base64"])
def test_unusable_secret_is_a_configuration_error(secret: str) -> None:
    """An empty key would make signatures anyone can forge; a mangled one must not sign at all."""
    with pytest.raises(ValueError, match="webhook secret"):
        sign(secret, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (absolute names; relative ones keep dots)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


def test_signing_module_uses_only_the_standard_library() -> None:
    """Receivers may copy the verifier into their own code base, or install the client, and nothing else."""
    verifier = Path(darkroom_client.webhooks.__file__)
    imported = _imported_modules(verifier)
    assert imported, "the AST scan found no imports at all"
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert not outside, f"{verifier.name} imports outside the standard library: {sorted(outside)}"


def test_the_service_signs_with_the_clients_verifier_module() -> None:
    """One copy: what the service signs with is what receivers verify with."""
    assert _imported_modules(WEBHOOKS_PACKAGE / "signing.py") == {"darkroom_client.webhooks"}
    assert signing.verify is darkroom_client.webhooks.verify
    assert signing.SignatureMismatch is darkroom_client.webhooks.SignatureMismatch


def test_webhooks_package_imports_neither_jobs_nor_server() -> None:
    files = sorted(WEBHOOKS_PACKAGE.rglob("*.py"))
    assert WEBHOOKS_PACKAGE / "signing.py" in files
    offenders = {
        f"{path.relative_to(WEBHOOKS_PACKAGE.parent)}: {name}"
        for path in files
        for name in _imported_modules(path)
        if name.split(".")[0] in ("jobs", "server") or name.startswith("..")
    }
    assert not offenders, f"webhooks/ must stand alone: {sorted(offenders)}"
