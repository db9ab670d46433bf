"""Labels for conditional models: the synthetic faces' factors, subfolder names (ImageFolder), a
CelebA-style attribute file; labels stay with their images through the cache, the split and
Batches (exact mid-epoch resume, data-parallel slicing)."""
import zipfile

import pytest
import torch
from PIL import Image

import data

SIZE = (8, 8)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGEN_CACHE", str(tmp_path / "cache"))


def load_labels(source, size, attr_file=None, attrs=None, **kw):   # each image's labels, as a run reads them
    return data._labels(*data.load_images(source, size, verbose=False, full=True, **kw)[1:3], attr_file, attrs)


def _put(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10), (value, value, value)).save(path)


def test_synthetic_labels_are_the_factors_drawn_and_leave_the_pixels_alone(tmp_path):
    x, f = data.synthetic_faces(40, (32, 32), seed=0, factors=True)
    assert torch.equal(x, data.synthetic_faces(40, (32, 32), seed=0))     # recording draws nothing
    assert f.shape == (40, 3) and f[:, 0].max() < len(data.HAIR_GROUPS) and set(f[:, 1:].flatten().tolist()) <= {0, 1}
    assert len(set(f[:, 0].tolist())) >= 4 and f[:, 1].any()              # varied
    # glasses: a face with glasses differs from the same face drawn without them (independent check)
    i = int(f[:, 1].nonzero()[0])
    rng = __import__("random").Random(f"facegen-face/0/{i}")
    face = data._draw_face(rng, 128)
    assert face.glasses and face.hair_group == f[i, 0]
    y, info = load_labels(None, (32, 32), n_synthetic=40, seed=0)
    assert torch.equal(y, f) and list(info) == ["hair", "glasses", "beard"]
    y2, _ = load_labels("synthetic", (32, 32), n_synthetic=40, seed=0)  # from the cache
    assert torch.equal(y2, f)


