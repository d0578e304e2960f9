"""Every mode PIL gives for PNG and TIFF files decodes to the right 8-bit RGB, or is refused naming the file."""
import numpy as np
import pytest
import torch
from PIL import Image

from unikd.data.images import load_image
from unikd.errors import DatasetError

RAMP8 = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)  # 0, 16, ..., 240
RAMP16 = RAMP8.astype(np.uint16) * 257  # the same grey levels in 16 bits


def saved(tmp_path, img: Image.Image, fmt: str):
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, format=fmt)
    with Image.open(path) as check:
        return path, check.mode


EIGHT_BIT = {  # mode: how the 8-bit grey ramp reads back (as the R channel)
    "L": RAMP8, "LA": RAMP8, "P": RAMP8, "RGB": RAMP8, "RGBA": RAMP8,
    "1": np.asarray(Image.fromarray(RAMP8).convert("1"), dtype=np.uint8) * 255,  # PIL dithers to 0/1
}


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("mode", sorted(EIGHT_BIT))
def test_eight_bit_modes(tmp_path, fmt, mode):
    path, read_mode = saved(tmp_path, Image.fromarray(RAMP8).convert(mode), fmt)
    assert read_mode == mode
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 4)
    assert np.array_equal(image[0].numpy(), EIGHT_BIT[mode])


@pytest.mark.parametrize("mode", ["PA", "CMYK", "YCbCr", "LAB"])
def test_tiff_only_modes_convert_to_rgb(tmp_path, mode):
    path, read_mode = saved(tmp_path, Image.fromarray(RAMP8).convert("RGB").convert(mode), "TIFF")
    assert read_mode == mode
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"))
    image = load_image(path)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    assert len(np.unique(expected)) > 4  # grey levels survive (not binarised)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_binarised(tmp_path, fmt):
    path, mode = saved(tmp_path, Image.fromarray(RAMP16), fmt)
    assert mode == "I;16"
    image = load_image(path)
    assert np.array_equal(image[0].numpy(), RAMP8) and torch.equal(image[0], image[2])


def test_sixteen_bit_big_endian_tiff(tmp_path):
    path = tmp_path / "be.tiff"
    Image.frombytes("I;16B", (4, 4), RAMP16.astype(">u2").tobytes()).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16B"
    assert np.array_equal(load_image(path)[0].numpy(), RAMP8)


def test_thirty_two_bit_integer_tiff(tmp_path):
    path, mode = saved(tmp_path, Image.fromarray(RAMP16.astype(np.int32)), "TIFF")
    assert mode == "I"
    assert np.array_equal(load_image(path)[0].numpy(), RAMP8)
    path, _ = saved(tmp_path, Image.fromarray(np.full((4, 4), 70000, np.int32)), "TIFF")
    with pytest.raises(DatasetError, match=rf"{path}: I image with values in \[70000, 70000\]"):
        load_image(path)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    path, mode = saved(tmp_path, Image.fromarray(RAMP8.astype(np.float32) / 255), "TIFF")
    assert mode == "F"
    assert np.array_equal(load_image(path)[0].numpy(), RAMP8)  # not 0/1


@pytest.mark.parametrize("value", [2.0, -0.5, float("nan")])
def test_float_tiff_outside_unit_range_is_refused(tmp_path, value):
    pixels = np.zeros((4, 4), np.float32)
    pixels[1, 2] = value
    path, _ = saved(tmp_path, Image.fromarray(pixels), "TIFF")
    with pytest.raises(DatasetError, match=f"{path}: float image with values in"):
        load_image(path)


def png_rgb16(path, pixels: np.ndarray) -> None:
    """Write uint16 [H, W, 3] as a 48-bit RGB PNG (PIL cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_sixteen_bit_rgb_png_is_scaled(tmp_path):
    path = tmp_path / "rgb16.png"
    png_rgb16(path, np.stack([RAMP16, RAMP16[::-1], np.full_like(RAMP16, 65535)], axis=2))
    with Image.open(path) as check:
        assert check.mode == "RGB"
    image = load_image(path)
    assert np.array_equal(image[0].numpy(), RAMP8) and np.array_equal(image[1].numpy(), RAMP8[::-1])
    assert (image[2] == 255).all()
