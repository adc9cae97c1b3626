"""jobs.pipeline.render on real files: orientation, fit modes, colour, depth, alpha, metadata, formats."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import pyvips

from jobs.operations import parse_operations
from jobs.ops.base import ProcessingError
from jobs.ops.encode import SAVERS
from jobs.params import ValidationFailed
from jobs.pipeline import KillSwitch, RenderedImage, configure_libvips
from tests import imagegen
from tests.pixels import Renderer, decode, record_held_pictures

# Written into every metadata field the fixtures carry, so a leak shows up in the raw output bytes.
SECRET = b"darkroom-secret-owner"
METADATA_FIELDS = ("exif-data", "icc-profile-data", "xmp-data", "jpeg-comment", "png-comment-0-comment")

RESIZE_FIRST = [{"type": "resize", "params": {"width": 32}}]
# Resampled once decoded (a kernel libvips' thumbnail does not offer), not shrunk on load.
RESIZE_LATER = [{"type": "resize", "params": {"width": 32, "kernel": "cubic"}}]
CHAINS: dict[str, list[dict[str, Any]]] = {
    "no-resize": [],
    "shrink-on-load": RESIZE_FIRST,
    "resize-in-chain": RESIZE_LATER,
}


@pytest.fixture(autouse=True, scope="module")
def libvips_as_in_the_worker() -> None:
    """The worker turns libvips' operation cache off; without that, loads of a reused path are stale."""
    configure_libvips()


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return float((a.cast("float") - b.cast("float")).abs().avg())


