"""Images in, uint8 tensors out; and everything else on disk that is not a checkpoint.

    source (folder | .zip | synthetic) --load_images--> uint8 N x 3 x H x W  (decoded once, cached)
        --split_indices--> train / test --Batches--> float [-1, 1] on the device, augmented
    (conditional models: _labels gives each image's attributes, int64 N x K, split alike)

Batch order and augmentation (seed report 001: h-flip; 003: h-flip + ColorJitter) depend only on
(seed, epoch, batch index), so a resumed run sees the same batches."""
import argparse, colorsys, contextlib, hashlib, io, json, math, numbers, os, random, re, stat, sys
import warnings, zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401 -- _FORMATS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")   # Pillow decodes by content: an EPS named x.png would run Ghostscript
_MAX_FILE_BYTES = 64 << 20   # one zip member, decompressed: no face photo needs more
_CACHE_VERSION = 2     # bump when decoding or the synthetic faces change: old caches go stale
_RESAMPLE = Image.Resampling.BILINEAR   # on downscaling pillow widens the filter: antialiased

class UsageError(Exception): """A problem the user must fix: printed as one line `error: ...`, exit code 2."""

def load_images(source, size, n_synthetic=10000, seed=0, cache_dir=None, verbose=True, full=False):
    """None | 'synthetic' | a folder (recursive) | a .zip -> uint8 N x 3 x H x W (CPU), cached; bad files skipped.
    full: -> (images, meta {n, skipped [[name, why]], synthetic: factors}, file names by row or None, fingerprint:
    a short id of the data, the cache key, which changes when a file is added, removed or touched)."""
    H, W = size = parse_size(size)
    kind, path, names, skipped, key = _identify(source, size, n_synthetic, seed)
    src = f"synthetic faces (seed {seed})" if path is None else _show(path)
    npy = Path(cache_dir or os.environ.get("FACEGEN_CACHE") or Path.home() / ".cache/facegen") / f"{kind}-{H}x{W}-{key[:20]}.npy"
    x, meta = _read_cache(npy, size)
    if miss := x is None:
        if kind == "synthetic":
            x, factors = synthetic_faces(n_synthetic, size, seed, factors=True)
            meta = {"n": len(x), "skipped": [], "factors": factors.tolist()}
        else:
            x, bad = _decode_files(kind, path, names, size)
            bad = sorted(skipped + bad)                  # with the folders that could not be listed
            if not len(x):
                raise UsageError(f"none of the {len(bad)} image files in {src} could be read "
                                 f"(first: {_show(bad[0][0])}: {_show(bad[0][1])[1:-1]})")
            meta = {"n": len(x), "skipped": bad}
        _write_cache(npy, x.numpy(), meta)
    _warn_skipped(meta["skipped"], len(x) + len(meta["skipped"]), src)
    if verbose:
        print(f"loaded {len(x)} images ({len(meta['skipped'])} skipped) from {src}{'' if miss else ' [cache hit]'}", flush=True)
    gone = {n for n, _ in meta["skipped"]}
    return (x, meta, None if names is None else [n for n in names if n not in gone], key[:16]) if full else x

def split_indices(n, test_fraction=0.2, seed=0):
    """Deterministic train/test split of range(n) -> (train_idx, test_idx), sorted LongTensors."""
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)      # both sides non-empty whenever possible
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values

def run_data(cfg, verbose=False):
    """A run's uint8 images split as it trained, read once -> (train, test, labels (train_y, test_y, info) or None).
    A fresh run records the data's fingerprint in cfg; later, a warning if the data changed since."""
    size, src, n, seed = tuple(cfg["image_size"]), cfg["data"], cfg["n_synthetic"], cfg["seed"]
    images, meta, names, now = load_images(src, size, n, seed, None, verbose, full=True)
    if cfg.setdefault("data_fingerprint", now) != now:   # the same split of other images: "test" may have trained
        print(f"warning: the data at {_show(src or 'synthetic faces')} changed since this run trained on it (fingerprint "
              f"{now}, the run has {cfg['data_fingerprint']}): its test split is no longer held out", file=sys.stderr)
    train_idx, test_idx = split_indices(len(images), cfg["test_fraction"], seed)
    if not cfg.get("conditional"):
        return images[train_idx], images[test_idx], None
    y, info = _labels(meta, names, cfg.get("attr_file"), cfg.get("attrs"))
    if verbose:   # labels: hair = dark 2034, brown 2511, ...; glasses = no 8512, yes 1488
        counts = [torch.bincount(y[:, k], minlength=len(v)).tolist() for k, v in enumerate(info.values())]
        print("labels: " + "; ".join(f"{_show(a)[1:-1]} = " + ", ".join(f"{_show(v)[1:-1]} {c}" for v, c in zip(vs, cs))
                                     for (a, vs), cs in zip(info.items(), counts)), flush=True)
    return images[train_idx], images[test_idx], (y[train_idx], y[test_idx], info)

class Batches:
    """Shuffled, augmented batches of images held on `device`; each rank keeps its rows of one global batch."""

    def __init__(self, images_uint8, batch_size, *, seed=0, flip=False, jitter=0.0,
                 device="cpu", rank=0, world_size=1, drop_last=True, labels=None, weights=None):
        self.images, self.labels = images_uint8.to(device), None if labels is None else labels.to(device)
        self.batch_size, self.seed, self.flip, self.jitter, self.weights = batch_size, seed, flip, jitter, weights
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def __len__(self):
        return len(self.images) // self.batch_size if self.drop_last else -(-len(self.images) // self.batch_size)

    def epoch(self, epoch, start=0):
        """Batches start, start+1, ... of pass `epoch` (exact resume): (x, y), this rank's rows, y None if unlabelled."""
        rng = _rng(self.seed, "order", epoch)
        perm = (torch.randperm(len(self.images), generator=rng) if self.weights is None else
                torch.multinomial(self.weights, len(self.images), replacement=True, generator=rng))
        perm, B = to_device(perm, self.images.device), self.batch_size
        for i in range(start, len(self)):
            idx = perm[i * B:(i + 1) * B]                                            # the global batch
            lo, hi = self.rank * len(idx) // self.world_size, (self.rank + 1) * len(idx) // self.world_size
            x = self.images.index_select(0, idx[lo:hi]).float().div_(127.5).sub_(1)   # this rank's rows
            if self.flip or self.jitter > 0:
                x = augment(x, _rng(self.seed, "aug", epoch, i), self.flip, self.jitter, rows=(lo, len(idx)))
            yield x, None if self.labels is None else self.labels.index_select(0, idx[lo:hi])

