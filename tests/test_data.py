"""data.py: decoding any image mode, folder == zip, cache, split, augmentation, batches, faces,
hostile input (FIFOs, unlisted formats, slivers, zip bombs, unreadable entries, odd names),
and the helpers save_gif and the data fingerprint."""
import contextlib
import errno
import io
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

import data
import models

SIZE = (8, 8)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache: every test gets its own cache folder."""
    monkeypatch.setenv("FACEGEN_CACHE", str(tmp_path / "cache"))


def _solid(mode, size, value):
    return Image.new(mode, size, value)


# Good files: name -> (image writer, the RGB colour every output pixel must have)
def _write_good(root):
    """Solid images in every mode and odd sizes; expected colour after RGB conversion."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    expect = {}

    def put(rel, img, rgb, **kw):
        img.save(root / rel, **kw)
        expect[rel] = rgb

    put("a_rgb.png", _solid("RGB", (50, 37), (200, 30, 60)), (200, 30, 60))
    put("b_rgba_opaque.png", _solid("RGBA", (33, 47), (10, 120, 250, 255)), (10, 120, 250))
    put("c_rgba_clear.png", _solid("RGBA", (20, 20), (0, 0, 0, 0)), (255, 255, 255))  # on white
    put("d_gray.png", _solid("L", (17, 90), 77), (77, 77, 77))
    put("e_gray_alpha.png", _solid("LA", (25, 25), (140, 255)), (140, 140, 140))
    pal = _solid("RGB", (31, 29), (40, 160, 90)).convert("P", palette=Image.Palette.ADAPTIVE)
    put("f_palette.png", pal, (40, 160, 90))
    put("g_16bit.png", Image.fromarray(np.full((21, 23), 32896, np.uint16)), (128, 128, 128))
    put("h_odd.jpg", _solid("RGB", (41, 77), (90, 90, 200)), (90, 90, 200), quality=100)
    put("i_cmyk.jpg", _solid("CMYK", (19, 13), (0, 255, 255, 0)), (255, 0, 0), quality=100)
    put("j.bmp", _solid("RGB", (9, 9), (1, 2, 3)), (1, 2, 3))
    put("k.gif", _solid("RGB", (12, 30), (255, 255, 0)).convert("P"), (255, 255, 0))
    if features.check("webp"):  # a Pillow built without libwebp can neither write nor read it
        put("l.webp", _solid("RGB", (16, 16), (0, 200, 0)), (0, 200, 0), lossless=True)
    put("nested/deeper/m.PNG", _solid("RGB", (64, 64), (9, 99, 199)), (9, 99, 199))
    return expect


