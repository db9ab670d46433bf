"""Images in, uint8 tensors out: folders, zips, synthetic faces, batches, grids and GIFs.

Reading order follows the data:

    source (folder | .zip | synthetic) --decode once--> uint8 N x 3 x H x W  (cached as .npy)
        --split_indices--> train / test --Batches--> float [-1, 1] on the device, augmented

Every image is converted to RGB, centre-cropped to the target aspect ratio and resized with an
antialiased filter. Decoding happens once per (source, file list, size); later calls read the cache.
Augmentation (seed 001: random h-flip; seed 003: h-flip p=0.5 + ColorJitter) runs per batch on
tensors, on the training device, and depends only on (seed, epoch, batch index), so a resumed run
sees exactly the batches it would have seen.
"""
import colorsys
import hashlib
import io
import json
import math
import numbers
import os
import random
import sys
import threading
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
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
# Decoding: any file pillow reads -> RGB -> centre crop -> antialiased resize -> uint8 H x W x 3
# ---------------------------------------------------------------------------------------------

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
    box = tuple(round(v) for v in _crop_box(*img.size, size))
    return img.crop(box).resize((W, H), _RESAMPLE)


def decode_image(f, size):
    """File path or file object -> uint8 array H x W x 3. Raises on unreadable/truncated files."""
    with Image.open(f) as img:
        H, W = size
        cw = _crop_box(*img.size, size)
        k = max(2 * W / (cw[2] - cw[0]), 2 * H / (cw[3] - cw[1]))
        if k < 1 and img.format == "JPEG":
            # JPEG can decode at 1/2, 1/4, 1/8 scale almost for free; keep >= 2x the target.
            img.draft(None, (math.ceil(img.size[0] * k), math.ceil(img.size[1] * k)))
        img.load()        # decode now: a truncated file raises here, not half-grey later
        ImageOps.exif_transpose(img, in_place=True)   # phone photos store rotation in EXIF
        return np.asarray(_fit(_to_rgb(img), size), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Sources: list files (and what the cache key needs), then decode them, a few threads at a time
# ---------------------------------------------------------------------------------------------

def _is_image_name(name):
    base = name.rsplit("/", 1)[-1]
    return name.lower().endswith(IMAGE_EXTS) and not base.startswith("._")  # macOS resource forks


def _list_source(path):
    """-> (kind, names, key entries). Folders are searched recursively; zips read in place."""
    if path.is_dir():
        entries = []
        for root, _, files in os.walk(path):
            for fn in files:
                p = Path(root) / fn
                rel = p.relative_to(path).as_posix()
                if _is_image_name(rel):
                    st = p.stat()
                    entries.append((rel, st.st_size, st.st_mtime_ns))
        entries.sort()                    # one global order, the same as for a zip of the folder
        return "folder", [e[0] for e in entries], entries
    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename)]
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not a readable zip file ({e})") from None
        infos.sort(key=lambda i: i.filename)
        st = path.stat()
        entries = [(st.st_size, st.st_mtime_ns)] + [(i.filename, i.file_size, i.CRC) for i in infos]
        return "zip", [i.filename for i in infos], entries
    raise DataError(f"{path} is neither a folder nor a .zip of images")


_zip_local = threading.local()


def _decode_one(kind, root, name, size):
    """-> (array or None, error string or None); each thread keeps its own ZipFile handle."""
    try:
        if kind == "zip":
            zf = getattr(_zip_local, "zf", None)
            if zf is None or zf.filename != str(root):
                zf = _zip_local.zf = zipfile.ZipFile(root)
            return decode_image(io.BytesIO(zf.read(name)), size), None
        return decode_image(root / name, size), None
    except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped, never a crash
        return None, f"{type(e).__name__}: {e}"


def _decode_files(kind, root, names, size, verbose=True):
    """Decode every file -> (uint8 N x 3 x H x W for the good ones, [(name, why)] for the bad)."""
    H, W = size
    out = np.empty((len(names), 3, H, W), np.uint8)
    ok = np.zeros(len(names), bool)
    bad = []
    # Pillow releases the GIL while decoding and resampling, so threads overlap real work.
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        results = ex.map(lambda name: _decode_one(kind, root, name, size), names)
        for i, (arr, err) in enumerate(results):
            if arr is None:
                bad.append((names[i], err))
            else:
                out[i], ok[i] = arr.transpose(2, 0, 1), True
            if verbose and (i + 1) % 20000 == 0:
                print(f"  decoded {i + 1}/{len(names)} images", file=sys.stderr, flush=True)
    return (out if ok.all() else out[ok]), bad     # no second copy when nothing was skipped


