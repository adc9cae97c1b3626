"""Our presigned URLs and POST forms (jobs/s3signing.py) are byte for byte the ones botocore makes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.session
import pytest
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials

from jobs.s3signing import Presigner

EXPIRES = 900
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
BUCKET = "darkroom-photos"
PROBE = "darkroom-probe"
KEYS = [
    "darkroom/acc_1/img_2/original",
    "pre fix/ümlaut+plus=equals&amp?question~tilde/original.jpg",
    # What JSON escapes (the form's policy is JSON text): quotes, backslashes, control characters.
    'say "cheese"\\ \t/original',
]
# (endpoint_url, region, addressing style): MinIO or moto on a port, AWS itself, an https endpoint.
SERVICES = [
    ("http://127.0.0.1:9000", "us-east-1", "path"),
    (None, "us-east-1", None),
    (None, "eu-west-1", None),
    ("https://storage.example.com", "auto", "path"),
]
# (HTTP method, botocore operation, its query parameters as botocore's Params, as ours)
OPERATIONS: list[tuple[str, str, dict[str, Any], dict[str, str | int]]] = [
    ("GET", "get_object", {}, {}),
    (
        "GET",
        "get_object",
        {"ResponseContentDisposition": 'attachment; filename="ü b.jpg"', "ResponseContentType": "image/jpeg"},
        {
            "response-content-disposition": 'attachment; filename="ü b.jpg"',
            "response-content-type": "image/jpeg",
        },
    ),
    ("PUT", "put_object", {}, {}),
    (
        "PUT",
        "upload_part",
        {"UploadId": "2~a+b/c=d e", "PartNumber": 7},
        {"uploadId": "2~a+b/c=d e", "partNumber": 7},
    ),
]


def botocore_client(endpoint_url: str | None, region: str, style: str | None, token: str | None) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key=SECRET,
        aws_session_token=token,
        config=Config(signature_version="s3v4", s3={"addressing_style": style} if style else None),
    )


def signer_like(client: Any) -> Presigner:
    """Ours for the bucket, made as S3Storage makes it: from botocore's URL of the probe key."""
    probe = client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": PROBE}, ExpiresIn=EXPIRES
    )
    return Presigner.like(probe, PROBE)


@pytest.mark.parametrize(("endpoint_url", "region", "style"), SERVICES)
@pytest.mark.parametrize("token", [None, "session/token+with=odd chars"])
def test_presigned_urls_match_botocores(
    endpoint_url: str | None, region: str, style: str | None, token: str | None
) -> None:
    client = botocore_client(endpoint_url, region, style, token)
    signer = signer_like(client)
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", SECRET, token)
    for key in KEYS:
        for method, operation, params, query in OPERATIONS:
            theirs = client.generate_presigned_url(
                operation,
                Params={"Bucket": BUCKET, "Key": key, **params},
                ExpiresIn=EXPIRES,
                HttpMethod=method,
            )
            signed_at = parse_qs(urlsplit(theirs).query)["X-Amz-Date"][0]
            now = datetime.strptime(signed_at, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            assert signer.presign(method, key, query, credentials, EXPIRES, now) == theirs


def test_a_new_day_signs_with_a_new_key() -> None:
    client = botocore_client("http://127.0.0.1:9000", "us-east-1", "path", None)
    signer = signer_like(client)
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", "secret", None)
    before = signer.presign(
        "GET", KEYS[0], {}, credentials, EXPIRES, datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC)
    )
    after = signer.presign(
        "GET", KEYS[0], {}, credentials, EXPIRES, datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC)
    )
    assert "X-Amz-Credential=AKIDEXAMPLE%2F20260101%2F" in before
    assert "X-Amz-Credential=AKIDEXAMPLE%2F20260102%2F" in after
    # Each is what a signer that never saw the other day makes.
    fresh = signer_like(client)
    assert (
        fresh.presign("GET", KEYS[0], {}, credentials, EXPIRES, datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC))
        == after
    )


@pytest.mark.parametrize(("endpoint_url", "region", "style"), SERVICES)
@pytest.mark.parametrize("token", [None, "session/token+with=odd chars"])
def test_presigned_post_forms_match_botocores(
    endpoint_url: str | None, region: str, style: str | None, token: str | None
) -> None:
    client = botocore_client(endpoint_url, region, style, token)
    signer = signer_like(client)
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", SECRET, token)
    redirect = "https://api.example.com/v1/uploads/upl_1/landed?expires=1&signature=a+b/c="
    fields = {"success_action_redirect": redirect, "Content-Type": "image/jpeg"}
    max_bytes = 12_345
    conditions: list[Any] = [["content-length-range", 1, max_bytes], *({k: v} for k, v in fields.items())]
    for key in KEYS:
        theirs = their_form(client, key, fields, conditions)
        now = datetime.strptime(theirs["fields"]["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        url, form = signer.presign_post(BUCKET, key, fields, max_bytes, credentials, EXPIRES, now)
        assert (url, form) == (theirs["url"], theirs["fields"])
        assert list(form) == list(theirs["fields"])


def their_form(client: Any, key: str, fields: dict[str, str], conditions: list[Any]) -> Any:
    """botocore's form, signed within one second: it reads the clock for the policy's expiration and
    again for the signature's date, which a second's tick between them would set apart."""
    while True:
        form = client.generate_presigned_post(
            Bucket=BUCKET, Key=key, Fields=fields, Conditions=[*conditions], ExpiresIn=EXPIRES
        )
        policy = json.loads(base64.b64decode(form["fields"]["policy"]))
        signed_at = datetime.strptime(form["fields"]["x-amz-date"], "%Y%m%dT%H%M%SZ")
        if datetime.strptime(policy["expiration"], "%Y-%m-%dT%H:%M:%SZ") == signed_at + timedelta(
            seconds=EXPIRES
        ):
            return form


def test_forms_signed_within_one_second_each_carry_their_own_times() -> None:
    """The date and expiration, formatted once a second, are those of the form's own second and expiry."""
    signer = signer_like(botocore_client("http://127.0.0.1:9000", "us-east-1", "path", None))
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", SECRET, None)

    def times(now: datetime, expires_in: int) -> tuple[str, str]:
        _, form = signer.presign_post(BUCKET, KEYS[0], {}, 1000, credentials, expires_in, now)
        return form["x-amz-date"], json.loads(base64.b64decode(form["policy"]))["expiration"]

    last = datetime(2026, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC)
    assert times(last, 60) == ("20260101T235959Z", "2026-01-02T00:00:59Z")
    assert times(last, 61) == ("20260101T235959Z", "2026-01-02T00:01:00Z")
    assert times(last + timedelta(microseconds=1), 60) == ("20260102T000000Z", "2026-01-02T00:01:00Z")
    assert times(last.replace(microsecond=0), 60) == ("20260101T235959Z", "2026-01-02T00:00:59Z")