def _write_bad(root):
    """A truncated JPEG, a text file named like an image, and a file that is no image at all."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG")
    (root / "nested" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "fake.png").write_text("this is not a png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return {"nested/truncated.jpg", "fake.png"}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "faces"
    expect = _write_good(root)
    bad = _write_bad(root)
    return root, expect, bad


def _zip_of(root, path):
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return path


def test_parse_size():
    assert data.parse_size("64") == (64, 64)
    assert data.parse_size(32) == (32, 32)
    assert data.parse_size("64x48") == (64, 48)
    assert data.parse_size((64, 48)) == (64, 48)
    for bad in ("", "0", "64x", "x48", "-4", "64x48x3", "abc", 0, True, (64, 0), 6.4):
        with pytest.raises(data.UsageError):
            data.parse_size(bad)


def test_folder_loads_every_mode_and_skips_exactly_the_bad_files(folder, capsys):
    root, expect, bad = folder
    with pytest.warns(UserWarning, match=r"skipped 2 of 15") as rec:
        x = data.load_images(str(root), SIZE)
    assert len(rec) == 1                                    # one warning, not one per file
    msg = str(rec[0].message)
    assert all(name in msg for name in bad) and "notes.txt" not in msg
    assert x.dtype == torch.uint8 and x.shape == (len(expect), 3, *SIZE)
    for i, rel in enumerate(sorted(expect)):                # files load in sorted path order
        want = torch.tensor(expect[rel], dtype=torch.int16)[:, None, None]
        err = (x[i].to(torch.int16) - want).abs().max().item()
        assert err <= 3, f"{rel}: {x[i][:, 0, 0].tolist()} != {expect[rel]}"
    assert "loaded 13 images (2 skipped)" in capsys.readouterr().out


def test_16bit_png_scales_to_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")   # a real 16-bit file
    y = data.decode_image(tmp_path / "ramp.png", (16, 16))
    np.testing.assert_allclose(y[..., 0], ramp / 257.0, atol=1)   # not clipped to 255


def test_zip_read_in_place_equals_folder(folder, tmp_path):
    root, expect, bad = folder
    with pytest.warns(UserWarning):
        x_dir = data.load_images(root, SIZE, verbose=False)
    with pytest.warns(UserWarning, match="skipped 2"):
        x_zip = data.load_images(_zip_of(root, tmp_path / "faces.zip"), SIZE, verbose=False)
    assert torch.equal(x_dir, x_zip)


def test_truncated_jpeg_raises_instead_of_grey_fill(folder):
    root, _, _ = folder
    with pytest.raises(OSError):
        data.decode_image(root / "nested" / "truncated.jpg", SIZE)


def test_centre_crop_and_antialiased_resize(tmp_path):
    # 30 x 10 image: red | green | blue thirds. A centre crop to a square keeps only green.
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, :10, 0], a[:, 10:20, 1], a[:, 20:, 2] = 255, 255, 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    y = data.decode_image(tmp_path / "wide.png", (4, 4)).astype(int)
    assert (y[..., 1] >= 250).all() and (y[..., [0, 2]] <= 5).all()
    # A 1-pixel checkerboard averages to grey when antialiased; nearest would give 0 or 255.
    check = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(check).save(tmp_path / "check.png")
    y = data.decode_image(tmp_path / "check.png", (8, 8)).astype(int)
    assert np.abs(y - 127.5).max() < 10
    # Aspect ratio: a portrait 64x48 (H x W) target from a square image
    assert data.decode_image(tmp_path / "check.png", (12, 9)).shape == (12, 9, 3)


def test_cache_hit_returns_identical_data_without_decoding(folder, monkeypatch, capsys):
    root, _, _ = folder
    with pytest.warns(UserWarning):
        x1 = data.load_images(root, SIZE)
    assert "[cache hit]" not in capsys.readouterr().out

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(data, "_decode_files", boom)
    with pytest.warns(UserWarning, match="skipped 2"):     # still reported on a hit
        x2 = data.load_images(root, SIZE)
    assert "loaded 13 images (2 skipped)" in capsys.readouterr().out.split("\n")[0]
    assert torch.equal(x1, x2)
    # a new file changes the key: the cache misses and decodes (here: the patched decoder)
    Image.new("RGB", (5, 5)).save(root / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_images(root, SIZE)


def test_cache_dir_argument_and_size_key(tmp_path):
    x = data.load_images(None, SIZE, n_synthetic=6, seed=3, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    y = data.load_images("synthetic", (8, 6), n_synthetic=6, seed=3, cache_dir=tmp_path / "c")
    assert y.shape == (6, 3, 8, 6) and len(list((tmp_path / "c").glob("*.npy"))) == 2
    assert torch.equal(x, data.synthetic_faces(6, SIZE, seed=3))


def test_missing_empty_and_unreadable_sources_raise_usage_error(tmp_path):
    with pytest.raises(data.UsageError, match="does not exist"):
        data.load_images(tmp_path / "nope", SIZE)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(data.UsageError, match="no images"):
        data.load_images(tmp_path / "empty", SIZE)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("not a jpeg")
    with pytest.raises(data.UsageError, match="could be read"):
        data.load_images(tmp_path / "bad", SIZE)
    (tmp_path / "notzip.zip").write_text("nope")
    with pytest.raises(data.UsageError, match="zip"):
        data.load_images(tmp_path / "notzip.zip", SIZE)


def test_split_is_disjoint_complete_and_stable():
    tr, te = data.split_indices(103, 0.2, seed=5)
    assert tr.dtype == te.dtype == torch.long
    assert len(te) == 21 and len(tr) == 82
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(103))
    tr2, te2 = data.split_indices(103, 0.2, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert not torch.equal(te, data.split_indices(103, 0.2, seed=6)[1])
    assert len(data.split_indices(3, 0.2)[1]) == 1            # never an empty side if avoidable


def _ref_color_jitter(img, factors, order):
    """torchvision.transforms.functional on one image in [0, 1], ops in the given order."""
    def gray(y):
        return (0.2989 * y[0] + 0.587 * y[1] + 0.114 * y[2])[None]
    for op in order.tolist():
        f = factors[op].item()
        if op == 0:
            img = (f * img).clamp(0, 1)                                   # adjust_brightness
        elif op == 1:
            img = (f * img + (1 - f) * gray(img).mean()).clamp(0, 1)      # adjust_contrast
        else:
            img = (f * img + (1 - f) * gray(img)).clamp(0, 1)            # adjust_saturation
    return img


def test_augment_matches_per_image_colorjitter_and_flip():
    x = torch.rand(16, 3, 6, 5, dtype=torch.float64) * 2 - 1
    x0 = x.clone()
    y = data.augment(x, torch.Generator().manual_seed(0), flip=True, jitter=0.4)
    assert torch.equal(x, x0)                                 # the input is left alone
    g = torch.Generator().manual_seed(0)        # the documented draws: flips, factors, order
    flips, factors = torch.rand(16, generator=g) < 0.5, 0.6 + 0.8 * torch.rand(16, 3, generator=g)
    order = torch.rand(16, 3, generator=g).argsort(dim=1)
    for i in range(16):
        xi = x[i].flip(-1) if flips[i] else x[i]
        ref = _ref_color_jitter((xi + 1) / 2, factors[i], order[i]) * 2 - 1
        torch.testing.assert_close(y[i], ref)
    assert len({tuple(o.tolist()) for o in order}) > 1 and 0 < flips.sum() < 16   # varies per image


def test_augment_reproducible_flips_and_jitters():
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    a = data.augment(x, torch.Generator().manual_seed(1), flip=True)
    b = data.augment(x, torch.Generator().manual_seed(1), flip=True)
    assert torch.equal(a, b)
    flipped = (a == torch.flip(x, [-1])).flatten(1).all(1)
    same = (a == x).flatten(1).all(1)
    assert (flipped ^ same).all() and 10 < flipped.sum() < 54     # each kept or flipped, ~half
    j = data.augment(x, torch.Generator().manual_seed(1), flip=False, jitter=0.1)
    assert not torch.allclose(j, x) and j.min() >= -1 and j.max() <= 1
    assert torch.equal(data.augment(x, torch.Generator(), flip=False), x)


def _id_images(n):
    """Image i is filled with value i, so a batch reveals which images it holds."""
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).clone()


def _ids(batch):
    return ((batch[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_batches_cover_epoch_and_depend_only_on_seed_epoch_index():
    imgs = _id_images(50)
    b = data.Batches(imgs, 8, seed=3)
    assert len(b) == 6 and len(data.Batches(imgs, 8, drop_last=False)) == 7
    ep = [x for x, _ in b.epoch(0)]
    assert all(x.shape == (8, 3, 4, 4) and x.dtype == torch.float32 for x in ep)
    ids = sum((_ids(x) for x in ep), [])
    assert len(set(ids)) == 48                                # no image twice in an epoch
    assert ids != sum((_ids(x) for x, _ in b.epoch(1)), [])      # reshuffled each epoch
    assert ids != sum((_ids(x) for x, _ in data.Batches(imgs, 8, seed=4).epoch(0)), [])
    last = [x for x, _ in data.Batches(imgs, 8, seed=3, drop_last=False).epoch(0)]
    assert sorted(sum((_ids(x) for x in last), [])) == list(range(50)) and len(last[-1]) == 2

    aug = data.Batches(imgs, 8, seed=3, flip=True, jitter=0.2)
    torch.manual_seed(0)
    full = [x for x, _ in aug.epoch(2)]
    torch.manual_seed(123)                                    # the global RNG plays no part
    again = [x for x, _ in data.Batches(imgs, 8, seed=3, flip=True, jitter=0.2).epoch(2)]
    assert all(torch.equal(p, q) for p, q in zip(full, again))
    resumed = [x for x, _ in aug.epoch(2, start=4)]                     # mid-epoch resume
    assert len(resumed) == 2 and all(torch.equal(p, q) for p, q in zip(full[4:], resumed))


def test_batches_sharding_union_equals_single_process():
    imgs = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    kw = dict(seed=7, flip=True, jitter=0.3)
    xs = lambda **k: [x for x, _ in data.Batches(imgs, 8, **kw, **k).epoch(1)]
    one, r0, r1 = xs(), xs(rank=0, world_size=2), xs(rank=1, world_size=2)
    assert r0[0].shape == (4, 3, 6, 6)
    for full, a, b in zip(one, r0, r1, strict=True):
        assert torch.equal(torch.cat([a, b]), full)


def test_synthetic_faces_deterministic_and_varied():
    x = data.synthetic_faces(6, (32, 32), seed=0)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 32, 32)
    assert torch.equal(x, data.synthetic_faces(6, (32, 32), seed=0))
    assert torch.equal(x[:3], data.synthetic_faces(3, (32, 32), seed=0))   # face i: (seed, i)
    assert not torch.equal(x, data.synthetic_faces(6, (32, 32), seed=1))
    flat = x.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(6) * 1e9).min() > 100    # all different
    assert flat.std(1).min() > 10                                # not blank
    assert data.synthetic_faces(2, "64x48").shape == (2, 3, 64, 48)


def test_grid_and_gif_files(tmp_path):
    x = torch.linspace(-1, 1, 10)[:, None, None, None].expand(10, 3, 8, 8)
    g = data.make_grid(x, nrow=4, padding=2)
    assert g.shape == (3 * 10 + 2, 4 * 10 + 2, 3) and g.dtype == np.uint8
    assert g[2, 2].tolist() == [0, 0, 0] and g[22, 12].tolist() == [255, 255, 255]  # -1, +1
    assert g[12, 2].tolist() == [113] * 3                      # image 4 (-1/9): second row
    assert (g[:2] == 0).all() and (g[22:30, 22:] == 0).all()   # padding, empty cells
    data.save_grid(x, tmp_path / "sub" / "grid.png", nrow=4)
    with Image.open(tmp_path / "sub" / "grid.png") as im:
        assert im.size == (42, 32) and np.array_equal(np.asarray(im.convert("RGB")), g)
    for i in range(3):
        Image.new("RGB", (20, 10), (40 * i, 0, 0)).save(tmp_path / f"epoch_{i + 1:03d}.png")
    assert data.save_gif(str(tmp_path), tmp_path / "a.gif", duration_ms=100) == 3
    with Image.open(tmp_path / "a.gif") as im:
        assert im.size == (20, 10) and im.n_frames == 3 and im.info["loop"] == 0


# ---------------------------------------------------------------------------------------------
# Hostile input: nothing hangs, nothing runs, nothing is silently wrong
# ---------------------------------------------------------------------------------------------

def _within(seconds, fn, fifos=()):
    """fn() in a daemon thread -> (its result, the warnings it raised), or a test failure after
    `seconds` instead of a hung suite (a reader stuck opening one of the fifos is released)."""
    box = {}

    def run():
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                box["value"] = fn()
            box["warnings"] = [str(w.message) for w in rec]
        except BaseException as e:  # noqa: BLE001 -- re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for p in fifos:                                     # a writer end releases the reader
            with contextlib.suppress(OSError):
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {seconds}s: blocked on a FIFO or a device")
    if "error" in box:
        raise box["error"]
    return box["value"], box["warnings"]


def _good(path, rgb=(200, 30, 60), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def test_a_folder_whose_only_subfolder_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "faces" / "locked").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(data.UsageError, match=r"none of the 1 image files .* could be read \(first: 'locked/': "):
        data.load_images(tmp_path / "faces", SIZE)


def test_only_regular_files_are_opened(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    _good(root / "good.png")
    fifos = [root / "x.png", root / "sub" / "y.jpg", tmp_path / "x.zip", tmp_path / "samples" / "epoch_002.png"]
    (root / "sub").mkdir()
    _good(tmp_path / "samples" / "epoch_001.png")
    for p in fifos:
        os.mkfifo(p)
    os.symlink("/dev/zero", root / "zero.png")              # a device: reading never ends
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a: opened.append(str(p)) or real_open(p, *a))

    x, msgs = _within(60, lambda: data.load_images(root, SIZE, verbose=False), fifos)
    assert len(x) == 1 and len(msgs) == 1 and "skipped 3 of 4" in msgs[0]
    assert all(n in msgs[0] for n in ("x.png", "sub/y.jpg", "zero.png", "not a regular file"))
    assert opened and not any(p.endswith(("x.png", "y.jpg", "zero.png")) for p in opened)
    with pytest.raises(data.UsageError, match="not a regular file"):    # --data x.zip, a FIFO
        _within(60, lambda: data.load_images(tmp_path / "x.zip", SIZE), fifos)
    with pytest.raises(data.UsageError, match="not a regular file"):
        _within(60, lambda: data.decode_image(root / "x.png", SIZE), fifos)
    kept, _ = _within(60, lambda: data.save_gif(tmp_path / "samples", tmp_path / "a.gif"), fifos)
    assert kept == 1                                         # a FIFO named like a frame is passed over, never opened


_PS_MARK = "ghostscript-was-started"
_EPS_SCRIPT = f"""
import os, sys, warnings
import data
from PIL import Image
warnings.simplefilter("ignore")
root, mark = sys.argv[1], sys.argv[2]
x = data.load_images(root, (8, 8), verbose=False)
print("loaded", len(x), "started", os.path.exists(mark))
try:                                                   # control: Pillow unrestricted runs gs
    Image.open(os.path.join(root, "face.png")).load()
