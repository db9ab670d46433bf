"""Images in, uint8 tensors out: folders, zips, synthetic faces, batches, grids and GIFs.

Reading order follows the data:

    source (folder | .zip | synthetic) --load_images--> uint8 N x 3 x H x W  (decoded once, cached)
        --split_indices--> train / test --Batches--> float [-1, 1] on the device, augmented
    (conditional models: load_labels gives each image's attributes, int64 N x K, split alike)

Every image is converted to RGB, centre-cropped to the target aspect ratio and resized with an
antialiased filter. Decoding happens once per (source, file list, size); later calls read the cache.
Augmentation (seed 001: random h-flip; seed 003: h-flip p=0.5 + ColorJitter) runs per batch on
tensors, on the training device, and depends only on (seed, epoch, batch index), so a resumed run
sees exactly the batches it would have seen.

Below the data story: the machinery that reads files safely (only regular files, only the listed
formats, bounded zip members) and the cache; last, the synthetic-face renderer, which a reader
can skip.
"""
import colorsys
import contextlib
import hashlib
import io
import json
import math
import numbers
import os
import random
import re
import stat
import sys
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin,  # noqa: F401 -- registers the
                 PngImagePlugin, WebPImagePlugin)                  # decoders _FORMATS allows

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Pillow picks a decoder by content, not by name, so it is told which ones it may try: an EPS
# file named face.png would otherwise start Ghostscript. No data file may start a program.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_MAX_FILE_BYTES = 64 << 20   # one zip member, decompressed: no face photo needs more
_CACHE_VERSION = 1     # bump when decoding or the synthetic faces change: old caches go stale
_RESAMPLE = Image.Resampling.BILINEAR   # on downscaling pillow widens the filter: antialiased


class DataError(Exception):
    """A data problem the user must fix (missing path, empty source, too few images)."""


def parse_size(s):
    """'64' or 64 -> (64, 64); '64x48' -> (64, 48), always (H, W)."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    hw = None
    if isinstance(s, (tuple, list)) and len(s) == 2 and all(map(is_int, s)):
        hw = (int(s[0]), int(s[1]))
    elif is_int(s):
        hw = (int(s), int(s))
    elif isinstance(s, str):
        parts = s.lower().replace(" ", "").split("x")
        if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
            hw = (int(parts[0]), int(parts[-1]))
    if hw is None or min(hw) < 1:
        raise ValueError(f"image size must be N or HxW with positive integers "
                         f"(e.g. 64 or 64x48); got {s!r}")
    return hw


def check_enough(n, batch_size):
    """Raise DataError unless n images fill at least one batch (checked before training)."""
    if n < batch_size:
        raise DataError(f"only {n} training images for a batch size of {batch_size}: "
                        f"lower --batch-size or add images")


# ---------------------------------------------------------------------------------------------
# 1. Load: source -> uint8 N x 3 x H x W, decoded once and cached
# ---------------------------------------------------------------------------------------------

def load_images(source, size, *, n_synthetic=10000, seed=0, cache_dir=None, verbose=True):
    """Decode a source once into uint8 N x 3 x H x W (CPU), reusing the cache when it can.

    source: None or 'synthetic' (n_synthetic faces drawn with seed), a folder (recursive,
    symlinks followed) or a .zip (read in place). Files that cannot be read (corrupt, truncated,
    not a regular file, an unlisted format, a zip member over _MAX_FILE_BYTES, a dangling link or
    a folder we may not list) are skipped with one warning that counts them; DataError when
    nothing is left. The cache key is described in _identify: any change re-decodes.
    """
    return _load(source, size, n_synthetic, seed, cache_dir, verbose)[0]


def _load(source, size, n_synthetic, seed, cache_dir, verbose):
    """load_images -> (images, cache meta, names of the files decoded, in row order; None for
    synthetic faces, whose meta["factors"] holds their labels)."""
    size = parse_size(size)
    H, W = size
    kind, path, names, unreadable, label, key = _identify(source, size, n_synthetic, seed)
    src = f"synthetic faces (seed {seed})" if kind == "synthetic" else _show(path)
    npy = _cache_dir(cache_dir) / f"{label}-{H}x{W}-{key[:16]}.npy"

    x, meta = _read_cache(npy, size)
    hit = x is not None and (kind != "synthetic" or "factors" in meta)   # older caches had no labels
    if not hit:
        if kind == "synthetic":
            arr, factors = synthetic_faces(n_synthetic, size, seed, factors=True)
            arr, bad = arr.numpy(), []
        else:
            arr, bad = _decode_files(kind, path, names, size, verbose)
            bad = sorted(unreadable + bad)
            if len(arr) == 0:
                raise DataError(f"none of the {len(bad)} image files in {src} could be read "
                                f"(first: {_show(bad[0][0])}: {_show(bad[0][1])[1:-1]})")
        meta = {"n": len(arr), "skipped": [list(b) for b in bad], "total": len(arr) + len(bad)}
        if kind == "synthetic":
            meta["factors"] = factors.tolist()
        _write_cache(npy, arr, meta)
        x = torch.from_numpy(arr)
    _warn_skipped(meta["skipped"], meta["total"], src)
    if verbose:
        print(f"loaded {len(x)} images ({len(meta['skipped'])} skipped) from {src}"
              f"{' [cache hit]' if hit else ''}", flush=True)
    skipped = {n for n, _ in meta["skipped"]}
    return x, meta, None if names is None else [n for n in names if n not in skipped]


def fingerprint(source, size, n_synthetic=10000, seed=0):
    """A short hex id of the data a run trains on: the cache key of load_images (see _identify).
    It changes when a file is added, removed, resized or touched, or the source moves; for the
    synthetic faces, when their number or seed does. Cheap: it lists files, never decodes them."""
    return _identify(source, parse_size(size), n_synthetic, seed)[-1][:16]


# ---------------------------------------------------------------------------------------------
# 2. Split: a deterministic train/test split; the test images never train
# ---------------------------------------------------------------------------------------------

def split_indices(n, test_fraction=0.2, seed=0):
    """Deterministic train/test split of range(n) -> (train_idx, test_idx), sorted LongTensors."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)      # both sides non-empty whenever possible
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def run_data(cfg, verbose=False):
    """A run's images, decoded once (cached) and split by its seed -> (train, test) uint8 tensors.
    facegen.py calls this too, so it sees exactly the split the run trained on; a warning says
    when the data no longer matches the fingerprint the run recorded (cfg["data_fingerprint"])."""
    size = tuple(cfg["image_size"])
    images = load_images(cfg["data"], size, n_synthetic=cfg["n_synthetic"], seed=cfg["seed"], verbose=verbose)
    now = fingerprint(cfg["data"], size, cfg["n_synthetic"], cfg["seed"])
    if cfg.get("data_fingerprint", now) != now:  # same split of other images: "test" may hold training images
        print(f"warning: the data at {_show(cfg['data'] or 'synthetic faces')} changed since this run trained on it (fingerprint "
              f"{now}, the run has {cfg['data_fingerprint']}): images were added, removed or moved, so its "
              f"test split is no longer held out", file=sys.stderr)
    train_idx, test_idx = split_indices(len(images), cfg["test_fraction"], cfg["seed"])
    return images[train_idx], images[test_idx]


