"""data.py: decoding any image mode, folder == zip, cache, split, augmentation, batches, faces."""
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

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
        with pytest.raises(ValueError):
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


def test_missing_empty_and_unreadable_sources_raise_data_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_images(tmp_path / "nope", SIZE)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match="no images"):
        data.load_images(tmp_path / "empty", SIZE)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("not a jpeg")
    with pytest.raises(data.DataError, match="could be read"):
        data.load_images(tmp_path / "bad", SIZE)
    (tmp_path / "notzip.zip").write_text("nope")
    with pytest.raises(data.DataError, match="zip"):
        data.load_images(tmp_path / "notzip.zip", SIZE)
    with pytest.raises(data.DataError, match="batch size"):
        data.check_enough(3, 4)
    data.check_enough(4, 4)


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
    p = data._augment_params(16, torch.Generator().manual_seed(0), True, 0.4)   # same draws
    for i in range(16):
        xi = x[i].flip(-1) if p["flip"][i] else x[i]
        ref = _ref_color_jitter((xi + 1) / 2, p["factors"][i], p["order"][i]) * 2 - 1
        torch.testing.assert_close(y[i], ref)
    assert len({tuple(o.tolist()) for o in p["order"]}) > 1    # the order varies per image


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
    ep = list(b.epoch(0))
    assert all(x.shape == (8, 3, 4, 4) and x.dtype == torch.float32 for x in ep)
    ids = sum((_ids(x) for x in ep), [])
    assert len(set(ids)) == 48                                # no image twice in an epoch
    assert ids != sum((_ids(x) for x in b.epoch(1)), [])      # reshuffled each epoch
    assert ids != sum((_ids(x) for x in data.Batches(imgs, 8, seed=4).epoch(0)), [])
    last = list(data.Batches(imgs, 8, seed=3, drop_last=False).epoch(0))
    assert sorted(sum((_ids(x) for x in last), [])) == list(range(50)) and len(last[-1]) == 2

    aug = data.Batches(imgs, 8, seed=3, flip=True, jitter=0.2)
    torch.manual_seed(0)
    full = list(aug.epoch(2))
    torch.manual_seed(123)                                    # the global RNG plays no part
    again = list(data.Batches(imgs, 8, seed=3, flip=True, jitter=0.2).epoch(2))
    assert all(torch.equal(p, q) for p, q in zip(full, again))
    resumed = list(aug.epoch(2, start=4))                     # mid-epoch resume
    assert len(resumed) == 2 and all(torch.equal(p, q) for p, q in zip(full[4:], resumed))


def test_batches_sharding_union_equals_single_process():
    imgs = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    kw = dict(seed=7, flip=True, jitter=0.3)
    one = list(data.Batches(imgs, 8, **kw).epoch(1))
    r0 = list(data.Batches(imgs, 8, rank=0, world_size=2, **kw).epoch(1))
    r1 = list(data.Batches(imgs, 8, rank=1, world_size=2, **kw).epoch(1))
    assert r0[0].shape == (4, 3, 6, 6)
    for full, a, b in zip(one, r0, r1, strict=True):
        assert torch.equal(torch.cat([a, b]), full)
    with pytest.raises(ValueError):
        data.Batches(imgs, 7, world_size=2)


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


def test_synthetic_faces_same_in_chunks_and_worker_processes(monkeypatch):
    x = data.synthetic_faces(5, (16, 16), seed=2)
    monkeypatch.setattr(data, "_FACE_CHUNK", 2)
    monkeypatch.setattr(data, "_FACE_POOL_MIN", 1)             # the multi-process path
    assert torch.equal(x, data.synthetic_faces(5, (16, 16), seed=2))


def test_grid_and_gif_files(tmp_path):
    x = torch.linspace(-1, 1, 10)[:, None, None, None].expand(10, 3, 8, 8)
    g = data.make_grid(x, nrow=4, padding=2)
    assert g.shape == (3 * 10 + 2, 4 * 10 + 2, 3) and g.dtype == np.uint8
    assert g[2, 2].tolist() == [0, 0, 0] and g[22, 12].tolist() == [255, 255, 255]  # -1, +1
    assert g[12, 2].tolist() == [113] * 3                      # image 4 (-1/9): second row
    assert (g[:2] == 0).all() and (g[22:30, 22:] == 0).all()   # padding, empty cells
    data.save_grid(x, tmp_path / "sub" / "grid.png", nrow=4)
    with Image.open(tmp_path / "sub" / "grid.png") as im:
        assert im.size == (42, 32) and im.mode == "RGB"
    frames = [Image.new("RGB", (20, 10), (40 * i, 0, 0)) for i in range(3)]
    frames[1].save(tmp_path / "f1.png")
    frames[1] = str(tmp_path / "f1.png")                       # paths and images both accepted
    data.save_gif(frames, tmp_path / "a.gif", duration_ms=100)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.size == (20, 10) and im.n_frames == 3 and im.info["loop"] == 0