def to_device(t, device):   # to a GPU pinned and non-blocking (a pageable copy syncs with the GPU each batch)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)

def augment(x, generator, flip=True, jitter=0.0, *, rows=None):
    """Per-sample h-flip (p = 0.5) and colour jitter (seed report 003: torchvision's ColorJitter, no hue): brightness,
    contrast and saturation factors f ~ U[max(0, 1-jitter), 1+jitter], in a random order per image, each clamped:
        brightness  y <- f * y
        contrast    y <- f * y + (1-f) * mean(gray(y))      gray = 0.2989 R + 0.587 G + 0.114 B
        saturation  y <- f * y + (1-f) * gray(y)
    x: float [-1, 1], N x 3 x H x W, not modified; rows=(lo, n): x is rows lo.. of a batch of n (a rank's share),
    whose draws are all made on the generator's device (CPU): any device and number of ranks augment alike."""
    lo, n = rows or (0, len(x))
    dev, mine = generator.device, slice(lo, lo + len(x))
    if flip:
        flips = to_device((torch.rand(n, generator=generator, device=dev) < 0.5)[mine], x.device)
    x = torch.where(flips[:, None, None, None], x.flip(-1), x) if flip else x.clone()
    if jitter > 0:
        a, b = max(0.0, 1.0 - jitter), 1.0 + jitter
        factors = a + (b - a) * torch.rand(n, 3, generator=generator, device=dev)
        order = torch.rand(n, 3, generator=generator, device=dev).argsort(dim=1)   # per image
        factors, order = to_device(factors[mine], x.device).to(x.dtype), to_device(order[mine], x.device)
        y, gray = x.add_(1).mul_(0.5), torch.empty_like(x[:, :1])     # [0, 1] as torchvision; N x 1 x H x W
        for k in range(3):   # each op, in place: y <- clamp(f*y + (1-f)*m, 0, 1) toward its m (brightness: m = 0)
            op = order[:, k]                                          # 0 brightness, 1 contrast, 2 sat.
            f = factors.gather(1, op[:, None])[:, :, None, None]                        # N x 1 x 1 x 1
            torch.mul(y[:, 0:1], 0.2989, out=gray).add_(y[:, 1:2], alpha=0.587).add_(y[:, 2:3], alpha=0.114)
            w_c = (1 - f) * (op == 1).to(x.dtype)[:, None, None, None]   # contrast: m = mean(gray)
            w_s = (1 - f) * (op == 2).to(x.dtype)[:, None, None, None]   # saturation: m = gray
            y.mul_(f).add_(w_c * gray.mean((2, 3), keepdim=True)).addcmul_(w_s, gray).clamp_(0, 1)
        x = y.mul_(2).sub_(1)
    return x.clamp_(-1, 1)

def _rng(*parts):   # a private CPU generator seeded from a stable hash of parts (never the global RNG)
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

# --- Labels for conditional models: one int64 row per image, split as the images are ----------
def _labels(meta, names, attr_file, attrs):
    """Each image's labels, row for row -> (int64 N x K, {attribute: [value names]}): SYNTHETIC_LABELS, a CelebA
    attribute file (attrs picks columns) or ImageFolder's classes: the first folder below the root (a zip's top one)."""
    if names is None:
        if attr_file is not None or attrs:
            raise UsageError("--attr-file/--attrs are for real data: the synthetic faces carry their own labels")
        return torch.tensor(meta["factors"], dtype=torch.long).view(meta["n"], 3), dict(SYNTHETIC_LABELS)
    if attr_file is not None or attrs:
        return _attr_labels(attr_file, names, attrs)
    parts = [n.split("/") for n in names]
    if len({p[0] for p in parts}) == 1 and all(len(p) > 2 for p in parts):
        parts = [p[1:] for p in parts]                  # a zip's single top folder is the root
    if loose := next(("/".join(p) for p in parts if len(p) < 2), None):
        raise UsageError(f"labels from subfolders: {_show(loose)} is in no class folder below the root (or give --attr-file)")
    classes = sorted({p[0] for p in parts})
    if odd := next((c for c in classes if "," in c), None):   # facegen --label class=a,b would read two labels
        raise UsageError(f"the class folder {_show(odd)} has a ',' in its name, so --label cannot pick it: rename the folder")
    return torch.tensor([[classes.index(p[0])] for p in parts], dtype=torch.long), {"class": classes}

