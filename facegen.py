"""facegen.py — pictures and measurements from a trained run: load its nets, decode z, save a grid.

    python facegen.py sample runs/vae --std 0.5           # z nearer the centre (Perriu & Amadi, fig 13)
    python facegen.py interpolate runs/vae --slerp        # between encoded test faces, on the sphere
    python facegen.py pca runs/vae-lrelu --serve          # latent PCA grid + slider explorer (LFW report, fig 17)
    python facegen.py evaluate runs/vae                   # bits/dim, IW bound, SWD, copying check
    python facegen.py attributes runs/c --attr glasses    # conditional runs: rows = attribute values, same z

RUN: a run folder (its last.pt, or --checkpoint best) or a checkpoint file. Each command (the others: reconstruct,
std-sweep, gif, control) writes one file, in the run folder unless --out says otherwise, and prints its path.
"""
import argparse, contextlib, http.server, io, json, math, os, re, sys, threading, urllib.parse, warnings

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import losses
import models
from data import UsageError, between

# --- A run: its checkpoint holds the nets' weights and the config they were built from ----------------------

def load_run(path, checkpoint="last", device="cpu"):
    """A run folder (its {checkpoint}.pt) or a checkpoint file -> (nets in eval mode, config)."""
    if os.path.isdir(path):
        path = os.path.join(path, f"{checkpoint}.pt")
    state = models.load_checkpoint(path, map_location=device)
    nets = models.from_config(state["config"])
    try:
        nets.load_state_dict(state["nets"])
    except RuntimeError as e:  # weights of another shape than the config builds
        raise UsageError(f"cannot rebuild the model of {path}: {str(e).splitlines()[0]}")
    return nets.to(device).eval(), dict(state["config"], checkpoint=path, trained_steps=state.get("step"))

def open_run(args):
    return load_run(args.run, args.checkpoint, models.pick_device(args.device))

def to_float(x, device="cpu"):
    """uint8 [0, 255] -> float [-1, 1], the scaling the nets were trained on."""
    return x.to(device).float() / 127.5 - 1

def noise(nets, n, generator, std=1.0):
    """n codes z ~ N(0, std² I), (n, latent_dim)."""
    return std * torch.randn(n, models.latent_dim(nets), generator=generator)

def random_labels(nets, n, generator):
    """n label rows, each attribute uniform over its values; None for an unconditional model."""
    classes = (nets["vae"] if "vae" in nets else nets["G"]).classes
    return torch.stack([torch.randint(0, c, (n,), generator=generator) for c in classes], 1) if classes else None

@torch.no_grad()
def decode(nets, z, y=None, batch=256):
    """z (N, latent_dim) [, labels y (N, K), or one row (1, K) for every face] -> images (N, 3, H, W) on the CPU.
    A conditional model given no y decodes every face with one uniform row (seed 0): faces differ only in z."""
    G, dev = models.generator(nets), next(nets.parameters()).device
    y = random_labels(nets, 1, torch.Generator().manual_seed(0)) if y is None else y
    part = lambda t, i: None if t is None else t.expand(len(z), -1)[i:i + batch].to(dev)  # noqa: E731
    return torch.cat([G(part(z, i), part(y, i)).float().cpu() for i in range(0, len(z), batch)])

OUT_KINDS = {".png": (".png", ".jpg", ".jpeg", ".webp", ".bmp"), ".gif": (".gif",), ".json": (".json",)}

def out_path(args, name):
    """--out, or `name` in the run folder; a --out that cannot be that kind of file is a UsageError."""
    path = args.out or os.path.join(models.run_folder(args.run), name)
    kinds, folder = OUT_KINDS[os.path.splitext(name)[1]], os.path.dirname(os.path.abspath(path))
    if not path.isprintable():  # "wrote PATH" must stay one honest line
        raise UsageError(f"--out {path!r}: a file name with a control character (newline, tab, ...) is refused")
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder: name a {kinds[0]} file in it")
    if os.path.splitext(path)[1].lower() not in kinds:
        raise UsageError(f"--out {path}: this command writes a {' / '.join(kinds)} file")
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: {folder} is not a folder{' (it is a file)' if os.path.exists(folder) else ''}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: the folder {folder} is not writable")
    return path

def save(images, args, name, nrow, **labels):
    path, grid = out_path(args, name), data.make_grid(images, nrow)
    (labelled_grid(grid, images.shape[-2:], **labels) if labels else Image.fromarray(grid)).save(path)
    print(f"wrote {path}")
    return path

def labelled_grid(grid, cell, padding=2, row_labels=(), col_labels=(), title=None):
    """A data.make_grid picture of (h, w) cells with labels left of its rows, above its columns ("" none) and a title."""
    (h, w), p, font = cell, padding, dict(font=ImageFont.load_default(10), spacing=1)  # the built-in font: no file
    kw = dict(font, fill="black")
    def box(t):  # the (width, height) a text takes; (-6, -4) for none, which cancels its margin
        return ImageDraw.Draw(Image.new("1", (1, 1))).multiline_textbbox((0, 0), t, **font)[2:] if t else (-6, -4)
    left = max(max([box(t)[0] + 6 for t in row_labels] + [0]), box(title)[0] + 4 - grid.shape[1] if title else 0)
    top = (box(title)[1] + 6 if title else 0) + max([box(t)[1] + 4 for t in col_labels] + [0])
    out = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), "white")
    out.paste(Image.fromarray(grid), (left, top))
    d = ImageDraw.Draw(out)
    d.text((2, 2), title or "", **kw)
    for r, t in enumerate(row_labels):                # right-aligned, centred on the row
        d.multiline_text((left - 3, top + p + r * (h + p) + h / 2), t, anchor="rm", align="right", **kw)
    for c, t in enumerate(col_labels):                # centred over the column
        d.multiline_text((left + p + c * (w + p) + w / 2, top - 2), t, anchor="md", align="center", **kw)
    return out

# --- Picture commands: one function each, returning the path it wrote ---------------------------------------

def cmd_sample(args):
    """--n faces decoded from z ~ N(0, std² I); std < 1 keeps z nearer the centre: more typical, less varied faces
    (Perriu & Amadi, fig 13). Conditional runs: --label fixes attributes, the others are uniform per face."""
    nets, cfg = open_run(args)
    g = torch.Generator().manual_seed(args.seed)
    z, y = noise(nets, args.n, g, args.std), random_labels(nets, args.n, g)
    if args.label and y is None:
        raise UsageError("--label needs a conditional run (train.py --conditional)")
    set_labels(y, args.label, cfg.get("labels") or {})
    return save(decode(nets, z, y), args, "sample.png", args.nrow)

def set_labels(y, text, info):
    """'hair=blond,glasses=yes' -> y[..., attribute index] = value index, checked against info {attribute: [values]}."""
    for item in filter(None, (text or "").split(",")):
        attr, _, value = item.partition("=")
        if attr not in info or value not in info[attr]:
            raise UsageError(f"--label {item!r}: the run's labels are "
                             + "; ".join(f"{a}={'|'.join(v)}" for a, v in info.items()))
        y[..., list(info).index(attr)] = info[attr].index(value)