except Exception:
    pass
print("control", os.path.exists(mark))
"""


def test_an_eps_named_png_never_starts_ghostscript(tmp_path):
    """A fake `gs` first on PATH leaves a mark when anything starts it. The control shows that
    Pillow left to itself does start it on this very file, so the test can fail."""
    root, bin_, mark = tmp_path / "faces", tmp_path / "bin", tmp_path / _PS_MARK
    _good(root / "good.png")
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "face.png", format="EPS")
    bin_.mkdir()
    (bin_ / "gs").write_text(f"#!/bin/sh\ntouch '{mark}'\necho 10.0\n")
    (bin_ / "gs").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
               FACEGEN_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", _EPS_SCRIPT, str(root), str(mark)], env=env,
                         cwd=Path(data.__file__).parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded 1 started False" in out.stdout
    assert "control True" in out.stdout


def test_only_the_listed_formats_are_decoded(tmp_path):
    """Pillow reads dozens of formats by content; only JPEG, PNG, WEBP, BMP and GIF are decoded,
    whatever the file is called. A JPEG named .png is still a listed format and loads."""
    root = tmp_path / "faces"
    _good(root / "a_good.png")
    img = Image.new("RGB", (16, 16), (90, 90, 200))
    img.save(root / "b_jpeg_named.png", format="JPEG", quality=100)
    unlisted = {"TIFF": "c.png", "PPM": "d.jpg", "ICO": "e.bmp", "PCX": "f.gif", "TGA": "g.webp",
                "SGI": "h.png", "EPS": "i.jpeg", "DDS": "j.png"}
    for fmt, name in unlisted.items():
        img.save(root / name, format=fmt)
        with Image.open(root / name) as im:                  # Pillow alone would read it
            assert im.format == fmt
    with pytest.warns(UserWarning, match=f"skipped {len(unlisted)} of {len(unlisted) + 2}"):
        x = data.load_images(root, SIZE, verbose=False)
    jpeg = x[1].int() - torch.tensor([90, 90, 200])[:, None, None]
    assert len(x) == 2 and jpeg.abs().max() <= 3


@pytest.mark.parametrize("wh", [(1, 5000), (5000, 1), (1, 1), (2, 1), (1, 3), (3, 1000), (7, 2)])
def test_slivers_keep_their_colour(tmp_path, wh):
    """Any geometry is centre-cropped and resized faithfully: a 1 x 5000 strip is not a black
    square. A solid image stays exactly its colour at every target size."""
    Image.new("RGB", wh, (201, 13, 77)).save(tmp_path / "s.png")
    for size in [(64, 64), (64, 48), (48, 64), (8, 8), (5, 3), (1, 1)]:
        y = data.decode_image(tmp_path / "s.png", size)
        assert y.shape == (*size, 3) and (y == (201, 13, 77)).all(), (wh, size)


def test_a_strip_keeps_its_centre_pixel(tmp_path):
    ramp = np.linspace(0, 255, 5000).round().astype(np.uint8)
    Image.fromarray(np.stack([ramp, 255 - ramp, ramp], -1)[:, None]).save(tmp_path / "v.png")
    y = data.decode_image(tmp_path / "v.png", (16, 16)).astype(int)            # 1 wide, 5000 high
    assert np.abs(y - [ramp[2500], 255 - ramp[2500], ramp[2500]]).max() <= 1


def _forge_declared_size(path, name, size):
    """Rewrite the uncompressed size a zip declares for `name` (local and central header)."""
    b = bytearray(path.read_bytes())
    for sig, at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        i = b.find(sig)
        while i >= 0:
            if b[i + name_at:i + name_at + len(name)] == name.encode():
                struct.pack_into("<I", b, i + at, size)
            i = b.find(sig, i + 1)
    path.write_bytes(bytes(b))


def test_zip_members_are_bounded(tmp_path):
    """Members declaring 1 GiB (a zip bomb), and a member whose header understates its size,
    are skipped and counted without using more than a few MB."""
    z = tmp_path / "bomb.zip"
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (5, 250, 5)).save(buf, "PNG")
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", buf.getvalue())
        zf.writestr("liar.png", buf.getvalue() + bytes(16 << 20))     # 16 MiB inflated
        for name in ("big1.png", "big2.png"):
            zf.writestr(name, bytes(1 << 20))
    for name in ("big1.png", "big2.png"):
        _forge_declared_size(z, name, 1 << 30)                        # declares 1 GiB
    _forge_declared_size(z, "liar.png", 1000)                          # declares 1000 bytes
    with zipfile.ZipFile(z) as zf:
        assert zf.getinfo("big1.png").file_size == 1 << 30
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match="skipped 3 of 4") as rec:
            x = data.load_images(z, SIZE, verbose=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(x) == 1 and peak < 8 << 20, peak
    msg = str(rec[0].message)
    assert "'big1.png' (ValueError: declares 1073741824 bytes" in msg and "liar.png" in msg


def test_zip_member_limit_is_a_setting(tmp_path, monkeypatch):
    """A member inflating past _MAX_FILE_BYTES is skipped, one under it is read."""
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(big)
    _good(tmp_path / "small.png")
    z = tmp_path / "s.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(big, "big.png")
        zf.write(tmp_path / "small.png", "small.png")
    monkeypatch.setattr(data, "_MAX_FILE_BYTES", big.stat().st_size - 1)
    with pytest.warns(UserWarning, match="skipped 1 of 2 .*big.png"):
        assert len(data.load_images(z, SIZE, verbose=False)) == 1


def test_unreadable_entries_are_counted_never_fatal_nor_silent(tmp_path):
    """Dangling links, link loops and a link back up the tree; a linked folder is followed."""
    root, elsewhere = tmp_path / "faces", tmp_path / "elsewhere"
    _good(root / "a.png")
    _good(root / "sub" / "b.png")
    _good(elsewhere / "c.png")
    os.symlink(tmp_path / "missing.png", root / "dangling.png")
    os.symlink("loop.png", root / "loop.png")                # ELOOP
    os.symlink(tmp_path / "no-such-folder", root / "gone")   # no image by its name: ignored
    os.symlink("..", root / "sub" / "up")                    # a cycle: read each folder once
    os.symlink(elsewhere, root / "linked")
    os.symlink(tmp_path / "nowhere", root / "notes.txt")     # not an image by its name: ignored
    with pytest.warns(UserWarning, match="skipped 2 of 5") as rec:
        x = data.load_images(root, SIZE, verbose=False)
    assert len(x) == 3                                       # a, sub/b and linked/c, once each
    assert all(n in str(rec[0].message) for n in ("'dangling.png'", "'loop.png'"))


def test_unreadable_folder_and_file_are_counted(tmp_path, monkeypatch):
    """A folder we may not list and a file we may not open, simulated so the test also runs as
    root (who may read anything): each is one counted skip, and the rest loads."""
    root = tmp_path / "faces"
    for rel in ("a.png", "locked/b.png", "locked/c.png", "secret.png"):
        _good(root / rel)
    real_scandir, real_open = os.scandir, os.open

    def scandir(p):
        if str(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_scandir(p)

    def os_open(p, *a, **k):
        if str(p).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "open", os_open)
    with pytest.warns(UserWarning, match="skipped 2 of 3") as rec:
        x = data.load_images(root, SIZE, verbose=False)
    assert len(x) == 1
    msg = str(rec[0].message)
    assert "'locked/' (PermissionError" in msg and "secret.png" in msg
    monkeypatch.setattr(os, "scandir", lambda p: scandir(str(p) + "/locked"))   # the root itself
    with pytest.raises(data.UsageError, match="cannot read the folder"):
        data.load_images(root, SIZE)


def test_chmod_000_folder_and_file_are_counted(tmp_path):
    """The real thing. Root reads a chmod-000 folder anyway (CAP_DAC_OVERRIDE): then there is
    nothing to skip, and the simulated test above covers the behaviour."""
    root = tmp_path / "faces"
    for rel in ("a.png", "locked/b.png", "secret.png"):
        _good(root / rel)
    (root / "locked").chmod(0)
    (root / "secret.png").chmod(0)
    try:
        if os.access(root / "locked", os.R_OK) or os.access(root / "secret.png", os.R_OK):
            pytest.skip("running as a user who can read chmod-000 files (root)")
        with pytest.warns(UserWarning, match="skipped 2 of 3"):
            assert len(data.load_images(root, SIZE, verbose=False)) == 1
    finally:
        (root / "locked").chmod(0o755)


def test_names_in_messages_are_escaped(tmp_path):
    """A file name can carry a newline or a terminal escape: warnings and errors stay one line."""
    root = tmp_path / "faces"
    _good(root / "ok.png")
    evil = "evil\n\x1b[2J\x1b[31mred\u202e.png"
    (root / evil).write_text("not an image")
    with pytest.warns(UserWarning) as rec:
        data.load_images(root, SIZE, verbose=False)
    msg = str(rec[0].message)
    assert "\n" not in msg and "\x1b" not in msg and "\u202e" not in msg
    assert repr(evil) in msg
    with pytest.raises(data.UsageError) as e:
        data.load_images(tmp_path / "no\nsuch\x1b[0m", SIZE)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    (root / "ok.png").unlink()
    with pytest.raises(data.UsageError, match="could be read") as e:     # nothing left: one line
        data.load_images(root, SIZE)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    """Over Pillow's pixel limit (a warning) and twice over (an error): both a counted skip."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    root = tmp_path / "faces"
    _good(root / "ok.png", size=(10, 10))
    _good(root / "warn.png", size=(20, 20))                  # 400 pixels: Pillow only warns
    _good(root / "error.png", size=(30, 30))                 # 900 > 2 x 300: Pillow raises
    with pytest.warns(UserWarning) as rec:
        assert len(data.load_images(root, SIZE, verbose=False)) == 1
    assert [str(w.message)[:17] for w in rec] == ["skipped 2 of 3 im"]   # and nothing else
    assert "DecompressionBomb" in str(rec[0].message)