# ---------------------------------------------------------------------------------------------
# load_images: source -> cache key -> cached .npy or decode -> uint8 tensor
# ---------------------------------------------------------------------------------------------

def _cache_dir(cache_dir):
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FACEGEN_CACHE") or Path.home() / ".cache" / "facegen")


def _read_cache(npy, size):
    try:
        meta = json.loads(npy.with_suffix(".json").read_text())
        arr = np.load(npy, mmap_mode="r")
        if arr.dtype == np.uint8 and arr.shape == (meta["n"], 3, *size):
            return torch.from_numpy(np.array(arr)), meta
    except (OSError, ValueError, KeyError):
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
        warnings.warn(f"could not write the image cache {npy} ({e}); continuing without it")


def _warn_skipped(bad, total, src):
    if bad:
        few = ", ".join(f"{n} ({why})" for n, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(f"skipped {len(bad)} of {total} image files in {src} that could not be "
                      f"read: {few}{more}", stacklevel=3)


def load_images(source, size, *, n_synthetic=10000, seed=0, cache_dir=None, verbose=True):
    """Decode a source once into uint8 N x 3 x H x W (CPU), reusing the cache when it can.

    source: None or 'synthetic' (n_synthetic faces drawn with seed), a folder (recursive) or a
    .zip (read in place). The cache key covers the source path, every file's name, size and
    mtime (or CRC inside a zip), the size and _CACHE_VERSION, so any change re-decodes.
    """
    size = parse_size(size)
    H, W = size
    key = hashlib.sha256(f"v{_CACHE_VERSION} {H}x{W}".encode())
    if source is None or str(source) == "synthetic":
        if n_synthetic < 1:
            raise DataError(f"n_synthetic must be at least 1; got {n_synthetic}")
        kind, src, names = "synthetic", f"synthetic faces (seed {seed})", None
        label = f"synthetic-n{n_synthetic}-seed{seed}"
        key.update(json.dumps(["synthetic", n_synthetic, seed]).encode())
    else:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise DataError(f"data path {source} does not exist")
        kind, names, entries = _list_source(path)
        src, label = str(path), path.stem
        if not names:
            raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {path}")
        key.update(json.dumps([str(path), entries]).encode())
    npy = _cache_dir(cache_dir) / f"{label}-{H}x{W}-{key.hexdigest()[:16]}.npy"

    x, meta = _read_cache(npy, size)
    hit = x is not None
    if not hit:
        if kind == "synthetic":
            arr, bad = synthetic_faces(n_synthetic, size, seed).numpy(), []
        else:
            arr, bad = _decode_files(kind, path, names, size, verbose)
            if len(arr) == 0:
                raise DataError(f"none of the {len(names)} image files in {path} could be read "
                                f"(first: {bad[0][0]}: {bad[0][1]})")
        meta = {"n": len(arr), "skipped": [list(b) for b in bad], "total": len(arr) + len(bad)}
        _write_cache(npy, arr, meta)
        x = torch.from_numpy(arr)
    _warn_skipped(meta["skipped"], meta["total"], src)
    if verbose:
        print(f"loaded {len(x)} images ({len(meta['skipped'])} skipped) from {src}"
              f"{' [cache hit]' if hit else ''}", flush=True)
    return x


def split_indices(n, test_fraction=0.2, seed=0):
    """Deterministic train/test split of range(n) -> (train_idx, test_idx), sorted LongTensors."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)      # both sides non-empty whenever possible
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# ---------------------------------------------------------------------------------------------
# Augmentation on tensors: h-flip and torchvision ColorJitter semantics, vectorised per sample
# ---------------------------------------------------------------------------------------------

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
    Each op is the blend y <- clamp(f*y + (1-f)*m, 0, 1) toward its own m, so a per-sample
    choice is arithmetic on N x 1 x 1 x 1 weights: no loop over images, no device sync, and
    in-place updates of one buffer (fresh full-size tensors cost more than the arithmetic)."""
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
    return y.mul_(2).sub_(1)                                  # brightness: m = 0


def augment(x, generator, flip=True, jitter=0.0):
    """Per-sample horizontal flip (p = 0.5) and colour jitter (seed 003, torchvision ColorJitter):
    brightness, contrast and saturation factors each ~ U[max(0, 1-jitter), 1+jitter], applied in
    a random order per image, each followed by a clamp to [0, 1]:
        brightness  y <- f * y
        contrast    y <- f * y + (1-f) * mean(gray(y))      gray = 0.2989 R + 0.587 G + 0.114 B
        saturation  y <- f * y + (1-f) * gray(y)
    x is float in [-1, 1] (N x 3 x H x W) and is not modified; returns a new tensor in [-1, 1].
    Hue jitter is left out: seed 003 names brightness, contrast and saturation only."""
    p = _augment_params(x.shape[0], generator, flip, jitter)
    x = _flip(x, p["flip"]) if flip else x.clone()
    if jitter > 0:
        _color_jitter_(x, p["factors"], p["order"])
    return x.clamp_(-1, 1)


def _generator(*parts):
    """A private CPU generator seeded from a stable hash of parts (never the global RNG)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class Batches:
    """Shuffled, augmented mini-batches of a uint8 dataset that lives on `device`.

    Order and augmentation depend only on (seed, epoch, batch index), so `epoch(e, start=k)`
    yields exactly the batches k, k+1, ... of a full pass: resume is exact. With world_size > 1
    every rank draws the same global batch and augmentation and keeps its own contiguous rows.
    """

    def __init__(self, images_uint8, batch_size, *, seed=0, flip=False, jitter=0.0,
                 device="cpu", rank=0, world_size=1, drop_last=True):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError("Batches expects a uint8 tensor N x C x H x W")
        if batch_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of "
                             f"world size {world_size} (rank {rank})")
        self.images = images_uint8.to(device)            # moved once: a GPU-resident dataset
        self.batch_size, self.seed, self.flip, self.jitter = batch_size, seed, flip, jitter
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def __len__(self):
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch, start=0):
        """Yield float batches in [-1, 1] on the device, (batch_size // world_size) x 3 x H x W,
        beginning at batch index `start`."""
        perm = torch.randperm(len(self.images), generator=_generator(self.seed, "order", epoch))
        perm = perm.to(self.images.device)
        B, ws, r = self.batch_size, self.world_size, self.rank
        for i in range(start, len(self)):
            idx = perm[i * B:(i + 1) * B]                       # the global batch
            p = _augment_params(len(idx), _generator(self.seed, "aug", epoch, i),
                                self.flip, self.jitter)
            lo, hi = r * len(idx) // ws, (r + 1) * len(idx) // ws   # this rank's rows
            x = self.images.index_select(0, idx[lo:hi])                 # uint8 B x 3 x H x W
            if self.flip:
                x = _flip(x, p["flip"][lo:hi])                # exact on uint8, 4x less memory
            x = x.float().div_(127.5).sub_(1)                 # [0, 255] -> [-1, 1]
            if self.jitter > 0:
                _color_jitter_(x, p["factors"][lo:hi], p["order"][lo:hi])
            yield x


# ---------------------------------------------------------------------------------------------
# Writing pictures: one grid writer and one GIF writer for the whole project
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


def save_grid(images, path, nrow=8, padding=2):
    """Write make_grid(images) as a PNG, creating parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, padding)).save(path)