def cmd_attributes(args):
    """One row per value of --attr, the columns the same --n draws of z (and the same other attributes: --label,
    else their first value), so a row differs from the next only in the label."""
    nets, cfg = open_run(args)
    info = cfg.get("labels")
    if not info:
        raise UsageError("attributes needs a conditional run (train.py --conditional)")
    if args.attr not in info:
        raise UsageError(f"--attr must be one of {', '.join(info)}; got {args.attr!r}")
    k, values = list(info).index(args.attr), info[args.attr]
    if len(values) * args.n > 4096:
        raise UsageError(f"--attr {args.attr} has {len(values)} values: --n {args.n} per row makes too many faces")
    z = noise(nets, args.n, torch.Generator().manual_seed(args.seed))
    y = torch.zeros(len(values), args.n, len(info), dtype=torch.long)
    set_labels(y, args.label, info)
    y[..., k] = torch.arange(len(values))[:, None]                       # row r: value r
    print(f"rows: {args.attr} = " + ", ".join(values))
    return save(decode(nets, z.repeat(len(values), 1), y.flatten(0, 1)), args, f"attributes_{args.attr}.png", args.n,
                row_labels=[f"{args.attr}={v}" for v in values], title="rows: the label; columns: the same z")

def cmd_std_sweep(args):
    """Row r decodes stds[r] · eps with one eps ~ N(0, I) per column, so the rows differ only in the scale of z:
    small std gives 'prototypical' faces, large std unusual ones (the LFW report, figs 12-13)."""
    nets, _ = open_run(args)
    print("rows: std " + ", ".join(f"{s:g}" for s in args.stds))
    g = torch.Generator().manual_seed(args.seed)
    eps, y = noise(nets, args.n, g), random_labels(nets, args.n, g)      # conditional: one label row per column
    y = None if y is None else y.repeat(len(args.stds), 1)
    return save(decode(nets, torch.cat([s * eps for s in args.stds]), y), args, "std_sweep.png", args.n,
                row_labels=[f"std {s:g}" for s in args.stds])

def run_split(cfg, command):
    """A run's data split as it trained -> (train_x, test_x, train_y, test_y), labels None if unconditional."""
    train_x, test_x, labels = data.run_data(cfg)
    train_y, test_y, _ = labels or (None, None, None)
    if not len(test_x):
        raise UsageError(f"{command} needs held-out test images and this run kept none (its test_fraction is 0)")
    return train_x, test_x, train_y, test_y

@torch.no_grad()
def encode_dataset(vae, images, labels=None, batch=256):
    """uint8 images [, their labels (conditional)] -> the means mu of q(z|x[, y]), (N, latent_dim), on the CPU."""
    dev = next(vae.parameters()).device
    y = lambda i: None if labels is None else labels[i:i + batch].to(dev)  # noqa: E731
    return torch.cat([vae.encode(to_float(images[i:i + batch], dev), y(i))[0].float().cpu()
                      for i in range(0, len(images), batch)])

def cmd_reconstruct(args):
    """Rows of --nrow test images (the run's test split, or --data), each over its reconstructions decode(mu)."""
    nets, cfg = open_run(args)
    if "vae" not in nets:
        raise UsageError("reconstruct needs an encoder (autoencoders, vaegan) and this run is a GAN; "
                         "use sample, interpolate, std-sweep or evaluate")
    vae = nets["vae"]
    if args.data and vae.classes:
        raise UsageError("reconstruct --data: this conditional autoencoder needs each image's labels and those "
                         "images carry none; leave out --data to use the run's labelled test images")
    if args.data:
        images, y = data.load_images(args.data, tuple(cfg["image_size"]), verbose=False)[:args.n], None
    else:
        _, test, _, test_y = run_split(cfg, "reconstruct")
        images, y = test[:args.n], None if test_y is None else test_y[:args.n]
    x, x_hat, ncol = to_float(images), decode(nets, encode_dataset(vae, images, y), y), min(args.nrow, len(images))
    pad = -torch.ones(-len(x) % ncol, *x.shape[1:])                 # black, to fill the last row
    grid = torch.stack([torch.cat([t, pad]).view(-1, ncol, *x.shape[1:]) for t in (x, x_hat)], 1).flatten(0, 2)
    return save(grid, args, "reconstruct.png", ncol, row_labels=["input", "reconstruction"] * (len(grid) // (2 * ncol)))

def slerp(a, b, t):
    """Spherical interpolation (Shoemake 1985; White 2016 for generative models), row by row:

        slerp(a, b; t) = [sin((1 − t) Ω) a + sin(t Ω) b] / sin Ω,   cos Ω = <a, b> / (|a| |b|)

    z ~ N(0, I_d) lives near the shell |z| ≈ √d, but the straight-line midpoint of two draws has |z| ≈ √(d/2),
    closer to the centre than typical samples. Parallel endpoints: the straight line."""
    omega = torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1))[..., None]
    so = torch.sin(omega)
    flat = so.abs() < 1e-6
    arc = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(flat, 1.0, so)
    return torch.where(flat, (1 - t) * a + t * b, arc)

def interpolation_path(a, b, steps, spherical=False):
    """Endpoints (B, d) -> (B, steps, d) at t = 0, 1/(steps − 1), ..., 1: straight line or slerp."""
    t, a, b = torch.linspace(0, 1, steps)[None, :, None], a[:, None], b[:, None]
    return slerp(a, b, t) if spherical else (1 - t) * a + t * b

def cmd_interpolate(args):
    """--rows interpolations of --steps faces: between the codes mu of random pairs of test images shown beside
    them (autoencoders), or between z ~ N(0, std² I) (GANs, --noise); --slerp follows the sphere."""
    nets, cfg = open_run(args)
    g, encode = torch.Generator().manual_seed(args.seed), "vae" in nets and not args.noise
    if encode:
        vae, (_, test, _, test_y) = nets["vae"], run_split(cfg, "interpolate")
        if len(test) < 2:
            raise UsageError("interpolate needs at least 2 test images")
        ia = torch.randint(len(test), (args.rows,), generator=g)
        ib = (ia + torch.randint(1, len(test), (args.rows,), generator=g)) % len(test)   # never ia
        ya, yb = (None, None) if test_y is None else (test_y[ia], test_y[ib])
        za, zb, y = encode_dataset(vae, test[ia], ya), encode_dataset(vae, test[ib], yb), ya
    else:
        za, zb = (noise(nets, args.rows, g, args.std) for _ in "ab")
        y = random_labels(nets, args.rows, g)
    y = None if y is None else y.repeat_interleave(args.steps, 0)  # a conditional row keeps A's labels: only z moves
    x = decode(nets, interpolation_path(za, zb, args.steps, args.slerp).flatten(0, 1), y).unflatten(0, (args.rows, -1))
    ends = ["t=0" if encode else "z_A\nt=0", *[""] * (args.steps - 2), "t=1" if encode else "z_B\nt=1"]
    if encode:
        x = torch.cat([to_float(test[ia])[:, None], x, to_float(test[ib])[:, None]], 1)
        ends = ["image\nA", *ends, "image\nB"]
    title = f"{'slerp' if args.slerp else 'linear'}, {'codes of test images A, B' if encode else 'noise z_A to z_B'}"
    return save(x.flatten(0, 1), args, "interpolate.png", x.shape[1], col_labels=ends, title=title)

