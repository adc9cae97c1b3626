"""`GET /v1/images/{id}/output?format=&quality=&width=&height=&preview=`: variants rendered from the stored
result, cached in storage, with ETags and conditional requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
import pyvips
from redis.asyncio import Redis

import server.variants
from jobs.ids import new_id
from jobs.pipeline import KillSwitch
from jobs.settings import Settings
from jobs.variants import PREVIEW_MAX_SIDE, VariantSpec, render_variant
from tests import imagegen
from tests.conftest import Partner, api_client, make_account, run_burst, with_settings
from tests.test_spine import upload
from tests.test_upload_validation import assert_problem, staged_files

LOADERS = {
    "jpeg": "jpegload_buffer",
    "png": "pngload_buffer",
    "webp": "webpload_buffer",
    "avif": "heifload_buffer",
}


def noisy_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG full of fine detail, whose size an encoder's quality visibly changes."""
    noise = pyvips.Image.gaussnoise(width, height, sigma=40, mean=0)
    picture = imagegen.picture(width, height)
    grainy = (picture + noise.bandjoin([noise, noise])).cast("uchar").copy(interpretation="srgb")
    return bytes(grainy.write_to_buffer(".jpg", Q=95, keep="none"))


async def completed(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    data: bytes,
    *,
    filename: str = "photo.jpg",
) -> dict[str, Any]:
    created = await upload(client, account, data, filename=filename)
    assert created.status_code == 202, created.text
    await run_burst(settings)
    response = await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)
    image: dict[str, Any] = response.json()
    assert image["status"] == "completed", image
    return image


async def get_output(
    client: httpx.AsyncClient, account: Partner, image_id: str, query: str = "", **headers: str
) -> httpx.Response:
    return await client.get(f"/v1/images/{image_id}/output{query}", headers={**account.headers, **headers})


def decode(response: httpx.Response) -> pyvips.Image:
    assert response.status_code == 200, response.text
    return pyvips.Image.new_from_buffer(response.content, "")


def variant_files(settings: Settings, account: Partner, image_id: str) -> list[Path]:
    folder = settings.storage_root / account.id / image_id / "variants"
    return sorted(folder.iterdir()) if folder.exists() else []


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[VariantSpec]]:
    """Every variant the web process renders (the real renderer still runs)."""
    seen: list[VariantSpec] = []

    def counting(
        source: Path, destination: Path, spec: VariantSpec, kill_switch: KillSwitch | None = None
    ) -> None:
        seen.append(spec)
        render_variant(source, destination, spec, kill_switch)

    monkeypatch.setattr(server.variants, "render_variant", counting)
    yield seen


# --- what a variant is -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
async def test_format_changes_the_encoding(
    client: httpx.AsyncClient, account: Partner, settings: Settings, fmt: str
) -> None:
    if fmt == "avif" and not imagegen.can_save_avif():
        pytest.skip("this libvips has no AV1 encoder")
    # A PNG result, so every asked format (PNG too, with another size) is a real conversion.
    image = await completed(client, account, settings, imagegen.png(120, 80), filename="art.png")
    response = await get_output(client, account, image["id"], f"?format={fmt}&width=60")
    decoded = decode(response)
    assert decoded.get("vips-loader") == LOADERS[fmt]
    assert response.headers["content-type"] == f"image/{fmt}"
    assert (decoded.width, decoded.height) == (60, 40)


async def test_resize_fits_inside_the_box_and_never_enlarges(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(600, 400))
    sizes = {
        "?width=300": (300, 200),
        "?height=100": (150, 100),
        "?width=300&height=50": (75, 50),
        "?width=5000&format=png": (600, 400),
        "?width=1&height=16384": (1, 1),
    }
    for query, expected in sizes.items():
        decoded = decode(await get_output(client, account, image["id"], query))
        assert (decoded.width, decoded.height) == expected, query
    # A box the result already fits in asks for the result itself: the same bytes, not a re-encode.
    plain = await get_output(client, account, image["id"])
    assert (
        await get_output(client, account, image["id"], "?width=5000&height=5000")
    ).content == plain.content


async def test_lower_quality_gives_fewer_bytes(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, noisy_jpeg(400, 300))
    for fmt in ("jpeg", "webp"):
        low = await get_output(client, account, image["id"], f"?format={fmt}&quality=20")
        high = await get_output(client, account, image["id"], f"?format={fmt}&quality=90")
        assert decode(low).get("vips-loader") == LOADERS[fmt]
        assert len(low.content) < 0.7 * len(high.content), fmt


