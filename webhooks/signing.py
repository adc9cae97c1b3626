"""Standard Webhooks signatures, as the service signs them: the client package's verifier module.

One copy serves both sides. A receiver verifies with `darkroom_client.webhooks` (`pip install ./client`,
standard library only) and the service signs with the same functions, so the two cannot drift apart.
"""

from darkroom_client.webhooks import (
    DEFAULT_TOLERANCE_SECONDS,
    SECRET_PREFIX,
    SignatureMismatch,
    WebhookVerificationError,
    check_secret,
    generate_secret,
    sign,
    sign_headers,
    signature_header,
    verify,
    verify_any,
)

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "SECRET_PREFIX",
    "SignatureMismatch",
    "WebhookVerificationError",
    "check_secret",
    "generate_secret",
    "sign",
    "sign_headers",
    "signature_header",
    "verify",
    "verify_any",
]
