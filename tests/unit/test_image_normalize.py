import io

import numpy as np
import pytest
from PIL import Image

from denseforge.pipeline.demo import load_photo, odd_variants
from denseforge.stages.image_normalize import ImageNormalizer, ImageRejected

from ..conftest import jpeg_bytes


@pytest.fixture(scope="module")
def coffee():
    return load_photo("coffee").convert("RGB")  # 600x400 landscape


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return img


@pytest.mark.parametrize("variant", sorted(odd_variants(Image.new("RGB", (60, 40))).keys()))
def test_odd_but_valid_images_become_upright_rgb(coffee, variant):
    source = coffee.resize((300, 200))
    data = odd_variants(source)[variant]
    out = ImageNormalizer(resize_mode="no").normalize(data)
    img = decode(out.data)
    assert img.mode == "RGB"
    assert (out.width, out.height) == (300, 200) == img.size  # landscape stays landscape, rotation undone
    if variant in ("exif_rotated.jpg", "photo.webp", "cmyk.jpg", "animated.gif"):
        # content matches the upright source, not a rotated/mirrored one
        diff = np.abs(np.asarray(img, dtype=float) - np.asarray(source, dtype=float)).mean()
        assert diff < 25, diff


def test_alpha_is_flattened_on_white():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    img = decode(ImageNormalizer(resize_mode="no").normalize(out.getvalue()).data)
    assert np.asarray(img).min() > 240


def test_16_bit_keeps_its_range():
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    img = np.asarray(decode(ImageNormalizer(resize_mode="no").normalize(out.getvalue()).data).convert("L"))
    assert img.min() < 10 and img.max() > 245


def test_resize_modes(coffee):
    data = jpeg_bytes(coffee)
    keep = ImageNormalizer(image_size=200, resize_mode="keep_ratio").normalize(data)
    assert (keep.width, keep.height) == (300, 200) and (keep.original_width, keep.original_height) == (600, 400)
    largest = ImageNormalizer(image_size=300, resize_mode="keep_ratio_largest").normalize(data)
    assert (largest.width, largest.height) == (300, 200)
    crop = ImageNormalizer(image_size=128, resize_mode="center_crop").normalize(data)
    assert (crop.width, crop.height) == (128, 128)
    small = ImageNormalizer(image_size=1000, resize_mode="keep_ratio").normalize(data)
    assert (small.width, small.height) == (600, 400)  # resize_only_if_bigger


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # tiny file, 400 Mpx
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ImageRejected) as err:
        ImageNormalizer().normalize(bomb.getvalue())
    assert err.value.reason == "decompression_bomb"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not_an_image"),
        (b"<!doctype html><html><body>hi</body></html>", "not_an_image"),
        (b"%PDF-1.4 not an image at all", "not_an_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not_an_image"),  # a JPEG magic number on junk
    ],
)
def test_hostile_bytes_get_a_reason(data, reason):
    with pytest.raises(ImageRejected) as err:
        ImageNormalizer().normalize(data)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected(coffee):
    data = jpeg_bytes(coffee)
    with pytest.raises(ImageRejected) as err:
        ImageNormalizer().normalize(data[: len(data) // 2])
    assert err.value.reason == "truncated"


def test_size_and_aspect_limits(coffee):
    with pytest.raises(ImageRejected, match="too_small"):
        ImageNormalizer(min_image_size=448).normalize(jpeg_bytes(coffee))
    strip = jpeg_bytes(Image.new("RGB", (2000, 50)))
    with pytest.raises(ImageRejected, match="bad_aspect_ratio"):
        ImageNormalizer(max_aspect_ratio=10).normalize(strip)


def test_other_formats_are_not_decoded():
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="ICO")
    with pytest.raises(ImageRejected, match="not_an_image"):
        ImageNormalizer().normalize(out.getvalue())


def test_a_patched_image_open_does_not_turn_junk_into_a_crash(monkeypatch):
    # ultralytics replaces PIL.Image.open; on unidentified bytes it imports pi_heif, which may be absent
    from PIL import Image as PilImage

    original = PilImage.open

    def patched(fp, *args, **kwargs):
        try:
            return original(fp, *args, **kwargs)
        except PilImage.UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'pi_heif'") from None

    monkeypatch.setattr(PilImage, "open", patched)
    with pytest.raises(ImageRejected, match="not_an_image"):
        ImageNormalizer().normalize(b"<!doctype html>")
    assert ImageNormalizer(resize_mode="no").normalize(jpeg_bytes(Image.new("RGB", (8, 8)))).width == 8
