"""Image input: the one preprocessing definition against an independent computation, and every bad input.

Images are made here (PIL encoders, or PNG bytes written by hand with zlib so the header says exactly what the
test needs); nothing is read from disk or the network.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from zfserve.config import IMAGENET_MEAN_RGB, ModelConfig, PreprocessConfig
from zfserve.errors import (CorruptImageError, ImageError, ImageSizeError, InvalidArgumentError,
                            UnsupportedImageFormatError)
from zfserve.preprocess import decode_image, load_image, load_images, to_display

MEAN = np.asarray(IMAGENET_MEAN_RGB, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ helpers
def encode(image, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written byte by byte: IHDR (valid CRC), one IDAT of filter-0 ``rows`` (or a token one), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png16(values: np.ndarray) -> bytes:
    """uint16 (H, W) grayscale or (H, W, 3) RGB -> 16-bit PNG, big-endian samples as the format requires."""
    colour_type = 0 if values.ndim == 2 else 2
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return handmade_png(values.shape[1], values.shape[0], 16, colour_type, rows)


def reference_input(rgb: np.ndarray, resize: int = 256, crop: int = 224, mean=MEAN) -> np.ndarray:
    """Independent preprocessing: PIL bilinear resize of the short side, numpy centre crop, mean subtraction."""
    h, w = rgb.shape[:2]
    if h <= w:
        new_h, new_w = resize, int(round(w * resize / h))
    else:
        new_h, new_w = int(round(h * resize / w)), resize
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = rgb[top:top + crop, left:left + crop].astype(np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    mean = mean.reshape(1, 1, 3) if mean.ndim == 1 else mean.transpose(1, 2, 0)
    return (cropped - mean).transpose(2, 0, 1)


def smooth_image(rng, h: int, w: int) -> np.ndarray:
    """Random but spatially smooth uint8 RGB: survives lossy codecs with small errors."""
    coarse = rng.integers(0, 256, size=(h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def blocky_image(rng, h: int, w: int, block: int = 16) -> np.ndarray:
    """Asymmetric solid 16x16 blocks aligned to the JPEG grid: lossless enough to compare orientations."""
    blocks = rng.integers(0, 256, size=(h // block, w // block, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)


@pytest.fixture
def rgb(np_rng):
    return np_rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (256, 256), (240, 1000), (50, 60), (256, 257)])
def test_matches_an_independent_computation(np_rng, shape):
    image = np_rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    out = load_image(encode(image, "PNG"))
    assert out.dtype == np.float32 and out.shape == (3, 224, 224)
    np.testing.assert_allclose(out, reference_input(image), rtol=0, atol=1e-4)


def test_sources_agree(tmp_path, rgb):
    data = encode(rgb, "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = load_image(data)
    for source in (bytearray(data), memoryview(data), str(path), path, rgb, np.asfortranarray(rgb)):
        np.testing.assert_array_equal(load_image(source), expected)


def test_config_forms_agree(rgb, tiny_model):
    data = encode(rgb, "PNG")
    expected = load_image(data)
    for config in (None, PreprocessConfig(), ModelConfig(), tiny_model.config, tiny_model):
        np.testing.assert_array_equal(load_image(data, config), expected)
    with pytest.raises(TypeError):
        load_image(data, config="imagenet")


def test_custom_sizes_and_mean(rgb):
    config = PreprocessConfig(resize=160, crop=128, mean=(10.0, 20.0, 30.0))
    out = load_image(encode(rgb, "PNG"), config)
    np.testing.assert_allclose(out, reference_input(rgb, 160, 128, (10, 20, 30)), atol=1e-4)


def test_mean_image_is_cropped_like_the_input(rgb, np_rng):
    mean_image = np_rng.uniform(0, 255, size=(3, 256, 256)).astype(np.float32)
    config = PreprocessConfig(mean="image", mean_image=mean_image)
    out = load_image(encode(rgb, "PNG"), config)
    np.testing.assert_allclose(out, reference_input(rgb, mean=mean_image[:, 16:240, 16:240]), atol=1e-4)


def test_to_display_inverts_the_mean_subtraction(np_rng):
    image = np_rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_display(load_image(image)), image[16:240, 16:240])


def test_batch_form_and_its_errors(np_rng):
    images = [np_rng.integers(0, 256, size=(64 + 10 * i, 80, 3), dtype=np.uint8) for i in range(3)]
    batch = load_images([encode(im, "PNG") for im in images])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_allclose(batch[i], reference_input(image), atol=1e-4)
    with pytest.raises(CorruptImageError) as info:
        load_images([encode(images[0], "PNG"), b"not an image"])
    assert info.value.field == "images[1]" and "images[1]" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        load_images([])


# ------------------------------------------------------------------------------------------------ arrays
def test_uint8_array_layouts(np_rng):
    gray = np_rng.integers(0, 256, size=(64, 96), dtype=np.uint8)
    expected = reference_input(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_allclose(load_image(gray), expected, atol=1e-4)
    np.testing.assert_allclose(load_image(gray[:, :, None]), expected, atol=1e-4)


def test_rgba_array_is_composited_like_an_rgba_png(np_rng):
    rgba = np_rng.integers(0, 256, size=(64, 96, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgba), load_image(encode(rgba, "PNG")))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, np.int8, bool])
def test_wrong_array_dtypes(dtype):
    with pytest.raises(InvalidArgumentError) as info:
        load_image(np.ones((64, 64, 3), dtype=dtype))
    assert "uint8" in str(info.value) and info.value.field == "image"


@pytest.mark.parametrize("shape", [(64, 64, 2), (3, 224, 224), (64,), (2, 64, 64, 3), (64, 64, 5)])
def test_wrong_array_shapes(shape):
    with pytest.raises(InvalidArgumentError, match=r"\(H, W"):
        load_image(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("source", [None, 42, [1, 2, 3], 3.5])
def test_wrong_source_types(source):
    with pytest.raises(InvalidArgumentError, match="bytes, a path or a uint8 array"):
        load_image(source)


def test_missing_path_and_directory(tmp_path):
    for path in (tmp_path / "absent.png", tmp_path):
        with pytest.raises(InvalidArgumentError, match="no such file"):
            load_image(path)


# ------------------------------------------------------------------------------------------------ bad bytes
def test_empty_bytes(tmp_path):
    with pytest.raises(CorruptImageError, match="empty"):
        load_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


@pytest.mark.parametrize("size", [1, 7, 100, 10_000])
def test_random_bytes(np_rng, size):
    data = np_rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    with pytest.raises(CorruptImageError) as info:
        load_image(data)
    assert "JPEG, PNG or WebP" in str(info.value)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.95])
def test_truncated_jpeg(np_rng, fraction):
    data = encode(smooth_image(np_rng, 240, 320), "JPEG", quality=90)
    with pytest.raises(CorruptImageError):
        load_image(data[:int(len(data) * fraction)])


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_png(rgb, fraction):
    data = encode(rgb, "PNG")
    with pytest.raises(CorruptImageError):
        load_image(data[:int(len(data) * fraction)])


def test_corrupt_png_crc(rgb):
    data = bytearray(encode(rgb, "PNG"))
    data[29] ^= 0xFF  # IHDR's CRC no longer matches
    with pytest.raises(CorruptImageError):
        load_image(bytes(data))


def test_png_header_claiming_100000_by_100000_is_rejected_before_decoding():
    data = handmade_png(100_000, 100_000, 8, 2)
    assert len(data) < 100  # nothing to decode: the header alone must be enough to refuse
    with pytest.raises(ImageSizeError) as info:
        load_image(data)
    assert "40000000" in str(info.value)


def test_pixel_limit_below_pillows_own():
    # 48 MP: under Pillow's decompression-bomb threshold, over ours (40 MP).
    with pytest.raises(ImageSizeError, match="8000x6000"):
        load_image(handmade_png(8000, 6000, 8, 2))


def test_configurable_pixel_limit(rgb):
    data = encode(rgb, "PNG")
    with pytest.raises(ImageSizeError, match="at most 100000 pixels"):
        load_image(data, max_pixels=100_000)
    with pytest.raises(ImageSizeError, match="at most 100000 pixels"):
        load_image(rgb, max_pixels=100_000)
    assert load_image(data, max_pixels=120_000).shape == (3, 224, 224)


def test_byte_limit(rgb):
    data = encode(rgb, "PNG")
    with pytest.raises(ImageSizeError, match="bytes"):
        load_image(data, max_bytes=len(data) - 1)


def gif_bytes(np_rng, frames: int) -> bytes:
    images = [Image.fromarray(np_rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)) for _ in range(frames)]
    return encode(images[0], "GIF", save_all=frames > 1, append_images=images[1:], duration=50, loop=0)


@pytest.mark.parametrize("frames", [1, 3])
def test_gif_is_not_accepted(np_rng, frames):
    with pytest.raises(UnsupportedImageFormatError) as info:
        load_image(gif_bytes(np_rng, frames))
    assert "GIF" in str(info.value) and "JPEG, PNG, WebP" in str(info.value)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_tiff_and_bmp_are_not_accepted(rgb, fmt):
    with pytest.raises(UnsupportedImageFormatError) as info:
        load_image(encode(rgb, fmt))
    assert fmt in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_1x1_image(fmt):
    with pytest.raises(ImageSizeError, match="at least 32"):
        load_image(encode(np.full((1, 1, 3), 200, np.uint8), fmt))


def test_minimum_side_edges(np_rng):
    with pytest.raises(ImageSizeError, match="31x100"):
        load_image(encode(np_rng.integers(0, 256, size=(100, 31, 3), dtype=np.uint8), "PNG"))
    with pytest.raises(ImageSizeError):
        load_image(np.zeros((1, 1, 3), np.uint8))
    assert load_image(encode(np_rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "PNG")).shape == \
        (3, 224, 224)


def test_every_rejection_is_an_image_error_with_a_field(np_rng):
    cases = [b"", b"\x89PNG\r\n\x1a\n", gif_bytes(np_rng, 2), handmade_png(100_000, 100_000, 8, 2)]
    for data in cases:
        with pytest.raises(ImageError) as info:
            load_image(data, field="request.image")
        assert info.value.field == "request.image" and str(info.value).startswith("request.image:")


# ------------------------------------------------------------------------------------------------ modes
def test_16bit_grayscale_png_is_scaled_not_clipped(np_rng):
    values = np_rng.integers(0, 65536, size=(48, 64), dtype=np.uint16)
    values[0, :4] = (0, 257, 32896, 65535)
    expected = np.rint(values / 257.0).astype(np.uint8)
    for data in (png16(values), encode(values, "PNG")):  # hand-written and Pillow-written
        decoded = decode_image(data)
        np.testing.assert_array_equal(decoded[:, :, 0], expected)
        np.testing.assert_array_equal(decoded[:, :, 1], decoded[:, :, 2])
    assert 100 < decoded.mean() < 155  # clipping at 255 would give a nearly white image


def test_16bit_rgb_png_is_scaled_not_clipped(np_rng):
    values = np_rng.integers(0, 65536, size=(40, 48, 3), dtype=np.uint16)
    decoded = decode_image(png16(values))
    assert np.abs(decoded.astype(np.float64) - values / 257.0).max() <= 1.0


def test_grayscale_png(np_rng):
    gray = np_rng.integers(0, 256, size=(120, 90), dtype=np.uint8)
    out = load_image(encode(Image.fromarray(gray, "L"), "PNG"))
    np.testing.assert_allclose(out, reference_input(np.repeat(gray[:, :, None], 3, axis=2)), atol=1e-4)


def test_cmyk_jpeg(np_rng):
    image = smooth_image(np_rng, 96, 128)
    data = encode(Image.fromarray(image).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.shape == (96, 128, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).mean() < 4


def test_rgba_png_is_composited_on_the_mean(np_rng):
    h, w = 256, 300
    rgba = np_rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    rgba[:, :150, 3] = 0      # left: fully transparent over random colours
    rgba[:, 150:, 3] = np.where(np.arange(h)[:, None] < 128, 255, rgba[:, 150:, 3])  # top right opaque
    decoded = decode_image(encode(rgba, "PNG"))
    alpha = rgba[:, :, 3:4] / 255.0
    expected = rgba[:, :, :3] * alpha + MEAN * (1 - alpha)
    assert np.abs(decoded - expected).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(decoded[:128, 150:], rgba[:128, 150:, :3])
    # Where the image was transparent, the network input is ~0 (the mean, up to uint8 rounding).
    out = load_image(encode(rgba, "PNG"))
    transparent = out[:, :, :100]  # crop starts at x=38; x < 138 stayed transparent after resizing
    assert np.abs(transparent).max() <= 0.5


def test_gray_alpha_png(np_rng):
    la = np_rng.integers(0, 256, size=(64, 64, 2), dtype=np.uint8)
    la[:32, :, 1] = 0
    decoded = decode_image(encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(decoded[:32], np.broadcast_to(np.rint(MEAN), (32, 64, 3)).astype(np.uint8))


def test_palette_png_with_and_without_transparency(np_rng):
    palette = np_rng.integers(0, 256, size=(16, 3), dtype=np.uint8)
    indices = np_rng.integers(0, 16, size=(64, 80), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.ravel().tolist())
    np.testing.assert_array_equal(decode_image(encode(image, "PNG")), palette[indices])
    decoded = decode_image(encode(image, "PNG", transparency=3))
    expected = palette[indices].copy()
    expected[indices == 3] = np.rint(MEAN).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)


# EXIF orientation tag value -> the stored pixels of an image a viewer shows as ``a`` (each of these
# transforms is what the tag tells the viewer to undo).
STORED_FOR_ORIENTATION = {
    2: lambda a: a[:, ::-1],                             # mirrored left-right
    3: lambda a: np.rot90(a, 2),                         # upside down
    4: lambda a: a[::-1],                                # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),                   # transposed
    6: lambda a: np.rot90(a, 1),                         # viewer turns it 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),       # transverse (anti-diagonal mirror)
    8: lambda a: np.rot90(a, -1),                        # viewer turns it 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(np_rng, orientation, fmt):
    shown = blocky_image(np_rng, 64, 96)  # what a viewer displays: 96 wide, 64 high, asymmetric
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](shown))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    decoded = decode_image(encode(stored, fmt, exif=exif.tobytes(), **options)).astype(int)
    assert decoded.shape == shown.shape
    error = np.abs(decoded - shown).mean()
    assert error < 3
    # Every wrong arrangement of the same shape is far away, so the check above is not luck.
    for wrong in (shown[:, ::-1], shown[::-1], shown[::-1, ::-1]):
        assert np.abs(decoded - wrong).mean() > 30


def test_exif_rotated_jpeg_through_the_whole_pipeline(np_rng):
    shown = blocky_image(np_rng, 256, 320)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(np.ascontiguousarray(np.rot90(shown, 1)), "JPEG", exif=exif.tobytes(), quality=95,
                  subsampling=0)
    out = load_image(data)
    assert np.abs(out - reference_input(shown)).mean() < 3


def test_webp_lossless_and_lossy(np_rng):
    image = smooth_image(np_rng, 200, 260)
    np.testing.assert_array_equal(decode_image(encode(image, "WEBP", lossless=True)), image)
    lossy = decode_image(encode(image, "WEBP", quality=90))
    assert np.abs(lossy.astype(int) - image).mean() < 4
    np.testing.assert_allclose(load_image(encode(image, "WEBP", lossless=True)), reference_input(image),
                               atol=1e-4)


@pytest.mark.parametrize("fmt, options", [("WEBP", {"lossless": True}), ("PNG", {})])
def test_animations_use_the_first_frame(np_rng, fmt, options):
    frames = [np_rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    data = encode(Image.fromarray(frames[0]), fmt, save_all=True,
                  append_images=[Image.fromarray(f) for f in frames[1:]], duration=40, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    np.testing.assert_array_equal(decode_image(data), frames[0])
    with pytest.raises(ImageSizeError, match="3 frames"):
        decode_image(data, max_frames=2)


def test_colour_key_transparency_in_rgb_and_gray_png(np_rng):
    rgb = np_rng.integers(0, 250, size=(48, 64, 3), dtype=np.uint8)
    rgb[:10] = (255, 0, 255)  # the keyed colour: transparent
    decoded = decode_image(encode(rgb, "PNG", transparency=(255, 0, 255)))
    np.testing.assert_array_equal(decoded[:10], np.broadcast_to(np.rint(MEAN), (10, 64, 3)).astype(np.uint8))
    np.testing.assert_array_equal(decoded[10:], rgb[10:])
    gray = np_rng.integers(0, 250, size=(48, 64), dtype=np.uint8)
    gray[:, :5] = 255
    decoded = decode_image(encode(Image.fromarray(gray, "L"), "PNG", transparency=255))
    np.testing.assert_array_equal(decoded[:, :5], np.broadcast_to(np.rint(MEAN), (48, 5, 3)).astype(np.uint8))
    np.testing.assert_array_equal(decoded[:, 5:, 0], gray[:, 5:])


@pytest.mark.filterwarnings("ignore:.*EXIF:UserWarning", "ignore:.*(Truncated File Read|Skipping tag):UserWarning")
def test_damaged_files_never_escape_as_other_exceptions(np_rng):
    """Seeded byte flips in every accepted format (EXIF and animations included): decoded or an ImageError."""
    image = smooth_image(np_rng, 40, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a description long enough to be stored out of line"
    frames = [Image.fromarray(image)] * 2
    seeds = [encode(image, "JPEG", exif=exif.tobytes()), encode(image, "PNG", exif=exif.tobytes()),
             encode(image, "WEBP", exif=exif.tobytes()), encode(image, "WEBP", lossless=True),
             encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
             encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])]
    outcomes = {"decoded": 0, "rejected": 0}
    for i in range(240):
        data = bytearray(seeds[i % len(seeds)])
        for position in np_rng.integers(0, len(data), size=int(np_rng.integers(1, 6))):
            data[position] = int(np_rng.integers(0, 256))
        try:
            decode_image(bytes(data))
            outcomes["decoded"] += 1
        except ImageError:
            outcomes["rejected"] += 1
    assert outcomes["decoded"] > 0 and outcomes["rejected"] > 0


def test_very_long_images_use_their_centre_and_stay_small(np_rng):
    # 40 x 6000: the centre 640 rows (16:1) hold every pixel the centre crop needs; with these sizes the
    # crop's grid lines up exactly, so the result equals resizing the whole strip.
    strip = np_rng.integers(0, 256, size=(6000, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(load_image(strip), reference_input(strip), atol=1e-4)
    # 32 x 200,000 would be 256 x 1,600,000 (1.2 GB) if resized whole.
    thin = np.broadcast_to(np_rng.integers(0, 256, size=(32, 1, 3), dtype=np.uint8), (32, 200_000, 3))
    assert load_image(np.ascontiguousarray(thin)).shape == (3, 224, 224)