def load_labels(source, size, *, n_synthetic=10000, seed=0, attr_file=None, attrs=None, cache_dir=None):
    """The labels of load_images(source, size, ...), row for row -> (int64 N x K, info), where
    info = {attribute: [its value names]} and row entry k indexes the k-th attribute's values.
      synthetic faces: SYNTHETIC_LABELS (hair colour group, glasses, beard), the factors the
          renderer drew, kept in the cache beside the images;
      attr_file: a CelebA-style list_attr_celeba.txt -- line 1 the image count, line 2 the
          attribute names, then one line 'FILE v1 v2 ...' per image with v = 1 or -1 -- matched by
          file name; attrs (names) picks columns, default all; -1 -> "no" (0), 1 -> "yes" (1);
      otherwise the ImageFolder convention: the first folder below the root (below a zip's one
          top folder, if all its images share one) names the class, classes sorted by name."""
    x, meta, names = _load(source, size, n_synthetic, seed, cache_dir, verbose=False)
    if names is None:
        if attr_file is not None or attrs:
            raise DataError("the synthetic faces carry their own labels (hair, glasses, beard): "
                            "--attr-file/--attrs are for real data")
        return torch.tensor(meta["factors"], dtype=torch.long).view(len(x), -1), dict(SYNTHETIC_LABELS)
    if attr_file is not None:
        return _attr_labels(attr_file, names, attrs)
    if attrs:
        raise DataError("--attrs picks columns of an attribute file: give --attr-file too")
    parts = [n.split("/") for n in names]
    if len({p[0] for p in parts}) == 1 and all(len(p) > 2 for p in parts):
        parts = [p[1:] for p in parts]                  # a zip's single top folder is the root
    if any(len(p) < 2 for p in parts):
        loose = next("/".join(p) for p in parts if len(p) < 2)
        raise DataError(f"labels from subfolders: every image must sit in a class folder below the "
                        f"root, but {_show(loose)} does not (or give --attr-file)")
    classes = sorted({p[0] for p in parts})
    y = torch.tensor([[classes.index(p[0])] for p in parts], dtype=torch.long)
    return y, {"class": classes}


def _attr_labels(path, names, attrs):
    """CelebA's list_attr_celeba.txt -> (int64 N x K in {0, 1}, info) for the decoded files `names`."""
    try:
        with _open_regular(Path(path).expanduser()) as f:
            lines = f.read().decode("utf-8").splitlines()
        header = lines[1].split()
        rows = {}
        for line in lines[2:]:
            cols = line.split()
            if cols:
                rows[cols[0]] = cols[1:]
    except (OSError, UnicodeDecodeError, IndexError, DataError) as e:
        raise DataError(f"cannot read the attribute file {_show(path)} ({_why(e)})") from None
    want = attrs or header
    missing = [a for a in want if a not in header]
    if missing:
        raise DataError(f"attribute(s) {', '.join(missing)} not in {_show(path)}; it has {', '.join(header)}")
    cols = [header.index(a) for a in want]
    y, absent = [], []
    for n in names:
        row = rows.get(n.rsplit("/", 1)[-1])
        if row is None or len(row) != len(header) or any(row[c] not in ("1", "-1") for c in cols):
            absent.append(n)
            continue
        y.append([int(row[c] == "1") for c in cols])
    if absent:
        raise DataError(f"{len(absent)} image(s) have no valid row (±1 per attribute) in "
                        f"{_show(path)}, first {_show(absent[0])}")
    return torch.tensor(y, dtype=torch.long).view(len(names), len(cols)), {a: ["no", "yes"] for a in want}


def run_labels(cfg):
    """A run's labels split as run_data splits its images -> (train, test, info) (load_labels)."""
    y, info = load_labels(cfg["data"], tuple(cfg["image_size"]), n_synthetic=cfg["n_synthetic"],
                          seed=cfg["seed"], attr_file=cfg.get("attr_file"), attrs=cfg.get("attrs"))
    train_idx, test_idx = split_indices(len(y), cfg["test_fraction"], cfg["seed"])
    return y[train_idx], y[test_idx], info


def balance_weights(labels):
    """Per-image draw weights under which every attribute's values are equally frequent:
    w_i = Π_k 1 / count_k(y_ik) (K attributes). Exact when the attributes are independent, as the
    synthetic faces' factors are (they then stay independent); approximate when they correlate.
    A conditional model learns p(x | y), which does not depend on how often each y is shown: the
    rare values (glasses, beard) are just drawn as often as the common ones, for D's real batches
    and G's requests alike."""
    w = torch.ones(len(labels), dtype=torch.float64)
    for k in range(labels.shape[1]):
        w /= torch.bincount(labels[:, k]).double()[labels[:, k]]
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# 3. Batches: shuffled, augmented with h-flip and torchvision ColorJitter semantics per sample
# ---------------------------------------------------------------------------------------------

class Batches:
    """Shuffled, augmented mini-batches of a uint8 dataset that lives on `device`.

    Order and augmentation depend only on (seed, epoch, batch index), so `epoch(e, start=k)`
    yields exactly the batches k, k+1, ... of a full pass: resume is exact. With world_size > 1
    every rank draws the same global batch and augmentation and keeps its own contiguous rows.
    """

    def __init__(self, images_uint8, batch_size, *, seed=0, flip=False, jitter=0.0,
                 device="cpu", rank=0, world_size=1, drop_last=True, labels=None, weights=None):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError("Batches expects a uint8 tensor N x C x H x W")
        if batch_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of "
                             f"world size {world_size} (rank {rank})")
        if labels is not None and len(labels) != len(images_uint8):
            raise ValueError(f"{len(labels)} labels for {len(images_uint8)} images")
        self.images = images_uint8.to(device)            # moved once: a GPU-resident dataset
        self.labels = None if labels is None else labels.to(device)
        self.weights = weights  # per-image draw weights (balance_weights): draws with replacement
        self.batch_size, self.seed, self.flip, self.jitter = batch_size, seed, flip, jitter
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def __len__(self):
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch, start=0):
        """Yield float batches in [-1, 1] on the device, (batch_size // world_size) x 3 x H x W,
        beginning at batch index `start`; with labels, (x, y) pairs, y the same rows' labels
        (int64 (batch_size // world_size) x K; augmentation never changes a label)."""
        rng = _rng(self.seed, "order", epoch)
        perm = (torch.randperm(len(self.images), generator=rng) if self.weights is None else
                torch.multinomial(self.weights, len(self.images), replacement=True, generator=rng))
        perm = perm.to(self.images.device)
        B, ws, r = self.batch_size, self.world_size, self.rank
        for i in range(start, len(self)):
            idx = perm[i * B:(i + 1) * B]                       # the global batch
            lo, hi = r * len(idx) // ws, (r + 1) * len(idx) // ws   # this rank's rows
            x = self.images.index_select(0, idx[lo:hi])                 # uint8 B x 3 x H x W
            x = x.float().div_(127.5).sub_(1)                 # [0, 255] -> [-1, 1]
            if self.flip or self.jitter > 0:
                x = augment(x, _rng(self.seed, "aug", epoch, i), self.flip, self.jitter,
                            rows=(lo, len(idx)))
            yield x if self.labels is None else (x, self.labels.index_select(0, idx[lo:hi]))


def augment(x, generator, flip=True, jitter=0.0, *, rows=None):
    """Per-sample horizontal flip (p = 0.5) and colour jitter (seed 003, torchvision ColorJitter):
    brightness, contrast and saturation factors each ~ U[max(0, 1-jitter), 1+jitter], applied in
    a random order per image, each followed by a clamp to [0, 1]:
        brightness  y <- f * y
        contrast    y <- f * y + (1-f) * mean(gray(y))      gray = 0.2989 R + 0.587 G + 0.114 B
        saturation  y <- f * y + (1-f) * gray(y)
    x is float in [-1, 1] (N x 3 x H x W) and is not modified; returns a new tensor in [-1, 1].
    rows=(lo, n): x holds rows lo, lo+1, ... of a batch of n (one data-parallel rank's share);
    the random draws are those of the whole batch, so the ranks together augment as one would.
    Hue jitter is left out: seed 003 names brightness, contrast and saturation only."""
    lo, n = rows or (0, len(x))
    p = _augment_params(n, generator, flip, jitter)
    mine = slice(lo, lo + len(x))
    x = _flip(x, p["flip"][mine]) if flip else x.clone()
    if jitter > 0:
        _color_jitter_(x, p["factors"][mine], p["order"][mine])
    return x.clamp_(-1, 1)


def _augment_params(n, generator, flip, jitter):
    """Draw every random number for a batch of n on the generator's device (CPU by default),
    so the same seed gives the same augmentation whatever device the images live on."""
    dev = generator.device
    p = {"flip": torch.rand(n, generator=generator, device=dev) < 0.5 if flip else None}
    if jitter > 0:
        lo, hi = max(0.0, 1.0 - jitter), 1.0 + jitter
        p["factors"] = lo + (hi - lo) * torch.rand(n, 3, generator=generator, device=dev)
        # ColorJitter applies its transforms in a fresh random order for every image
        p["order"] = torch.rand(n, 3, generator=generator, device=dev).argsort(dim=1)
    return p