async def test_quality_means_nothing_to_png_so_it_asks_for_the_same_file(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.png(40, 30), filename="art.png")
    plain = await get_output(client, account, image["id"])
    with_quality = await get_output(client, account, image["id"], "?quality=10")
    assert with_quality.content == plain.content
    assert with_quality.headers["etag"] == plain.headers["etag"]
    assert variant_files(settings, account, image["id"]) == []


async def test_preview_is_small_and_visibly_watermarked(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(1200, 800))
    preview = decode(await get_output(client, account, image["id"], "?preview=true&format=png"))
    assert max(preview.width, preview.height) == PREVIEW_MAX_SIDE
    assert (preview.width, preview.height) == (400, 267)
    plain = decode(await get_output(client, account, image["id"], "?width=400&format=png"))
    assert (plain.width, plain.height) == (preview.width, preview.height)
    difference = (preview.cast("int") - plain.cast("int")).bandmean()
    lighter, darker = difference > 20, difference < -20
    # Light letters and their dark shadow, both over a real share of the picture…
    assert lighter.avg() / 255 > 0.03 and darker.avg() / 255 > 0.02
    # …tiled, so cropping a corner does not remove the mark.
    half_width, half_height = preview.width // 2, preview.height // 2
    for left, top in ((0, 0), (half_width, 0), (0, half_height), (half_width, half_height)):
        assert lighter.crop(left, top, half_width, half_height).max() == 255, (left, top)


async def test_preview_keeps_transparency_and_marks_the_transparent_part_too(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.png(600, 600, alpha=True), filename="a.png")
    preview = decode(await get_output(client, account, image["id"], "?preview=true"))
    assert preview.bands == 4 and (preview.width, preview.height) == (400, 400)
    transparent_quarter = preview.extract_band(3).crop(200, 200, 200, 200)
    assert transparent_quarter.min() == 0  # still see-through between the letters
    assert transparent_quarter.max() > 64  # but the mark is there


async def test_variant_without_alpha_support_is_flattened_on_white(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.png(64, 64, alpha=True), filename="a.png")
    as_jpeg = decode(await get_output(client, account, image["id"], "?format=jpeg"))
    assert as_jpeg.bands == 3
    assert as_jpeg.crop(40, 40, 24, 24).min() > 240  # the transparent quarter comes out white
    as_webp = decode(await get_output(client, account, image["id"], "?format=webp"))
    assert as_webp.hasalpha()


# --- headers -----------------------------------------------------------------------------------------


async def test_variant_headers_name_the_variant(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(
        client, account, settings, imagegen.jpeg(600, 400), filename="C:\\trip\\sunset.jpg"
    )
    expected = {
        "": 'inline; filename="sunset.jpg"',
        "?format=webp": 'inline; filename="sunset.webp"',
        "?width=300&format=webp&quality=50": 'inline; filename="sunset-300x200-q50.webp"',
        "?preview=true": 'inline; filename="sunset-400x267-preview.jpg"',
    }
    for query, disposition in expected.items():
        response = await get_output(client, account, image["id"], query)
        assert response.status_code == 200
        assert response.headers["content-disposition"] == disposition, query
        assert response.headers["cache-control"] == "private, max-age=31536000, immutable"
        assert int(response.headers["content-length"]) == len(response.content)


async def test_head_answers_the_headers_without_a_body(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(200, 100))
    url = f"/v1/images/{image['id']}/output?width=100&format=webp"
    head = await client.head(url, headers=account.headers)
    assert head.status_code == 200 and head.content == b""
    get = await client.get(url, headers=account.headers)
    assert head.headers["etag"] == get.headers["etag"]
    assert int(head.headers["content-length"]) == len(get.content)
    assert head.headers["content-type"] == "image/webp"


# --- cache -------------------------------------------------------------------------------------------


async def test_second_request_is_served_from_the_stored_variant(
    client: httpx.AsyncClient, account: Partner, settings: Settings, renders: list[VariantSpec]
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(600, 400))
    first = await get_output(client, account, image["id"], "?width=300&format=webp")
    (stored,) = variant_files(settings, account, image["id"])
    assert stored.read_bytes() == first.content
    before = stored.stat()
    # The same variant asked another way: the box bounds the same 300x200.
    second = await get_output(client, account, image["id"], "?format=webp&height=200&width=300")
    assert second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]
    after = stored.stat()
    assert after.st_ino == before.st_ino  # the same file, not rendered and committed again
    assert len(renders) == 1
    # Another web process finds it too.
    async with api_client(settings) as other_process:
        third = await get_output(other_process, account, image["id"], "?width=300&format=webp")
    assert third.content == first.content and third.headers["etag"] == first.headers["etag"]
    assert len(renders) == 1