def test_a_damaged_cache_is_a_cache_miss(tmp_path):
    root = tmp_path / "faces"
    _good(root / "a.png")
    x = data.load_images(root, SIZE, verbose=False, cache_dir=tmp_path / "c")
    (meta,) = (tmp_path / "c").glob("*.json")
    for bad in ('{"n": 1, "skipped": [1, 2], "total": 1}', '{"n": 1}', "[" * 100000, "\xff"):
        meta.write_text(bad)
        assert torch.equal(data.load_images(root, SIZE, verbose=False, cache_dir=tmp_path / "c"), x)
    (arr,) = (tmp_path / "c").glob("*.npy")                   # the array is read whole, never mapped:
    whole = arr.read_bytes()
    huge = whole.replace(b"(1, 3,", b"(9999999, 3,")
    assert huge != whole
    for bad in (whole[:-5], whole[:20], b"not an npy file", huge):    # truncated, bad header, too short for its shape
        arr.write_bytes(bad)
        assert torch.equal(data.load_images(root, SIZE, verbose=False, cache_dir=tmp_path / "c"), x)
    meta.unlink()
    os.mkfifo(meta)                                           # a FIFO where the cache was
    y, _ = _within(60, lambda: data.load_images(root, SIZE, verbose=False,
                                                cache_dir=tmp_path / "c"), [meta])
    assert torch.equal(y, x)