def _flip(x, mask):
    """Mirror the images whose mask entry is True (works on uint8 and float alike)."""
    return torch.where(mask.to(x.device)[:, None, None, None].expand_as(x), x.flip(-1), x)


def _color_jitter_(x, factors, order):
    """In place on float x in [-1, 1]; factors, order: N x 3 from _augment_params.
    Each op is the blend y <- clamp(f*y + (1-f)*m, 0, 1) toward its own m (brightness: m = 0),
    so a per-sample choice is arithmetic on N x 1 x 1 x 1 weights: no loop over images, no device
    sync, and in-place updates of one buffer (fresh full-size tensors cost more than the maths)."""
    factors, order = factors.to(x.device, x.dtype), order.to(x.device)
    y = x.add_(1).mul_(0.5)                                   # [0, 1], as torchvision expects
    gray = torch.empty_like(y[:, :1])                                           # N x 1 x H x W
    for k in range(3):
        op = order[:, k]                                      # 0 brightness, 1 contrast, 2 sat.
        f = factors.gather(1, op[:, None])[:, :, None, None]                    # N x 1 x 1 x 1
        torch.mul(y[:, 0:1], 0.2989, out=gray).add_(y[:, 1:2], alpha=0.587).add_(y[:, 2:3],
                                                                                  alpha=0.114)
        w_c = (1 - f) * (op == 1).to(x.dtype)[:, None, None, None]   # contrast: m = mean(gray)
        w_s = (1 - f) * (op == 2).to(x.dtype)[:, None, None, None]   # saturation: m = gray
        y.mul_(f).add_(w_c * gray.mean((2, 3), keepdim=True)).addcmul_(w_s, gray).clamp_(0, 1)
    return y.mul_(2).sub_(1)                                  # back to [-1, 1]


def _rng(*parts):
    """A private CPU torch.Generator seeded from a stable hash of parts (never the global RNG)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ---------------------------------------------------------------------------------------------
# 4. Pictures out: one grid writer and one GIF writer for the whole project
# ---------------------------------------------------------------------------------------------

def make_grid(images, nrow=8, padding=2, pad_value=0):
    """Float N x C x H x W in [-1, 1] (or uint8) -> uint8 grid (rows*(H+p)+p) x (nrow*(W+p)+p) x 3,
    images laid out row by row, nrow per row."""
    x = images.detach().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    p = padding
    grid = torch.full((c, nrows * (h + p) + p, ncol * (w + p) + p), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, p + r * (h + p):p + r * (h + p) + h, p + col * (w + p):p + col * (w + p) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images, path, nrow=8, padding=2, **labels):
    """Write make_grid(images) as a PNG, creating parent folders; with labels (row_labels,
    col_labels, title, scale: see labelled_grid), the labelled picture."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow, padding)
    save_png(labelled_grid(grid, images.shape[-2:], padding, **labels) if labels else Image.fromarray(grid), path)


def save_png(img, path):
    """Save a pillow RGB image as a PNG; one of at most 256 colours (a loss plot, a flat grid) as a
    palette PNG: the same pixels in about half the bytes (the README's docs/ stay small)."""
    colours = img.getcolors(256)
    (img.quantize(len(colours)) if colours else img).save(path, optimize=True)


def font(size=10):
    """Pillow's built-in font (no font file needed; ASCII only: no Greek, no minus sign)."""
    return ImageFont.load_default(size)


def labelled_grid(grid, cell, padding=2, row_labels=(), col_labels=(), title=None, scale=1):
    """A make_grid picture (uint8 H x W x 3) of cell = (h, w) images that explains itself: each
    row's label in a band to its left, each column's above it (labels may hold a newline; "" for
    none), a title line on top. The grid itself keeps the bottom-right corner, unchanged (scale
    enlarges it, nearest neighbour, so that labels fit)."""
    (h, w), p, f = cell, padding, font()
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(img)
    size = lambda t: d.multiline_textbbox((0, 0), t, font=f, spacing=1)[2:]
    left = max((size(t)[0] for t in row_labels if t), default=-6) + 6
    col_h = max((size(t)[1] for t in col_labels if t), default=-4) + 4
    title_w, title_h = (size(title)[0] + 4, size(title)[1] + 6) if title else (0, 0)
    left = max(left, title_w - img.width)  # the faces keep the bottom-right corner
    out = Image.new("RGB", (left + img.width, title_h + col_h + img.height), "white")
    out.paste(img, (left, title_h + col_h))
    d = ImageDraw.Draw(out)
    if title:
        d.text((2, 2), title, fill="black", font=f)
    for r, t in enumerate(row_labels):  # right-aligned, centred on the row
        y = title_h + col_h + scale * (p + r * (h + p) + h / 2)
        d.multiline_text((left - 3, y), t, fill="black", font=f, anchor="rm", align="right", spacing=1)
    for c, t in enumerate(col_labels):  # centred over the column
        x = left + scale * (p + c * (w + p) + w / 2)
        d.multiline_text((x, title_h + col_h - 2), t, fill="black", font=f, anchor="md", align="center", spacing=1)
    return out


def nice_ticks(lo, hi, log=False, n=5, integer=False):
    """About n round tick values in [lo, hi] (steps of 1, 2 or 5 x 10^k, at least 1 if integer);
    log: powers of ten, and 2 and 5 times them when the range spans under 3 decades."""
    if log:
        k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mult = (1,) if k1 - k0 > 3 else (1, 2, 5)
        return [m * 10.0 ** k for k in range(k0, k1 + 1) for m in mult if lo <= m * 10.0 ** k <= hi]
    raw = (hi - lo) / max(n - 1, 1)
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    step = max(step, 1) if integer else step
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def tick_label(v):
    """1500000 -> '1.5e6', 0.25 -> '0.25', 10000 -> '10000': short and exact for round ticks."""
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        m, e = f"{v:.1e}".split("e")
        return f"{m.removesuffix('.0')}e{int(e)}"
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"   # .4g would print 10000 as '1e+04'