def cmd_gif(args):
    """progress.gif from samples/epoch_*.png (train.py's same noise every epoch), the last frame held --hold-last-ms."""
    path = out_path(args, "progress.gif")
    kept = data.save_gif(os.path.join(models.run_folder(args.run), "samples"), path, args.duration_ms, args.hold_last_ms)
    print(f"wrote {path} ({kept} frames)")
    return path

# --- Latent PCA (the LFW report): order the latent directions by how much the data's codes vary along them ---

def latent_pca(codes):
    """PCA of codes (N, d), N >= 2 -> (mean (d,), components (k, d), sigma (k,)), k = min(N − 1, d) (the rank):

        codes − mean = U S Vᵀ (torch.linalg.svd),  component j = row j of Vᵀ,  sigma_j = S_j / √(N − 1)

    sigma_j is the std of the codes along component j, descending. Every component is kept: "the gain lies in
    the ordering of these dimensions by variance". Each is signed so that its largest entry is positive."""
    if len(codes) < 2:
        raise UsageError(f"a PCA needs at least 2 codes (training images); got {len(codes)}")
    mean, k = codes.mean(0), min(len(codes) - 1, codes.shape[1])
    _, S, Vh = torch.linalg.svd(codes - mean, full_matrices=False)
    S, Vh = S[:k], Vh[:k]
    sign = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    return mean, Vh * sign, S / math.sqrt(len(codes) - 1)

def from_pca(mean, components, sigma, coeffs):
    """Coefficients (B, K) in std units -> codes z = mean + Σ_j c_j sigma_j v_j."""
    return mean + (coeffs * sigma[:coeffs.shape[1]]) @ components[:coeffs.shape[1]]

def fit_pca(nets, train_images=None, n_noise=4096, seed=0, labels=None):
    """The PCA of the training images' codes μ (a CVAE's: given labels); a GAN's: of n_noise draws z ~ N(0, I)."""
    if "vae" in nets:
        return latent_pca(encode_dataset(nets["vae"], train_images, labels))
    return latent_pca(noise(nets, n_noise, torch.Generator().manual_seed(seed)))

def variance_share(sigma):  # of each principal component (all 0 if the codes do not vary)
    return sigma ** 2 / (sigma ** 2).sum().clamp_min(1e-30)

def start_code(nets, f, mean, faces=None, labels=None):
    """Start face f -> (z (d,), labels (1, K) or None): 'mean' the mean code (decode's default labels); else held-out
    image f's μ with its labels (autoencoders: faces, labels) or z ~ N(0, I) and uniform labels seeded by f (GANs)."""
    if f == "mean":
        return mean, None
    if faces is None:
        g = torch.Generator().manual_seed(int(f))
        return noise(nets, 1, g)[0], random_labels(nets, 1, g)
    y = None if labels is None else labels[int(f)][None]
    return encode_dataset(nets["vae"], faces[int(f)][None], y)[0], y

def pca_traversal(nets, basis, K, steps, span, start=None, y=None):
    """Row j walks component j over ±span of its std around the code `start` (default: the mean code), the others
    fixed, every face decoded with the labels y -> (images, row labels, column labels)."""
    mean, components, sigma = basis
    K, c = min(K, len(sigma)), torch.linspace(-span, span, steps)
    coeffs = torch.eye(K)[:, None] * c[:, None]                          # (K, steps, K): row j moves c_j only
    rows = [f"PC{j + 1}\n{100 * s:.1f}% var" for j, s in enumerate(variance_share(sigma)[:K].tolist())]
    cols = [f"{v:+.3g}\nsd" if v else "mean" if start is None else "start" for v in c.tolist()]
    z = from_pca(mean if start is None else start, components, sigma, coeffs.flatten(0, 1))
    return decode(nets, z, y), rows, cols

def explorer_about(run, cfg, n_train, latent_size):
    """The explorer page's text about a run (n_train: training images the PCA saw; None for a GAN)."""
    folder, step, (H, W) = models.run_folder(run), cfg.get("trained_steps"), cfg["image_size"]
    epoch = "?"
    with contextlib.suppress(UsageError, KeyError, TypeError, ValueError):  # the epoch of the step: its metrics.csv row
        rows = models.read_csv(os.path.join(folder, "metrics.csv"))
        epoch = ([r["epoch"] for r in rows if int(r["step"]) <= step] or ["0"])[-1]
    basis = (f"This GAN has no encoder, so the components are those of 4096 draws z ~ N(0, I), an isotropic cloud in "
             f"{latent_size} dimensions: random orthogonal directions whose order means little." if n_train is None else
             f"The components are the principal axes of the codes μ of the {n_train} training images, largest "
             f"variance first; a slider moves the face along one, in units of that component's std σ.")
    return {"model": cfg["model"], "basis": basis, "help": basis + " The strip above each slider shows the face at "
            "its ticks (click one to go there). Pick a start face; the address bar is a permalink.",
            "facts": [["run", os.path.abspath(folder)], ["model", cfg["model"]],
                      ["checkpoint", os.path.basename(cfg["checkpoint"])], ["epoch", f"{epoch} (step {step})"],
                      ["latent size", str(latent_size)], ["image", f"{H}×{W}"]]}

def cmd_pca(args):
    """Row j walks principal component j over ±range of its std around a face (the mean code is a blob, a GAN's
    z = 0 black): test image #(--seed mod N)'s code, or z ~ N(0, I) seeded by --seed. --serve: the slider explorer."""
    nets, cfg = open_run(args)
    train_images, test_images, train_y, test_y = run_split(cfg, "pca") if "vae" in nets else (None,) * 4
    basis = fit_pca(nets, train_images, seed=args.seed, labels=train_y)
    f = str(args.seed % (2 ** 31 if test_images is None else len(test_images)))
    z0, y0 = start_code(nets, f, basis[0], test_images, test_y)
    images, rows, cols = pca_traversal(nets, basis, args.components, args.steps, args.range, z0, y0)
    title = f"around {'z ~ N(0, I), seed ' if test_images is None else 'held-out test image #'}{f}"
    path = save(images, args, "pca.png", args.steps, row_labels=rows, col_labels=cols, title=title)
    about = explorer_about(args.run, cfg, None if train_images is None else len(train_images), len(basis[0]))
    if train_images is None:
        print(about["basis"])
    print("variance explained: " + ", ".join(r.replace("\n", " ").replace(" var", "") for r in rows))
    if args.serve:
        explorer = Explorer(nets, basis, about, test_images, args.components, args.range, labels=test_y, start=f)
        server = make_server(explorer, port=args.port)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C may come as soon as the address is printed
            print(f"explorer at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops it)", flush=True)
            server.serve_forever()
        server.server_close()
    return path