# ---------------------------------------------------------------------------------------------
# Helpers for train.py and facegen.py: frames in epoch order, a GIF despite bad frames, a
# fingerprint of the data a run trained on
# ---------------------------------------------------------------------------------------------

def test_gif_frames_in_epoch_order_ignoring_strays(tmp_path):
    epochs = ("1", "099", "100", "101", "999", "1000", "10000")
    for i, e in enumerate(epochs):
        _good(tmp_path / f"epoch_{e}.png", (30 * i, 0, 0), (20, 10))
    for stray in ("epoch_abc.png", "notes.txt", "epoch_5.png.tmp", "epoch_\u0663.png", ".epoch_2.png"):
        (tmp_path / stray).write_text("x")
    (tmp_path / "epoch_7.png").mkdir()
    assert data.save_gif(tmp_path, tmp_path / "a.gif") == len(epochs)
    with Image.open(tmp_path / "a.gif") as im:
        for i in range(im.n_frames):
            im.seek(i)
            assert im.convert("RGB").getpixel((0, 0))[0] == pytest.approx(30 * i, abs=8)
    with pytest.raises(data.UsageError, match="no readable sample grids"):
        data.save_gif(tmp_path / "missing", tmp_path / "b.gif")


def test_save_gif_skips_bad_frames_and_holds_the_last(tmp_path):
    frames = [_good(tmp_path / f"epoch_{2 * i}.png", (60 * i, 0, 0), (20, 10)) for i in range(3)]
    (tmp_path / "epoch_1.png").write_bytes(frames[0].read_bytes()[:40])     # cut short
    (tmp_path / "epoch_3.png").write_text("nope")
    with pytest.warns(UserWarning, match="skipped 2 of 5") as rec:
        assert data.save_gif(tmp_path, tmp_path / "a.gif", duration_ms=100, hold_last_ms=300) == 3
    assert "\n" not in str(rec[0].message) and "epoch_1.png" in str(rec[0].message)
    with Image.open(tmp_path / "a.gif") as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            assert im.convert("RGB").getpixel((0, 0))[0] == pytest.approx(60 * i, abs=8)
    assert durations == [100, 100, 300]
    for f in frames:
        f.unlink()
    with pytest.raises(data.UsageError, match="no readable"), pytest.warns(UserWarning):
        data.save_gif(tmp_path, tmp_path / "b.gif")