def plot_losses(rows, path, points=(), units=None, width=760, panel_h=170):
    """metrics.csv rows (one per epoch) and steps.csv points (every --log-every steps), drawn
    with pillow as small multiples: one panel per term, titled with its quantity and unit
    (units: {term: label}), its own y axis (log when a positive term spans over 1.5 decades: a
    VAE's NLL falls 100x), x in optimizer steps with the epoch ends as grey lines. Train terms
    are drawn from the points when there are as many as epochs (else from the epoch means),
    test terms (per epoch) beside them; D(x) shares a panel with D(G(z)). No plotting library:
    the design card allows torch, numpy and pillow."""
    units, points, f = units or {}, list(points), font(11)
    skip = {"epoch", "step", "images_per_s", "seconds"}
    has = lambda rs, k: rs and all(r.get(k, "") not in ("", None) for r in rs)
    keys = [k for k in dict.fromkeys([*(rows[0] if rows else {}), *(points[0] if points else {})])
            if k not in skip and (has(rows, k) or has(points, k))]
    groups = {}
    for k in keys:  # test_recon joins recon; D(G(z)) joins D(x)
        base = "D(x)" if k == "D(G(z))" else k.removeprefix("test_")
        groups.setdefault(base if base in keys else k, []).append(k)
    dense = lambda k: has(points, k) and len(points) >= len(rows)  # the points, unless sparser than epochs
    # a run resumed from one that logged no points: its epoch means, up to the first point
    first = float(points[0]["step"]) if points else math.inf
    early = lambda k: [r for r in rows if dense(k) and float(r["step"]) < first and has([r], k)]
    series = {k: [(float(r["step"]), float(r[k])) for r in early(k) + (points if dense(k) else rows)] for k in keys}
    ends = [float(r["step"]) for r in rows]
    every = int(points[1]["step"]) - int(points[0]["step"]) if len(points) > 1 else "N"
    xs = [x for k in keys for x, _ in series[k]] + ends
    x0, x1 = (0.0, max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    left, right = 64, width - 150
    img = Image.new("RGB", (width, max(1, len(groups)) * panel_h + 24), "white")
    d = ImageDraw.Draw(img)
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    for i, (name, members) in enumerate(groups.items()):
        top, bottom = 22 + i * panel_h, (i + 1) * panel_h - 8
        d.text((left, top - 16), f"{', '.join(members)}: {units.get(name, name)}", fill="black", font=f)
        finite = [v for k in members for _, v in series[k] if math.isfinite(v)] or [0.0]
        lo, hi = min(finite), max(finite)
        log = lo > 0 and hi / lo > 30
        if log:
            lo, hi = lo / 1.1, hi * 1.1
            ty = lambda v: math.log10(max(v, lo))
        else:
            pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-3)
            lo, hi = lo - pad, hi + pad
            ty = lambda v: v
        py = lambda v: bottom - (ty(v) - ty(lo)) / (ty(hi) - ty(lo)) * (bottom - top)
        for x in ends if len(ends) <= 60 else ends[::math.ceil(len(ends) / 60)]:
            d.line([px(x), top, px(x), bottom], fill="#dddddd")
        for v in nice_ticks(lo, hi, log):
            d.line([left - 4, py(v), left, py(v)], fill="black")
            d.line([left + 1, py(v), right - 1, py(v)], fill="#f0f0f0")
            d.text((left - 6, py(v)), tick_label(v), fill="black", font=f, anchor="rm")
        for v in nice_ticks(x0, x1, integer=True):
            d.line([px(v), bottom, px(v), bottom + 4], fill="black")
            if i == len(groups) - 1:
                d.text((px(v), bottom + 5), tick_label(v), fill="black", font=f, anchor="mt")
        d.rectangle([left, top, right, bottom], outline="black")
        for j, k in enumerate(members):
            c = colours[j % len(colours)]
            pts = [(px(x), py(v)) for x, v in series[k] if math.isfinite(v)]
            if len(pts) > 1:
                d.line(pts, fill=c, width=1 if dense(k) else 2)
            if not dense(k) or len(pts) == 1:
                for x, y in pts:
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            how = f"mean of {every} steps" if dense(k) else "per epoch"
            d.line([right + 8, top + 8 + 28 * j, right + 26, top + 8 + 28 * j], fill=c, width=3)
            d.text((right + 31, top + 2 + 28 * j), f"{k}\n{how}", fill="black", font=f, spacing=1)
    before = f"; epoch means before step {first:.0f}, the first logged" if any(early(k) for k in keys) else ""
    d.text(((left + right) // 2, img.height - 2), f"optimizer step (grey lines: epoch ends{before})",
           fill="black", font=f, anchor="md")
    save_png(img, path)


def epoch_frames(folder):
    """The sample grids epoch_NNN.png in `folder` (paths), in epoch order: epoch_1000 comes after
    epoch_999, not between epoch_100 and epoch_101. Any other name, and anything that is not a
    regular file, is ignored; a missing folder has no frames."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DataError(f"cannot list {_show(folder)} ({_why(e)})") from None
    frames = sorted((int(m[1]), name) for name in names
                    if (m := re.fullmatch(r"epoch_([0-9]+)\.png", name)))
    paths = [os.path.join(folder, name) for _, name in frames]
    return [p for p in paths if os.path.isfile(p)]


def save_gif(frames, path, duration_ms=200, loop=0):
    """Animated GIF from image paths or PIL images (e.g. epoch_frames(...): the 'fast forward').
    duration_ms: one number, or one per frame. A frame that cannot be read (corrupt, not a
    regular file, not an image) is skipped with one warning; DataError when none is left.
    Returns the number of frames written."""
    durations = duration_ms if isinstance(duration_ms, (list, tuple)) else None
    imgs, kept, bad = [], [], []
    for i, f in enumerate(frames):
        try:
            if isinstance(f, Image.Image):
                imgs.append(f.convert("RGB"))
            else:
                with _open_image(f) as im:
                    imgs.append(im.convert("RGB"))
            kept.append(i)
        except Exception as e:  # noqa: BLE001 -- a bad frame costs one frame, never the GIF
            bad.append((str(f), _why(e)))
    _warn_skipped(bad, len(kept) + len(bad), f"the frames for {_show(path)}")
    if not imgs:
        raise DataError(f"no readable frames to write {_show(path)}")
    if durations is not None:
        duration_ms = [durations[i] for i in kept]
    imgs = [im if im.size == imgs[0].size else im.resize(imgs[0].size, _RESAMPLE) for im in imgs]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=duration_ms, loop=loop)
    return len(imgs)


# =============================================================================================
# Machinery: identify a source, read its files safely, decode them, cache the result
# =============================================================================================

def _identify(source, size, n_synthetic, seed):
    """-> (kind, path, names, unreadable, label, key). Lists files, decodes nothing.

    key (hex sha256) covers everything the decoded images depend on: the size, _CACHE_VERSION
    and, for files, the source path and every file's name, size and mtime (CRC inside a zip);
    for synthetic faces, their number and seed. It names the cache and is the data fingerprint.
    """
    H, W = size
    key = hashlib.sha256(f"v{_CACHE_VERSION} {H}x{W}".encode())
    if source is None or str(source) == "synthetic":
        if n_synthetic < 1:
            raise DataError(f"n_synthetic must be at least 1; got {n_synthetic}")
        key.update(json.dumps(["synthetic", n_synthetic, seed]).encode())
        return "synthetic", None, None, [], f"synthetic-n{n_synthetic}-seed{seed}", key.hexdigest()
    try:
        path = Path(source).expanduser().resolve()
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data path {_show(source)} does not exist") from None
    except (OSError, RuntimeError, ValueError) as e:     # RuntimeError: a symlink loop
        raise DataError(f"cannot read the data path {_show(source)} ({_why(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        kind, (entries, unreadable) = "folder", _list_folder(path)
        names = [e[0] for e in entries]
    elif stat.S_ISREG(st.st_mode) and path.suffix.lower() == ".zip":
        with _open_zip(path) as zf:
            infos = sorted((i for i in zf.infolist()
                            if not i.is_dir() and _is_image_name(i.filename)),
                           key=lambda i: i.filename)
        kind, names, unreadable = "zip", [i.filename for i in infos], []
        entries = [(st.st_size, st.st_mtime_ns)] + [(i.filename, i.file_size, i.CRC) for i in infos]
    elif stat.S_ISREG(st.st_mode):
        raise DataError(f"{_show(path)} is neither a folder nor a .zip of images")
    else:                                              # a FIFO would block, a device never end
        raise DataError(f"{_show(path)} is not a regular file (nor a folder)")
    if not names and not unreadable:
        raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {_show(path)}")
    seen = [str(path), entries] + ([[n for n, _ in unreadable]] if unreadable else [])
    key.update(json.dumps(seen).encode())
    label = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:40]       # a safe cache file name
    return kind, path, names, unreadable, label, key.hexdigest()


def _is_image_name(name):
    base = name.rsplit("/", 1)[-1]
    return name.lower().endswith(IMAGE_EXTS) and not base.startswith("._")  # macOS resource forks


def _list_folder(root):
    """Image files under root, recursively -> (sorted [(relative name, size, mtime_ns)],
    [(name, why)] for entries that cannot be read). Symlinks are followed, each folder is read
    once (a link back up the tree is no loop). A dangling link, a link loop, a folder we may not
    list or a non-regular file is reported, never dropped in silence; so is an unreadable entry
    whose name does not rule out images (a name without an extension may be a folder)."""
    entries, unreadable, seen, todo = [], [], set(), [(root, "")]
    while todo:
        folder, prefix = todo.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not prefix:
                raise DataError(f"cannot read the folder {_show(root)} ({_why(e)})") from None
            unreadable.append((prefix, _why(e)))
            continue
        for item in items:
            name = prefix + item.name
            try:
                st = item.stat()                      # follows links: dangling ones raise here
            except OSError as e:
                if _is_image_name(name) or "." not in item.name:
                    unreadable.append((name, _why(e)))
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append((item.path, name + "/"))
            elif _is_image_name(name) and stat.S_ISREG(st.st_mode):
                entries.append((name, st.st_size, st.st_mtime_ns))
            elif _is_image_name(name):
                unreadable.append((name, "not a regular file"))
    return sorted(entries), sorted(unreadable)


def _open_regular(path):
    """open(path, 'rb') for a regular file only: a FIFO would block forever, a device might never
    end. Checked before opening, and again on the open file (O_NONBLOCK, so a FIFO swapped in
    between cannot block either)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError("not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError("not a regular file")
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def _open_image(f):
    """Image.open on a path (a regular file only) or a file object, trying only _FORMATS."""
    with (_open_regular(f) if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f)
          ) as fp:
        try:
            img = Image.open(fp, formats=_FORMATS)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"not a {', '.join(_FORMATS[:-1])} or "
                                         f"{_FORMATS[-1]} image") from None
        with img:
            yield img