def save_gif(frames, path, duration_ms=200, loop=0):
    """Animated GIF from image paths or PIL images (e.g. samples/epoch_*.png, 'fast forward')."""
    def rgb(f):
        if isinstance(f, (str, Path)):
            with Image.open(f) as im:
                return im.convert("RGB")
        return f.convert("RGB")

    imgs = [rgb(f) for f in frames]
    if not imgs:
        raise ValueError("save_gif needs at least one frame")
    imgs = [im if im.size == imgs[0].size else im.resize(imgs[0].size, _RESAMPLE) for im in imgs]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=duration_ms, loop=loop)


# ---------------------------------------------------------------------------------------------
# Synthetic faces: procedural cartoon faces, so every command runs offline
# ---------------------------------------------------------------------------------------------
# Independent factors, each drawn from the face's own RNG seeded by (seed, index):
# skin tone, face shape (width, forehead, jaw), hair colour and style, ears, eye colour, size,
# spacing, gaze and style, eyebrows, nose, mouth, blush, freckles, facial hair, glasses,
# background and shirt colour, and the head's position, size and tilt.
_SKIN = [(255, 228, 206), (247, 206, 172), (236, 188, 145), (216, 162, 118), (188, 131, 88),
         (146, 97, 62), (108, 69, 44), (78, 50, 33)]