def test_fingerprint_tracks_the_file_list(tmp_path):
    fingerprint = lambda *a, **kw: data.load_images(*a, **kw, full=True)[3]   # the cache key: it changes with any file
    root = tmp_path / "faces"
    _good(root / "a.png")
    _good(root / "sub" / "b.png")
    fp = fingerprint(root, 64)
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and fingerprint(str(root), (64, 64)) == fp
    assert fingerprint(root, (64, 48)) != fp
    _good(root / "c.png")
    fp_added = fingerprint(root, 64)
    assert fp_added != fp
    os.utime(root / "c.png", ns=(10**18,) * 2)                    # touched: the mtime changed
    assert fingerprint(root, 64) not in (fp, fp_added)
    z = _zip_of(root, tmp_path / "faces.zip")
    assert fingerprint(z, 64) == fingerprint(z, 64) != fp
    syn = fingerprint(None, 64, n_synthetic=100, seed=1)
    assert syn == fingerprint("synthetic", 64, n_synthetic=100, seed=1)
    assert syn != fingerprint(None, 64, n_synthetic=100, seed=2)
    assert syn != fingerprint(None, 64, n_synthetic=101, seed=1)


def test_batches_run_the_public_augment():
    """Training and the benchmark share one augmentation: a batch is augment() of its images."""
    imgs = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    kw = dict(seed=7, flip=True, jitter=0.3)
    perm = torch.randperm(40, generator=data._rng(7, "order", 2))
    for i, (x, _) in enumerate(data.Batches(imgs, 8, **kw).epoch(2)):
        raw = imgs[perm[i * 8:(i + 1) * 8]].float() / 127.5 - 1
        assert torch.equal(x, data.augment(raw, data._rng(7, "aug", 2, i), True, 0.3))
    r1 = next(data.Batches(imgs, 8, rank=1, world_size=2, **kw).epoch(2))[0]
    raw = imgs[perm[4:8]].float() / 127.5 - 1
    assert torch.equal(r1, data.augment(raw, data._rng(7, "aug", 2, 0), True, 0.3, rows=(4, 8)))