@contextlib.contextmanager
def _open_zip(path):
    """A ZipFile on a regular file, or DataError with one line."""
    try:
        fp = _open_regular(path)
    except OSError as e:
        raise DataError(f"cannot read {_show(path)} ({_why(e)})") from None
    except DataError:
        raise DataError(f"{_show(path)} is not a regular file") from None
    with fp:
        try:
            zf = zipfile.ZipFile(fp)
        except Exception as e:  # noqa: BLE001 -- BadZipFile, and a damaged zip raises others too
            raise DataError(f"{_show(path)} is not a readable zip file ({_why(e)})") from None
        with zf:
            yield zf


def _read_member(zf, name):
    """A zip member's bytes, refused over _MAX_FILE_BYTES. The declared size is checked first and
    then caps the read (the inflater makes no more than asked for), so a zip bomb costs no memory
    and a header that understates its member fails zipfile's CRC check instead."""
    info = zf.getinfo(name)
    if info.file_size > _MAX_FILE_BYTES:
        raise ValueError(f"declares {info.file_size} bytes, over the {_MAX_FILE_BYTES} limit")
    with zf.open(info) as f:
        b = f.read(info.file_size + 1)
    if len(b) > info.file_size:
        raise ValueError(f"longer than the {info.file_size} bytes it declares")
    return b


def _decode_files(kind, root, names, size, verbose=True):
    """Decode every file -> (uint8 N x 3 x H x W for the good ones, [(name, why)] for the bad)."""
    H, W = size
    out = np.empty((len(names), 3, H, W), np.uint8)
    ok = np.zeros(len(names), bool)
    bad = []
    with contextlib.ExitStack() as stack:
        zf = stack.enter_context(_open_zip(root)) if kind == "zip" else None

        def one(name):            # -> (array or None, why or None); any failure skips the file
            try:
                return decode_image(io.BytesIO(_read_member(zf, name)) if zf else root / name,
                                    size), None
            except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped, never a crash
                return None, _why(e)

        # Pillow only warns about images over its decompression-bomb limit: here that is an
        # error, so such a file is skipped. Set once around the pool (filters are global).
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow releases the GIL while decoding and resampling, so threads overlap real work;
        # ZipFile serialises the reads of its members with a lock and inflates outside it.
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as ex:
            for i, (arr, err) in enumerate(ex.map(one, names)):
                if arr is None:
                    bad.append((names[i], err))
                else:
                    out[i], ok[i] = arr.transpose(2, 0, 1), True
                if verbose and (i + 1) % 20000 == 0:
                    print(f"  decoded {i + 1}/{len(names)} images", file=sys.stderr, flush=True)
    return (out if ok.all() else out[ok]), bad     # no second copy when nothing was skipped


def decode_image(f, size):
    """File path or file object -> uint8 array H x W x 3. Raises on unreadable/truncated files,
    on anything but a regular file and on formats outside _FORMATS."""
    with _open_image(f) as img:
        H, W = size
        cw = _crop_box(*img.size, size)
        k = max(2 * W / (cw[2] - cw[0]), 2 * H / (cw[3] - cw[1]))
        if k < 1 and img.format == "JPEG":
            # JPEG can decode at 1/2, 1/4, 1/8 scale almost for free; keep >= 2x the target.
            img.draft(None, (math.ceil(img.size[0] * k), math.ceil(img.size[1] * k)))
        img.load()        # decode now: a truncated file raises here, not half-grey later
        ImageOps.exif_transpose(img, in_place=True)   # phone photos store rotation in EXIF
        return np.asarray(_fit(_to_rgb(img), size), dtype=np.uint8)