# --- The PCA explorer: a local page with a slider per component ---------------------------------------------
# The page's state is its URL query, so every view is a permalink: f, the start face, and c, the slider values.
# The face shown is decode(z_f + Σ_j c_j σ_j v_j), z_f the mean code, test image f's μ, or z ~ N(0, I) with seed f.

PAGE = """<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>facegen latent PCA explorer</title>
<style>
body { margin: 0; padding: 12px 24px; font: 15px/1.4 system-ui, sans-serif; background: #f6f6f6 }
h1 { font-size: 20px; margin: 0 } h2 { font-size: 15px; margin: 14px 0 6px } p { color: #555; overflow-wrap: anywhere }
main { display: grid; grid-template-columns: minmax(0, 4fr) minmax(0, 5fr); gap: 0 32px; align-items: start;
       grid-template-areas: "view sliders" "starts sliders" ". sliders" }
#view { grid-area: view; position: sticky; top: 0; background: #f6f6f6 } #starts { grid-area: starts }
#sliders { grid-area: sliders } img { image-rendering: pixelated; aspect-ratio: var(--aspect) }
#face { display: block; width: 100%; max-width: 70vh } output { font: 600 15px monospace; margin: 0 8px }
.row { margin: 6px 0 12px; padding: 8px 12px 4px; background: #fff }
.thumb { width: 60px; cursor: pointer; border: 3px solid transparent } .thumb.on { border-color: #1a73e8 }
.strip { display: block; width: 100%; aspect-ratio: calc(var(--n) * var(--aspect)); margin-top: 6px; cursor: pointer }
/* the slider's ends sit under the centres of the first and last preview faces (its thumb: 16 px) */
input[type=range] { display: block; margin: 4px 0 0 calc(100% / (2 * var(--n)) - 8px);
                    width: calc(100% * (var(--n) - 1) / var(--n) + 16px) }
.ticks { display: grid; grid-template-columns: repeat(var(--n), 1fr); text-align: center; font-size: 12px }
@media (max-width: 760px) {
  main { grid-template-columns: minmax(0, 1fr); grid-template-areas: "view" "starts" "sliders" }
  body { padding: 8px 10px } #face { width: auto; max-width: 100%; height: 32vh; margin: 0 auto } }
</style>
<h1>Latent PCA explorer</h1><p id="facts"></p><p id="help"></p>
<main><section id="view"><img id="face" alt="the face for the current slider values">
  <p><span id="from"></span><br><a id="save" download>save PNG</a>
  <button onclick="start(f)">reset all sliders</button></p></section>
<section id="starts"><h2>Start from</h2><div id="thumbs"></div></section>
<section id="sliders"><h2>Principal components (slider: offset from the start face, in σ)</h2></section></main>
<script>
const I = __INFO__;  // the run, the components and the starting state, written by the server
const $ = id => document.getElementById(id), el = (tag, props) => Object.assign(document.createElement(tag), props);
const pc = j => "PC" + (j + 1), pct = x => (100 * x).toFixed(1) + "%", n = I.ticks.length;
const signed = v => (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v).toFixed(2) + "σ";
document.body.style.cssText = `--n: ${n}; --aspect: ${I.aspect}`;
$("facts").textContent = I.facts.map(([k, v]) => `${k} ${v}`).join(" · ");
$("help").textContent = I.help;
// One request at a time per picture (a newer value waits as the wish): dragging never floods the server.
function loader(img) {
  let wish = null, busy = false;
  const next = () => { busy = wish !== img.getAttribute("src"); if (busy) img.src = wish; };
  img.onload = img.onerror = e => { if (e.type === "load") img.dataset.shown = img.getAttribute("src"); next(); };
  return url => { wish = url; if (!busy) next(); };
}

let f = I.f, c = I.c.slice(), cumulative = 0;
const face = loader($("face"));
const rows = I.shares.map((share, j) => {
  const out = el("output"), reset = el("button", {textContent: "reset"}), ticks = el("div", {className: "ticks"});
  const strip = el("img", {className: "strip", alt: `the face along ${pc(j)}`, title: "click a face to go there"});
  const r = el("input", {type: "range", min: -I.range, max: I.range, step: I.step, value: c[j]});
  r.setAttribute("aria-label", pc(j));
  I.ticks.forEach(t => ticks.append(el("span", {textContent: (t > 0 ? "+" : "") + +t.toFixed(2)})));
  const row = $("sliders").appendChild(el("div", {className: "row"}));
  row.append(el("b", {textContent: pc(j)}), out,
             `${pct(share)} of the variance · ${pct(cumulative += share)} cumulative `, reset, strip, r, ticks);
  const set = v => { r.value = v; c[j] = +r.value; show(true); };
  r.oninput = () => { c[j] = +r.value; show(false); };
  r.onchange = () => show(true);
  reset.onclick = () => set(0);
  strip.onclick = e => set(I.ticks[Math.min(n - 1, Math.floor(e.offsetX / strip.clientWidth * n))]);
  c[j] = +r.value;  // a permalink's value, snapped to the slider's step
  return {r, out, strip: loader(strip)};
});
// The start faces: the mean code, then held-out test images (autoencoders) or noise seeds (GANs).
const name = v => v === "mean" ? "the mean code" : I.noise ? `z ~ N(0, I), seed ${v}` : `held-out test image #${v}`;
const thumbs = ["mean", ...I.starts].map(v => $("thumbs").appendChild(
  el("img", {className: "thumb", src: "start.png?f=" + v, title: name(v), onclick: () => start(v)})));
$("thumbs").append(" ", el("button", {textContent: I.noise ? "random z" : "random test image",
                                      onclick: () => start(Math.floor(Math.random() * I.n_faces))}));
function start(v) { f = String(v); rows.forEach((row, j) => { row.r.value = 0; c[j] = 0; }); show(true); }
function show(settled) {  // settled: not mid-drag, so also the preview strips, the URL and the start
  const s = `f=${f}&c=${c.join(",")}`;
  rows.forEach((row, j) => row.out.value = signed(c[j]));
  face("face.png?" + s);
  $("save").href = "face.png?" + s;
  $("save").download = `${I.model}-f${f}-c${c.join("_")}.png`;
  if (!settled) return;
  history.replaceState(null, "", "?" + s);
  rows.forEach((row, j) => row.strip(`strip.png?j=${j}&${s}`));
  thumbs.forEach((t, i) => t.classList.toggle("on", ["mean", ...I.starts][i] == f));
  const edited = I.noise || f === "mean" ? "" : " (the face is its reconstruction, edited)";
  $("from").textContent = "Start: " + name(f) + edited;
}
show(true);
</script>
"""
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)  # not nan, inf, 1_0 or '٣'

def png_bytes(x):
    """Faces (B, 3, h, w) in [-1, 1] -> PNG bytes of one row at the model's size (the page scales them up)."""
    buf = io.BytesIO()
    Image.fromarray(data.make_grid(x, nrow=len(x), padding=0)).save(buf, "PNG")
    return buf.getvalue()