# ---------------------------------------------------------------------------------------------
# Shared command-line helpers: flag checks, device, run folder, CSV logs, the loss plot
# ---------------------------------------------------------------------------------------------

def test_checked_flag_types_accept_and_refuse():
    import argparse
    count = data.between(int, 1, 10)
    assert count("3") == 3 and data.positive_float("0.5") == 0.5
    assert data.non_negative("0") == 0.0 and data.unit_interval("0.999") == 0.999
    assert data.seed_int("0") == 0 and data.seed_int(str(2 ** 63 - 2)) == 2 ** 63 - 2
    for parse, bad in ((count, "0"), (count, "11"), (data.positive_float, "inf"), (data.positive_float, "nan"),
                       (data.non_negative, "-1e-9"), (data.seed_int, str(2 ** 63 - 1)), (data.seed_int, "-1"),
                       (data.unit_interval, "1"), (data.unit_interval, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be .*, got {re.escape(bad)}"):
            parse(bad)
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=count)
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "x"])                              # not an int: argparse's own error


def test_csv_round_trip_is_atomic(tmp_path):
    path = str(tmp_path / "metrics.csv")
    assert models.read_csv(path) == []
    rows = [{"epoch": 1, "step": 10, "loss": 0.5}, {"epoch": 2, "step": 20, "loss": 0.25, "test_loss": 0.3}]
    models.write_csv(path, rows)
    back = models.read_csv(path)
    assert [list(r) for r in back] == [["epoch", "step", "loss", "test_loss"]] * 2
    assert back[1]["test_loss"] == "0.3" and back[0]["test_loss"] == "" and os.listdir(tmp_path) == ["metrics.csv"]
    models.write_csv(path, [{"epoch": 3, "step": 30, "loss": 0.125, "test_loss": "nan"}], append=True)
    assert [r["loss"] for r in models.read_csv(path)] == ["0.5", "0.25", "0.125"]


def test_damaged_log_lines_are_skipped_with_one_warning(tmp_path):
    """A log never stops a run: the good rows come back, the damaged lines are counted once."""
    path = tmp_path / "metrics.csv"
    good = "epoch,step,loss,test_loss\r\n1,10,0.5,0.6\r\n2,20,0.25,\r\n"
    for tail, n in (("3,30,0.1", 1),                           # the last line, half written by a full disk
                    ("3,30,0.125,0.3", 1),                     # complete fields, but no line end
                    ("x,30,0.1,0.2\r\n3,3.5,1,1\r\n", 2),       # epoch, step not integers
                    ("3,30,oops,0.2\r\n3,30,1,2,3\r\n", 2)):    # not a number; a field too many
        path.write_text(good + tail)
        with pytest.warns(UserWarning) as rec:
            rows = models.read_csv(path)
        assert [str(w.message) for w in rec] == [f"skipped {n} damaged line(s) in {str(path)!r}"]
        assert [(r["epoch"], r["test_loss"]) for r in rows] == [("1", "0.6"), ("2", "")]
    path.write_text("step,loss\n1,2\n")                          # no epoch column
    with pytest.warns(UserWarning, match="skipped 1 damaged"):
        assert models.read_csv(path) == []
    for bad in (b"epoch,step\n\xff\xfe,oops\n", None):           # not UTF-8; a folder
        path.unlink(missing_ok=True)
        path.write_bytes(bad) if bad else path.mkdir()
        with pytest.warns(UserWarning, match="could not read") as rec:
            assert models.read_csv(path) == []
        assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.read_csv(tmp_path / "missing.csv") == []     # silently


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    data.write_json(path, {"a": 1})
    for patched in ((json, "dump"), (os, "replace")):          # the write fails; the rename fails
        with monkeypatch.context() as m:
            m.setattr(*patched, _no_space)
            with pytest.raises(OSError) as e:
                data.write_json(path, {"a": 2})
        assert str(e.value) == f"could not write {str(path)!r} (No space left on device)"
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
        assert os.listdir(tmp_path) == ["config.json"] and json.loads(path.read_text()) == {"a": 1}


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_file_size_limit_cuts_no_log_in_half(tmp_path):
    """A real short write (the file size limit: EFBIG, as a full disk would stop it): an append leaves the log
    as it was, a rewrite leaves no temp file."""
    path = tmp_path / "steps.csv"
    models.write_csv(path, [{"epoch": 1, "step": 2, "loss": 0.5}])
    before = path.read_bytes()
    old_handler, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 10, limits[1]))
        row = {"epoch": 1, "step": 4, "loss": 0.123456789012345}
        for append in (True, False):
            with pytest.raises(OSError, match="could not write .*steps.csv.* \\(File too large\\)"):
                models.write_csv(path, [row] * (1 if append else 2), append=append)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["steps.csv"]