def _to_rgb(img):
    """Any pillow mode -> RGB. 16-bit and alpha need care that Image.convert does not take."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # convert('RGB') clips 16-bit values at 255 (a white image); rescale to 8 bits instead.
        # Mode 'I' holds 16-bit PNGs on some pillow versions; a max above 255 tells them apart.
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:
            peak = 1.0
        g = np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have no defined colour: composite onto white.
        img = img.convert("RGBA")
        out = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(out, img).convert("RGB")
    return img.convert("RGB")


def _crop_box(w, h, size):
    """Largest centred box of aspect W/H inside a w x h image, (left, top, right, bottom)."""
    H, W = size
    if w * H > h * W:                      # too wide: trim the sides
        cw, ch = h * W / H, h
    else:                                  # too tall: trim top and bottom
        cw, ch = w, w * H / W
    left, top = (w - cw) / 2, (h - ch) / 2
    return (left, top, left + cw, top + ch)


def _fit(img, size):
    """Centre crop to the aspect ratio of size = (H, W), then resize (antialiased) to it."""
    H, W = size
    # crop first: resize(box=...) would let the filter read pixels outside the box
    left, top, right, bottom = (round(v) for v in _crop_box(*img.size, size))
    # A sliver (a 1 x 5000 strip) is kept faithfully, not skipped: its centre crop is narrower
    # than a pixel and would round to nothing (a black square), so it keeps at least one pixel.
    box = (left, top, max(right, left + 1), max(bottom, top + 1))
    return img.crop(box).resize((W, H), _RESAMPLE)


def _cache_dir(cache_dir):
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FACEGEN_CACHE") or Path.home() / ".cache" / "facegen")


def _read_cache(npy, size):
    """-> (uint8 tensor, meta), or (None, None) when the entry is missing, stale or damaged
    (then the source is decoded again)."""
    try:
        with _open_regular(npy.with_suffix(".json")) as f:
            meta = json.loads(f.read())
        with _open_regular(npy) as f:  # mapped, not read: the split copies its rows straight out
            version = np.lib.format.read_magic(f)  # of it (one copy of the data in memory, not two)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(f)
            arr = np.memmap(f, dtype, "c", f.tell(), shape, "F" if fortran else "C")  # copy-on-write
        skipped = meta["skipped"]
        if (arr.dtype == np.uint8 and arr.shape == (meta["n"], 3, *size)
                and isinstance(meta["total"], int) and isinstance(skipped, list)
                and all(isinstance(s, list) and len(s) == 2 and all(isinstance(t, str) for t in s)
                        for s in skipped)):
            return torch.from_numpy(arr), meta
    except Exception:  # noqa: BLE001 -- a damaged or tampered cache entry is only a cache miss
        pass
    return None, None


def _write_cache(npy, arr, meta):
    """Atomic writes (temp file + rename): concurrent ranks or a Ctrl-C never leave half a file."""
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, npy)
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, npy.with_suffix(".json"))
    except OSError as e:
        warnings.warn(f"could not write the image cache {_show(npy)} ({_why(e)}); "
                      f"continuing without it")


def _warn_skipped(bad, total, src):
    if bad:
        few = ", ".join(f"{_show(n)} ({_show(why)[1:-1]})" for n, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(f"skipped {len(bad)} of {total} image files in {src} that could not be "
                      f"read: {few}{more}", stacklevel=3)


def _show(name):
    """A name fit to print, quoted and escaped like repr: a newline or a terminal escape
    sequence in a file name cannot forge or hide lines of output."""
    return repr(str(name))


def _why(e):
    return f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)


# =============================================================================================
# Synthetic faces: an offline stand-in for real photos, so every command runs with no download.
# Nothing above depends on how they are drawn: a reader can skip the rest of the file.
# =============================================================================================
# Independent factors, each drawn from the face's own RNG seeded by (seed, index):
# skin tone, face shape (width, forehead, jaw), hair colour and style, ears, eye colour, size,
# spacing, gaze and style, eyebrows, nose, mouth, blush, freckles, facial hair, glasses,
# background and shirt colour, and the head's position, size and tilt. The parts below draw
# their random numbers in a fixed order: changing that order changes every face (and the cache).

def synthetic_faces(n, size=(64, 64), seed=0, factors=False):
    """n procedural cartoon faces -> uint8 n x 3 x H x W; face i depends only on (seed, i).
    factors=True: (images, int64 n x 3 labels), SYNTHETIC_LABELS' attributes, drawn by the same
    random numbers that draw the face (recording them changes no pixel)."""
    size = parse_size(size)
    chunks = [(i, min(i + _FACE_CHUNK, n), size, seed) for i in range(0, n, _FACE_CHUNK)]
    workers = min(os.cpu_count() or 1, 8)
    parts = None
    if n >= _FACE_POOL_MIN and workers > 1:
        try:
            with ProcessPoolExecutor(workers) as ex:
                parts = list(ex.map(_render_range, chunks))
        except Exception as e:  # noqa: BLE001 -- no processes here (sandbox): draw serially
            warnings.warn(f"drawing faces in one process ({type(e).__name__}: {e})")
    if parts is None:
        parts = [_render_range(c) for c in chunks]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])) if parts else torch.empty(0, 3, *size, dtype=torch.uint8)
    if not factors:
        return images
    return images, torch.from_numpy(np.concatenate([p[1] for p in parts])) if parts else torch.empty(0, 3, dtype=torch.long)


_FACE_CHUNK, _FACE_POOL_MIN = 500, 2000     # faces per task; fewer faces are drawn in-process


def _render_range(args):
    """Faces start..stop-1 -> (uint8 (stop-start) x 3 x H x W, int64 (stop-start) x 3 factors)
    (a picklable unit of work)."""
    start, stop, size, seed = args
    S = max(128, 2 * max(size))                     # supersample, then an antialiased resize
    out = np.empty((stop - start, 3, *size), np.uint8)
    factors = np.empty((stop - start, len(SYNTHETIC_LABELS)), np.int64)
    for i in range(start, stop):
        rng = random.Random(f"facegen-face/{seed}/{i}")   # each face depends on (seed, i) only
        f = _draw_face(rng, S)
        out[i - start] = np.asarray(_fit(_tilt_and_crop(f), size)).transpose(2, 0, 1)
        factors[i - start] = (f.hair_group, f.glasses, f.beard)     # SYNTHETIC_LABELS order
    return out, factors


def _draw_face(rng, S):
    """One cartoon face, part by part, back to front; _tilt_and_crop(face) is its S x S picture
    and face.hair_group, .glasses, .beard its labels."""
    f = _Face(rng, S)                  # position, size, colours, head shape
    _shoulders(f)
    _hair_behind(f)
    _head(f)                           # ears and face; the eye line
    _cheeks(f)                         # where eyes and mouth go; blush, freckles
    _eyes(f)
    _eyebrows(f)
    _nose(f)
    _facial_hair(f)
    _mouth(f)
    _hair_in_front(f)
    _glasses(f)
    return f                           # _tilt_and_crop(f) is the picture


class _Face:
    """A face being drawn: its RNG, its canvas (S plus a margin, so the tilt leaves no corners),
    colours and head geometry in units of u, the head size. Parts add what later parts need."""

    def __init__(self, rng, S):
        self.rng, self.S, self.pad = rng, S, S // 6
        C = S + 2 * self.pad
        u = self.u = S * rng.uniform(1.08, 1.25)              # head size: the unit of length
        self.cx = C / 2 + S * rng.uniform(-0.05, 0.05)          # position of the head
        self.cy = C / 2 + S * rng.uniform(-0.03, 0.04)
        self.lw = max(1, round(S / 90))                         # line width
        self.bg = _hsv(rng.random(), rng.uniform(0.12, 0.5), rng.uniform(0.62, 0.95))
        t = rng.random() * (len(_SKIN) - 1)
        skin = self.skin = _mix(_SKIN[int(t)], _SKIN[min(int(t) + 1, len(_SKIN) - 1)], t % 1)
        hair = rng.choice(_FUN_HAIR) if rng.random() < 0.1 else rng.choice(_HAIR)
        self.hair_group = _HAIR_GROUP.get(hair, len(HAIR_GROUPS) - 1)   # a label; draws nothing
        self.hair = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in hair)
        self.line, self.dark = _mix(skin, (40, 20, 12), 0.5), (30, 20, 20)
        self.style = rng.choice(_HAIR_STYLES)
        self.img = Image.new("RGB", (C, C), self.bg)
        self.d = ImageDraw.Draw(self.img)
        # head: half width a, forehead and jaw half heights bt, bb, roundness (small nb: pointy)
        a = self.a = u * rng.uniform(0.18, 0.23)
        bt = self.bt = u * rng.uniform(0.22, 0.26)
        bb = self.bb = u * rng.uniform(0.24, 0.3)
        nt, nb = rng.uniform(2.0, 2.6), rng.uniform(1.6, 3.2)
        self.head = dict(cx=self.cx, cy=self.cy, a=a, bt=bt, bb=bb, nt=nt, nb=nb)

    def oval(self, x, y, rx, ry, **kw):
        self.d.ellipse((x - rx, y - ry, x + rx, y + ry), **kw)


def _shoulders(f):
    """Shoulders in a shirt, and the neck with a V collar."""
    rng, u, cx, cy, a, bb = f.rng, f.u, f.cx, f.cy, f.a, f.bb
    shirt = _hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
    neck, top = _mix(f.skin, (0, 0, 0), 0.12), cy + bb + u * 0.06
    f.oval(cx, top + u * 0.35, u * 0.42, u * 0.35, fill=shirt,
           outline=_mix(shirt, (0, 0, 0), 0.3), width=f.lw)
    f.d.rectangle((cx - a * 0.42, cy + bb * 0.4, cx + a * 0.42, top + u * 0.04), fill=neck)
    f.d.polygon([(cx - a * 0.42, top + u * 0.02), (cx + a * 0.42, top + u * 0.02),
                 (cx, top + u * 0.1)], fill=neck)


def _hair_behind(f):
    """Hair behind the head (long, a bun, curls, a bald fringe); f.ht: the hair's outline."""
    rng, u, cx, cy, a, bt, bb, hair = f.rng, f.u, f.cx, f.cy, f.a, f.bt, f.bb, f.hair
    ht = f.ht = dict(f.head, a=a * rng.uniform(1.06, 1.12), bt=bt * rng.uniform(1.1, 1.22))
    if f.style == "long":
        drop = cy + bb * rng.uniform(0.6, 1.5)
        back = _head_pts(**dict(ht, a=a * 1.2), t0=math.pi, t1=2 * math.pi)
        f.d.polygon(back + [(cx + a * 1.25, drop), (cx, drop + u * 0.03), (cx - a * 1.25, drop)],
                    fill=hair)
    elif f.style == "bun":
        r = a * rng.uniform(0.35, 0.5)
        f.oval(cx, cy - ht["bt"] - r * 0.3, r, r, fill=hair)
    elif f.style == "curly":
        r = u * rng.uniform(0.05, 0.07)
        for x, y in _head_pts(**dict(ht, a=a * 1.12, bt=ht["bt"] * 1.02), t0=math.pi - 0.5,
                              t1=2 * math.pi + 0.5, m=14):
            f.oval(x, y, r, r, fill=hair)
    elif f.style == "bald" and rng.random() < 0.6:          # a fringe of hair above the ears
        for s in (-1, 1):
            f.oval(cx + s * a * 0.9, cy - bt * 0.3, a * 0.18, bt * 0.4, fill=hair)


