"""models.imageio: every odd image a person may hand us decodes to the right RGB picture, or
fails with a one-line reason."""
import io

import numpy as np
import pytest
from PIL import Image

from models.imageio import ImageError, RGBImage, open_image
from synthetic.photoset import exif_rotated_jpeg, save_as


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


# --------------------------------------------------------------------------- reduced decoding

def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A camera-like picture: gradients, stripes and blotchy noise, so JPEG and resizing do real work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    noise = rng.normal(0, 25, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    a = np.stack([xx / w * 255, yy / h * 255, (xx + yy) % 512 / 2], -1) + noise + 40 * np.sin(xx / 37.0)[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _jpeg_bytes(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _resized(im, s=64):
    return np.asarray(im.resize((s, s), Image.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("encode", [_jpeg_bytes, _png_bytes], ids=["jpeg", "png"])
def test_reduced_decoding_keeps_twice_the_target_and_the_picture(encode):
    im = _photo(1600, 1000)
    data = encode(im)
    reduced = open_image(data, size=64)
    # JPEG: the DCT scale 1/8 (200 x 125) is still >= 2 x 64 in both sides; then no further reduce.
    # PNG: reduce by 7 (1600 // 128, 1000 // 128) -> 229 x 143.
    assert min(reduced.size) >= 128 and reduced.size[0] < 1600
    assert reduced.mode == "RGB"
    diff = np.abs(_resized(reduced) - _resized(open_image(data)))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 12  # the same picture at 64 px


def test_reduced_decoding_leaves_small_images_alone():
    im = _photo(100, 90)
    for data in (_jpeg_bytes(im), _png_bytes(im)):
        assert np.array_equal(np.asarray(open_image(data, size=64)), np.asarray(open_image(data)))


def test_reduced_decoding_applies_exif_rotation_and_keeps_the_margin(tmp_path):
    im = _photo(1200, 400)
    im.paste((255, 0, 0), (0, 0, 100, 400))  # red strip on the left
    exif_rotated_jpeg(im, tmp_path / "r.jpg")
    out = open_image(tmp_path / "r.jpg", size=48)
    assert out.size[0] > out.size[1] and min(out.size) >= 96  # upright again, >= 2 x 48 px
    x, y = out.size[0] // 40, out.size[1] // 2
    r, g, b = out.getpixel((x, y))
    assert r > 180 and g < 100


def test_reduced_decoding_of_cmyk_grey_and_sixteen_bit(tmp_path):
    base = _photo(900, 700)
    for mode, fmt in (("CMYK", "JPEG"), ("L", "JPEG"), ("I;16", "PNG")):
        path = tmp_path / f"x_{mode.replace(';', '')}.{fmt.lower()}"
        save_as(base, path, fmt, mode)
        out = open_image(path, size=32)
        assert out.mode == "RGB" and min(out.size) >= 64 and out.size[0] < 900, mode
        diff = np.abs(_resized(out, 32) - _resized(open_image(path), 32))
        assert diff.mean() < 3.0, mode  # the DCT-scaled decode averages 8x8 blocks: not bit-equal


def test_reduced_decoding_still_refuses_a_bomb_by_its_stored_size():
    bomb = _png_bytes(Image.new("1", (12_000, 12_000)))
    with pytest.raises(ImageError, match="too large"):
        open_image(bomb, size=32)
    # a JPEG header over the limit is refused before any (reduced) decode, too
    big = _jpeg_bytes(Image.new("L", (9000, 8000)))
    with pytest.raises(ImageError, match="too large"):
        open_image(big, size=32)


def test_decoded_images_say_their_full_upright_size(tmp_path):
    from models.imageio import ORIGINAL_SIZE
    im = _photo(1200, 400)
    exif_rotated_jpeg(im, tmp_path / "r.jpg")  # stored 400 x 1200, upright 1200 x 400
    for size in (None, 48):
        out = RGBImage.create(tmp_path / "r.jpg", size=size)
        assert out.info[ORIGINAL_SIZE] == (1200, 400)
        assert (out.size == (1200, 400)) == (size is None)


def test_training_cache_decodes_reduced_and_records_original_sizes(tmp_path):
    from train.data import decode_items
    items = []
    for c, seed in (("a", 1), ("b", 2)):
        (tmp_path / c).mkdir()
        for i in range(5):
            p = tmp_path / c / f"{i}.jpg"
            _photo(1600, 1200, seed * 10 + i).save(p, quality=90)
            items.append(p)
    cache = decode_items([(p, p.parent.name, None) for p in items], 32, "photos", tmp_path, "photos", progress=False)
    assert tuple(cache.images.shape[1:]) == (3, 32, 32)
    assert cache.summary.min_size == (1600, 1200) and cache.summary.max_size == (1600, 1200)
    full = np.stack([np.asarray(open_image(p).resize((32, 32), Image.BILINEAR)) for p in items])
    got = cache.images.permute(0, 2, 3, 1).numpy().astype(np.float32)
    assert np.abs(got - full.astype(np.float32)).mean() < 2.0  # the cache keeps the items' order