def test_folder_labels_follow_imagefolder_and_skip_what_was_skipped(tmp_path):
    root = tmp_path / "faces"
    _put(root / "smiling" / "a.png", 10)
    _put(root / "smiling" / "deep" / "b.png", 20)
    _put(root / "neutral" / "c.png", 30)
    (root / "neutral" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1"):
        x = data.load_images(root, SIZE, verbose=False)
        y, info = load_labels(root, SIZE)
    assert info == {"class": ["neutral", "smiling"]} and len(y) == len(x) == 3
    # rows in file-name order: neutral/c, smiling/a, smiling/deep/b
    assert y[:, 0].tolist() == [0, 1, 1] and x[:, 0, 0, 0].tolist() == [30, 10, 20]
    zpath = tmp_path / "faces.zip"
    with zipfile.ZipFile(zpath, "w") as z:                       # one top folder: stripped
        for p in sorted(root.rglob("*.png")):
            z.write(p, "top/" + str(p.relative_to(root)))
    with pytest.warns(UserWarning):
        yz, infoz = load_labels(zpath, SIZE)
    assert torch.equal(yz, y) and infoz == info
    _put(root / "loose.png", 40)
    with pytest.raises(data.UsageError, match="class folder"):
        load_labels(root, SIZE)


def test_celeba_attribute_file_picks_columns_by_name(tmp_path):
    root = tmp_path / "img_align_celeba"
    for i, v in enumerate([10, 20, 30], 1):
        _put(root / f"00000{i}.jpg", v)
    attr = tmp_path / "list_attr_celeba.txt"
    attr.write_text("3\n5_o_Clock_Shadow Male Smiling\n000001.jpg -1  1 -1\n000002.jpg  1 -1  1\n"
                    "000003.jpg -1 -1  1\n")
    y, info = load_labels(root, SIZE, attr_file=attr, attrs=["Smiling", "Male"])
    assert info == {"Smiling": ["no", "yes"], "Male": ["no", "yes"]}
    assert y.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert load_labels(root, SIZE, attr_file=attr)[0].shape == (3, 3)   # default: every column
    with pytest.raises(data.UsageError, match="Bald"):
        load_labels(root, SIZE, attr_file=attr, attrs=["Bald"])
    attr.write_text("3\nSmiling\n000001.jpg 1\n000002.jpg -1\n")
    with pytest.raises(data.UsageError, match="no valid row"):
        load_labels(root, SIZE, attr_file=attr)


def _celeba(tmp_path, text):
    for i, v in enumerate([10, 20], 1):
        _put(tmp_path / "img" / f"00000{i}.jpg", v)
    (tmp_path / "attr.txt").write_text(text)
    return tmp_path / "img", tmp_path / "attr.txt"


@pytest.mark.parametrize("text, says", [
    ("", "has no line of attribute names"),
    ("2\n", "has no line of attribute names"),
    ("2\nSmiling Male Smiling\n000001.jpg 1 1 1\n000002.jpg 1 1 1\n", "the attribute 'Smiling' is named twice"),
    ("2\nSmiling\n000001.jpg 1\n000002.jpg 1\n000001.jpg -1\n", "'000001.jpg' has two different rows")])
def test_a_damaged_attribute_file_is_one_usage_error(tmp_path, text, says):
    root, attr = _celeba(tmp_path, text)
    with pytest.raises(data.UsageError) as e:
        load_labels(root, SIZE, attr_file=attr)
    assert says in str(e.value) and str(attr) in str(e.value) and "\n" not in str(e.value)


def test_an_attribute_file_may_start_with_its_header_and_repeat_a_row(tmp_path):
    root, attr = _celeba(tmp_path, "Smiling Male\n000001.jpg 1 -1\n000002.jpg -1 1\n000001.jpg 1 -1\n")
    y, info = load_labels(root, SIZE, attr_file=attr)
    assert y.tolist() == [[1, 0], [0, 1]] and list(info) == ["Smiling", "Male"]


def test_a_class_folder_with_a_comma_is_refused(tmp_path):
    _put(tmp_path / "faces" / "a,b" / "x.png", 10)
    _put(tmp_path / "faces" / "c" / "y.png", 20)
    with pytest.raises(data.UsageError, match="the class folder 'a,b' has a ',' in its name.*rename"):
        load_labels(tmp_path / "faces", SIZE)


def test_a_conditional_run_reads_its_images_once_and_says_what_it_found(tmp_path, monkeypatch, capsys):
    root = tmp_path / "faces"
    for name, v in (("dark/a.png", 10), ("dark/b.png", 20), ("fair/c.png", 200)):
        _put(root / name, v)
    (root / "fair" / "broken.png").write_bytes(b"not a png")
    decoded, real, reads, real_read = [], data.decode_image, [], data._read_cache
    monkeypatch.setattr(data, "decode_image", lambda f, size: decoded.append(f) or real(f, size))
    monkeypatch.setattr(data, "_read_cache", lambda *a: reads.append(a) or real_read(*a))
    cfg = dict(data=str(root), image_size=[8, 8], n_synthetic=1, seed=0, test_fraction=0.34)
    cfg["conditional"] = True
    with pytest.warns(UserWarning) as rec:
        train_x, test_x, (train_y, test_y, info) = data.run_data(cfg, verbose=True)
    assert len(decoded) == 4 and len(reads) == 1 and [str(w.message)[:17] for w in rec] == ["skipped 1 of 4 im"]
    assert capsys.readouterr().out.splitlines() == [f"loaded 3 images (1 skipped) from {str(root)!r}",
                                                    "labels: class = dark 2, fair 1"]
    assert torch.equal(torch.cat([train_x, test_x])[:, 0, 0, 0], torch.tensor([10, 20, 200], dtype=torch.uint8)[
        torch.cat(data.split_indices(3, 0.34, 0))])
    assert torch.equal(torch.cat([train_y, test_y])[:, 0], torch.tensor([0, 0, 1])[torch.cat(data.split_indices(3, 0.34, 0))])


def test_synthetic_label_counts_are_printed(capsys):
    cfg = dict(data=None, image_size=[8, 8], n_synthetic=20, seed=1, test_fraction=0.2, conditional=True)
    data.run_data(cfg, verbose=True)
    y = data.synthetic_faces(20, (8, 8), seed=1, factors=True)[1]
    hair = ", ".join(f"{g} {int((y[:, 0] == i).sum())}" for i, g in enumerate(data.HAIR_GROUPS))
    assert capsys.readouterr().out.splitlines()[1].startswith(f"labels: hair = {hair}; glasses = no {int((y[:, 1] == 0).sum())}, ")


def test_labels_split_like_the_images():
    cfg = dict(data=None, image_size=[32, 32], n_synthetic=30, seed=5, test_fraction=0.2, conditional=True)
    train_x, test_x, (train_y, test_y, _) = data.run_data(cfg)
    x, y = data.synthetic_faces(30, (32, 32), seed=5, factors=True)
    tr, te = data.split_indices(30, 0.2, 5)
    assert torch.equal(train_x, x[tr]) and torch.equal(train_y, y[tr]) and torch.equal(test_y, y[te])


def _id_images(n):
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).clone()