def _head(f):
    """Ears and the face; f.ey: the eye line."""
    a, bt = f.a, f.bt
    f.ey = f.cy + f.u * f.rng.uniform(-0.02, 0.02)
    for s in (-1, 1):
        f.oval(f.cx + s * a * 0.96, f.ey + bt * 0.03, a * 0.16, bt * 0.25, fill=f.skin,
               outline=f.line, width=f.lw)
    f.d.polygon(_head_pts(**f.head), fill=f.skin, outline=f.line, width=f.lw)


def _cheeks(f):
    """Blush and freckles between the eyes (offset f.ex, half width f.ew) and the mouth line f.my,
    which are placed here."""
    rng, u, cx, ey, skin = f.rng, f.u, f.cx, f.ey, f.skin
    ex = f.ex = f.a * rng.uniform(0.38, 0.48)
    f.ew = u * rng.uniform(0.038, 0.054)
    f.my = f.cy + f.bb * rng.uniform(0.5, 0.62)
    if rng.random() < 0.45:
        blush = _mix(skin, (236, 104, 118), rng.uniform(0.25, 0.45))
        for s in (-1, 1):
            f.oval(cx + s * ex * 1.2, (ey + f.my) / 2 + u * 0.01, u * 0.045, u * 0.024, fill=blush)
    if rng.random() < 0.15:
        for _ in range(rng.randint(6, 12)):
            f.oval(cx + rng.choice((-1, 1)) * ex * rng.uniform(0.6, 1.4),
                   ey + u * rng.uniform(0.05, 0.09), f.lw, f.lw,
                   fill=_mix(skin, (90, 45, 20), 0.35))


def _eyes(f):
    """White + iris + pupil + highlight under a lid line, or dots, or happy arcs; f.eh: half
    height."""
    rng, cx, ey, ex, ew, lw, dark = f.rng, f.cx, f.ey, f.ex, f.ew, f.lw, f.dark
    eh = f.eh = ew * rng.uniform(0.6, 0.95)
    iris = rng.choice(_IRIS)
    kind = rng.choices(("open", "dot", "happy"), (0.8, 0.12, 0.08))[0]
    r = min(eh * rng.uniform(0.75, 0.95), ew * 0.8)
    gx, gy = rng.uniform(-1, 1) * (ew - r) * 0.7, rng.uniform(-0.15, 0.15) * eh   # gaze
    for s in (-1, 1):
        x0 = cx + s * ex
        box = (x0 - ew, ey - eh, x0 + ew, ey + eh)
        if kind == "open":
            f.d.ellipse(box, fill=(250, 250, 250), outline=f.line, width=lw)
            f.oval(x0 + gx, ey + gy, r, r, fill=iris)
            f.oval(x0 + gx, ey + gy, r * 0.5, r * 0.5, fill=(15, 12, 12))
            f.oval(x0 + gx - r * 0.35, ey + gy - r * 0.35, r * 0.28, r * 0.28,
                   fill=(255, 255, 255))
            f.d.arc(box, 200, 340, fill=dark, width=lw * 2)
        elif kind == "dot":
            f.oval(x0, ey, r, r * 1.25, fill=dark)
            f.oval(x0 - r * 0.3, ey - r * 0.55, r * 0.25, r * 0.25, fill=(255, 255, 255))
        else:
            f.d.arc(box, 195, 345, fill=dark, width=lw * 2)


def _eyebrows(f):
    """Thickness, height, arch and tilt (inner end up: worried; down: cross)."""
    rng, u, ew = f.rng, f.u, f.ew
    brow = (_mix(f.skin, (40, 30, 25), 0.6) if f.style == "bald"
            else _mix(f.hair, (20, 15, 10), 0.35))
    by = f.ey - f.eh - u * rng.uniform(0.02, 0.045)
    bw = max(f.lw, round(u * rng.uniform(0.012, 0.024)))
    tilt, arch = u * rng.uniform(-0.018, 0.018), u * rng.uniform(0, 0.015)
    for s in (-1, 1):
        x0 = f.cx + s * f.ex
        f.d.line([(x0 + s * ew * 1.1, by + u * 0.005), (x0 + s * ew * 0.1, by - arch),
                  (x0 - s * ew * 0.9, by + tilt)], fill=brow, width=bw, joint="curve")


def _nose(f):
    """A button, nostrils, an arc or a line; f.ny: its height."""
    rng, u, cx, lw, skin = f.rng, f.u, f.cx, f.lw, f.skin
    ny = f.ny = f.ey + (f.my - f.ey) * rng.uniform(0.5, 0.65)
    nose = _mix(skin, (60, 30, 15), 0.35)
    kind = rng.choice(("button", "nostrils", "arc", "line"))
    nw = u * rng.uniform(0.018, 0.03)
    if kind == "button":
        f.oval(cx, ny, nw, nw * 0.7, fill=_mix(skin, (60, 30, 15), 0.18))
    elif kind == "nostrils":
        for s in (-1, 1):
            f.oval(cx + s * nw * 0.6, ny, lw, lw, fill=nose)
    elif kind == "arc":
        f.d.arc((cx - nw, ny - nw, cx + nw, ny + nw), 20, 160, fill=nose, width=lw + 1)
    else:
        s = rng.choice((-1, 1))
        f.d.line([(cx + s * nw * 0.3, ny - u * 0.06), (cx - s * nw * 0.6, ny),
                  (cx + s * nw * 0.5, ny)], fill=nose, width=lw + 1)


def _facial_hair(f):
    """A beard (the jaw outline closed above the mouth) and a moustache."""
    u, cx, a, my = f.u, f.cx, f.a, f.my
    f.beard = f.style != "long" and f.rng.random() < 0.1    # the label records the same draw
    if f.beard:
        chin = _head_pts(**dict(f.head, a=a * 1.01, bb=f.bb * 1.03), t0=0.15, t1=math.pi - 0.15,
                         m=24)
        f.d.polygon(chin + [(cx - a * 0.6, my - u * 0.02), (cx + a * 0.6, my - u * 0.02)],
                    fill=_mix(f.hair, f.skin, 0.25))
    if f.rng.random() < 0.1:
        w = u * 0.06
        f.d.polygon([(cx - w, my - u * 0.01), (cx, f.ny + u * 0.012), (cx + w, my - u * 0.01),
                     (cx, my - u * 0.025)], fill=f.hair)


def _mouth(f):
    """A smile, grin (teeth), arc, open mouth, flat line, 'o' or frown."""
    rng, u, cx, my, lw = f.rng, f.u, f.cx, f.my, f.lw
    mw, mh = u * rng.uniform(0.04, 0.08), u * rng.uniform(0.02, 0.045)
    inside, lips = (92, 26, 36), _mix(f.skin, (196, 64, 74), 0.55)
    kind = rng.choices(("smile", "grin", "arc", "open", "flat", "o", "frown"),
                       (3, 2, 3, 1, 1, 1, 1))[0]
    box = (cx - mw, my - mh, cx + mw, my + mh)
    if kind in ("smile", "grin"):
        f.d.chord(box, 0, 180, fill=inside, outline=lips, width=lw)
        if kind == "grin":                                   # teeth
            f.d.chord((cx - mw * 0.9, my - mh * 0.2, cx + mw * 0.9, my + mh * 0.8), 180, 360,
                      fill=(248, 248, 244))
    elif kind == "arc":
        f.d.arc(box, 15, 165, fill=inside, width=lw * 2)
    elif kind == "open":
        f.oval(cx, my + mh * 0.05, mw * 0.6, mh * 1.05, fill=inside, outline=lips, width=lw)
        f.d.chord((cx - mw * 0.45, my, cx + mw * 0.45, my + mh), 0, 180, fill=(222, 96, 106))
    elif kind == "flat":
        f.d.line([(cx - mw * 0.8, my), (cx + mw * 0.8, my)], fill=inside, width=lw * 2)
    elif kind == "o":
        f.oval(cx, my, mh * 0.7, mh * 0.8, fill=inside, outline=lips, width=lw)
    else:
        f.d.arc((cx - mw * 0.8, my, cx + mw * 0.8, my + mh * 2), 200, 340, fill=inside,
                width=lw * 2)