# --- orientation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_every_exif_orientation_comes_out_as_the_same_upright_picture(renderer: Renderer, chain: str) -> None:
    operations = CHAINS[chain]
    width = 32 if operations else 64
    expected = imagegen.picture(64, 48)
    if operations:
        expected = expected.resize(0.5, kernel="linear")
    outputs = {
        orientation: renderer.run(imagegen.jpeg(64, 48, orientation=orientation), operations)
        for orientation in range(1, 9)
    }
    for orientation, output in outputs.items():
        assert (output.width, output.height) == (width, width * 3 // 4), f"orientation {orientation}"
        assert output.get_typeof("orientation") == 0 or output.get("orientation") == 1
        difference = mean_difference(output, expected)
        assert difference < 4, f"orientation {orientation} is off the upright picture by {difference:.1f}"
        # The red block stays in the top-left corner, the gradient grows to the bottom-right.
        assert output(1, 1)[0] > 180 and output(1, 1)[1] < 80, f"orientation {orientation}: {output(1, 1)}"
        assert output(width - 2, width * 3 // 4 - 2)[1] > 160, f"orientation {orientation}"
        assert mean_difference(output, outputs[1]) < 3, (
            f"orientation {orientation} differs from orientation 1"
        )


def test_wrong_orientation_would_be_caught(renderer: Renderer) -> None:
    """The comparison above can tell turned pictures apart: a mirrored picture is far from upright."""
    upright = renderer.run(imagegen.jpeg(64, 48))
    assert mean_difference(upright.fliphor(), imagegen.picture(64, 48)) > 10
    assert mean_difference(upright.rot180(), imagegen.picture(64, 48)) > 10


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_fit_applies_to_the_upright_size(renderer: Renderer, orientation: int) -> None:
    """Stored 48x64 with a turning orientation: fit modes see the upright 64x48, not the stored size."""
    inside = [{"type": "resize", "params": {"width": 32, "height": 16, "fit": "inside"}}]
    output = renderer.run(imagegen.jpeg(64, 48, orientation=orientation), inside)
    assert (output.width, output.height) == (21, 16)
    # For `outside` the upright height binds (32/48 > 32/64); the stored size would pick the width.
    outside = [{"type": "resize", "params": {"width": 32, "height": 32, "fit": "outside"}}]
    output = renderer.run(imagegen.jpeg(64, 48, orientation=orientation), outside)
    assert (output.width, output.height) == (43, 32)


# --- fit modes --------------------------------------------------------------------------------------

# Source 128x64 (2:1). Each case: box, fit, enlarge → expected size, for the leading resize
# (shrink-on-load via thumbnail) and for a resize later in the chain (thumbnail_image).
FIT_CASES = [
    ((32, 32), "inside", False, (32, 16)),
    ((256, 256), "inside", False, (128, 64)),
    ((256, 256), "inside", True, (256, 128)),
    ((32, None), "inside", False, (32, 16)),
    ((None, 256), "inside", True, (512, 256)),
    ((None, 256), "inside", False, (128, 64)),
    ((32, 32), "cover", False, (32, 32)),
    ((100, 10), "cover", False, (100, 10)),
    ((256, 256), "cover", False, (128, 64)),
    ((256, 256), "cover", True, (256, 256)),
    ((256, 32), "cover", False, (128, 32)),
    ((32, 32), "fill", False, (32, 32)),
    ((100, 10), "fill", False, (100, 10)),
    ((256, 256), "fill", True, (256, 256)),
    ((256, 256), "fill", False, (128, 64)),
    ((256, 32), "fill", False, (128, 32)),
    ((32, 32), "contain", False, (32, 32)),
    ((100, 10), "contain", False, (100, 10)),
    ((256, 256), "contain", False, (256, 256)),
    ((256, 256), "contain", True, (256, 256)),
    ((32, 32), "outside", False, (64, 32)),
    ((100, 10), "outside", False, (100, 50)),
    ((256, 256), "outside", False, (128, 64)),
    ((256, 256), "outside", True, (512, 256)),
    ((256, 32), "outside", True, (256, 128)),
]


@pytest.mark.parametrize(
    ("box", "fit", "enlarge", "expected"),
    FIT_CASES,
    ids=[
        f"{fit}-{box[0]}x{box[1]}-{'enlarge' if enlarge else 'no-enlarge'}"
        for box, fit, enlarge, _ in FIT_CASES
    ],
)
@pytest.mark.parametrize("position", ["first", "later"])
def test_resize_fit_gives_the_expected_size(
    renderer: Renderer,
    box: tuple[int | None, int | None],
    fit: str,
    enlarge: bool,
    expected: tuple[int, int],
    position: str,
) -> None:
    params: dict[str, Any] = {"fit": fit, "enlarge": enlarge}
    if box[0] is not None:
        params["width"] = box[0]
    if box[1] is not None:
        params["height"] = box[1]
    operations: list[dict[str, Any]] = [{"type": "resize", "params": params}]
    if position == "later":
        operations.insert(0, {"type": "convert", "params": {"format": "png"}})
    output = renderer.run(imagegen.jpeg(128, 64), operations)
    assert (output.width, output.height) == expected


@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("source", [(104, 1000), (1000, 104), (333, 1000)], ids=str)
def test_outside_always_covers_the_box(renderer: Renderer, source: tuple[int, int], position: str) -> None:
    box = (10, 100) if source[0] < source[1] else (100, 10)
    operations: list[dict[str, Any]] = [
        {"type": "resize", "params": {"width": box[0], "height": box[1], "fit": "outside"}}
    ]
    if position == "later":
        operations.insert(0, {"type": "convert", "params": {"format": "png"}})
    output = renderer.run(imagegen.jpeg(*source), operations)
    assert output.width >= box[0] and output.height >= box[1], (output.width, output.height)
    assert output.width == box[0] or output.height == box[1], (output.width, output.height)


def test_contain_pads_with_the_background_colour(renderer: Renderer) -> None:
    operations = [
        {"type": "resize", "params": {"width": 64, "height": 64, "fit": "contain", "background": "#00ff00"}},
        {"type": "convert", "params": {"format": "png"}},
    ]
    output = renderer.run(imagegen.jpeg(128, 64), operations)
    assert (output.width, output.height) == (64, 64)
    assert output(32, 2) == [0.0, 255.0, 0.0]  # padding above
    assert output(32, 61) == [0.0, 255.0, 0.0]  # padding below
    assert output(32, 32)[2] > 150  # the picture in the middle


def test_contain_pads_alpha_images_with_transparency(renderer: Renderer) -> None:
    operations = [
        {"type": "resize", "params": {"width": 64, "height": 64, "fit": "contain"}},
        {"type": "convert", "params": {"format": "png"}},
    ]
    output = renderer.run(imagegen.png(128, 64, alpha=True), operations, "png")
    assert (output.width, output.height, output.bands) == (64, 64, 4)
    assert output(32, 2)[3] == 0
    assert output(10, 20)[3] == 255


# --- colour, depth, alpha ---------------------------------------------------------------------------


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_cmyk_jpeg_comes_out_three_band_srgb(renderer: Renderer, chain: str) -> None:
    output = renderer.run(imagegen.cmyk_jpeg(64, 48), CHAINS[chain])
    assert (output.bands, output.interpretation, output.format) == (3, "srgb", "uchar")
    if not CHAINS[chain]:
        # Through the embedded CMYK profile and back: close to the picture it was made from.
        assert mean_difference(output, imagegen.picture(64, 48)) < 12


@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_sixteen_bit_png_comes_out_eight_bit(renderer: Renderer, chain: str, alpha: bool) -> None:
    operations = [*CHAINS[chain], {"type": "convert", "params": {"format": "png"}}]
    source = imagegen.png(64, 48, sixteen_bit=True, alpha=alpha)
    assert decode(source).format == "ushort"
    output = renderer.run(source, operations, "png")
    assert output.format == "uchar"
    assert output.interpretation == "srgb"
    assert output.bands == (4 if alpha else 3)
    if not CHAINS[chain]:
        # Scaled to 8 bits, not clipped: the picture's levels survive.
        assert mean_difference(output[0:3], imagegen.picture(64, 48)) < 1.5


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_rgba_png_to_jpeg_is_flattened_on_white(renderer: Renderer, chain: str) -> None:
    operations = [*CHAINS[chain], {"type": "convert", "params": {"format": "jpeg"}}]
    output = renderer.run(imagegen.png(64, 48, alpha=True), operations, "png")
    assert output.bands == 3
    corner = output(output.width - 2, output.height - 2)  # in the transparent quarter
    assert min(corner) > 240, corner


@pytest.mark.parametrize("target", ["png", "webp", "tiff", "avif"])
def test_rgba_png_keeps_alpha_where_the_format_has_it(renderer: Renderer, target: str) -> None:
    if target == "avif" and not imagegen.can_save_avif():
        pytest.skip("this libvips build has no AV1 encoder")
    operations = [{"type": "convert", "params": {"format": target, "lossless": target == "webp"}}]
    output = renderer.run(imagegen.png(64, 48, alpha=True), operations, "png")
    assert output.bands == 4
    assert output(63, 47)[3] < 10
    assert output(1, 1)[3] > 245


def test_greyscale_input_is_not_invented_colour(renderer: Renderer) -> None:
    grey = imagegen.picture(64, 48).colourspace("b-w")
    output = renderer.run(
        bytes(grey.write_to_buffer(".png")), [{"type": "convert", "params": {"format": "png"}}], "png"
    )
    assert output.format == "uchar"
    assert output.bands in (1, 3)


# --- metadata ---------------------------------------------------------------------------------------


def metadata_rich(extension: str) -> bytes:
    """The picture with EXIF (orientation 1, an artist), an ICC profile, XMP and a comment, all kept."""
    image = imagegen.picture(64, 48).icc_transform("srgb", input_profile="srgb").copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 1)
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Artist", SECRET.decode())
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    xmp += b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="' + SECRET + b'"/>'
    xmp += b"</rdf:RDF></x:xmpmeta>"
    image.set_type(pyvips.GValue.blob_type, "xmp-data", xmp)
    if extension == ".jpg":
        image.set_type(pyvips.GValue.gstr_type, "jpeg-comment", SECRET.decode())
    data = bytes(image.write_to_buffer(extension, keep="all"))
    fields = set(decode(data).get_fields())
    assert {"exif-data", "icc-profile-data", "xmp-data"} <= fields, f"fixture lost metadata: {fields}"
    assert SECRET in data
    return data


@pytest.mark.parametrize("target", list(SAVERS))
@pytest.mark.parametrize(
    ("extension", "input_format"), [(".jpg", "jpeg"), (".png", "png"), (".webp", "webp")]
)
@pytest.mark.parametrize("chain", ["no-resize", "shrink-on-load"])
def test_metadata_is_stripped(
    renderer: Renderer, extension: str, input_format: str, target: str, chain: str
) -> None:
    if target == "avif" and not imagegen.can_save_avif():
        pytest.skip("this libvips build has no AV1 encoder")
    operations = [*CHAINS[chain], {"type": "convert", "params": {"format": target}}]
    rendered = renderer.render(metadata_rich(extension), operations, input_format)
    data = rendered.path.read_bytes()
    fields = set(decode(data).get_fields())
    assert not fields & set(METADATA_FIELDS), f"{target} output kept {sorted(fields & set(METADATA_FIELDS))}"
    assert not any(field.startswith(("exif-", "xmp", "iptc")) for field in fields), sorted(fields)
    assert SECRET not in data


# --- encoder options and formats --------------------------------------------------------------------


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_progressive_flag_gives_an_interlaced_jpeg(renderer: Renderer, chain: str) -> None:
    progressive = renderer.run(
        imagegen.jpeg(64, 48), [*CHAINS[chain], {"type": "convert", "params": {"progressive": True}}]
    )
    baseline = renderer.run(imagegen.jpeg(64, 48), [*CHAINS[chain], {"type": "convert"}])
    assert progressive.get_typeof("interlaced") and progressive.get("interlaced") == 1
    assert not baseline.get_typeof("interlaced")


def test_progressive_png_is_interlaced(renderer: Renderer) -> None:
    output = renderer.run(
        imagegen.png(64, 48), [{"type": "convert", "params": {"format": "png", "progressive": True}}], "png"
    )
    assert output.get_typeof("interlaced") and output.get("interlaced") == 1


def test_quality_changes_the_jpeg(renderer: Renderer) -> None:
    low = renderer.render(imagegen.jpeg(256, 192), [{"type": "convert", "params": {"quality": 5}}])
    high = renderer.render(imagegen.jpeg(256, 192), [{"type": "convert", "params": {"quality": 100}}])
    assert low.bytes < high.bytes


@pytest.mark.parametrize("target", list(SAVERS))
@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_each_output_format_saves_and_decodes(renderer: Renderer, target: str, chain: str) -> None:
    if target == "avif" and not imagegen.can_save_avif():
        pytest.skip("this libvips build has no AV1 encoder")
    assert set(imagegen.LOADER_OF_FORMAT) == set(SAVERS)
    operations = [*CHAINS[chain], {"type": "convert", "params": {"format": target}}]
    rendered = renderer.render(imagegen.jpeg(64, 48), operations)
    assert rendered.format == target
    assert rendered.path.suffix == SAVERS[target].suffix
    assert rendered.path.name.startswith("out-")
    decoded = decode(rendered.path.read_bytes())
    assert decoded.get("vips-loader") == imagegen.LOADER_OF_FORMAT[target]
    expected = imagegen.picture(64, 48)
    if CHAINS[chain]:
        expected = expected.resize(0.5, kernel="linear")
    assert (decoded.width, decoded.height) == (expected.width, expected.height)
    # GIF quantises to a palette and AVIF is lossy at a low default quality: looser, but the same picture.
    tolerance = {"gif": 10, "avif": 10}.get(target, 5)
    assert mean_difference(decoded[0:3], expected) < tolerance


@pytest.mark.parametrize(
    ("make", "input_format", "expected"),
    [
        (lambda: imagegen.jpeg(64, 48), "jpeg", "jpeg"),
        (lambda: imagegen.png(64, 48), "png", "png"),
        (lambda: imagegen.webp(64, 48), "webp", "webp"),
        (lambda: imagegen.gif(64, 48), "gif", "gif"),
        (lambda: imagegen.tiff(64, 48), "tiff", "tiff"),
    ],
    ids=["jpeg", "png", "webp", "gif", "tiff"],
)
def test_without_convert_the_input_format_is_kept(
    renderer: Renderer, make: Any, input_format: str, expected: str
) -> None:
    rendered = renderer.render(make(), [], input_format)
    assert rendered.format == expected


def test_heif_input_without_convert_becomes_jpeg(renderer: Renderer) -> None:
    if not imagegen.can_save_avif():
        pytest.skip("this libvips build has no AV1 encoder")
    # An AVIF recorded as "heif" (the HEIC brand family): libvips has no HEIC saver in this build.
    rendered = renderer.render(imagegen.avif(64, 48), [], "heif")
    assert rendered.format == "jpeg"


# --- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
@pytest.mark.parametrize("target", ["jpeg", "png", "tiff"])
def test_truncated_jpeg_is_corrupt_image(renderer: Renderer, chain: str, target: str, tmp_path: Path) -> None:
    operations = [*CHAINS[chain], {"type": "convert", "params": {"format": target}}]
    with pytest.raises(ProcessingError) as caught:
        renderer.render(imagegen.truncated_jpeg(640, 480), operations)
    assert caught.value.code == "corrupt_image"
    assert caught.value.message
    assert str(tmp_path) not in caught.value.message
    assert not list(tmp_path.glob("out-*")), "a failed render left a partial output behind"


def test_not_an_image_is_a_processing_error(renderer: Renderer) -> None:
    with pytest.raises(ProcessingError) as caught:
        renderer.render(imagegen.text_as_jpeg())
    assert caught.value.code == "unsupported_format"


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
def test_kill_switch_fired_before_save_is_a_timeout(renderer: Renderer, chain: str, tmp_path: Path) -> None:
    kill_switch = KillSwitch()
    kill_switch.fire()
    with pytest.raises(ProcessingError) as caught:
        renderer.render(imagegen.jpeg(256, 192), CHAINS[chain], kill_switch=kill_switch)
    assert caught.value.code == "timeout"
    assert not list(tmp_path.glob("out-*"))


# Steps that read every pixel of their input while the chain is built, before the save runs.
PASSES_BEFORE_SAVE: dict[str, list[dict[str, Any]]] = {
    "enhance measures": [{"type": "enhance", "params": {}}],
    "smart crop looks": [{"type": "smart_crop", "params": {"width": 64, "height": 64}}],
    "turn after shrink-on-load holds": [
        {"type": "resize", "params": {"width": 128}},
        {"type": "rotate", "params": {"angle": 90}},
    ],
}


@pytest.mark.parametrize("chain", list(PASSES_BEFORE_SAVE), ids=str)
def test_kill_switch_stops_passes_over_the_pixels_before_the_save(
    renderer: Renderer, chain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job past its time limit stops at once, not after a full-size pass that nobody will use."""
    finished: list[str] = []
    call = pyvips.Operation.call

    def spied_call(name: str, *args: Any, **kwargs: Any) -> Any:
        result = call(name, *args, **kwargs)
        finished.append(name)
        return result

    monkeypatch.setattr(pyvips.Operation, "call", staticmethod(spied_call))
    held = record_held_pictures(monkeypatch)
    kill_switch = KillSwitch()
    kill_switch.fire()
    with pytest.raises(ProcessingError) as caught:
        renderer.render(imagegen.jpeg(512, 384), PASSES_BEFORE_SAVE[chain], kill_switch=kill_switch)
    assert caught.value.code == "timeout"
    assert held == [] and "smartcrop" not in finished


def test_stacked_area_filters_each_read_a_held_picture(
    renderer: Renderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a held copy between them, each area filter recomputes the one before for every tile's
    margin: three blurs of sigma 100 on an 8 MP photo took 12 s and a chain of 32 took gigabytes."""
    held = record_held_pictures(monkeypatch)
    blurs = [{"type": "blur", "params": {"sigma": 3}}] * 3
    chain = [{"type": "resize", "params": {"width": 128}}, *blurs, {"type": "adjust", "params": {}}]
    rendered = renderer.render(imagegen.jpeg(256, 192), chain)
    assert (rendered.width, rendered.height) == (128, 96)
    assert held == [(128, 96), (128, 96)]


def test_kill_switch_left_alone_changes_nothing(renderer: Renderer) -> None:
    kill_switch = KillSwitch()
    rendered = renderer.render(imagegen.jpeg(64, 48), RESIZE_FIRST, kill_switch=kill_switch)
    assert (rendered.width, rendered.height) == (32, 24)
    assert not kill_switch.fired


def live_images() -> int:
    return sum(1 for thing in gc.get_objects() if isinstance(thing, pyvips.Image))


@pytest.mark.parametrize("outcome", ["completed", "corrupt", "killed"])
def test_render_leaves_no_image_for_the_garbage_collector(renderer: Renderer, outcome: str) -> None:
    """Images are freed when render returns or raises, not by a later collection in whatever thread
    (a libvips loader finalised inside a libvips log callback can abort the process)."""
    data = imagegen.truncated_jpeg(640, 480) if outcome == "corrupt" else imagegen.jpeg(256, 192)
    kill_switch = KillSwitch()
    if outcome == "killed":
        kill_switch.fire()
    gc.collect()
    gc.disable()
    try:
        before = live_images()
        try:
            renderer.render(data, RESIZE_LATER, kill_switch=kill_switch)
        except ProcessingError as exc:
            assert outcome != "completed"
            assert exc.__context__ is None and exc.__cause__ is None
        else:
            assert outcome == "completed"
        assert live_images() == before
    finally:
        gc.enable()


def fine_ramp_png() -> bytes:
    """A 16-bit PNG whose levels step by 3 (of 65535): detail no 8-bit image can hold."""
    ramp = (pyvips.Image.xyz(256, 8)[0] * 3 + 1000).cast("ushort")
    return bytes(ramp.bandjoin([ramp, ramp]).copy(interpretation="rgb16").write_to_buffer(".png"))


@pytest.mark.parametrize("chain_start", [[], [{"type": "resize", "params": {"width": 128}}]])
def test_16_bit_sources_keep_their_detail_when_16_bit_output_is_asked(
    renderer: Renderer, chain_start: list[dict[str, Any]]
) -> None:
    deep = renderer.run(
        fine_ramp_png(),
        [*chain_start, {"type": "convert", "params": {"format": "png", "bit_depth": 16}}],
        "png",
    )
    assert deep.format == "ushort"
    row = deep[0].crop(0, 0, deep.width, 1)
    levels = {int(row.getpoint(x, 0)[0]) for x in range(row.width)}
    assert len(levels) > deep.width // 2, "neighbouring columns keep levels of their own"
    assert any(level % 257 for level in levels), "not 8-bit levels scaled up"
    shallow = renderer.run(
        fine_ramp_png(), [*chain_start, {"type": "convert", "params": {"format": "png"}}], "png"
    )
    assert shallow.format == "uchar"


def frames_of(rendered: RenderedImage) -> int:
    image = pyvips.Image.new_from_file(str(rendered.path), n=-1)
    return int(image.height // image.get("page-height")) if image.get_typeof("page-height") else 1


@pytest.mark.parametrize("output", ["gif", "webp"])
@pytest.mark.parametrize("chain_start", [[], [{"type": "resize", "params": {"width": 32}}]])
def test_animated_output_keeps_every_frame(
    renderer: Renderer, output: str, chain_start: list[dict[str, Any]]
) -> None:
    animation = imagegen.gif(64, 48, pages=5)
    convert = {"type": "convert", "params": {"format": output, "animated": True}}
    rendered = renderer.render(animation, [*chain_start, convert], "gif")
    assert frames_of(rendered) == 5
    assert rendered.width == (32 if chain_start else 64)
    first_only = renderer.render(
        animation, [*chain_start, {"type": "convert", "params": {"format": output}}], "gif"
    )
    assert frames_of(first_only) == 1


def test_an_animation_over_the_frame_limit_fails_cleanly(
    renderer: Renderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobs.pipeline.MAX_FRAMES", 3)
    with pytest.raises(ProcessingError) as caught:
        renderer.render(
            imagegen.gif(16, 12, pages=5),
            [{"type": "convert", "params": {"format": "gif", "animated": True}}],
            "gif",
        )
    assert caught.value.code == "too_many_frames"
    # The first frame alone is always within the limit.
    assert frames_of(renderer.render(imagegen.gif(16, 12, pages=5), [], "gif")) == 1


@pytest.mark.parametrize(
    ("chain", "field"),
    [
        ([{"type": "rotate", "params": {"angle": 90}}], "operations[0].type"),
        ([{"type": "resize", "params": {"width": 8}}, {"type": "sharpen"}], "operations[1].type"),
        ([{"type": "resize", "params": {"width": 8, "height": 8, "fit": "cover"}}], "operations[0].type"),
    ],
)
def test_animated_output_refuses_steps_that_would_cut_across_frames(
    chain: list[dict[str, Any]], field: str
) -> None:
    convert = {"type": "convert", "params": {"format": "webp", "animated": True}}
    with pytest.raises(ValidationFailed) as caught:
        parse_operations([*chain, convert])
    assert [error.field for error in caught.value.errors] == [field]
    with pytest.raises(ValidationFailed):
        parse_operations([{"type": "convert", "params": {"format": "png", "animated": True}}])
