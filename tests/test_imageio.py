"""models.imageio: every odd image a person may hand us decodes to the right RGB picture, or
fails with a one-line reason."""
import io

import numpy as np
import pytest
from PIL import Image

from models.imageio import ImageError, RGBImage, open_image
from tests.photoset import exif_rotated_jpeg, save_as


def _png_bytes(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif_rotated_jpeg(im, tmp_path / "r.jpg")
    assert Image.open(tmp_path / "r.jpg").size == (20, 40)  # stored sideways
    out = open_image(tmp_path / "r.jpg")
    assert out.size == (40, 20)
    assert out.getpixel((2, 10))[0] > 200 and out.getpixel((2, 10))[1] < 80  # red is back on the left


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.frombytes("I;16", a.shape[::-1], a.astype("<u2").tobytes()).save(tmp_path / "g16.png")
    out = np.asarray(open_image(tmp_path / "g16.png"))
    assert out.shape == (64, 64, 3)
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155


def test_cmyk_palette_rgba_and_grey_become_rgb(tmp_path):
    base = Image.new("RGB", (30, 30), (200, 30, 30))
    for mode in ("CMYK", "P", "RGBA", "L", "I;16"):
        path = tmp_path / f"x_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        save_as(base, path, "JPEG" if mode == "CMYK" else "PNG", mode)
        out = open_image(path)
        assert out.mode == "RGB" and out.size == (30, 30), mode


def test_transparency_composites_over_white():
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    out = open_image(_png_bytes(im))
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    r, g, b = open_image(buf.getvalue()).getpixel((8, 8))
    assert r > 200 and b < 50


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am a text file", "not an image"),
])
def test_bad_bytes_have_reasons(data, reason):
    with pytest.raises(ImageError, match=reason):
        open_image(data)


def test_truncated_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 10)).save(buf, "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        open_image(buf.getvalue()[:300])


def test_decompression_bomb_is_refused():
    # 12,000 x 12,000 = 144 MP: tiny on disk (1-bit, all black), huge once decoded.
    bomb = _png_bytes(Image.new("1", (12_000, 12_000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="too large"):
        open_image(bomb)


def test_one_pixel_image_is_fine():
    assert open_image(_png_bytes(Image.new("L", (1, 1), 255))).size == (1, 1)


def test_rgbimage_accepts_path_pil_bytes_array_and_tensor(tmp_path):
    import torch
    im = Image.new("RGB", (8, 6), (1, 2, 3))
    im.save(tmp_path / "a.png")
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), im, _png_bytes(im), np.asarray(im),
                torch.from_numpy(np.array(im)).permute(2, 0, 1)):
        out = RGBImage.create(src)
        assert isinstance(out, RGBImage) and out.size == (8, 6) and out.getpixel((0, 0)) == (1, 2, 3)