class Explorer:
    """The explorer's pictures, a method per route. faces: held-out test images (uint8; None: a GAN), labels: theirs
    (a CVAE); start: the face without f. Server threads share it; the nets run under a lock (not thread-safe)."""
    def __init__(self, nets, pca, about, faces=None, k=8, span=3.0, n_ticks=7, n_starts=12, labels=None, start="0"):
        self.nets, self.pca, self.faces, self.labels, self.start = nets, pca, faces, labels, str(start)
        self.k, self.span, self.lock = min(k, len(pca[2])), span, threading.Lock()
        self.n_faces = 2 ** 31 if faces is None else len(faces)
        self.ticks = torch.linspace(-span, span, n_ticks)
        h, w = decode(nets, pca[0][None]).shape[2:]
        self.info = dict(about, shares=variance_share(pca[2])[:self.k].tolist(), range=span, step=round(span / 60, 2)
                         or 0.01, ticks=self.ticks.tolist(), aspect=w / h, noise=faces is None, n_faces=self.n_faces,
                         starts=list(range(min(n_starts, self.n_faces))))

    def state(self, query, names=("f", "c")):
        """Query 'f=3&c=0.5,-1.2' -> (f: 'mean' or a start index, c (K,) with 0 for those not given, fields). Other
        names, a repeated name, bad bytes or values are a ValueError (a 400 that never echoes the input)."""
        pairs = None
        with contextlib.suppress(ValueError):  # bad syntax or bytes, too many fields
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                           errors="strict", max_num_fields=len(names))
        if pairs is None or len(dict(pairs)) < len(pairs) or not {k for k, _ in pairs} <= set(names):
            raise ValueError(f"the query takes name=value pairs, each of {', '.join(names)} at most once")
        q = dict(pairs)
        f, c = q.get("f", self.start), q["c"].split(",") if q.get("c") else []
        if f != "mean" and not (re.fullmatch(r"\d{1,10}", f, re.ASCII) and int(f) < self.n_faces):
            raise ValueError(f"f is 'mean' or a whole number below {self.n_faces}")
        if len(c) > self.k or not all(NUMBER.fullmatch(v) and abs(float(v)) <= self.span for v in c):
            raise ValueError(f"c takes at most {self.k} comma-separated numbers in [-{self.span:g}, {self.span:g}]")
        return f, torch.tensor([float(v) for v in c] + [0.0] * (self.k - len(c))), q

    @torch.no_grad()
    def faces_at(self, f, coeffs):
        """Coefficient rows (B, K) -> faces decode(z_f + Σ_j c_j σ_j v_j), (B, 3, H, W)."""
        with self.lock:
            z_f, y = start_code(self.nets, f, self.pca[0], self.faces, self.labels)
            return decode(self.nets, from_pca(z_f, *self.pca[1:], coeffs), y)

    def face_png(self, query):
        f, c, _ = self.state(query)
        return png_bytes(self.faces_at(f, c[None]))

    def strip_png(self, query):
        """Component j's preview: the current face with c_j at each tick."""
        f, c, q = self.state(query, ("f", "c", "j"))
        if not (re.fullmatch(r"\d{1,3}", q.get("j", ""), re.ASCII) and int(q["j"]) < self.k):
            raise ValueError(f"j is a component index below {self.k}")
        coeffs = c.repeat(len(self.ticks), 1)
        coeffs[:, int(q["j"])] = self.ticks
        return png_bytes(self.faces_at(f, coeffs))

    def start_png(self, query):
        """A start face's thumbnail: the test image itself, or the decoded mean code or noise."""
        f, _, _ = self.state(query, ("f",))
        if self.faces is not None and f != "mean":
            return png_bytes(to_float(self.faces[int(f)])[None])
        return png_bytes(self.faces_at(f, torch.zeros(1, self.k)))

    def page(self, query):
        f, c, _ = self.state(query)
        info = json.dumps(dict(self.info, f=f, c=c.tolist())).replace("<", "\\u003c")  # no </script>, <!--
        return PAGE.replace("__INFO__", info).encode()

class ExplorerHandler(http.server.BaseHTTPRequestHandler):
    """GET a route with the state as query: a bad query is a 400, another path a 404, another Host (DNS rebinding)
    a 403. A stalled client holds only its own thread, for `timeout` s; one that hangs up is dropped silently."""
    timeout = 10
    routes = {"/": "page", "/face.png": "face_png", "/strip.png": "strip_png", "/start.png": "start_png"}

    def handle(self):
        with contextlib.suppress(ConnectionError, TimeoutError):  # the client left, or stalled mid-reply: its loss only
            super().handle()

    def do_GET(self):
        if self.headers.get("Host", "").rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
            return self.send_error(403, "the explorer answers requests for 127.0.0.1 or localhost only")
        try:
            url = urllib.parse.urlsplit(self.path)
            if url.path not in self.routes:
                return self.send_error(404)
            body = getattr(self.server.explorer, self.routes[url.path])(url.query)
        except ValueError as e:
            return self.send_error(400, str(e))
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8" if url.path == "/" else "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # another run may serve this port tomorrow
        self.end_headers()
        self.wfile.write(body)

    log_message = lambda self, *args: None  # noqa: E731  quiet: one request per slider move

def make_server(explorer, port=0):
    """A ThreadingHTTPServer for the explorer on 127.0.0.1 only (it has no authentication); port 0: any free one."""
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), ExplorerHandler)
    except (OSError, OverflowError) as e:
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {getattr(e, 'strerror', None) or e} (try --port 0)")
    server.explorer = explorer
    return server

# --- Metrics 1: likelihood bounds for the VAEs, nats per image ----------------------------------------------

def log_weights(vae, x, obs_std, k, generator, batch=256, y=None):
    """Log importance weights (B, k) of k posterior samples per image (Burda et al. 2016):

        z_i = mu + sigma ⊙ eps_i,   eps = randn(k, B, d, generator)   (models.reparameterize)
        log w_i = log p(x|z_i) + log p(z_i) − log q(z_i|x)
        log p(x|z) = −losses.gaussian_nll(x, x_hat, σ) per image
        log p(z) = −½ Σ (z² + log 2π),   log q(z|x) = −½ Σ (eps² + logvar + log 2π)

    Each log w_i is an unbiased one-sample estimate of the ELBO; σ = obs_std. `batch`: samples per decoder call.
    A CVAE (labels y): q(z|x, y), p(x|z, y), the same p(z), so the bound is on log p(x|y)."""
    mu, logvar = vae.encode(x, y)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    c, out = 0.5 * math.log(2 * math.pi), []
    for e in eps.split(max(1, batch // len(x))):                       # (j, B, d)
        z = models.reparameterize(mu, logvar, e)                       # (j, B, d)
        x_hat = vae.decode(z.flatten(0, 1), None if y is None else y.repeat(len(e), 1)).to(x.dtype)  # (j·B, C, H, W)
        x_rep = x.expand(len(e), *x.shape).flatten(0, 1)
        log_px_z = -losses.gaussian_nll(x_rep, x_hat, obs_std, reduction="none").view(len(e), len(x))
        out.append(log_px_z - (0.5 * z ** 2 + c).sum(2) + (0.5 * e ** 2 + 0.5 * logvar + c).sum(2))
    return torch.cat(out).T

def iw_bound(log_w):
    """Importance-weighted bound per row of log_w (B, k) (Burda et al. 2016):

        L_k = log (1/k) Σ_i w_i = logsumexp_i(log w_i) − log k  <=  log p(x)

    L_1 is the ELBO; E[L_k] rises with k toward log p(x); L_k >= mean_i log w_i for the same draws (Jensen)."""
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])