def _attr_labels(path, names, attrs):
    """list_attr_celeba.txt: line 1 the row count, line 2 the attribute names, then 'FILE v1 v2 ...' (1 yes, -1 no)."""
    if path is None:
        raise UsageError("--attrs picks columns of an attribute file: give --attr-file too")
    try:
        with _open_regular(Path(path).expanduser()) as f:
            lines = [c for c in map(str.split, f.read().decode("utf-8").splitlines()) if c]
    except (OSError, UnicodeDecodeError, UsageError) as e:
        raise UsageError(f"cannot read the attribute file {_show(path)} ({_why(e)})") from None
    lines = lines[1:] if lines and len(lines[0]) == 1 and lines[0][0].isdigit() else lines   # the row count: unused
    if not lines:
        raise UsageError(f"the attribute file {_show(path)} has no line of attribute names (CelebA's line 2)")
    header, rows = lines[0], {}
    if twice := next((a for i, a in enumerate(header) if a in header[:i]), None):
        raise UsageError(f"the attribute {_show(twice)} is named twice in the header of {_show(path)}")
    for name, *values in lines[1:]:
        if rows.setdefault(name, values) != values:
            raise UsageError(f"{_show(name)} has two different rows in the attribute file {_show(path)}")
    if missing := [a for a in attrs or header if a not in header]:
        raise UsageError(f"attribute(s) {', '.join(missing)} not in {_show(path)}; it has {', '.join(header)}")
    cols, rows = [header.index(a) for a in attrs or header], [rows.get(n.rsplit("/", 1)[-1], []) for n in names]
    if bad := [n for n, r in zip(names, rows) if len(r) != len(header) or any(r[c] not in ("1", "-1") for c in cols)]:
        raise UsageError(f"{len(bad)} image(s) have no valid row (±1 per attribute) in {_show(path)}, first {_show(bad[0])}")
    y = torch.tensor([[int(r[c] == "1") for c in cols] for r in rows], dtype=torch.long).view(len(names), len(cols))
    return y, {a: ["no", "yes"] for a in attrs or header}

def balance_weights(labels):
    """Draw weights w_i = prod_k 1 / count_k(y_ik): each attribute's values equally frequent (exact if independent)."""
    w = torch.ones(len(labels), dtype=torch.float64)
    for k in range(labels.shape[1]):
        w /= torch.bincount(labels[:, k]).double()[labels[:, k]]
    return w / w.sum()

