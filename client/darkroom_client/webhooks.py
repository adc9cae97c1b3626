"""Standard Webhooks signatures: sign on our side, verify on the receiver's.

Standard library only, so a receiver can copy this module or install `darkroom-client` without Darkroom;
the service signs with it too (`webhooks/signing.py` re-exports it).
Spec: https://www.standardwebhooks.com — `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")),
where key is the base64 part of the `whsec_…` secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """The delivery is not authentic, or too old or too new to accept."""


class SignatureMismatch(WebhookVerificationError):
    """Well formed and in time, but signed with none of the secrets tried."""


def generate_secret(num_bytes: int = 32) -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(num_bytes)).decode()


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if not key:
        # An empty HMAC key is a signature anyone can forge.
        raise ValueError("a webhook secret must not be empty")
    return key


def check_secret(secret: str) -> None:
    """ValueError unless `secret` is one this module can sign and verify with."""
    _key(secret)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `body` as sent."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_in_force: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Every valid secret signs, space separated, so receivers keep verifying during a rotation."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_in_force)


def sign_headers(
    secrets_in_force: Iterable[str], msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    sent_at = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(sent_at),
        "webhook-signature": signature_header(secrets_in_force, msg_id, sent_at, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` was signed with `secret` within `tolerance` seconds.

    `headers` may use any case. Any one matching `v1` signature among those sent is enough.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id")
    raw_timestamp = lowered.get("webhook-timestamp")
    sent = lowered.get("webhook-signature")
    if not msg_id or not raw_timestamp or not sent:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    # Digits only: int() would also take "+1_614_265_330", which is not the text the sender signed.
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()):
        raise WebhookVerificationError("webhook-timestamp is not unix seconds")
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance window")
    expected = sign(secret, msg_id, timestamp, body).encode()
    for candidate in sent.split():
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a raised TypeError,
        # not a rejection), and header values can carry any Latin-1 character.
        if candidate.startswith("v1,") and hmac.compare_digest(
            candidate.encode("utf-8", "replace"), expected
        ):
            return
    raise SignatureMismatch("no matching signature")


def verify_any(
    candidates: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
) -> int | None:
    """The index of the first of `candidates` that verifies the delivery, None when it was signed with none of
    them (during a rotation, or for a receiver that hears several senders). A malformed or stale delivery
    raises WebhookVerificationError, whichever the secret."""
    for index, secret in enumerate(candidates):
        try:
            verify(secret, headers, body, tolerance=tolerance)
        except SignatureMismatch:
            continue
        return index
    return None