def likelihood_std(cfg):
    """σ of p(x|z) = N(x_hat, σ² I) for bits/dim. A gnll run trained that likelihood: its --obs-std. An MSE run
    trained none, so by convention σ² = ½, under which the summed squared error is the NLL up to a constant
    (Σ(x − x_hat)² = −log N(x; x_hat, ½ I) − (D/2) log π). Any σ bounds the model p(x|z) = N(g(z), σ² I)."""
    return cfg["obs_std"] if cfg["recon"] == "gnll" else math.sqrt(0.5)

@torch.no_grad()
def likelihood_bounds(vae, images, obs_std, k, seed, batch=64, labels=None):
    """Test images (uint8) [, a CVAE's labels] -> (−ELBO, −L_k) in nats per image, both from the same k draws."""
    dev = next(vae.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    y = lambda i: None if labels is None else labels[i:i + batch].to(dev)  # noqa: E731
    lw = torch.cat([log_weights(vae, to_float(images[i:i + batch], dev), obs_std, k, g, y=y(i)).double()
                    for i in range(0, len(images), batch)])
    return -lw.mean().item(), -iw_bound(lw).mean().item()

# --- Metrics 2: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, app. D) -------

def _blur(x, gain=1.0):
    """cv2's 5x5 binomial filter [1 4 6 4 1]ᵀ[1 4 6 4 1] / 256 per channel, mirrored borders."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k1[:, None] * k1 / 256 * gain).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])

def laplacian_pyramid(x, levels):
    """x (N, C, H, W) -> [L_0, ..., L_{levels−2}, G_{levels−1}], finest first:

        G_0 = x,  G_{i+1} = blur(G_i)[::2, ::2] (cv2.pyrDown),  L_i = G_i − up(G_{i+1})

    up is cv2.pyrUp: zeros between the pixels, then the blur with 4 x the kernel."""
    out, g = [], x
    for _ in range(levels - 1):
        down, up = _blur(g)[:, :, ::2, ::2], torch.zeros_like(g)
        up[:, :, ::2, ::2] = down
        out.append(g - _blur(up, gain=4.0))
        g = down
    return out + [g]

def patch_descriptors(x, top, left, size=7):
    """size x size neighbourhoods of x (N, C, H, W) at corners top, left (each N x n) -> (N n, C size²)."""
    N, n = top.shape
    d = torch.arange(size, device=x.device)
    rows = (top.reshape(-1, 1) + d)[:, :, None]                            # (N n, size, 1)
    cols = (left.reshape(-1, 1) + d)[:, None, :]                           # (N n, 1, size)
    img = torch.arange(N, device=x.device).repeat_interleave(n)[:, None, None]
    return x.permute(0, 2, 3, 1)[img, rows, cols].permute(0, 3, 1, 2).reshape(N * n, -1)

def sliced_wasserstein(a, b, n_projections, generator, chunk=128):
    """Sliced Wasserstein distance between equal-size point sets a, b (M, d) (Rabin et al. 2011):

        SWD(a, b) = mean over directions θ ~ U(S^{d−1}) of W_1(θᵀa, θᵀb),
        W_1 in 1-D = mean_m |sort(θᵀa)_m − sort(θᵀb)_m|

    n_projections directions from `generator`, `chunk` at a time (Karras et al.: 4 x 128)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets; got {tuple(a.shape)}, {tuple(b.shape)}")
    total = 0.0
    for start in range(0, n_projections, chunk):
        theta = torch.randn(a.shape[1], min(chunk, n_projections - start), generator=generator)
        theta = (theta / theta.norm(dim=0, keepdim=True)).to(a)
        total += ((a @ theta).sort(0).values - (b @ theta).sort(0).values).abs().mean(0).sum().item()
    return total / n_projections

def swd_pyramid(a, b, generator, n_per_image=128, n_projections=512, size=7, coarsest=16):
    """SWD x 1e3 per Laplacian level (down to `coarsest` px), finest first, between image sets a, b (N, C, H, W),
    as Karras et al. 2018: n_per_image random 7x7 neighbourhoods per image and level, each channel normalised by its
    mean and std over the patches. Unlike their code, the patch positions are drawn once for both sets (SWD(a, a) = 0
    exactly) and the normalisation pools both sets (per-set statistics hide a global colour or brightness shift)."""
    if a.shape != b.shape:
        raise ValueError(f"swd_pyramid needs equal-size sets; got {tuple(a.shape)}, {tuple(b.shape)}")
    N, C, H, W = a.shape
    levels = 1 + max(0, int(math.log2(min(H, W) / coarsest)))                 # 64 px: 64, 32, 16
    out = []
    for la, lb in zip(laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)):
        s = min(size, *la.shape[2:])
        top, left = (torch.randint(m - s + 1, (N, n_per_image), generator=generator).to(a.device) for m in la.shape[2:])
        da, db = (patch_descriptors(x, top, left, s).view(N * n_per_image, C, -1) for x in (la, lb))
        both = torch.cat([da, db])
        mean, std = both.mean((0, 2), keepdim=True), both.std((0, 2), keepdim=True).clamp_min(1e-8)
        da, db = (((d - mean) / std).flatten(1) for d in (da, db))
        out.append(1e3 * sliced_wasserstein(da, db, n_projections, generator))
    return out

def nearest_rms(queries, reference, chunk=1024):
    """Does the model copy its training set? Per image of `queries` (float [-1, 1]), the per-pixel RMS distance
    sqrt(mean (x − r)²) to its nearest image r of `reference` (uint8)."""
    q = queries.flatten(1).float()
    best = torch.full((len(q),), math.inf, device=q.device)
    for i in range(0, len(reference), chunk):
        r = to_float(reference[i:i + chunk], q.device).flatten(1)
        best = torch.minimum(best, torch.cdist(q, r).min(1).values)
    return best / math.sqrt(q.shape[1])