# --- Pictures out: one grid writer, the loss plot and one GIF writer for the whole project ----
def make_grid(images, nrow=8, padding=2, pad_value=0):
    """Float N x C x H x W in [-1, 1] (or uint8) -> uint8 grid (rows*(H+p)+p) x (nrow*(W+p)+p) x 3."""
    x = images.detach().cpu().reshape(-1, *images.shape[-3:])
    x = x if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    (n, _, h, w), p, ncol = x.shape, padding, min(nrow, len(x))
    grid = torch.full((3, -(-n // ncol) * (h + p) + p, ncol * (w + p) + p), pad_value, dtype=torch.uint8)
    for i in range(n):                                  # one channel broadcasts to three
        top, left = p + i // ncol * (h + p), p + i % ncol * (w + p)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()

def save_grid(images, path, nrow=8, padding=2):
    """make_grid(images) as a PNG (parent folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, padding)).save(path)

def plot_losses(rows, path, points=(), width=720, panel_h=140):
    """loss.png: a panel per logged term vs step, from points or rows (whichever has more); log y if it spans > 30x."""
    terms = {}
    for k in dict.fromkeys(k for r in [*rows, *points] for k in r if k not in ("epoch", "step", "images_per_s", "seconds")):
        per = [[(x, v) for r in rs if math.isfinite(x := _num(r.get("step"))) and math.isfinite(v := _num(r.get(k)))]
               for rs in (points, rows)]
        if s := max(per, key=len):
            terms[k] = s
    x1, left, right, f = max([x for s in terms.values() for x, _ in s] + [1.0]), 64, width - 12, ImageFont.load_default(11)
    d = ImageDraw.Draw(img := Image.new("RGB", (width, max(1, len(terms)) * panel_h + 30), "white"))
    for i, (k, s) in enumerate(terms.items()):
        top, bottom, vals = i * panel_h + 20, (i + 1) * panel_h - 4, [v for _, v in s]
        ty = math.log10 if min(vals) > 0 and max(vals) / min(vals) > 30 else float   # a VAE's NLL falls 100x
        a, b = ty(min(vals)), ty(max(vals))
        a, b = a - (pad := 0.05 * (b - a) or 0.05 * abs(a) or 1.0), b + pad
        d.rectangle([left, top, right, bottom], outline="black")
        scale = f"{min(vals):.4g} .. {max(vals):.4g}" + (", log scale" if ty is math.log10 else "")
        d.text((left, top - 15), f"{k}  ({scale})", fill="black", font=f)
        pts = [(left + x / x1 * (right - left), bottom - (ty(v) - a) / (b - a) * (bottom - top)) for x, v in s]
        d.line(pts + pts[-1:], fill="#1f77b4", width=3)
    d.text((left, img.height - 4), f"optimizer step 0 .. {x1:.0f}", fill="black", font=f, anchor="ld")
    img.save(path)

def _num(v): return math.nan if v in ("", None) else float(v)   # a logged value (models.read_csv checked it is a number)

def save_gif(folder, path, duration_ms=200, hold_last_ms=None):
    """The sample grids epoch_NNN.png (regular files) in `folder`, in epoch order, as an animated GIF whose last frame
    stays hold_last_ms -> frames written; unreadable ones skipped with one warning; none: a UsageError."""
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if os.path.isfile(os.path.join(folder, n))]
    epochs = sorted((int(m[1]), n) for n in names if (m := re.fullmatch(r"epoch_([0-9]+)\.png", n)))
    imgs, bad = [], []
    for f in (os.path.join(folder, n) for _, n in epochs):
        try:
            with _open_image(f) as im:
                imgs.append(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 -- a bad frame costs one frame, never the GIF
            bad.append((f, _why(e)))
    _warn_skipped(bad, len(epochs), f"the frames for {_show(path)}")
    if not imgs:
        raise UsageError(f"no readable sample grids epoch_NNN.png in {_show(folder)}")
    first, *rest = (im.resize(imgs[0].size, _RESAMPLE) for im in imgs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    first.save(path, save_all=True, append_images=rest, loop=0,
               duration=[duration_ms] * len(rest) + [hold_last_ms or duration_ms])
    return len(imgs)

# --- Command-line helpers shared by train.py and facegen.py ---------------------------------
def checked(kind, ok, what):
    """An argparse type= function: kind(s), refused unless ok(value) ("must be {what}")."""
    def parse(s):
        if not ok(v := kind(s)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    parse.__name__ = kind.__name__            # argparse's "invalid int value: 'x'"
    return parse

positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
non_negative = checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
seed_int = checked(int, lambda v: 0 <= v < 2 ** 63 - 1, "an integer in [0, 2^63 - 1)")
unit_interval = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")   # Adam betas, EMA decay, test fraction

def between(kind, lo, hi):   # every size and count is bounded: a typo fails at parse time, not in an allocation
    return checked(kind, lambda v: lo <= v <= hi, f"in {lo}..{hi}")

def parse_size(s):
    """'64' or 64 -> (64, 64); '64x48' or (64, 48) -> (64, 48), always (H, W)."""
    parts = s.lower().replace(" ", "").split("x") if isinstance(s, str) else list(s) if isinstance(s, (tuple, list)) else [s]
    if not (len(parts) in (1, 2) and all(p.isdigit() if isinstance(p, str) else isinstance(p, numbers.Integral)
                                         and not isinstance(p, bool) for p in parts) and min(map(int, parts)) > 0):
        raise UsageError(f"image size must be N or HxW with positive integers (e.g. 64 or 64x48); got {s!r}")
    return int(parts[0]), int(parts[-1])

def write_json(path, obj):   # atomically (config.json, evaluate.json...)
    with atomic(path) as f:
        json.dump(obj, f, indent=2)

@contextlib.contextmanager
def atomic(path, mode="w", append=False):
    """Written whole or not at all: a temp file synced and renamed over path, or an append cut back; no temp file left
    behind. An OSError (also one torch.save wraps in a RuntimeError) is one line naming the file."""
    tmp = path if append else os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}.{os.getpid()}")
    end = os.path.getsize(path) if append and os.path.exists(path) else 0       # where a failed append is cut
    try:
        with open(tmp, "a" if append else mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            if not append:   # on disk before the rename makes it the file (a log line needs no fsync of its own)
                f.flush()
                os.fsync(f.fileno())
        if not append:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.truncate(path, end) if append else os.unlink(tmp)
        if isinstance(cause := e if isinstance(e, OSError) else e.__context__, OSError):
            raise _WriteError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise

class _WriteError(OSError):
    def __str__(self):   # one line: could not write 'runs/x/metrics.csv' (No space left on device)
        return f"could not write {_show(self.filename)} ({self.strerror})"

# --- Machinery: list a source's files, read them safely, decode them, cache the result --------
def _identify(source, size, n_synthetic, seed):
    """-> (kind, path, names, skipped, key), decoding nothing. key (sha256) covers all the images depend on: size,
    _CACHE_VERSION, the path and each file's name, size and mtime (CRC in a zip), or the faces' number and seed."""
    key = hashlib.sha256(f"v{_CACHE_VERSION} {size[0]}x{size[1]}".encode())
    if source is None or str(source) == "synthetic":
        key.update(json.dumps(["synthetic", n_synthetic, seed]).encode())
        return "synthetic", None, None, [], key.hexdigest()
    try:
        st = os.stat(path := Path(os.path.abspath(os.path.expanduser(source))))
    except OSError as e:
        raise UsageError(f"the data path {_show(source)} does not exist" if isinstance(e, FileNotFoundError)
                         else f"cannot read the data path {_show(source)} ({_why(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        kind, (names, skipped) = "folder", _list_folder(path)
        entries = [[n, _signature(path / n)] for n in names]
    elif path.suffix.lower() == ".zip":
        with _open_zip(path) as zf:
            infos = sorted((i for i in zf.infolist() if _is_image(i.filename) and not i.is_dir()), key=lambda i: i.filename)
        kind, names, skipped = "zip", [i.filename for i in infos], []
        entries = [_signature(path)] + [[i.filename, i.file_size, i.CRC] for i in infos]
    else:
        raise UsageError(f"{_show(path)} is neither a folder nor a .zip of images")
    if not names and not skipped:
        raise UsageError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {_show(path)}")
    key.update(json.dumps([str(path), entries, skipped]).encode())
    return kind, path, names, skipped, key.hexdigest()

def _list_folder(root):
    """-> (sorted image names below root, [[folder, why]] unlisted); links followed, each folder once (no loops)."""
    names, skipped, seen = [], [], set()

    def refused(e):                                   # os.walk could not list a folder
        if not seen:
            raise UsageError(f"cannot read the folder {_show(root)} ({_why(e)})")
        skipped.append([Path(e.filename).relative_to(root).as_posix() + "/", _why(e)])
    for folder, dirs, files in os.walk(root, onerror=refused, followlinks=True):
        st, rel = os.stat(folder), Path(folder).relative_to(root)
        dirs[:] = [] if (st.st_dev, st.st_ino) in seen else sorted(dirs)
        names += [(rel / f).as_posix() for f in files if _is_image(f) and (st.st_dev, st.st_ino) not in seen]
        seen.add((st.st_dev, st.st_ino))
    return sorted(names), skipped

def _signature(path):   # what the cache key knows of a file: size and mtime, or why it cannot be read
    try:
        return [(st := os.stat(path)).st_size, st.st_mtime_ns]
    except OSError as e:
        return _why(e)

def _open_regular(path, follow=True):
    """open(path, 'rb') for a regular file only (a FIFO would block, a device never end): checked before opening
    and on the open file (O_NONBLOCK: a FIFO swapped in cannot block). follow=False: a symlink is refused too."""
    if stat.S_ISREG((os.stat if follow else os.lstat)(path).st_mode):
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise UsageError("not a regular file")

@contextlib.contextmanager
def _open_image(f):
    """Image.open on a path (a regular file only) or a file object, trying only _FORMATS."""
    with _open_regular(f) if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as fp:
        try:
            img = Image.open(fp, formats=_FORMATS)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"not a {', '.join(_FORMATS[:-1])} or {_FORMATS[-1]} image") from None
        with img:
            yield img

@contextlib.contextmanager
def _open_zip(path):
    with contextlib.ExitStack() as stack:
        try:
            zf = stack.enter_context(zipfile.ZipFile(stack.enter_context(_open_regular(path))))
        except Exception as e:  # noqa: BLE001 -- BadZipFile, and a damaged zip raises others too
            raise UsageError(f"cannot read the zip file {_show(path)} ({_why(e)})") from None
        yield zf

def _read_member(zf, name):
    """A zip member's bytes, only its declared size <= _MAX_FILE_BYTES: a bomb costs no memory, a lie fails the CRC."""
    if (size := zf.getinfo(name).file_size) > _MAX_FILE_BYTES:
        raise ValueError(f"declares {size} bytes, over the {_MAX_FILE_BYTES} limit")
    with zf.open(name) as f:
        return f.read(size)

def _decode_files(kind, root, names, size):
    """-> (uint8 N x 3 x H x W of the files that decode, [[name, why]] of the others)."""
    out, ok, bad = np.empty((len(names), 3, *size), np.uint8), np.ones(len(names), bool), []
    with _open_zip(root) if kind == "zip" else contextlib.nullcontext() as zf, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)   # Pillow only warns; here the file is skipped
        for i, name in enumerate(names):
            try:
                out[i] = decode_image(io.BytesIO(_read_member(zf, name)) if zf else root / name, size).transpose(2, 0, 1)
            except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped, never a crash
                ok[i] = False
                bad.append([name, _why(e)])
    return torch.from_numpy(out if ok.all() else out[ok]), bad     # no second copy when none was skipped

def decode_image(f, size):
    """Path or file object -> uint8 H x W x 3: RGB, centre-cropped, resized; raises on any bad or unlisted file."""
    with _open_image(f) as img:
        img.load()        # decode now: a truncated file raises here, not half-grey later
        ImageOps.exif_transpose(img, in_place=True)   # phone photos store rotation in EXIF
        return np.asarray(_fit(_to_rgb(img), size), dtype=np.uint8)

def _to_rgb(img):
    """Any mode -> RGB: 16-bit rescaled (convert clips it at 255: white), transparency onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):       # no listed format decodes to 'F'
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0   # 'I': 16-bit PNG on some pillows
        return Image.fromarray(np.repeat(np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8)[..., None], 3, -1))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")

def _fit(img, size):
    """Centre crop to the aspect of size = (H, W) (a sliver keeps a pixel), then resize, antialiased, to it."""
    (H, W), (w, h) = size, img.size
    cw, ch = (h * W / H, h) if w * H > h * W else (w, w * H / W)   # trim the sides or top/bottom
    left, top, right, bottom = (round(v) for v in ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
    return img.crop((left, top, max(right, left + 1), max(bottom, top + 1))).resize(size[::-1], _RESAMPLE)

def _read_cache(npy, size):
    """-> (uint8 tensor, meta), or (None, None) if missing, stale, damaged or a symlink; read whole, never mapped."""
    try:
        with _open_regular(npy.with_suffix(".json"), follow=False) as f, _open_regular(npy, follow=False) as g:
            meta, arr = json.loads(f.read()), np.load(g, allow_pickle=False)
        meta["skipped"] = [[str(n), str(why)] for n, why in meta["skipped"]]    # raises unless pairs
        if "factors" in meta:
            meta["factors"] = np.asarray(meta["factors"], np.int64).reshape(meta["n"], 3).tolist()
        if arr.dtype == np.uint8 and arr.shape == (meta["n"], 3, *size):
            return torch.from_numpy(arr), meta
    except Exception:  # noqa: BLE001 -- a damaged or tampered cache entry is only a cache miss
        pass
    return None, None

def _write_cache(npy, arr, meta):
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        with atomic(npy, "wb") as f:
            np.save(f, arr)
        write_json(npy.with_suffix(".json"), meta)
    except OSError as e:
        warnings.warn(f"could not write the image cache {_show(npy)} ({e.strerror or e}); continuing without it")

def _warn_skipped(bad, total, src):
    if bad:
        few = ", ".join(f"{_show(n)} ({_show(why)[1:-1]})" for n, why in bad[:3])
        warnings.warn(f"skipped {len(bad)} of {total} image files in {src} that could not be read: {few}"
                      + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""), stacklevel=3)

def _is_image(name): return name.lower().endswith(IMAGE_EXTS) and not name.rsplit("/", 1)[-1].startswith("._")  # macOS
def _show(name): return repr(str(name))   # quoted: a newline or terminal escape in a name cannot forge output
def _why(e): return str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}"

# --- Synthetic faces, an offline stand-in for photos. Reorder a draw or change a drawing call and every face changes
def synthetic_faces(n, size=(64, 64), seed=0, factors=False):
    """n cartoon faces -> uint8 n x 3 x H x W; factors=True: also their int64 n x 3 SYNTHETIC_LABELS."""
    size, labels = parse_size(size), np.empty((n, 3), np.int64)
    S, out = max(128, 2 * max(size)), np.empty((n, 3, *size), np.uint8)   # supersample, then an antialiased resize
    for i in range(n):
        f = _draw_face(random.Random(f"facegen-face/{seed}/{i}"), S)   # face i: its own RNG, seeded by (seed, i) only
        out[i], labels[i] = np.asarray(_fit(f.picture, size)).transpose(2, 0, 1), (f.hair_group, f.glasses, f.beard)
    return (torch.from_numpy(out), torch.from_numpy(labels)) if factors else torch.from_numpy(out)

class _Face:   # a face being drawn: canvas d, colours, head geometry (unit u); set by _draw_face and the parts
    def oval(self, x, y, rx, ry, **kw): self.d.ellipse((x - rx, y - ry, x + rx, y + ry), **kw)   # centre, radii

def _draw_face(rng, S):
    """One face drawn back to front, then tilted -> _Face: .picture (S x S), labels .hair_group, .glasses, .beard."""
    f, pad, C, u = _Face(), S // 6, S + 2 * (S // 6), S * rng.uniform(1.08, 1.25)   # u: head size, the unit of length
    f.rng, f.cx, f.cy = rng, C / 2 + S * rng.uniform(-0.05, 0.05), C / 2 + S * rng.uniform(-0.03, 0.04)
    f.lw, f.bg = max(1, round(S / 90)), _hsv(rng.random(), rng.uniform(0.12, 0.5), rng.uniform(0.62, 0.95))
    t = rng.random() * (len(_SKIN) - 1)
    skin = f.skin = _mix(_SKIN[int(t)], _SKIN[min(int(t) + 1, len(_SKIN) - 1)], t % 1)
    hair = rng.choice(_FUN_HAIR) if rng.random() < 0.1 else rng.choice(_HAIR)
    f.hair_group, f.hair = _HAIR_GROUP[hair], tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in hair)
    f.line, f.dark, f.style = _mix(skin, (40, 20, 12), 0.5), (30, 20, 20), rng.choice(_HAIR_STYLES)
    f.d = ImageDraw.Draw(img := Image.new("RGB", (C, C), f.bg))
    f.u, f.a, f.bt, f.bb = u, u * rng.uniform(0.18, 0.23), u * rng.uniform(0.22, 0.26), u * rng.uniform(0.24, 0.3)
    f.head = dict(cx=f.cx, cy=f.cy, a=f.a, bt=f.bt, bb=f.bb, nt=rng.uniform(2.0, 2.6), nb=rng.uniform(1.6, 3.2))
    for part in (_back, _features, _hair_in_front, _glasses): part(f)
    th = math.radians(rng.uniform(-10, 10))   # tilt about the centre, crop the margin: one affine map, output -> input
    ca, sa, ox, oy = math.cos(th), math.sin(th), pad - f.cx, pad - f.cy
    affine = (ca, -sa, ca * ox - sa * oy + f.cx, sa, ca, sa * ox + ca * oy + f.cy)   # nearest is enough: _fit smooths
    f.picture = img.transform((S, S), Image.Transform.AFFINE, affine, Image.Resampling.NEAREST, fillcolor=f.bg)
    return f

def _back(f):
    """Shoulders in a shirt, the neck, hair behind the head (f.ht: its outline), ears and the face (f.ey: eye line)."""
    rng, u, cx, cy, a, bt, bb, hair, top = f.rng, f.u, f.cx, f.cy, f.a, f.bt, f.bb, f.hair, f.cy + f.bb + f.u * 0.06
    shirt, neck = _hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9)), _mix(f.skin, (0, 0, 0), 0.12)
    f.oval(cx, top + u * 0.35, u * 0.42, u * 0.35, fill=shirt, outline=_mix(shirt, (0, 0, 0), 0.3), width=f.lw)
    f.d.rectangle((cx - a * 0.42, cy + bb * 0.4, cx + a * 0.42, top + u * 0.04), fill=neck)      # neck, V collar
    f.d.polygon([(cx - a * 0.42, top + u * 0.02), (cx + a * 0.42, top + u * 0.02), (cx, top + u * 0.1)], fill=neck)
    ht = f.ht = dict(f.head, a=a * rng.uniform(1.06, 1.12), bt=bt * rng.uniform(1.1, 1.22))
    if f.style == "long":
        drop, back = cy + bb * rng.uniform(0.6, 1.5), _head_pts(**dict(ht, a=a * 1.2), t0=math.pi, t1=math.tau)
        f.d.polygon(back + [(cx + a * 1.25, drop), (cx, drop + u * 0.03), (cx - a * 1.25, drop)], fill=hair)
    elif f.style == "bun":
        r = a * rng.uniform(0.35, 0.5)
        f.oval(cx, cy - ht["bt"] - r * 0.3, r, r, fill=hair)
    elif f.style == "curly":
        r, curls = u * rng.uniform(0.05, 0.07), dict(ht, a=a * 1.12, bt=ht["bt"] * 1.02)
        for x, y in _head_pts(**curls, t0=math.pi - 0.5, t1=math.tau + 0.5, m=14): f.oval(x, y, r, r, fill=hair)
    elif f.style == "bald" and rng.random() < 0.6:          # a fringe of hair above the ears
        for s in (-1, 1): f.oval(cx + s * a * 0.9, cy - bt * 0.3, a * 0.18, bt * 0.4, fill=hair)
    f.ey, ink = cy + u * rng.uniform(-0.02, 0.02), dict(fill=f.skin, outline=f.line, width=f.lw)
    for s in (-1, 1): f.oval(cx + s * a * 0.96, f.ey + bt * 0.03, a * 0.16, bt * 0.25, **ink)     # ears
    f.d.polygon(_head_pts(**f.head), **ink)

def _features(f):
    """Blush, freckles, eyes (white, iris, pupil, glint, lid; dot; happy arcs), brows, nose, beard, moustache, mouth."""
    rng, u, cx, a, ey, skin, lw, dark = f.rng, f.u, f.cx, f.a, f.ey, f.skin, f.lw, f.dark
    ex, ew = f.ex, f.ew = a * rng.uniform(0.38, 0.48), u * rng.uniform(0.038, 0.054)   # eye offset, half width
    my = f.cy + f.bb * rng.uniform(0.5, 0.62)                                           # the mouth line
    if rng.random() < 0.45:
        blush = _mix(skin, (236, 104, 118), rng.uniform(0.25, 0.45))
        for s in (-1, 1): f.oval(cx + s * ex * 1.2, (ey + my) / 2 + u * 0.01, u * 0.045, u * 0.024, fill=blush)
    for _ in range(rng.randint(6, 12) if rng.random() < 0.15 else 0):                # freckles
        f.oval(cx + rng.choice((-1, 1)) * ex * rng.uniform(0.6, 1.4), ey + u * rng.uniform(0.05, 0.09),
               lw, lw, fill=_mix(skin, (90, 45, 20), 0.35))
    eh, iris = ew * rng.uniform(0.6, 0.95), rng.choice(_IRIS)
    kind, r = rng.choices(("open", "dot", "happy"), (0.8, 0.12, 0.08))[0], min(eh * rng.uniform(0.75, 0.95), ew * 0.8)
    gx, gy = rng.uniform(-1, 1) * (ew - r) * 0.7, rng.uniform(-0.15, 0.15) * eh   # gaze
    for x0 in (cx - ex, cx + ex):
        box = (x0 - ew, ey - eh, x0 + ew, ey + eh)
        if kind == "open":
            f.d.ellipse(box, fill=(250, 250, 250), outline=f.line, width=lw)
            for d, k, c in ((0, 1, iris), (0, 0.5, (15, 12, 12)), (0.35, 0.28, (255, 255, 255))):   # + pupil, highlight
                f.oval(x0 + gx - r * d, ey + gy - r * d, r * k, r * k, fill=c)
        if kind == "dot":
            f.oval(x0, ey, r, r * 1.25, fill=dark)
            f.oval(x0 - r * 0.3, ey - r * 0.55, r * 0.25, r * 0.25, fill=(255, 255, 255))
        else: f.d.arc(box, *((200, 340) if kind == "open" else (195, 345)), fill=dark, width=lw * 2)   # lid, happy
    brow = _mix(skin, (40, 30, 25), 0.6) if f.style == "bald" else _mix(f.hair, (20, 15, 10), 0.35)
    by, bw = ey - eh - u * rng.uniform(0.02, 0.045), max(lw, round(u * rng.uniform(0.012, 0.024)))
    tilt, arch = u * rng.uniform(-0.018, 0.018), u * rng.uniform(0, 0.015)   # inner end up: worried; down: cross
    for x0, s in ((cx - ex, -1), (cx + ex, 1)):
        f.d.line([(x0 + s * ew * 1.1, by + u * 0.005), (x0 + s * ew * 0.1, by - arch), (x0 - s * ew * 0.9, by + tilt)],
                 fill=brow, width=bw, joint="curve")
    ny, nose = ey + (my - ey) * rng.uniform(0.5, 0.65), _mix(skin, (60, 30, 15), 0.35)
    kind, nw = rng.choice(("button", "nostrils", "arc", "line")), u * rng.uniform(0.018, 0.03)
    if kind == "button": f.oval(cx, ny, nw, nw * 0.7, fill=_mix(skin, (60, 30, 15), 0.18))
    elif kind == "nostrils":
        for s in (-1, 1): f.oval(cx + s * nw * 0.6, ny, lw, lw, fill=nose)
    elif kind == "arc": f.d.arc((cx - nw, ny - nw, cx + nw, ny + nw), 20, 160, fill=nose, width=lw + 1)
    else:
        w = rng.choice((-1, 1)) * nw                    # a line, bent to either side
        f.d.line([(cx + w * 0.3, ny - u * 0.06), (cx - w * 0.6, ny), (cx + w * 0.5, ny)], fill=nose, width=lw + 1)
    f.beard = f.style != "long" and rng.random() < 0.1    # the label records the same draw
    if f.beard:                                          # the jaw outline, closed above the mouth
        chin = _head_pts(**dict(f.head, a=a * 1.01, bb=f.bb * 1.03), t0=0.15, t1=math.pi - 0.15, m=24)
        f.d.polygon(chin + [(cx + s * a * 0.6, my - u * 0.02) for s in (-1, 1)], fill=_mix(f.hair, skin, 0.25))
    if rng.random() < 0.1:                               # a moustache
        w, y = u * 0.06, my - u * 0.01
        f.d.polygon([(cx - w, y), (cx, ny + u * 0.012), (cx + w, y), (cx, my - u * 0.025)], fill=f.hair)
    mw, mh = u * rng.uniform(0.04, 0.08), u * rng.uniform(0.02, 0.045)
    box, inside, lips = (cx - mw, my - mh, cx + mw, my + mh), (92, 26, 36), _mix(skin, (196, 64, 74), 0.55)
    kind = rng.choices(("smile", "grin", "arc", "open", "flat", "o", "frown"), (3, 2, 3, 1, 1, 1, 1))[0]
    if kind in ("smile", "grin"): f.d.chord(box, 0, 180, fill=inside, outline=lips, width=lw)
    if kind == "grin":                                   # teeth
        f.d.chord((cx - mw * 0.9, my - mh * 0.2, cx + mw * 0.9, my + mh * 0.8), 180, 360, fill=(248, 248, 244))
    if kind == "arc": f.d.arc(box, 15, 165, fill=inside, width=lw * 2)
    if kind == "open":
        f.oval(cx, my + mh * 0.05, mw * 0.6, mh * 1.05, fill=inside, outline=lips, width=lw)
        f.d.chord((cx - mw * 0.45, my, cx + mw * 0.45, my + mh), 0, 180, fill=(222, 96, 106))
    if kind == "flat": f.d.line([(cx - mw * 0.8, my), (cx + mw * 0.8, my)], fill=inside, width=lw * 2)
    if kind == "o": f.oval(cx, my, mh * 0.7, mh * 0.8, fill=inside, outline=lips, width=lw)
    if kind == "frown": f.d.arc((cx - mw * 0.8, my, cx + mw * 0.8, my + mh * 2), 200, 340, fill=inside, width=lw * 2)

def _hair_in_front(f):
    """An arc over the head closed by a hairline spline (a fringe, a side parting or a plain curve); spikes, curls."""
    if f.style == "bald": return
    rng, u, cx, cy, a, bt, bb, ht, hair, xs = f.rng, f.u, f.cx, f.cy, f.a, f.bt, f.bb, f.ht, f.hair, f.a * 0.9
    # how far down the sides it reaches, the hairline's height (share of forehead), the parting
    side, hl, part = rng.uniform(0.1, 0.4), rng.uniform(0.5, 0.72), a * rng.uniform(-0.4, 0.4)
    if f.style in ("bangs", "long"): side, hl = rng.uniform(0.5, 1.1), rng.uniform(0.28, 0.45)
    if f.style == "buzz": hair, hl, side = _mix(hair, f.skin, 0.45), 0.78, 0.05   # skin shows: a lighter cap
    outer = _head_pts(**ht, t0=math.pi - side, t1=math.tau + side, m=40)
    if f.style in ("bangs", "long") and (f.style == "bangs" or rng.random() < 0.5):   # a fringe with n teeth
        n, y = rng.randint(3, 7), cy + bb * 0.1 * side
        line = [(cx + xs * 0.95 * (1 - 2 * i / n), cy - bt * (hl + (0.08 if i % 2 and n <= 5 else 0.0)))
                for i in range(n + 1)]
    else:                                                # control points right to left; y: at the sides
        y, k, d, lo = ((cy - bt * 0.25, 0.45, 0.2, hl * 0.55) if f.style == "side" else
                       (cy - bt * 0.15 + bb * 0.2 * max(0, side - 0.4), 0.5, 0.12, hl))
        fl, fr = (lo, hl) if part > 0 else (hl, lo)
        line = [(cx + a * k, cy - bt * fr), (cx + part, cy - bt * (hl + d)), (cx - a * k, cy - bt * fl)]
    f.d.polygon(outer + _spline([outer[-1], (cx + xs, y), *line, (cx - xs, y), outer[0]]), fill=hair)
    if f.style == "spiky":                               # triangles pointing away from centre
        for x, y in _head_pts(**ht, t0=math.pi + 0.35, t1=math.tau - 0.35, m=rng.randint(5, 8)):
            p, q, k = x - cx, y - cy, rng.uniform(0.18, 0.35)                    # (p, q): from the centre
            f.d.polygon([(x - q * 0.18, y + p * 0.18), (x + p * k, y + q * k), (x + q * 0.18, y - p * 0.18)], fill=hair)
    if f.style == "curly":                               # curls along the hairline
        for x, y in _head_pts(**dict(ht, a=a * 0.9, bt=bt * hl * 1.25), t0=math.pi + 0.3, t1=math.tau - 0.3, m=8):
            f.oval(x, y, u * 0.035, u * 0.035, fill=hair)

def _glasses(f):
    """Round or square frames in one of four colours, with arms and a bridge."""
    rng, cx, ey, ex, lw = f.rng, f.cx, f.ey, f.ex, f.lw
    f.glasses = rng.random() < 0.15                         # the label records the same draw
    if not f.glasses: return
    frame = rng.choice([(25, 25, 30), (110, 60, 30), (180, 30, 40), (40, 60, 150)])
    gw, lens = f.ew * 1.45, f.d.ellipse if rng.random() < 0.5 else f.d.rectangle
    for s in (-1, 1):
        lens((cx + s * ex - gw, ey - gw * 0.8, cx + s * ex + gw, ey + gw * 0.8), outline=frame, width=lw * 2)
        f.d.line([(cx + s * (ex + gw), ey - gw * 0.3), (cx + s * f.a * 0.98, ey - gw * 0.4)], fill=frame, width=lw * 2)
    f.d.line([(cx - ex + gw, ey - gw * 0.2), (cx + ex - gw, ey - gw * 0.2)], fill=frame, width=lw * 2)

_SKIN = [(255, 228, 206), (247, 206, 172), (236, 188, 145), (216, 162, 118), (188, 131, 88), (146, 97, 62),
         (108, 69, 44), (78, 50, 33)]
_HAIR = [(28, 24, 24), (62, 42, 30), (104, 68, 40), (146, 92, 50), (176, 84, 42), (220, 186, 118),
         (236, 222, 180), (136, 136, 140), (222, 222, 226)]
_FUN_HAIR = [(64, 104, 208), (222, 98, 168), (76, 166, 106), (136, 82, 188), (226, 82, 70)]
_IRIS = [(96, 60, 32), (58, 38, 24), (66, 122, 198), (68, 138, 86), (138, 108, 52), (108, 124, 140)]
_HAIR_STYLES = ("bald", "buzz", "short", "side", "bangs", "long", "spiky", "curly", "bun")
HAIR_GROUPS = ("dark", "brown", "blond", "grey", "colourful")   # labels: _HAIR's 9 colours in 4 groups, _FUN_HAIR
_HAIR_GROUP = dict(zip(_HAIR + _FUN_HAIR, [0, 0, 1, 1, 1, 2, 2, 3, 3] + [4] * len(_FUN_HAIR)))   # colour -> group
SYNTHETIC_LABELS = {"hair": list(HAIR_GROUPS), "glasses": ["no", "yes"], "beard": ["no", "yes"]}
def _mix(c1, c2, t): return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))
def _hsv(h, s, v): return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))

def _head_pts(cx, cy, a, bt, bb, nt, nb, t0=0.0, t1=2 * math.pi, m=48):
    """Head outline points, angle t0 to t1 (y down): superellipses, half width a, forehead (bt, nt), jaw (bb, nb)."""
    cs = [(math.cos(t), math.sin(t)) for t in (t0 + (t1 - t0) * i / m for i in range(m + 1))]
    return [(cx + a * math.copysign(abs(c) ** (2 / n), c), cy + b * math.copysign(abs(s) ** (2 / n), s))
            for c, s in cs for b, n in [(bb, nb) if s > 0 else (bt, nt)]]

def _spline(pts, k=6):
    """Catmull-Rom curve through pts, k points per segment (smooth hairlines from a few control points)."""
    P = [pts[0], *pts, pts[-1]]
    return [tuple(0.5 * (2 * b + (c - a) * t + (2 * a - 5 * b + 4 * c - d) * t * t + (3 * b - a - 3 * c + d) * t ** 3)
                  for a, b, c, d in zip(*w))
            for w in zip(P, P[1:], P[2:], P[3:]) for t in (j / k for j in range(k))] + [P[-2]]