def _hair_in_front(f):
    """An arc over the top of the head closed by a hairline spline; spikes or curls on top."""
    if f.style == "bald":
        return
    rng, u, cx, cy, a, bt, ht, hair = f.rng, f.u, f.cx, f.cy, f.a, f.bt, f.ht, f.hair
    side = rng.uniform(0.1, 0.4)                         # how far down the sides it reaches
    hl = rng.uniform(0.5, 0.72)                          # hairline height, share of forehead
    part = a * rng.uniform(-0.4, 0.4)
    if f.style in ("bangs", "long"):
        side, hl = rng.uniform(0.5, 1.1), rng.uniform(0.28, 0.45)
    front = hair
    if f.style == "buzz":                                # skin shows through: a lighter cap
        front, hl, side = _mix(hair, f.skin, 0.45), 0.78, 0.05
    outer = _head_pts(**ht, t0=math.pi - side, t1=2 * math.pi + side, m=40)
    inner = _hairline(f, side, hl, part)
    f.d.polygon(outer + _spline([outer[-1]] + inner + [outer[0]]), fill=front)
    if f.style == "spiky":                               # triangles pointing away from centre
        for x, y in _head_pts(**ht, t0=math.pi + 0.35, t1=2 * math.pi - 0.35,
                              m=rng.randint(5, 8)):
            dx, dy, k = x - cx, y - cy, rng.uniform(0.18, 0.35)
            f.d.polygon([(x - dy * 0.18, y + dx * 0.18), (x + dx * k, y + dy * k),
                         (x + dy * 0.18, y - dx * 0.18)], fill=hair)
    if f.style == "curly":                               # curls along the hairline
        r = u * 0.035
        for x, y in _head_pts(**dict(ht, a=a * 0.9, bt=bt * hl * 1.25), t0=math.pi + 0.3,
                              t1=2 * math.pi - 0.3, m=8):
            f.oval(x, y, r, r, fill=hair)


def _hairline(f, side, hl, part):
    """Control points of the hairline, right to left: swept to one side of the parting, a fringe
    cut straight or in tufts, or a plain curve (hl: its height as a share of the forehead)."""
    cx, cy, a, bt, bb = f.cx, f.cy, f.a, f.bt, f.bb
    xs = a * 0.9
    if f.style == "side":
        fl, fr = (hl * 0.55, hl) if part > 0 else (hl, hl * 0.55)
        return [(cx + xs, cy - bt * 0.25), (cx + a * 0.45, cy - bt * fr),
                (cx + part, cy - bt * (hl + 0.2)), (cx - a * 0.45, cy - bt * fl),
                (cx - xs, cy - bt * 0.25)]
    if f.style in ("bangs", "long") and (f.style == "bangs" or f.rng.random() < 0.5):
        n_teeth = f.rng.randint(3, 7)
        inner = [(cx + xs, cy + bb * 0.1 * side)]
        for i in range(n_teeth + 1):
            lift = 0.08 if i % 2 and n_teeth <= 5 else 0.0
            inner.append((cx + xs * 0.95 * (1 - 2 * i / n_teeth), cy - bt * (hl + lift)))
        return inner + [(cx - xs, cy + bb * 0.1 * side)]
    y_side = cy - bt * 0.15 + bb * 0.2 * max(0, side - 0.4)
    return [(cx + xs, y_side), (cx + a * 0.5, cy - bt * hl), (cx + part, cy - bt * (hl + 0.12)),
            (cx - a * 0.5, cy - bt * hl), (cx - xs, y_side)]


def _glasses(f):
    """Round or square frames in one of four colours, with arms and a bridge."""
    rng, cx, ey, ex, lw = f.rng, f.cx, f.ey, f.ex, f.lw
    f.glasses = rng.random() < 0.15                         # the label records the same draw
    if not f.glasses:
        return
    frame = rng.choice([(25, 25, 30), (110, 60, 30), (180, 30, 40), (40, 60, 150)])
    gw, lens = f.ew * 1.45, f.d.ellipse if rng.random() < 0.5 else f.d.rectangle
    for s in (-1, 1):
        lens((cx + s * ex - gw, ey - gw * 0.8, cx + s * ex + gw, ey + gw * 0.8),
             outline=frame, width=lw * 2)
        f.d.line([(cx + s * (ex + gw), ey - gw * 0.3), (cx + s * f.a * 0.98, ey - gw * 0.4)],
                 fill=frame, width=lw * 2)
    f.d.line([(cx - ex + gw, ey - gw * 0.2), (cx + ex - gw, ey - gw * 0.2)], fill=frame,
             width=lw * 2)


def _tilt_and_crop(f):
    """Tilt about the face centre and crop the margin in one affine map (output -> input).
    Nearest is enough (2.5x faster than bilinear): the shapes are drawn without antialiasing
    anyway, and the downscale in _fit smooths every edge."""
    th = math.radians(f.rng.uniform(-10, 10))
    ca, sa = math.cos(th), math.sin(th)
    ox, oy = f.pad - f.cx, f.pad - f.cy
    affine = (ca, -sa, ca * ox - sa * oy + f.cx, sa, ca, sa * ox + ca * oy + f.cy)
    return f.img.transform((f.S, f.S), Image.Transform.AFFINE, affine, Image.Resampling.NEAREST,
                           fillcolor=f.bg)


_SKIN = [(255, 228, 206), (247, 206, 172), (236, 188, 145), (216, 162, 118), (188, 131, 88),
         (146, 97, 62), (108, 69, 44), (78, 50, 33)]
_HAIR = [(28, 24, 24), (62, 42, 30), (104, 68, 40), (146, 92, 50), (176, 84, 42),
         (220, 186, 118), (236, 222, 180), (136, 136, 140), (222, 222, 226)]
_FUN_HAIR = [(64, 104, 208), (222, 98, 168), (76, 166, 106), (136, 82, 188), (226, 82, 70)]
_IRIS = [(96, 60, 32), (58, 38, 24), (66, 122, 198), (68, 138, 86), (138, 108, 52),
         (108, 124, 140)]
_HAIR_STYLES = ("bald", "buzz", "short", "side", "bangs", "long", "spiky", "curly", "bun")
# the hair-colour label: _HAIR's nine colours in four groups, any _FUN_HAIR colour the fifth
HAIR_GROUPS = ("dark", "brown", "blond", "grey", "colourful")
_HAIR_GROUP = {c: g for g, cs in enumerate([_HAIR[0:2], _HAIR[2:5], _HAIR[5:7], _HAIR[7:9]]) for c in cs}
SYNTHETIC_LABELS = {"hair": list(HAIR_GROUPS), "glasses": ["no", "yes"], "beard": ["no", "yes"]}


def _mix(c1, c2, t):
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))


def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _head_pts(cx, cy, a, bt, bb, nt, nb, t0=0.0, t1=2 * math.pi, m=48):
    """Points of a head outline from angle t0 to t1 (y points down): two superellipse halves,
    forehead (half height bt, exponent nt) and jaw (bb, nb; small nb = pointed chin)."""
    pts = []
    for i in range(m + 1):
        t = t0 + (t1 - t0) * i / m
        c, s = math.cos(t), math.sin(t)
        b, n = (bb, nb) if s > 0 else (bt, nt)
        pts.append((cx + a * math.copysign(abs(c) ** (2 / n), c),
                    cy + b * math.copysign(abs(s) ** (2 / n), s)))
    return pts


def _spline(pts, k=6):
    """Catmull-Rom curve through pts (smooth hairlines from a few control points)."""
    P = [pts[0], *pts, pts[-1]]
    out = []
    for i in range(1, len(P) - 2):
        p0, p1, p2, p3 = P[i - 1:i + 3]
        for j in range(k):
            t = j / k
            out.append(tuple(0.5 * (2 * b + (c - a) * t + (2 * a - 5 * b + 4 * c - d) * t * t
                                    + (3 * b - a - 3 * c + d) * t ** 3)
                             for a, b, c, d in zip(p0, p1, p2, p3)))
    return out + [P[-2]]