def evaluate(nets, cfg, n=512, k=16, seed=0, patches=128, projections=512, draws=4):
    """The metrics, no downloaded weights -> report dict. SWD: n samples z ~ N(0, I) against the first n test
    images beside the floor (n training images against them), averaged over `draws` draws (seed, seed + 1, ...).
    nearest_train_rms: distance to the nearest training image; a samples/test ratio well below 1: copying (or blur).
    likelihood (VAEs): test −ELBO, −L_k in bits/dim = nats / (D ln 2), D = 3 H W, x in [-1, 1]^D, σ: likelihood_std
    (8-bit: + log2 127.5). Conditional runs: samples get the test images' labels; the bounds are on log p(x|y)."""
    train_x, test_x, _, test_y = run_split(cfg, "evaluate")
    n, dev, mean = min(n, len(test_x), len(train_x)), next(nets.parameters()).device, lambda v: sum(v) / len(v)
    if n < 2:
        raise UsageError("evaluate needs at least 2 test and 2 training images")
    real, y, each = to_float(test_x[:n], dev), None if test_y is None else test_y[:n], []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        floor = to_float(train_x[torch.randperm(len(train_x), generator=g)[:n]], dev)
        fake = decode(nets, noise(nets, n, g), y).to(dev)
        each.append([swd_pyramid(x, real, torch.Generator().manual_seed(seed + d), patches, projections)
                     for x in (fake, floor)])                                 # [model, floor] per level
        if d == 0:                                                               # the first draw's samples
            near = [nearest_rms(x, train_x) for x in (fake, real)]
    model, floor = ([mean(levels) for levels in zip(*(e[i] for e in each))] for i in (0, 1))
    H, W = cfg["image_size"]
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"], "n": n,
              "n_test": len(test_x), "seed": seed,
              "swd_x1e3": {"level_px": [H >> i for i in range(len(model))], "draws": draws,
                           "samples_vs_test": model, "train_vs_test": floor,
                           "samples_vs_test_mean": mean(model), "train_vs_test_mean": mean(floor),
                           "ratio": mean(model) / mean(floor), "ratio_each": [sum(m) / sum(f) for m, f in each]},
              "nearest_train_rms": {f"{who}_{stat}": getattr(t, stat)().item()
                                    for who, t in zip(("samples", "test"), near) for stat in ("median", "mean")}}
    report["nearest_train_rms"]["ratio_median"] = (near[0].median() / near[1].median()).item()
    if "vae" in nets and nets["vae"].variational:
        sigma, bpd = likelihood_std(cfg), lambda nats: nats / (3 * H * W * math.log(2))
        elbo, iw = likelihood_bounds(nets["vae"], test_x[:n], sigma, k, seed, labels=y)
        report["likelihood"] = {"obs_std": sigma, "k": k, "neg_elbo_nats": elbo, "neg_iw_nats": iw,
                                "neg_elbo_bpd": bpd(elbo), "neg_iw_bpd": bpd(iw)}
    return report

def cmd_evaluate(args):
    """Write evaluate.json and print a table: see evaluate()."""
    nets, cfg = open_run(args)
    r = evaluate(nets, cfg, args.n, args.k, args.seed, args.patches, args.projections, args.draws)
    path, s, nn, lik = out_path(args, "evaluate.json"), r["swd_x1e3"], r["nearest_train_rms"], r.get("likelihood")
    data.write_json(path, r)
    rows = [*zip([f"SWD x1e3, {px} px level" for px in s["level_px"]], s["samples_vs_test"], s["train_vs_test"]),
            ("SWD x1e3, mean", s["samples_vs_test_mean"], s["train_vs_test_mean"]),
            ("nearest-train RMS, median", nn["samples_median"], nn["test_median"]),
            ("nearest-train RMS, mean", nn["samples_mean"], nn["test_mean"])] + ([
             ("test -ELBO, bits/dim", lik["neg_elbo_bpd"], None),
             (f"test -IW bound k={args.k}, bits/dim", lik["neg_iw_bpd"], None)] if lik else [])
    head, n = f"{r['model']}: {r['n']} samples / test / training images, SWD over {s['draws']} draws", r["n"]
    print(f"  {head:44s} {'model':>10s} {'real floor':>10s}")
    for name, v, floor in rows:
        print(f"  {name:44s} {v:10.4g} {'' if floor is None else format(floor, '10.4g'):>10s}")
    print(f"  nearest-train ratio samples/test {nn['ratio_median']:.3f} (< 1: closer to training faces than held-out "
          f"faces are)\nSWD {s['ratio']:.2f}x the real-vs-real floor (1x = as close to the test faces as training faces"
          f" are; lower is better), from {n} samples; per draw {', '.join(f'{x:.2f}' for x in s['ratio_each'])}")
    if n < max(args.n, 128):  # fewer than asked (a small test split), or too few to trust
        print(f"warning: SWD from {n} samples (--n {args.n}, {r['n_test']} test images)"
              + ("; under 128 samples it is too noisy to trust" if n < 128 else ""), file=sys.stderr)
    print(f"wrote {path}")
    return path

# --- Metrics 3: control of a conditional model, the classification accuracy score (CAS) per label -----------