def _ids(x):
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long()


def test_batches_keep_labels_with_their_images_on_resume_and_across_ranks():
    imgs, labels = _id_images(50), torch.arange(50)[:, None] * torch.tensor([[1, 2]])
    kw = dict(seed=3, flip=True, labels=labels)   # a flip keeps the uniform images readable
    full = list(data.Batches(imgs, 8, **kw).epoch(2))
    for x, y in full:
        assert torch.equal(y, _ids(x)[:, None] * torch.tensor([[1, 2]]))      # row for row
    resumed = list(data.Batches(imgs, 8, **kw).epoch(2, start=4))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(full[4:], resumed, strict=True))
    r0 = list(data.Batches(imgs, 8, rank=0, world_size=2, **kw).epoch(2))
    r1 = list(data.Batches(imgs, 8, rank=1, world_size=2, **kw).epoch(2))
    for (x, y), (x0, y0), (x1, y1) in zip(full, r0, r1, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert all(y is None for _, y in data.Batches(imgs, 8).epoch(0))   # no labels: y is None


def test_balanced_batches_show_every_attribute_value_equally_often():
    # independent attributes with rare values (glasses 10 %, beard 5 %, hair 60/30/10 %)
    g = torch.Generator().manual_seed(0)
    n = 4000
    y = torch.stack([torch.multinomial(torch.tensor([.6, .3, .1]), n, True, generator=g),
                     (torch.rand(n, generator=g) < .1).long(), (torch.rand(n, generator=g) < .05).long()], 1)
    x = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    b = data.Batches(x, 200, seed=0, labels=y, weights=data.balance_weights(y))
    drawn = torch.cat([yb for e in range(5) for _, yb in b.epoch(e)])
    assert len(drawn) == 5 * n
    for k, values in enumerate((3, 2, 2)):                  # counted, not derived from the weights
        share = torch.bincount(drawn[:, k], minlength=values).double() / len(drawn)
        assert torch.allclose(share, torch.full((values,), 1 / values, dtype=torch.float64), atol=0.02), (k, share)
    # still a fixed draw per (seed, epoch): a resume at batch 7 yields the same batches
    full = [yb for _, yb in b.epoch(3)]
    assert all(torch.equal(a, c) for a, c in zip(full[7:], [yb for _, yb in b.epoch(3, start=7)]))
    # and the unweighted loader is untouched: a permutation, each image once
    plain = data.Batches(x, 200, seed=0, labels=y)
    assert sorted(torch.cat([xb[:, 0, 0, 0] for xb, _ in plain.epoch(0)]).tolist()) == sorted(((x[:, 0, 0, 0].float() / 127.5) - 1).tolist())
