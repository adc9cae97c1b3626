"""Python client for the Darkroom image-processing API.

    from darkroom_client import Darkroom

    with Darkroom("sk_live_…", "https://darkroom.example") as darkroom:
        image = darkroom.images.upload("photo.jpg", operations=[{"type": "resize", "params": {"width": 800}}])
        image = darkroom.images.wait(image.id)
        darkroom.images.download_to(image.id, "photo-800.webp")

`AsyncDarkroom` is the same for asyncio; `darkroom_client.webhooks` verifies the webhooks it sends, and
`WebhookListener` receives them so `images.wait(id, listener=…)` returns on the image's webhook.
"""

from darkroom_client.client import AsyncDarkroom, Darkroom
from darkroom_client.core import RetryPolicy
from darkroom_client.errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    Conflict,
    DarkroomError,
    Gone,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    TransportError,
    UnsupportedMedia,
    ValidationFailed,
    WaitTimeout,
)
from darkroom_client.listener import WebhookListener
from darkroom_client.types import Archive, Batch, Delivery, Image, Page, WebhookEndpoint
from darkroom_client.version import __version__

__all__ = [
    "APIError",
    "Archive",
    "AsyncDarkroom",
    "AuthenticationError",
    "BadRequest",
    "Batch",
    "Conflict",
    "Darkroom",
    "DarkroomError",
    "Delivery",
    "Gone",
    "Image",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "TransportError",
    "UnsupportedMedia",
    "ValidationFailed",
    "WaitTimeout",
    "WebhookEndpoint",
    "WebhookListener",
    "__version__",
]