def train_classifier(images, labels, classes, epochs=5, seed=0, batch=128, lr=1e-3):
    """models.Classifier fitted to labelled real images (h-flips): Adam on the attributes' summed cross-entropy."""
    torch.manual_seed(seed)
    clf = models.Classifier(tuple(images.shape[2:]), classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    batches = data.Batches(images, min(batch, len(images)), seed=seed, flip=True, labels=labels)
    for epoch in range(epochs):
        for x, y in batches.epoch(epoch):
            loss = sum(F.cross_entropy(logits, y[:, k]) for k, logits in enumerate(clf(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()

@torch.no_grad()
def predict(clf, x, batch=512):
    """float images (N, 3, H, W) in [-1, 1] -> the classifier's value per attribute, int64 (N, K)."""
    return torch.cat([torch.stack([o.argmax(1) for o in clf(x[i:i + batch])], 1) for i in range(0, len(x), batch)])

def control(nets, cfg, n=256, epochs=5, seed=0):
    """Do generated faces carry the requested labels? (classification accuracy score, Ravuri & Vinyals 2019, reversed:
    a classifier trained on real faces judges generated ones.) Per attribute k and value v: its recall on test faces,
    and the share of n faces generated with y_k = v (others: random test labels) it reads as v; 'balanced': mean."""
    if not cfg.get("labels"):
        raise UsageError("control needs a conditional run (train.py --conditional)")
    train_x, test_x, train_y, test_y = run_split(cfg, "control")
    info = cfg["labels"]
    clf = train_classifier(train_x, train_y, models.label_classes(info), epochs, seed)
    read, g = predict(clf, to_float(test_x)), torch.Generator().manual_seed(seed)
    share = lambda b: b.float().mean().item()  # noqa: E731  of True in a bool tensor
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"],
              "classifier_epochs": epochs, "n_per_value": n, "n_test": len(test_x), "attributes": {}}
    for k, (attr, values) in enumerate(info.items()):
        per_value = {}
        for v, name in enumerate(values):
            has, y = test_y[:, k] == v, test_y[torch.randint(len(test_y), (n,), generator=g)]
            y[:, k] = v
            got = predict(clf, decode(nets, noise(nets, n, g), y))[:, k]
            per_value[name] = {"n_test": int(has.sum()), "real": share(read[has, k] == v) if has.any() else None,
                               "generated": share(got == v)}
        real = [p["real"] for p in per_value.values() if p["real"] is not None]
        generated = [p["generated"] for p in per_value.values()]
        report["attributes"][attr] = {"real_accuracy": share(read[:, k] == test_y[:, k]), "values": per_value,
                                      "real_balanced": sum(real) / len(real),
                                      "generated_balanced": sum(generated) / len(generated)}
    return report

def cmd_control(args):
    """Write control.json and print its table: see control()."""
    nets, cfg = open_run(args)
    r = control(nets, cfg, args.n, args.epochs, args.seed)
    path = out_path(args, "control.json")
    data.write_json(path, r)
    print(f"  {'attribute = value':30s} {'real (test)':>12s} {'generated':>10s}   classifier: {args.epochs} epochs")
    for attr, a in r["attributes"].items():
        for name, p in a["values"].items():
            real = "n/a" if p["real"] is None else f"{100 * p['real']:.1f}%"
            print(f"  {attr + ' = ' + name:30s} {real:>12s} {100 * p['generated']:9.1f}%   ({p['n_test']} test faces)")
        print(f"  {attr + ', balanced':30s} {100 * a['real_balanced']:11.1f}% {100 * a['generated_balanced']:9.1f}%   "
              f"(plain accuracy on test faces {100 * a['real_accuracy']:.1f}%)")
    print(f"wrote {path}")
    return path

# --- Command line: every size and count is bounded, so a typo fails at once, not after loading the run; a picture
# holds at most ~4096 faces (std-sweep 256 x 16, interpolate 64 x 66, pca 64 x 64), evaluate 4096 x 128 patches a set

std_list = data.checked(lambda s: [data.non_negative(x) for x in s.split(",")], lambda v: len(v) <= 16,
                        "1 to 16 comma-separated stds")
std_list.__name__ = "comma-separated std"  # argparse: "invalid comma-separated std value: '1,x'"
FACES, ROW = between(int, 1, 4096), between(int, 1, 256)   # faces in one grid; faces in a grid row
RUN = [("run", dict(metavar="RUN", help="run folder (its last.pt) or a checkpoint file")),
       ("--out", dict(help="output file (default: in the run folder)"))]
NET = [("--checkpoint", dict(choices=["last", "best"], default="last", help="which checkpoint of a run folder")),
       ("--device", dict(choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present")),
       ("--seed", dict(type=data.seed_int, default=0, help="seeds every random draw"))]

COMMANDS = {  # name: (function, one-line help, its flags beyond RUN and NET)
    "sample": (cmd_sample, "grid of faces from z ~ N(0, std² I)", [
        ("--n", dict(type=FACES, default=64, help="number of faces")),
        ("--std", dict(type=data.non_negative, default=1.0, help="std of z (< 1: closer to the centre)")),
        ("--nrow", dict(type=ROW, default=8, help="faces per grid row")),
        ("--label", dict(help="conditional runs: fixed labels, e.g. hair=blond,glasses=yes"))]),
    "reconstruct": (cmd_reconstruct, "test images over their reconstructions (autoencoders)", [
        ("--n", dict(type=FACES, default=16, help="number of images")),
        ("--nrow", dict(type=ROW, default=8, help="images per row")),
        ("--data", dict(help="folder or .zip of images instead of the run's test split"))]),
    "interpolate": (cmd_interpolate, "interpolations between encoded test images or noise", [
        ("--rows", dict(type=between(int, 1, 64), default=4, help="number of interpolations")),
        ("--steps", dict(type=between(int, 2, 64), default=8, help="decoded faces per row, t = 0 ... 1")),
        ("--slerp", dict(action="store_true", help="spherical instead of linear interpolation")),
        ("--noise", dict(action="store_true", help="autoencoders: between noise, not test images")),
        ("--std", dict(type=data.non_negative, default=1.0, help="std of the noise endpoints"))]),
    "std-sweep": (cmd_std_sweep, "rows of samples at std 0.25 ... 2.0 (the LFW report, figs 12-13)", [
        ("--n", dict(type=ROW, default=8, help="faces per row (one eps per column)")),
        ("--stds", dict(type=std_list, default=[i / 4 for i in range(1, 9)], help="comma-separated std of each row"))]),
    "pca": (cmd_pca, "latent PCA grid, and the slider explorer with --serve", [
        ("--components", dict(type=between(int, 1, 64), default=8, help="top components: grid rows, sliders")),
        ("--steps", dict(type=between(int, 1, 64), default=9, help="grid columns")),
        ("--range", dict(type=between(float, 0.0, 10.0), default=3.0, help="grid and sliders: -range to +range std")),
        ("--serve", dict(action="store_true", help="then serve the slider explorer on 127.0.0.1")),
        ("--port", dict(type=between(int, 0, 65535), default=8000, help="explorer port (0: any free port)"))]),
    "gif": (cmd_gif, "progress.gif from samples/epoch_*.png", [
        ("--duration-ms", dict(type=between(int, 10, 60000), default=200, help="time per frame")),
        ("--hold-last-ms", dict(type=between(int, 10, 600000), default=2000, help="time on the last frame"))]),
    "evaluate": (cmd_evaluate, "SWD, nearest-training-image distance, bits/dim -> evaluate.json", [
        ("--n", dict(type=between(int, 2, 4096), default=512, help="samples and test images compared")),
        ("--k", dict(type=between(int, 1, 1024), default=16, help="importance samples per test image (VAEs)")),
        ("--patches", dict(type=between(int, 1, 128), default=128, help="7x7 patches per image and level")),
        ("--projections", dict(type=between(int, 1, 8192), default=512, help="SWD random directions")),
        ("--draws", dict(type=between(int, 1, 64), default=4, help="SWD averaged over draws of all its samples"))]),
    "attributes": (cmd_attributes, "conditional runs: rows = the values of one attribute, columns = the same z", [
        ("--attr", dict(required=True, help="the attribute whose values make the rows")),
        ("--n", dict(type=ROW, default=8, help="columns: draws of z")),
        ("--label", dict(help="values of the other attributes (default: their first)"))]),
    "control": (cmd_control, "conditional runs: does a classifier trained on real faces read the requested labels?", [
        ("--n", dict(type=FACES, default=256, help="generated faces per attribute value")),
        ("--epochs", dict(type=between(int, 1, 100), default=5, help="classifier training epochs"))]),
}

class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pictures and measurements from a run (COMMAND --help: its options).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, short, flags) in COMMANDS.items():
        s = sub.add_parser(name, help=short, description=fn.__doc__, formatter_class=Help)
        for flag, kw in RUN + ([] if name == "gif" else NET) + flags:  # gif reads only the run's PNGs
            s.add_argument(flag, **kw)
        s.set_defaults(fn=fn)
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # data.py's warnings: one line each
    try:
        args.fn(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed after the checks (disk full, ...): the cause and the file, one line
        why = (f"{e.strerror}: {e.filename}" if e.filename else e.strerror) if e.strerror else str(e)
        print(f"error: {why}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