async def test_concurrent_requests_for_one_variant_leave_one_whole_file(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, noisy_jpeg(800, 600))
    responses = await asyncio.gather(
        *(get_output(client, account, image["id"], "?width=500&format=avif") for _ in range(6))
    )
    bodies = {response.content for response in responses}
    assert all(response.status_code == 200 for response in responses)
    (stored,) = variant_files(settings, account, image["id"])
    assert stored.read_bytes() in bodies
    assert pyvips.Image.new_from_file(str(stored)).width == 500
    assert staged_files(settings) == []


# --- conditional requests ----------------------------------------------------------------------------


async def test_etag_and_if_none_match(
    client: httpx.AsyncClient, account: Partner, settings: Settings, renders: list[VariantSpec]
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    for query in ("", "?width=100&format=png"):
        response = await get_output(client, account, image["id"], query)
        etag = response.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')  # strong
        for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            not_modified = await get_output(
                client, account, image["id"], query, **{"If-None-Match": condition}
            )
            assert not_modified.status_code == 304, condition
            assert not_modified.content == b""
            assert not_modified.headers["etag"] == etag
            assert not_modified.headers["cache-control"] == response.headers["cache-control"]
        changed = await get_output(client, account, image["id"], query, **{"If-None-Match": '"other"'})
        assert changed.status_code == 200 and changed.content == response.content
    etags = {
        (await get_output(client, account, image["id"], query)).headers["etag"]
        for query in ("", "?width=100", "?width=100&format=png", "?width=100&preview=true")
    }
    assert len(etags) == 4


async def test_a_cached_copy_is_confirmed_without_rendering(
    client: httpx.AsyncClient, account: Partner, settings: Settings, renders: list[VariantSpec]
) -> None:
    """The ETag is known from the record, so revalidating a variant costs no render even where it was
    never stored (another deployment's storage, or a new process)."""
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    etag = (await get_output(client, account, image["id"], "?width=120")).headers["etag"]
    for stored in variant_files(settings, account, image["id"]):
        stored.unlink()
    renders.clear()
    response = await get_output(client, account, image["id"], "?width=120", **{"If-None-Match": etag})
    assert response.status_code == 304
    assert renders == [] and variant_files(settings, account, image["id"]) == []


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code", "fields"),
    [
        ("?width=0", "validation_failed", ["width"]),
        ("?width=16385", "validation_failed", ["width"]),
        ("?height=-5", "validation_failed", ["height"]),
        ("?width=abc", "validation_failed", ["width"]),
        ("?width=", "validation_failed", ["width"]),
        ("?quality=0", "validation_failed", ["quality"]),
        ("?quality=101", "validation_failed", ["quality"]),
        ("?format=gif", "validation_failed", ["format"]),
        ("?preview=yes", "validation_failed", ["preview"]),
        ("?width=10&width=20", "validation_failed", ["width"]),
        ("?size=10", "unknown_query_parameter", ["size"]),
        # Every problem is named, the unknown parameter giving the code.
        ("?width=0&format=bmp&colour=red", "unknown_query_parameter", ["width", "format", "colour"]),
    ],
)
async def test_invalid_query_is_422_naming_the_field(
    client: httpx.AsyncClient, account: Partner, query: str, code: str, fields: list[str]
) -> None:
    created = await upload(client, account, imagegen.jpeg())
    response = await get_output(client, account, created.json()["id"], query)
    body = assert_problem(response, 422, code, fields=fields)
    assert {error["field"] for error in body["errors"]} == set(fields)


async def test_variant_of_an_unfinished_image_is_409(client: httpx.AsyncClient, account: Partner) -> None:
    created = await upload(client, account, imagegen.jpeg())
    response = await get_output(client, account, created.json()["id"], "?format=webp&preview=true")
    detail = assert_problem(response, 409, "not_ready")["detail"]
    assert "queued" in detail
    assert f"GET /v1/images/{created.json()['id']} with Prefer: wait=25" in detail  # how to wait for it
    assert response.headers.get("retry-after")


