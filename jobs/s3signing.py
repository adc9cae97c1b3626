"""Presigned S3 URLs for the data path (GetObject, PutObject, UploadPart), signed here rather than by
botocore: its presigner runs the client's whole request pipeline (endpoint rules, serialisers, event
hooks) and cost about 300 us of CPU a URL, three URLs an image; this costs about 20 us. The URLs are
byte for byte botocore's (tests/test_s3_signing.py compares them): the same SigV4 query signature,
parameters in the same order.

What depends on the service and the bucket (scheme, host, addressing style, the path up to the key,
the signing region) is read once from a URL botocore presigned for the bucket (`like`), so its endpoint
resolution stays the one authority. Credentials come from the botocore session on every URL, so
refreshed ones (instance roles, SSO) are used as botocore's would be.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit


class FrozenCredentials(Protocol):
    access_key: str
    secret_key: str
    token: str | None


def _quote(value: str) -> str:
    """A query key or value as SigV4 encodes it: everything but unreserved characters."""
    return quote(value, safe="-_.~")


@dataclass
class QuerySigner:
    """Presigns `method` requests for object keys of one bucket, valid `expires_in` seconds."""

    base_url: str  # up to the key: "https://bucket.s3.amazonaws.com/" or "http://host:port/bucket/"
    host: str  # the Host header as signed (no default port)
    path_prefix: str  # base_url's path
    scope_suffix: str  # "<region>/s3/aws4_request"
    expires_in: int
    _signing_keys: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def like(cls, presigned_url: str, object_key: str, expires_in: int) -> QuerySigner:
        """A signer for the bucket and service of `presigned_url`, botocore's GetObject URL of
        `object_key` (a key of plain characters, so its path ends with the key as given)."""
        parts = urlsplit(presigned_url)
        if not parts.path.endswith("/" + object_key):
            raise ValueError(f"{presigned_url} does not end with the key {object_key}")
        path_prefix = parts.path[: -len(object_key)]
        credential = parse_qs(parts.query)["X-Amz-Credential"][0]
        # access-key/date/region/service/aws4_request
        _, _, region, service, terminator = credential.rsplit("/", 4)
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        host = parts.hostname or ""
        if parts.port is not None and parts.port != default_port:
            host = f"{host}:{parts.port}"
        return cls(
            base_url=f"{parts.scheme}://{parts.netloc}{path_prefix}",
            host=host,
            path_prefix=path_prefix,
            scope_suffix=f"{region}/{service}/{terminator}",
            expires_in=expires_in,
        )

    def presign(
        self,
        method: str,
        object_key: str,
        query: Mapping[str, Any],
        credentials: FrozenCredentials,
        now: datetime | None = None,
    ) -> str:
        """The URL for `method` on `object_key` with the operation's `query` (in the order botocore's
        serialiser puts them: its S3 model's member order)."""
        timestamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        date = timestamp[:8]
        scope = f"{date}/{self.scope_suffix}"
        path = quote(object_key, safe="/~")
        auth = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{credentials.access_key}/{scope}",
            "X-Amz-Date": timestamp,
            "X-Amz-Expires": str(self.expires_in),
            "X-Amz-SignedHeaders": "host",
        }
        if credentials.token is not None:
            auth["X-Amz-Security-Token"] = credentials.token
        pairs = [(_quote(name), _quote(str(value))) for name, value in query.items()]
        pairs += [(_quote(name), _quote(value)) for name, value in auth.items()]
        canonical_request = "\n".join(
            (
                method,
                self.path_prefix + path,
                "&".join(f"{name}={value}" for name, value in sorted(pairs)),
                f"host:{self.host}\n",
                "host",
                "UNSIGNED-PAYLOAD",
            )
        )
        string_to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256",
                timestamp,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            )
        )
        key = self._signing_key(credentials.secret_key, date)
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        query_string = "&".join(f"{name}={value}" for name, value in pairs)
        return f"{self.base_url}{path}?{query_string}&X-Amz-Signature={signature}"

    def _signing_key(self, secret_key: str, date: str) -> bytes:
        """SigV4's key for a day: four HMACs, made once a day per secret."""
        cached = self._signing_keys.get((secret_key, date))
        if cached is None:
            self._signing_keys.clear()  # yesterday's, or a rotated secret's
            cached = f"AWS4{secret_key}".encode()
            for part in (date, *self.scope_suffix.split("/")):
                cached = hmac.new(cached, part.encode(), hashlib.sha256).digest()
            self._signing_keys[(secret_key, date)] = cached
        return cached
