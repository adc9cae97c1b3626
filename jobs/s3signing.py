"""Presigned S3 URLs and POST forms, signed here rather than by botocore: its presigner runs the
client's whole request pipeline (endpoint rules, serialisers, event hooks) and cost about 300 us of CPU a
URL (three URLs an image on the data path, one form each direct upload); this costs about 20 us. The URLs
and forms are byte for byte botocore's (tests/test_s3_signing.py compares them): the same SigV4 query
signature, parameters in the same order; the same policy document, fields in the same order.

What depends on the service and the bucket (scheme, host, addressing style, the path up to the key,
the signing region) is read once from a URL botocore presigned for the bucket (`like`), so its endpoint
resolution stays the one authority. Credentials come from the botocore session on every URL, so
refreshed ones (instance roles, SSO) are used as botocore's would be.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"


class FrozenCredentials(Protocol):
    access_key: str
    secret_key: str
    token: str | None


def _quote(value: str) -> str:
    """A query key or value as SigV4 encodes it: everything but unreserved characters."""
    return quote(value, safe="-_.~")


# Formatted by hand: strftime costs twice as much, on every URL and form.
def _amz_date(moment: datetime) -> str:
    """`moment` (UTC) as SigV4 dates a signature: strftime's `%Y%m%dT%H%M%SZ`."""
    day = f"{moment.year:04}{moment.month:02}{moment.day:02}"
    return f"{day}T{moment.hour:02}{moment.minute:02}{moment.second:02}Z"


def _policy_time(moment: datetime) -> str:
    """`moment` (UTC) as a POST policy's expiration: strftime's `%Y-%m-%dT%H:%M:%SZ`."""
    day = f"{moment.year:04}-{moment.month:02}-{moment.day:02}"
    return f"{day}T{moment.hour:02}:{moment.minute:02}:{moment.second:02}Z"


@functools.lru_cache(maxsize=8)
def _post_times(second: int, expires_in: int) -> tuple[str, str]:
    """A form's signature date and its policy's expiration, for a form signed at `second` (Unix time)
    that expires `expires_in` seconds later: made once a second (4 us of a form's 15), as a process
    creating direct uploads one after another signs many forms within one, all expiring together."""
    moment = datetime.fromtimestamp(second, UTC)
    return _amz_date(moment), _policy_time(moment + timedelta(seconds=expires_in))


@dataclass
class Presigner:
    """Presigns requests and POST forms for object keys of one bucket."""

    base_url: str  # up to the key: "https://bucket.s3.amazonaws.com/" or "http://host:port/bucket/"
    host: str  # the Host header as signed (no default port)
    path_prefix: str  # base_url's path
    # Where forms are POSTed: "https://bucket.s3.amazonaws.com/" or "http://host:port/bucket"
    bucket_url: str
    scope_suffix: str  # "<region>/s3/aws4_request"
    _signing_keys: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def like(cls, presigned_url: str, object_key: str) -> Presigner:
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
            bucket_url=f"{parts.scheme}://{parts.netloc}{path_prefix.rstrip('/') or '/'}",
            scope_suffix=f"{region}/{service}/{terminator}",
        )

    def presign(
        self,
        method: str,
        object_key: str,
        query: Mapping[str, Any],
        credentials: FrozenCredentials,
        expires_in: int,
        now: datetime | None = None,
    ) -> str:
        """The URL for `method` on `object_key` with the operation's `query` (in the order botocore's
        serialiser puts them: its S3 model's member order), valid `expires_in` seconds."""
        timestamp = _amz_date(now or datetime.now(UTC))
        date = timestamp[:8]
        scope = f"{date}/{self.scope_suffix}"
        path = quote(object_key, safe="/~")
        auth = {
            "X-Amz-Algorithm": _ALGORITHM,
            "X-Amz-Credential": f"{credentials.access_key}/{scope}",
            "X-Amz-Date": timestamp,
            "X-Amz-Expires": str(expires_in),
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
                _ALGORITHM,
                timestamp,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            )
        )
        key = self._signing_key(credentials.secret_key, date)
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        query_string = "&".join(f"{name}={value}" for name, value in pairs)
        return f"{self.base_url}{path}?{query_string}&X-Amz-Signature={signature}"

    def presign_post(
        self,
        bucket: str,
        object_key: str,
        fields: Mapping[str, str],
        max_bytes: int,
        credentials: FrozenCredentials,
        expires_in: int,
        now: datetime | None = None,
    ) -> tuple[str, dict[str, str]]:
        """The URL and the fields of a form that POSTs a file of 1 to `max_bytes` bytes to `object_key`,
        with `fields` (each also an exact condition), under a policy that expires in `expires_in` seconds:
        botocore's with the conditions `["content-length-range", 1, max_bytes]`, then each field's."""
        moment = now or datetime.now(UTC)
        timestamp, expiration = _post_times(int(moment.timestamp()), expires_in)
        date = timestamp[:8]
        credential = f"{credentials.access_key}/{date}/{self.scope_suffix}"
        signed = {
            "x-amz-algorithm": _ALGORITHM,
            "x-amz-credential": credential,
            "x-amz-date": timestamp,
        }
        if credentials.token is not None:
            signed["x-amz-security-token"] = credentials.token
        exact = [*fields.items(), ("bucket", bucket), ("key", object_key), *signed.items()]
        # The text json.dumps makes of botocore's policy document (its default spacing, each string
        # through json's own encoder), written directly: building the document's dicts and lists and
        # dumping them cost 6 of the form's 21 us.
        policy = (
            f'{{"expiration": "{expiration}", "conditions": '
            f'[["content-length-range", 1, {max_bytes:d}], '
            + ", ".join([f"{{{_json_string(name)}: {_json_string(value)}}}" for name, value in exact])
            + "]}"
        )
        encoded_policy = base64.b64encode(policy.encode()).decode()
        key = self._signing_key(credentials.secret_key, date)
        signature = hmac.new(key, encoded_policy.encode(), hashlib.sha256).hexdigest()
        form = {**fields, "key": object_key, **signed, "policy": encoded_policy, "x-amz-signature": signature}
        return self.bucket_url, form

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