_HAIR = [(28, 24, 24), (62, 42, 30), (104, 68, 40), (146, 92, 50), (176, 84, 42),
         (220, 186, 118), (236, 222, 180), (136, 136, 140), (222, 222, 226)]
_FUN_HAIR = [(64, 104, 208), (222, 98, 168), (76, 166, 106), (136, 82, 188), (226, 82, 70)]
_IRIS = [(96, 60, 32), (58, 38, 24), (66, 122, 198), (68, 138, 86), (138, 108, 52),
         (108, 124, 140)]
_HAIR_STYLES = ("bald", "buzz", "short", "side", "bangs", "long", "spiky", "curly", "bun")


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


def _draw_face(rng, S):
    """One cartoon face on an S x S canvas (drawn with a margin so the tilt leaves no corners)."""
    pad = S // 6
    C = S + 2 * pad
    u = S * rng.uniform(1.08, 1.25)                         # head size: the unit of length
    cx, cy = C / 2 + S * rng.uniform(-0.05, 0.05), C / 2 + S * rng.uniform(-0.03, 0.04)
    lw = max(1, round(S / 90))                              # line width
    bg = _hsv(rng.random(), rng.uniform(0.12, 0.5), rng.uniform(0.62, 0.95))
    t = rng.random() * (len(_SKIN) - 1)
    skin = _mix(_SKIN[int(t)], _SKIN[min(int(t) + 1, len(_SKIN) - 1)], t % 1)
    hair = rng.choice(_FUN_HAIR) if rng.random() < 0.1 else rng.choice(_HAIR)
    hair = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in hair)
    line, dark = _mix(skin, (40, 20, 12), 0.5), (30, 20, 20)
    style = rng.choice(_HAIR_STYLES)
    img = Image.new("RGB", (C, C), bg)
    d = ImageDraw.Draw(img)

    def oval(x, y, rx, ry, **kw):
        d.ellipse((x - rx, y - ry, x + rx, y + ry), **kw)

    # -- head: half width a, forehead and jaw half heights bt, bb, roundness (small nb: pointy)
    a, bt, bb = u * rng.uniform(0.18, 0.23), u * rng.uniform(0.22, 0.26), u * rng.uniform(0.24, 0.3)
    nt, nb = rng.uniform(2.0, 2.6), rng.uniform(1.6, 3.2)
    head = dict(cx=cx, cy=cy, a=a, bt=bt, bb=bb, nt=nt, nb=nb)

    # -- shoulders in a shirt, neck with a V collar
    shirt = _hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
    neck, top = _mix(skin, (0, 0, 0), 0.12), cy + bb + u * 0.06
    oval(cx, top + u * 0.35, u * 0.42, u * 0.35, fill=shirt, outline=_mix(shirt, (0, 0, 0), 0.3),
         width=lw)
    d.rectangle((cx - a * 0.42, cy + bb * 0.4, cx + a * 0.42, top + u * 0.04), fill=neck)
    d.polygon([(cx - a * 0.42, top + u * 0.02), (cx + a * 0.42, top + u * 0.02),
               (cx, top + u * 0.1)], fill=neck)

    # -- hair behind the head
    ht = dict(head, a=a * rng.uniform(1.06, 1.12), bt=bt * rng.uniform(1.1, 1.22))  # hair top
    if style == "long":
        drop = cy + bb * rng.uniform(0.6, 1.5)
        back = _head_pts(**dict(ht, a=a * 1.2), t0=math.pi, t1=2 * math.pi)
        d.polygon(back + [(cx + a * 1.25, drop), (cx, drop + u * 0.03), (cx - a * 1.25, drop)],
                  fill=hair)
    elif style == "bun":
        r = a * rng.uniform(0.35, 0.5)
        oval(cx, cy - ht["bt"] - r * 0.3, r, r, fill=hair)
    elif style == "curly":
        r = u * rng.uniform(0.05, 0.07)
        for x, y in _head_pts(**dict(ht, a=a * 1.12, bt=ht["bt"] * 1.02), t0=math.pi - 0.5,
                              t1=2 * math.pi + 0.5, m=14):
            oval(x, y, r, r, fill=hair)
    elif style == "bald" and rng.random() < 0.6:            # a fringe of hair above the ears
        for s in (-1, 1):
            oval(cx + s * a * 0.9, cy - bt * 0.3, a * 0.18, bt * 0.4, fill=hair)

    # -- ears, face
    ey = cy + u * rng.uniform(-0.02, 0.02)                  # eye line
    for s in (-1, 1):
        oval(cx + s * a * 0.96, ey + bt * 0.03, a * 0.16, bt * 0.25, fill=skin, outline=line,
             width=lw)
    d.polygon(_head_pts(**head), fill=skin, outline=line, width=lw)

    # -- cheeks: blush and freckles
    ex, ew = a * rng.uniform(0.38, 0.48), u * rng.uniform(0.038, 0.054)  # eye offset, half width
    my = cy + bb * rng.uniform(0.5, 0.62)                   # mouth line
    if rng.random() < 0.45:
        blush = _mix(skin, (236, 104, 118), rng.uniform(0.25, 0.45))
        for s in (-1, 1):
            oval(cx + s * ex * 1.2, (ey + my) / 2 + u * 0.01, u * 0.045, u * 0.024, fill=blush)
    if rng.random() < 0.15:
        for _ in range(rng.randint(6, 12)):
            oval(cx + rng.choice((-1, 1)) * ex * rng.uniform(0.6, 1.4),
                 ey + u * rng.uniform(0.05, 0.09), lw, lw, fill=_mix(skin, (90, 45, 20), 0.35))

    # -- eyes: white + iris + pupil + highlight under a lid line, or dots, or happy arcs
    eh = ew * rng.uniform(0.6, 0.95)
    iris = rng.choice(_IRIS)
    kind = rng.choices(("open", "dot", "happy"), (0.8, 0.12, 0.08))[0]
    r = min(eh * rng.uniform(0.75, 0.95), ew * 0.8)
    gx, gy = rng.uniform(-1, 1) * (ew - r) * 0.7, rng.uniform(-0.15, 0.15) * eh   # gaze
    for s in (-1, 1):
        x0 = cx + s * ex
        box = (x0 - ew, ey - eh, x0 + ew, ey + eh)
        if kind == "open":
            d.ellipse(box, fill=(250, 250, 250), outline=line, width=lw)
            oval(x0 + gx, ey + gy, r, r, fill=iris)
            oval(x0 + gx, ey + gy, r * 0.5, r * 0.5, fill=(15, 12, 12))
            oval(x0 + gx - r * 0.35, ey + gy - r * 0.35, r * 0.28, r * 0.28, fill=(255, 255, 255))
            d.arc(box, 200, 340, fill=dark, width=lw * 2)
        elif kind == "dot":
            oval(x0, ey, r, r * 1.25, fill=dark)
            oval(x0 - r * 0.3, ey - r * 0.55, r * 0.25, r * 0.25, fill=(255, 255, 255))
        else:
            d.arc(box, 195, 345, fill=dark, width=lw * 2)

    # -- eyebrows: thickness, height, arch and tilt (inner end up: worried; down: cross)
    brow = _mix(skin, (40, 30, 25), 0.6) if style == "bald" else _mix(hair, (20, 15, 10), 0.35)
    by = ey - eh - u * rng.uniform(0.02, 0.045)
    bw = max(lw, round(u * rng.uniform(0.012, 0.024)))
    tilt, arch = u * rng.uniform(-0.018, 0.018), u * rng.uniform(0, 0.015)
    for s in (-1, 1):
        x0 = cx + s * ex
        d.line([(x0 + s * ew * 1.1, by + u * 0.005), (x0 + s * ew * 0.1, by - arch),
                (x0 - s * ew * 0.9, by + tilt)], fill=brow, width=bw, joint="curve")

    # -- nose
    ny = ey + (my - ey) * rng.uniform(0.5, 0.65)
    nose = _mix(skin, (60, 30, 15), 0.35)
    kind = rng.choice(("button", "nostrils", "arc", "line"))
    nw = u * rng.uniform(0.018, 0.03)
    if kind == "button":
        oval(cx, ny, nw, nw * 0.7, fill=_mix(skin, (60, 30, 15), 0.18))
    elif kind == "nostrils":
        for s in (-1, 1):
            oval(cx + s * nw * 0.6, ny, lw, lw, fill=nose)
    elif kind == "arc":
        d.arc((cx - nw, ny - nw, cx + nw, ny + nw), 20, 160, fill=nose, width=lw + 1)
    else:
        s = rng.choice((-1, 1))
        d.line([(cx + s * nw * 0.3, ny - u * 0.06), (cx - s * nw * 0.6, ny),
                (cx + s * nw * 0.5, ny)], fill=nose, width=lw + 1)

    # -- facial hair: beard (the jaw outline closed above the mouth) and moustache
    if style != "long" and rng.random() < 0.1:
        chin = _head_pts(**dict(head, a=a * 1.01, bb=bb * 1.03), t0=0.15, t1=math.pi - 0.15, m=24)
        d.polygon(chin + [(cx - a * 0.6, my - u * 0.02), (cx + a * 0.6, my - u * 0.02)],
                  fill=_mix(hair, skin, 0.25))
    if rng.random() < 0.1:
        w = u * 0.06
        d.polygon([(cx - w, my - u * 0.01), (cx, ny + u * 0.012), (cx + w, my - u * 0.01),
                   (cx, my - u * 0.025)], fill=hair)

    # -- mouth
    mw, mh = u * rng.uniform(0.04, 0.08), u * rng.uniform(0.02, 0.045)
    inside, lips = (92, 26, 36), _mix(skin, (196, 64, 74), 0.55)
    kind = rng.choices(("smile", "grin", "arc", "open", "flat", "o", "frown"),
                       (3, 2, 3, 1, 1, 1, 1))[0]
    box = (cx - mw, my - mh, cx + mw, my + mh)
    if kind in ("smile", "grin"):
        d.chord(box, 0, 180, fill=inside, outline=lips, width=lw)
        if kind == "grin":                                   # teeth
            d.chord((cx - mw * 0.9, my - mh * 0.2, cx + mw * 0.9, my + mh * 0.8), 180, 360,
                    fill=(248, 248, 244))
    elif kind == "arc":
        d.arc(box, 15, 165, fill=inside, width=lw * 2)
    elif kind == "open":
        oval(cx, my + mh * 0.05, mw * 0.6, mh * 1.05, fill=inside, outline=lips, width=lw)
        d.chord((cx - mw * 0.45, my, cx + mw * 0.45, my + mh), 0, 180, fill=(222, 96, 106))
    elif kind == "flat":
        d.line([(cx - mw * 0.8, my), (cx + mw * 0.8, my)], fill=inside, width=lw * 2)
    elif kind == "o":
        oval(cx, my, mh * 0.7, mh * 0.8, fill=inside, outline=lips, width=lw)
    else:
        d.arc((cx - mw * 0.8, my, cx + mw * 0.8, my + mh * 2), 200, 340, fill=inside, width=lw * 2)

    # -- hair in front: an arc over the top of the head closed by a hairline spline
    if style != "bald":
        side = rng.uniform(0.1, 0.4)                         # how far down the sides it reaches
        f = rng.uniform(0.5, 0.72)                           # hairline height, share of forehead
        part = a * rng.uniform(-0.4, 0.4)
        if style in ("bangs", "long"):
            side, f = rng.uniform(0.5, 1.1), rng.uniform(0.28, 0.45)
        front = hair
        if style == "buzz":                                  # skin shows through: a lighter cap
            front, f, side = _mix(hair, skin, 0.45), 0.78, 0.05
        outer = _head_pts(**ht, t0=math.pi - side, t1=2 * math.pi + side, m=40)
        xs = a * 0.9
        if style == "side":                                  # swept to one side of the parting
            fl, fr = (f * 0.55, f) if part > 0 else (f, f * 0.55)
            inner = [(cx + xs, cy - bt * 0.25), (cx + a * 0.45, cy - bt * fr),
                     (cx + part, cy - bt * (f + 0.2)), (cx - a * 0.45, cy - bt * fl),
                     (cx - xs, cy - bt * 0.25)]
        elif style in ("bangs", "long") and (style == "bangs" or rng.random() < 0.5):
            n_teeth = rng.randint(3, 7)                      # a fringe cut straight or in tufts
            inner = [(cx + xs, cy + bb * 0.1 * side)]
            for i in range(n_teeth + 1):
                lift = 0.08 if i % 2 and n_teeth <= 5 else 0.0
                inner.append((cx + xs * 0.95 * (1 - 2 * i / n_teeth), cy - bt * (f + lift)))
            inner.append((cx - xs, cy + bb * 0.1 * side))
        else:
            y_side = cy - bt * 0.15 + bb * 0.2 * max(0, side - 0.4)
            inner = [(cx + xs, y_side), (cx + a * 0.5, cy - bt * f),
                     (cx + part, cy - bt * (f + 0.12)), (cx - a * 0.5, cy - bt * f),
                     (cx - xs, y_side)]
        d.polygon(outer + _spline([outer[-1]] + inner + [outer[0]]), fill=front)
        if style == "spiky":                                 # triangles pointing away from centre
            for x, y in _head_pts(**ht, t0=math.pi + 0.35, t1=2 * math.pi - 0.35,
                                  m=rng.randint(5, 8)):
                dx, dy, k = x - cx, y - cy, rng.uniform(0.18, 0.35)
                d.polygon([(x - dy * 0.18, y + dx * 0.18), (x + dx * k, y + dy * k),
                           (x + dy * 0.18, y - dx * 0.18)], fill=hair)
        if style == "curly":                                 # curls along the hairline
            r = u * 0.035
            for x, y in _head_pts(**dict(ht, a=a * 0.9, bt=bt * f * 1.25), t0=math.pi + 0.3,
                                  t1=2 * math.pi - 0.3, m=8):
                oval(x, y, r, r, fill=hair)

    # -- glasses
    if rng.random() < 0.15:
        frame = rng.choice([(25, 25, 30), (110, 60, 30), (180, 30, 40), (40, 60, 150)])
        gw, lens = ew * 1.45, d.ellipse if rng.random() < 0.5 else d.rectangle
        for s in (-1, 1):
            lens((cx + s * ex - gw, ey - gw * 0.8, cx + s * ex + gw, ey + gw * 0.8),
                 outline=frame, width=lw * 2)
            d.line([(cx + s * (ex + gw), ey - gw * 0.3), (cx + s * a * 0.98, ey - gw * 0.4)],
                   fill=frame, width=lw * 2)
        d.line([(cx - ex + gw, ey - gw * 0.2), (cx + ex - gw, ey - gw * 0.2)], fill=frame,
               width=lw * 2)

    # -- tilt about the face centre and crop the margin in one affine map (output -> input).
    # Nearest is enough (2.5x faster than bilinear): the shapes are drawn without antialiasing
    # anyway, and the downscale in _fit smooths every edge.
    th = math.radians(rng.uniform(-10, 10))
    ca, sa = math.cos(th), math.sin(th)
    ox, oy = pad - cx, pad - cy
    affine = (ca, -sa, ca * ox - sa * oy + cx, sa, ca, sa * ox + ca * oy + cy)
    return img.transform((S, S), Image.Transform.AFFINE, affine, Image.Resampling.NEAREST,
                         fillcolor=bg)


def _render_range(args):
    """Faces start..stop-1 -> uint8 (stop-start) x 3 x H x W (a picklable unit of work)."""
    start, stop, size, seed = args
    S = max(128, 2 * max(size))                     # supersample, then an antialiased resize
    out = np.empty((stop - start, 3, *size), np.uint8)
    for i in range(start, stop):
        rng = random.Random(f"facegen-face/{seed}/{i}")   # each face depends on (seed, i) only
        out[i - start] = np.asarray(_fit(_draw_face(rng, S), size)).transpose(2, 0, 1)
    return out


_FACE_CHUNK, _FACE_POOL_MIN = 500, 2000     # faces per task; fewer faces are drawn in-process


def synthetic_faces(n, size=(64, 64), seed=0):
    """n procedural cartoon faces -> uint8 n x 3 x H x W; face i depends only on (seed, i)."""
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
    if not parts:
        return torch.empty(0, 3, *size, dtype=torch.uint8)
    return torch.from_numpy(np.concatenate(parts))