@pytest.mark.parametrize("query", ["", "?width=10"])
async def test_output_of_a_failed_image_is_409_image_failed_with_its_error(
    client: httpx.AsyncClient, account: Partner, settings: Settings, query: str
) -> None:
    """Not `not_ready`: waiting will not help, and the problem says why there is no output."""
    created = await upload(client, account, imagegen.truncated_jpeg())
    await run_burst(settings)
    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    response = await get_output(client, account, image["id"], query)
    detail = assert_problem(response, 409, "image_failed")["detail"]
    assert image["error"]["code"] == "corrupt_image"
    assert image["error"]["code"] in detail and image["error"]["message"] in detail
    assert "retry-after" not in response.headers


async def test_another_accounts_variant_is_404_and_renders_nothing(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    redis: Redis,
    renders: list[VariantSpec],
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    etag = (await get_output(client, account, image["id"])).headers["etag"]
    stranger = await make_account(redis, "stranger")
    for query in ("", "?width=100", "?preview=true"):
        response = await get_output(client, stranger, image["id"], query, **{"If-None-Match": etag})
        assert_problem(response, 404, "not_found")
    # An invalid query is refused before any image is looked for: it tells a stranger nothing either.
    for image_id in (image["id"], new_id("img")):
        assert_problem(await get_output(client, stranger, image_id, "?width=0"), 422, "validation_failed")
    assert renders == [] and variant_files(settings, account, image["id"]) == []


async def test_missing_stored_result_is_410_gone(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    for output in (settings.storage_root / account.id / image["id"]).glob("output*"):
        output.unlink()
    for query in ("", "?width=100"):
        assert_problem(await get_output(client, account, image["id"], query), 410, "output_missing")


async def test_corrupt_stored_result_is_500_and_stores_no_variant(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    (output,) = (settings.storage_root / account.id / image["id"]).glob("output*")
    output.write_bytes(output.read_bytes()[:200])
    response = await get_output(client, account, image["id"], "?width=100")
    assert_problem(response, 500, "output_unreadable")
    assert variant_files(settings, account, image["id"]) == []
    assert staged_files(settings) == []
    # The stored bytes themselves are still offered as they are.
    assert (await get_output(client, account, image["id"])).content == output.read_bytes()


# --- delete ------------------------------------------------------------------------------------------


async def test_delete_removes_the_variants(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    for query in ("?width=100", "?preview=true&format=webp"):
        assert (await get_output(client, account, image["id"], query)).status_code == 200
    assert len(variant_files(settings, account, image["id"])) == 2
    assert (await client.delete(f"/v1/images/{image['id']}", headers=account.headers)).status_code == 204
    assert not (settings.storage_root / account.id / image["id"]).exists()
    assert_problem(await get_output(client, account, image["id"], "?width=100"), 404)


async def test_delete_while_a_variant_renders_leaves_nothing_behind(
    client: httpx.AsyncClient, account: Partner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))

    def render_then_delete(
        source: Path, destination: Path, spec: VariantSpec, kill_switch: KillSwitch | None = None
    ) -> None:
        render_variant(source, destination, spec, kill_switch)
        # The owner deletes the image while this request still holds the rendered variant.
        deleted = anyio.from_thread.run(
            lambda: client.delete(f"/v1/images/{image['id']}", headers=account.headers)
        )
        assert deleted.status_code == 204

    monkeypatch.setattr(server.variants, "render_variant", render_then_delete)
    response = await get_output(client, account, image["id"], "?width=100")
    assert_problem(response, 404)
    assert not (settings.storage_root / account.id / image["id"]).exists()
    assert staged_files(settings) == []


# --- limits on rendering -----------------------------------------------------------------------------


async def test_an_image_keeps_only_its_most_recently_used_variants(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    renders: list[VariantSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server.variants, "MAX_VARIANTS_PER_IMAGE", 3)
    image = await completed(client, account, settings, imagegen.jpeg(300, 200))
    for width in (100, 110, 120):
        assert (await get_output(client, account, image["id"], f"?width={width}")).status_code == 200
    assert (await get_output(client, account, image["id"], "?width=100")).status_code == 200  # used again
    for width in (130, 140):
        assert (await get_output(client, account, image["id"], f"?width={width}")).status_code == 200
    kept = sorted(
        pyvips.Image.new_from_file(str(path)).width for path in variant_files(settings, account, image["id"])
    )
    assert kept == [100, 130, 140]
    assert [spec.width for spec in renders] == [100, 110, 120, 130, 140]
    renders.clear()
    evicted = await get_output(client, account, image["id"], "?width=110")
    assert decode(evicted).width == 110 and [spec.width for spec in renders] == [110]  # rendered again


class SlowRenders:
    """Replaces the web process's renderer: renders of `held` accounts wait for `release`, then render."""

    def __init__(self, held: Sequence[Partner]) -> None:
        self.held = [account.id for account in held]
        self.running = 0
        self.most = 0
        self.release = threading.Event()
        self._changed = threading.Condition()

    def render(
        self, source: Path, destination: Path, spec: VariantSpec, kill_switch: KillSwitch | None = None
    ) -> None:
        with self._changed:
            self.running += 1
            self.most = max(self.most, self.running)
            self._changed.notify_all()
        if any(account_id in str(source) for account_id in self.held):
            self.release.wait(10)
        render_variant(source, destination, spec, kill_switch)
        with self._changed:
            self.running -= 1

    def until_running(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.running >= count, timeout=10)


async def test_renders_share_a_bounded_number_of_slots_and_a_long_wait_is_503(
    account: Partner, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.variants, "RENDER_SLOTS", 2)
    monkeypatch.setattr(server.variants, "RENDER_WAIT_SECONDS", 0.3)
    partners = [account, await make_account(redis, "second"), await make_account(redis, "third")]
    async with api_client(settings) as client:  # its start-up makes the slots
        images = [
            (partner, await completed(client, partner, settings, imagegen.jpeg(300, 200)))
            for partner in partners
        ]
        slow = SlowRenders(partners)
        monkeypatch.setattr(server.variants, "render_variant", slow.render)
        busy = [
            asyncio.create_task(get_output(client, partner, image["id"], f"?width={width}"))
            for (partner, image), width in zip(images[:2], (50, 60), strict=True)
        ]
        await asyncio.to_thread(slow.until_running, 2)
        third, third_image = images[2]
        waited = await get_output(client, third, third_image["id"], "?width=70")
        problem = assert_problem(waited, 503, "renderer_busy")
        assert problem["detail"].startswith("every variant renderer is busy")
        assert waited.headers["retry-after"] == str(server.variants.RENDER_RETRY_AFTER_SECONDS)
        # A stored variant and a revalidation need no slot.
        assert (await get_output(client, third, third_image["id"])).status_code == 200
        slow.release.set()
        assert [response.status_code for response in await asyncio.gather(*busy)] == [200, 200]
        monkeypatch.setattr(server.variants, "RENDER_WAIT_SECONDS", 10.0)
        slow.release.clear()
        queued = [
            asyncio.create_task(get_output(client, partner, image["id"], "?width=80"))
            for partner, image in images
        ]
        await asyncio.to_thread(slow.until_running, 2)
        slow.release.set()
        assert [response.status_code for response in await asyncio.gather(*queued)] == [200, 200, 200]
        assert slow.most == 2
        assert staged_files(settings) == []


async def test_one_account_holds_at_most_half_the_render_slots(
    account: Partner, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.variants, "RENDER_SLOTS", 2)
    monkeypatch.setattr(server.variants, "RENDER_WAIT_SECONDS", 0.3)
    other = await make_account(redis, "other tenant")
    async with api_client(settings) as client:
        greedy_image = await completed(client, account, settings, imagegen.jpeg(300, 200))
        other_image = await completed(client, other, settings, imagegen.jpeg(300, 200))
        slow = SlowRenders([account])
        monkeypatch.setattr(server.variants, "render_variant", slow.render)
        first = asyncio.create_task(get_output(client, account, greedy_image["id"], "?width=50"))
        await asyncio.to_thread(slow.until_running, 1)

        second = await get_output(client, account, greedy_image["id"], "?width=60")
        problem = assert_problem(second, 503, "renderer_busy")
        assert problem["detail"].startswith("this account's share of the variant renderers is busy")
        served = await get_output(client, other, other_image["id"], "?width=60")
        assert decode(served).width == 60

        slow.release.set()
        assert (await first).status_code == 200


async def test_a_render_past_the_time_limit_is_stopped_and_503(account: Partner, settings: Settings) -> None:
    async with api_client(with_settings(settings, variant_render_timeout=0.05)) as client:
        # Re-encoding 12 MP as WebP takes over a second.
        image = await completed(client, account, settings, imagegen.jpeg(4000, 3000))
        response = await get_output(client, account, image["id"], "?format=webp")
    problem = assert_problem(response, 503, "render_too_slow")
    assert "longer than 0.05 s" in problem["detail"]
    assert variant_files(settings, account, image["id"]) == []
    assert staged_files(settings) == []