def test_a_failed_cache_write_warns_and_leaves_no_temp_file(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    _good(root / "a.png")

    def half(f, arr):
        f.write(b"\x93NUMPY half an array")
        _no_space()
    monkeypatch.setattr(np, "save", half)
    for _ in range(2):
        with pytest.warns(UserWarning, match="could not write the image cache .*No space left on device") as rec:
            assert len(data.load_images(root, SIZE, verbose=False, cache_dir=tmp_path / "c")) == 1
        assert len(rec) == 1 and os.listdir(tmp_path / "c") == []


def test_a_symlinked_cache_entry_is_a_miss_and_is_replaced(tmp_path):
    """Two data sets of the same shape: b's entry linked to a's would give a's images for b."""
    cache = tmp_path / "c"
    _good(tmp_path / "a" / "x.png", (250, 0, 0))
    x_a = data.load_images(tmp_path / "a", SIZE, verbose=False, cache_dir=cache)
    a_files = {p: p.read_bytes() for p in cache.iterdir()}
    _good(tmp_path / "b" / "x.png", (0, 0, 250))
    x_b = data.load_images(tmp_path / "b", SIZE, verbose=False, cache_dir=cache)
    for ext in (".npy", ".json"):
        (b_entry,) = [p for p in cache.glob("*" + ext) if p not in a_files]
        b_entry.unlink()
        b_entry.symlink_to(next(p for p in a_files if p.suffix == ext))
        assert torch.equal(data.load_images(tmp_path / "b", SIZE, verbose=False, cache_dir=cache), x_b)
        assert not b_entry.is_symlink()                          # rewritten: the link replaced, not written through
    assert not torch.equal(x_a, x_b) and {p: p.read_bytes() for p in a_files} == a_files


def test_a_cache_file_cut_short_while_read_is_a_miss(tmp_path, monkeypatch):
    _good(tmp_path / "a" / "x.png")
    x = data.load_images(tmp_path / "a", SIZE, verbose=False, cache_dir=tmp_path / "c")
    (npy,) = (tmp_path / "c").glob("*.npy")
    real_load = np.load

    def cut_then_load(f, **kw):                                   # another process truncates it meanwhile
        os.truncate(npy, 100)
        return real_load(f, **kw)
    monkeypatch.setattr(np, "load", cut_then_load)
    assert torch.equal(data.load_images(tmp_path / "a", SIZE, verbose=False, cache_dir=tmp_path / "c"), x)


def test_loss_plot_takes_rows_with_other_keys_and_empty_values(tmp_path):   # read_csv has dropped non-numbers
    rows = [{"epoch": "1", "step": "10", "loss": "1.0"}, {"epoch": "2", "step": "", "loss": "0.5"},
            {"epoch": "3", "loss": "0.4"}, {"epoch": "4", "step": "40", "loss": "", "kl": ""},
            {"epoch": "5", "step": "50", "loss": "0.2", "kl": "3"}]
    data.plot_losses(rows, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (720, 2 * 140 + 30)                     # loss and kl


def test_loss_plot_has_one_panel_per_term_and_draws_the_curves(tmp_path):
    rows = [{"epoch": e, "step": 10 * e, "loss": 100.0 / e, "test_loss": 120.0 / e, "kl": 3.0,
             "images_per_s": 9.0, "seconds": 1.0} for e in range(1, 6)]
    points = [{"epoch": s // 10 + 1, "step": s, "loss": 100.0 / (s / 10), "kl": 3.0 + s} for s in range(2, 51, 2)]
    data.plot_losses(rows, tmp_path / "loss.png", points, width=600, panel_h=120)
    with Image.open(tmp_path / "loss.png") as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[:2] == (3 * 120 + 30, 600)                  # three panels: loss, test_loss, kl
    blue = (a == [0x1f, 0x77, 0xb4]).all(-1)
    assert all(blue[20 + 120 * i:116 + 120 * i].sum() > 100 for i in range(3))   # a curve in each
    # loss falls: the blue curve starts high on the left and ends low on the right
    cols = np.nonzero(blue[25:110].any(0))[0]
    rows_at = lambda c: np.nonzero(blue[25:110, c])[0].mean()
    assert rows_at(cols[2]) < rows_at(cols[-3])
