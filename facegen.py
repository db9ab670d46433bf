"""facegen.py — pictures and measurements from a trained run.

    python facegen.py sample runs/vae --std 0.5           # seed 001 fig 13: z closer to the centre
    python facegen.py reconstruct runs/vae                # test faces over their reconstructions
    python facegen.py interpolate runs/vae --slerp        # seed 001 figs 5-8, 11-12, 14
    python facegen.py std-sweep runs/vae-lrelu            # seed 003 figs 12-13: rows std 0.25 ... 2.0
    python facegen.py pca runs/vae-lrelu --serve          # seed 003's latent PCA GUI (fig 17)
    python facegen.py gif runs/dcgan --hold-last-ms 3000  # seed 000's "learning fast forward"
    python facegen.py evaluate runs/vae                   # bits/dim, IW bound, SWD, copying check

RUN is a run folder (its last.pt; --checkpoint best for best.pt) or a checkpoint file. Each
command writes one file, inside the run folder unless --out says otherwise, and prints its path.
Reading order: loading a run -> latent geometry (slerp, PCA) -> metrics (likelihood bounds,
Laplacian-pyramid SWD, nearest neighbours) -> the PCA explorer server -> one function per
command -> the CLI.
"""
import argparse
import glob
import http.server
import io
import json
import math
import os
import re
import sys
import urllib.parse

import torch
import torch.nn.functional as F
from PIL import Image

import data
import models
from train import UsageError, load_checkpoint, positive

# -----------------------------------------------------------------------------
# Loading a run: one loader (train.load_checkpoint), nets rebuilt from the run's own config.

def load_run(path, checkpoint="last", device="cpu"):
    """A run folder (its {checkpoint}.pt) or a checkpoint file -> (nets in eval mode, config)."""
    if os.path.isdir(path):
        path = os.path.join(path, f"{checkpoint}.pt")
    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or not {"nets", "config"} <= set(state):
        raise UsageError(f"{path} is not a facegen checkpoint (it has no 'nets' and 'config')")
    cfg = state["config"]
    try:
        nets = models.build_model(cfg["model"], tuple(cfg["image_size"]), cfg["latent_dim"],
                                  cfg.get("arch"), cfg.get("critic_norm"))
        nets.load_state_dict(state["nets"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot rebuild the model of {path}: {str(e).splitlines()[0]}")
    return nets.to(device).eval(), dict(cfg, checkpoint=path, trained_steps=state.get("step"))


def run_images(cfg):
    """The run's own data, split exactly as train.py split it -> (train, test), uint8 N x 3 x H x W."""
    try:
        x = data.load_images(cfg["data"], tuple(cfg["image_size"]), n_synthetic=cfg["n_synthetic"],
                             seed=cfg["seed"], verbose=False)
    except data.DataError as e:
        raise UsageError(f"the run's data: {e}")
    train_idx, test_idx = data.split_indices(len(x), cfg["test_fraction"], cfg["seed"])
    return x[train_idx], x[test_idx]


def to_float(x, device="cpu"):
    """uint8 [0, 255] -> float [-1, 1] on device (train.py's scaling)."""
    return x.to(device).float() / 127.5 - 1


def encoder(nets, command):
    """The run's autoencoder; GANs have no encoder, so a command that encodes refuses them."""
    if "vae" not in nets:
        raise UsageError(f"{command} needs an encoder (autoencoders and vaegan); this run is a GAN "
                         "with G and D only: use sample, interpolate, std-sweep or evaluate")
    return nets["vae"]


@torch.no_grad()
def decode(nets, z, batch=256):
    """z (N, latent_dim) -> images (N, 3, H, W) on the CPU, decoded in batches (VAE decoder or G)."""
    G, dev = models.generator(nets), next(nets.parameters()).device
    return torch.cat([G(z[i:i + batch].to(dev)).float().cpu() for i in range(0, len(z), batch)])


@torch.no_grad()
def encode_dataset(vae, images, batch=256):
    """uint8 images -> (mu, logvar) of q(z|x), each (N, latent_dim), on the CPU (AE: logvar None)."""
    dev, mus, logvars = next(vae.parameters()).device, [], []
    for i in range(0, len(images), batch):
        mu, logvar = vae.encode(to_float(images[i:i + batch], dev))
        mus.append(mu.float().cpu())
        logvars.append(None if logvar is None else logvar.float().cpu())
    return torch.cat(mus), None if logvars[0] is None else torch.cat(logvars)


# -----------------------------------------------------------------------------
# Latent geometry.

def slerp(a, b, t):
    """Spherical interpolation (Shoemake 1985; White 2016 for generative models), row by row:

        slerp(a, b; t) = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b,   cos Ω = <a, b> / (|a| |b|)

    Why: z ~ N(0, I_d) lives near the shell |z| ≈ √d, but the straight-line midpoint of two
    independent draws has |z| ≈ √(d/2) -- much closer to the centre than any sample (seed 001's
    "z closer to the centre"). Parallel rows fall back to the straight line.
    """
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)[..., None]
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    lerp = (1 - t) * a + t * b
    safe = torch.where(so.abs() < 1e-6, torch.ones_like(so), so)
    return torch.where(so.abs() < 1e-6, lerp, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe)


def interpolation_path(a, b, steps, spherical=False):
    """(B, d) endpoints -> (B, steps, d): t = 0, 1/(steps−1), ..., 1, straight line or slerp."""
    t = torch.linspace(0, 1, steps)[None, :, None]
    a, b = a[:, None], b[:, None]
    return slerp(a, b, t) if spherical else (1 - t) * a + t * b


def latent_pca(codes):
    """PCA of codes (N, d) (seed 003): returns (mean (d,), components (k, d), sigma (k,)), k = min(N, d).

        C = codes − mean = U S Vᵀ  (torch.linalg.svd)    component j = row j of Vᵀ
        sigma_j = S_j / √(N − 1)   (std of the codes along component j, descending)

    Seed 003 keeps every component ("the gain lies in the ordering of these dimensions by
    variance"). SVD signs are arbitrary: each component is flipped so its largest entry is positive.
    """
    mean = codes.mean(0)
    _, S, Vh = torch.linalg.svd(codes - mean, full_matrices=False)
    sign = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    return mean, Vh * sign, S / math.sqrt(max(len(codes) - 1, 1))


def from_pca(mean, components, sigma, coeffs):
    """Coefficients in units of each component's std (B, K) -> codes: z = mean + Σ_j c_j sigma_j v_j."""
    K = coeffs.shape[1]
    return mean + (coeffs * sigma[:K]) @ components[:K]


# -----------------------------------------------------------------------------
# Metrics 1: likelihood bounds (VAEs), nats per image.

def log_weights(vae, x, obs_std, k, generator):
    """Log importance weights (B, k) of k posterior samples per image (Burda et al. 2016):

        z_i = mu + sigma ⊙ eps_i,  eps = randn(k, B, d, generator)   (that draw order, for tests)
        log w_i = log p(x|z_i) + log p(z_i) − log q(z_i|x)
        log p(x|z) = −½ Σ_pixels [((x − x_hat)/σ)² + log 2πσ²]      (losses.gaussian_nll per image)
        log p(z) = −½ Σ (z² + log 2π),   log q(z|x) = −½ Σ (eps² + logvar + log 2π)

    Each log w_i is an unbiased estimate of the ELBO. vae: anything with encode(x) -> (mu, logvar)
    and decode(z) -> x-shaped mean; σ = obs_std.
    """
    mu, logvar = vae.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    c = 0.5 * math.log(2 * math.pi)
    out = []
    for e in eps:
        z = mu + torch.exp(0.5 * logvar) * e
        x_hat = vae.decode(z).to(x.dtype)
        log_px_z = -(0.5 * ((x - x_hat) / obs_std) ** 2 + math.log(obs_std) + c).flatten(1).sum(1)
        log_pz = -(0.5 * z ** 2 + c).sum(1)
        log_qz = -(0.5 * e ** 2 + 0.5 * logvar + c).sum(1)
        out.append(log_px_z + log_pz - log_qz)
    return torch.stack(out, 1)


def iw_bound(log_w):
    """Importance-weighted bound (Burda et al. 2016) per row of log_w (B, k):

        L_k = log (1/k) Σ_i w_i = logsumexp_i(log w_i) − log k  <=  log p(x)

    L_1 is the ELBO; E[L_k] never decreases with k and tends to log p(x). For the same draws,
    L_k >= mean_i log w_i (Jensen), so it is never looser than the k-sample ELBO estimate.
    """
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


def likelihood_std(cfg):
    """σ of the Gaussian likelihood p(x|z) = N(x_hat, σ² I) used for bits/dim: the run's --obs-std
    for gnll runs. For mse runs σ² = ½, since Σ(x − x_hat)² = −log N(x; x_hat, ½ I) − (D/2) log π:
    the squared error is that likelihood up to a constant. Any σ gives a valid bound for the model
    p(x|z) = N(g(z), σ²I); it is the run's decoder with the variance its loss implies."""
    return cfg["obs_std"] if cfg["recon"] == "gnll" else math.sqrt(0.5)


@torch.no_grad()
def likelihood_bounds(vae, images, obs_std, k, seed, batch=64):
    """Test images (uint8) -> (−ELBO, −L_k) in nats per image, averaged; both from the same k draws
    (the ELBO is the mean of the k log-weights), with a fixed seed."""
    dev = next(vae.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    elbo, iw = [], []
    for i in range(0, len(images), batch):
        lw = log_weights(vae, to_float(images[i:i + batch], dev), obs_std, k, g).double()
        elbo.append(lw.mean(1))
        iw.append(iw_bound(lw))
    return -torch.cat(elbo).mean().item(), -torch.cat(iw).mean().item()


def bits_per_dim(nats, dims):
    """nats per image -> bits per dimension: nats / (D ln 2), D = 3 H W."""
    return nats / (dims * math.log(2))


# -----------------------------------------------------------------------------
# Metrics 2: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, app. D).

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _blur(x, gain=1.0):
    """5x5 binomial filter [1 4 6 4 1]ᵀ[1 4 6 4 1] / 256 per channel, mirror borders (cv2's kernel)."""
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :] / 256 * gain).to(x)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


def pyr_down(x):
    """cv2.pyrDown: blur, keep every second row and column."""
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x, shape):
    """cv2.pyrUp to `shape` (H, W): zeros between the pixels, blur with 4 x the kernel."""
    up = x.new_zeros(*x.shape[:2], *shape)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x, levels):
    """x (N, C, H, W) -> [L_0, ..., L_{levels−2}, G_{levels−1}], finest first:

        G_0 = x,   G_{i+1} = pyr_down(G_i),   L_i = G_i − pyr_up(G_{i+1})

    Each L_i holds the detail of one octave; the last entry is the low-pass image. The pyramid is
    exactly invertible: G_i = L_i + pyr_up(G_{i+1}).
    """
    out, g = [], x
    for _ in range(levels - 1):
        down = pyr_down(g)
        out.append(g - pyr_up(down, g.shape[2:]))
        g = down
    return out + [g]


def pyramid_levels(height, width, coarsest=16):
    """Number of levels from full size down to `coarsest` px (short side), e.g. 64 -> 64, 32, 16."""
    n, side = 1, min(height, width)
    while side // 2 >= coarsest:
        n, side = n + 1, side // 2
    return n


def patch_descriptors(x, top, left, size=7):
    """size x size neighbourhoods of x (N, C, H, W) at corners (top, left), each (N, n) ->
    (N n, C size²), image by image."""
    N, n = top.shape
    d = torch.arange(size, device=x.device)
    rows = (top.reshape(-1, 1) + d)[:, :, None]                     # (N n, size, 1)
    cols = (left.reshape(-1, 1) + d)[:, None, :]                    # (N n, 1, size)
    img = torch.arange(N, device=x.device).repeat_interleave(n)[:, None, None]
    return x.permute(0, 2, 3, 1)[img, rows, cols].permute(0, 3, 1, 2).reshape(N * n, -1)


def sliced_wasserstein(a, b, n_projections, generator, chunk=128):
    """Sliced Wasserstein distance between two equal-size point sets a, b (M, d) (Rabin et al. 2011):

        SWD(a, b) = mean over θ ~ U(S^{d−1}) of W_1(θᵀa, θᵀb),
        W_1 in 1-D = mean_m |sort(θᵀa)_m − sort(θᵀb)_m|

    n_projections random directions from `generator`, drawn `chunk` at a time (Karras et al.: 4
    repeats of 128). Zero for identical sets, symmetric, and a metric as the projections grow.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets; got {tuple(a.shape)} and {tuple(b.shape)}")
    total = 0.0
    for start in range(0, n_projections, chunk):
        theta = torch.randn(a.shape[1], min(chunk, n_projections - start), generator=generator)
        theta = (theta / theta.norm(dim=0, keepdim=True)).to(a)
        pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
        total += (pa - pb).abs().mean(0).sum().item()
    return total / n_projections


def swd_pyramid(a, b, generator, n_per_image=128, n_projections=512, size=7):
    """SWD × 1e3 per Laplacian level (finest first) between image sets a, b (N, C, H, W), as Karras
    et al. 2018 report it: n_per_image random 7x7 neighbourhoods per image and level, each channel
    normalised by its mean and std over the patch set, SWD with n_projections directions.

    Deviations from their code, both stated: the patch positions are drawn once and used for both
    sets (so SWD(a, a) = 0 exactly), and the normalisation uses the pooled statistics of both sets
    (theirs normalises each set by its own, which hides a global colour or brightness shift).
    """
    if a.shape != b.shape:
        raise ValueError(f"swd_pyramid needs equal-size sets; got {tuple(a.shape)} and {tuple(b.shape)}")
    N, C, H, W = a.shape
    out = []
    for la, lb in zip(*(laplacian_pyramid(x, pyramid_levels(H, W)) for x in (a, b))):
        h, w = la.shape[2:]
        s = min(size, h, w)
        top = torch.randint(0, h - s + 1, (N, n_per_image), generator=generator).to(a.device)
        left = torch.randint(0, w - s + 1, (N, n_per_image), generator=generator).to(a.device)
        da, db = (patch_descriptors(x, top, left, s).view(N * n_per_image, C, -1) for x in (la, lb))
        both = torch.cat([da, db])
        mean, std = both.mean((0, 2), keepdim=True), both.std((0, 2), keepdim=True).clamp_min(1e-8)
        da, db = ((d - mean) / std for d in (da, db))
        out.append(1e3 * sliced_wasserstein(da.flatten(1), db.flatten(1), n_projections, generator))
    return out


# -----------------------------------------------------------------------------
# Metrics 3: does it copy the training set?

def nearest_rms(queries, reference, chunk=1024):
    """For each image of `queries` (float [-1, 1]) the per-pixel RMS distance to its nearest image
    in `reference` (uint8), sqrt(mean_pixels (x − r)²), scanning the reference in chunks."""
    q = queries.flatten(1).float()
    best = torch.full((len(q),), math.inf, device=q.device)
    for i in range(0, len(reference), chunk):
        r = to_float(reference[i:i + chunk], q.device).flatten(1)
        best = torch.minimum(best, torch.cdist(q, r).min(1).values)
    return best / math.sqrt(q.shape[1])


# -----------------------------------------------------------------------------
# The PCA explorer (seed 003's "face generation GUI"): a local page, a slider per component.

PAGE = """<!doctype html><meta charset="utf-8"><title>facegen latent PCA</title>
<style>body{font-family:sans-serif;display:flex;gap:2em;margin:2em}label{display:block;font-size:13px}
input{width:260px;vertical-align:middle}</style>
<img id="face" src="face.png" width="%(w)d" height="%(h)d" style="image-rendering:pixelated">
<div><p>Principal components of the training codes, in std units (seed 003).</p><div id="s"></div>
<button onclick="setAll(() => 0)">reset</button> <button onclick="setAll(randn)">random</button></div>
<script>
const EXPLAINED = %(explained)s, img = document.getElementById("face");
const sliders = EXPLAINED.map((e, i) => {
  const l = document.createElement("label"), r = document.createElement("input");
  Object.assign(r, {type: "range", min: -3, max: 3, step: 0.05, value: 0, oninput: draw});
  l.append(`PC${i + 1} (${(100 * e).toFixed(1)}%%) `, r);
  document.getElementById("s").append(l);
  return r;
});
function draw() { img.src = "face.png?c=" + sliders.map(r => r.value).join(","); }
function randn() { return Math.sqrt(-2 * Math.log(1 - Math.random())) * Math.cos(2 * Math.PI * Math.random()); }
function setAll(f) { sliders.forEach(r => r.value = Math.max(-3, Math.min(3, f()))); draw(); }
</script>
"""


class Explorer:
    """Decodes z = mean + Σ_j c_j sigma_j v_j for the top K components to an upscaled PNG."""

    def __init__(self, nets, mean, components, sigma, k, size=256):
        self.nets, self.mean, self.components, self.sigma = nets, mean, components, sigma
        self.k, self.explained = min(k, len(sigma)), (sigma ** 2 / (sigma ** 2).sum()).tolist()
        H, W = decode(nets, mean[None]).shape[2:]
        self.shape = (size, round(size * W / H))

    def coefficients(self, query):
        """'c=0.5,-1.2' -> (1, K) tensor; missing trailing components are 0."""
        text = urllib.parse.parse_qs(query).get("c", [""])[0]
        c = [float(v) for v in text.split(",") if v.strip()]
        if len(c) > self.k or not all(math.isfinite(v) for v in c):
            raise ValueError(f"c takes at most {self.k} finite numbers")
        return torch.tensor([c + [0.0] * (self.k - len(c))])

    def face_png(self, coeffs):
        x = decode(self.nets, from_pca(self.mean, self.components, self.sigma, coeffs))
        img = Image.fromarray(data.make_grid(x, padding=0)).resize(self.shape[::-1], Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def page(self):
        return PAGE % {"w": self.shape[1], "h": self.shape[0], "explained": json.dumps(self.explained[:self.k])}


class ExplorerHandler(http.server.BaseHTTPRequestHandler):
    """GET / -> the page; GET /face.png?c=c1,c2,... -> the decoded face. Nothing else."""

    def do_GET(self):
        url, explorer = urllib.parse.urlsplit(self.path), self.server.explorer
        try:
            if url.path == "/":
                body, kind = explorer.page().encode(), "text/html; charset=utf-8"
            elif url.path == "/face.png":
                body, kind = explorer.face_png(explorer.coefficients(url.query)), "image/png"
            else:
                return self.send_error(404)
        except ValueError as e:
            return self.send_error(400, str(e))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet: one request per slider move
        pass


def make_server(explorer, host="127.0.0.1", port=0):
    """An HTTPServer for the explorer on 127.0.0.1 only (it has no authentication, so it never
    listens on another interface); port 0 picks a free port (see server.server_address)."""
    if host != "127.0.0.1":
        raise UsageError(f"the explorer listens on 127.0.0.1 only; refusing host {host!r}")
    try:
        server = http.server.HTTPServer((host, port), ExplorerHandler)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e} (try --port 0)")
    server.explorer = explorer
    return server


# -----------------------------------------------------------------------------
# Commands: one function each; each returns the path it wrote.

def open_run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    return load_run(args.run, args.checkpoint, dev)


def run_folder(path):
    """The folder of a run: RUN itself, or the folder holding the checkpoint file RUN."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def out_path(args, name):
    return args.out or os.path.join(run_folder(args.run), name)


def save(images, args, name, nrow):
    path = out_path(args, name)
    data.save_grid(images, path, nrow=nrow)
    print(f"wrote {path}")
    return path


def cmd_sample(args):
    """A grid of --n faces decoded from z ~ N(0, std² I). std < 1 draws z closer to the centre
    (seed 001 fig 13): more typical, less varied faces."""
    nets, _ = open_run(args)
    z = args.std * torch.randn(args.n, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    return save(decode(nets, z), args, "sample.png", args.nrow)


def cmd_reconstruct(args):
    """Autoencoders: rows of --nrow test images (the run's own held-out split, or --data) each
    followed by a row of their reconstructions decode(mu)."""
    nets, cfg = open_run(args)
    vae = encoder(nets, "reconstruct")
    if args.data:
        try:
            images = data.load_images(args.data, tuple(cfg["image_size"]), verbose=False)[:args.n]
        except data.DataError as e:
            raise UsageError(str(e))
    else:
        images = run_images(cfg)[1][:args.n]
    x, x_hat = to_float(images), decode(nets, encode_dataset(vae, images)[0])
    ncol = min(args.nrow, len(x))
    pad = lambda t: torch.cat([t, -torch.ones(-len(t) % ncol, *t.shape[1:])]).view(-1, ncol, *t.shape[1:])
    return save(torch.stack([pad(x), pad(x_hat)], 1).flatten(0, 2), args, "reconstruct.png", ncol)


def cmd_interpolate(args):
    """--rows interpolations of --steps faces. Autoencoders: between the codes mu of random pairs
    of test images, shown beside the real images (first and last columns); GANs, or --noise:
    between z ~ N(0, std² I). --slerp follows the sphere instead of the straight line."""
    nets, cfg = open_run(args)
    g, d = torch.Generator().manual_seed(args.seed), models.latent_dim(nets)
    if "vae" in nets and not args.noise:
        test = run_images(cfg)[1]
        if len(test) < 2:
            raise UsageError("interpolate needs at least 2 test images")
        ia = torch.randint(len(test), (args.rows,), generator=g)
        ib = (ia + torch.randint(1, len(test), (args.rows,), generator=g)) % len(test)   # never ia
        (za, _), (zb, _) = encode_dataset(nets["vae"], test[ia]), encode_dataset(nets["vae"], test[ib])
    else:
        za, zb = (args.std * torch.randn(args.rows, d, generator=g) for _ in range(2))
    x = decode(nets, interpolation_path(za, zb, args.steps, args.slerp).flatten(0, 1))
    x = x.view(args.rows, args.steps, *x.shape[1:])
    if "vae" in nets and not args.noise:
        x = torch.cat([to_float(test[ia])[:, None], x, to_float(test[ib])[:, None]], 1)
    return save(x.flatten(0, 1), args, "interpolate.png", x.shape[1])


def cmd_std_sweep(args):
    """Seed 003 figs 12-13: row r decodes stds[r] · eps with the same eps per column, so rows
    differ only by the scale of z; small std = 'prototypical' faces, large = unusual ones."""
    nets, _ = open_run(args)
    eps = torch.randn(args.n, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    print("rows: std " + ", ".join(f"{s:g}" for s in args.stds))
    return save(decode(nets, torch.cat([s * eps for s in args.stds])), args, "std_sweep.png", args.n)


def fit_pca(nets, cfg):
    """PCA (latent_pca) of the posterior means mu of the run's training images."""
    codes, _ = encode_dataset(encoder(nets, "pca"), run_images(cfg)[0])
    return latent_pca(codes)


def cmd_pca(args):
    """Seed 003's latent PCA: row j walks the j-th principal component of the training codes from
    −range to +range of its std (columns), all other components at the mean code. --serve then
    opens the slider explorer on 127.0.0.1."""
    nets, cfg = open_run(args)
    mean, components, sigma = fit_pca(nets, cfg)
    K = min(args.components, len(sigma))
    t = torch.linspace(-args.range, args.range, args.steps)
    coeffs = torch.zeros(K, args.steps, K)
    coeffs[torch.arange(K), :, torch.arange(K)] = t
    path = save(decode(nets, from_pca(mean, components, sigma, coeffs.flatten(0, 1))), args, "pca.png", args.steps)
    share = sigma ** 2 / (sigma ** 2).sum()
    print("explained variance: " + ", ".join(f"PC{j + 1} {100 * share[j]:.1f}%" for j in range(K)))
    if args.serve:
        server = make_server(Explorer(nets, mean, components, sigma, K, args.size), port=args.port)
        print(f"explorer at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return path


def cmd_gif(args):
    """Rebuild progress.gif from samples/epoch_*.png (the same noise every epoch: seed 000's
    'learning fast forward'), the last frame held for --hold-last-ms."""
    folder = run_folder(args.run)
    frames = glob.glob(os.path.join(folder, "samples", "epoch_*.png"))
    if not frames:
        raise UsageError(f"no samples/epoch_*.png in {folder}")
    frames.sort(key=lambda f: int(re.search(r"epoch_(\d+)", os.path.basename(f)).group(1)))
    path = out_path(args, "progress.gif")
    data.save_gif(frames, path, duration_ms=[args.duration_ms] * (len(frames) - 1) + [args.hold_last_ms])
    print(f"wrote {path} ({len(frames)} frames)")
    return path


def cmd_evaluate(args):
    """Measure a run without downloaded weights (SPEC 'Quality and evaluation'): SWD of samples vs
    held-out faces beside the real-vs-real floor, nearest-training-image distances, and for VAEs
    the test -ELBO and importance-weighted bound in bits/dim. Writes evaluate.json."""
    nets, cfg = open_run(args)
    train_x, test_x = run_images(cfg)
    n = min(args.n, len(test_x), len(train_x))
    if n < 2:
        raise UsageError("evaluate needs at least 2 test and 2 training images")
    g = torch.Generator().manual_seed(args.seed)
    real = to_float(test_x[:n])
    floor_ref = to_float(train_x[torch.randperm(len(train_x), generator=g)[:n]])   # a real set of the same size
    fake = decode(nets, torch.randn(n, models.latent_dim(nets), generator=g))
    swd = lambda a, b: swd_pyramid(a, b, torch.Generator().manual_seed(args.seed), args.patches, args.projections)
    swd_fake, swd_floor = swd(fake, real), swd(floor_ref, real)
    nn_fake, nn_test = nearest_rms(fake, train_x), nearest_rms(real, train_x)
    H, W = cfg["image_size"]
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"],
              "n": n, "seed": args.seed,
              "swd": {"levels_px": [H >> i for i in range(len(swd_fake))], "samples_vs_test": swd_fake,
                      "samples_vs_test_mean": sum(swd_fake) / len(swd_fake), "train_vs_test": swd_floor,
                      "train_vs_test_mean": sum(swd_floor) / len(swd_floor)},
              "nearest_train_rms": {"samples_median": nn_fake.median().item(), "samples_mean": nn_fake.mean().item(),
                                    "test_median": nn_test.median().item(), "test_mean": nn_test.mean().item(),
                                    "ratio_median": (nn_fake.median() / nn_test.median()).item()}}
    rows = [(f"SWD x1e3 {h}px", v, f) for h, v, f in zip(report["swd"]["levels_px"], swd_fake, swd_floor)]
    rows += [("SWD x1e3 mean", report["swd"]["samples_vs_test_mean"], report["swd"]["train_vs_test_mean"])]
    nnr = report["nearest_train_rms"]
    rows += [("nearest-train RMS median", nnr["samples_median"], nnr["test_median"]),
             ("nearest-train RMS mean", nnr["samples_mean"], nnr["test_mean"])]
    vae = nets["vae"] if "vae" in nets else None
    if vae is not None and vae.variational:
        sigma, D = likelihood_std(cfg), 3 * H * W
        elbo, iw = likelihood_bounds(vae, test_x[:n], sigma, args.k, args.seed)
        report["likelihood"] = {"obs_std": sigma, "k": args.k, "n_test": n, "neg_elbo_nats": elbo, "neg_iw_nats": iw,
                                "neg_elbo_bpd": bits_per_dim(elbo, D), "neg_iw_bpd": bits_per_dim(iw, D),
                                "convention": "Gaussian density of x in [-1,1]^D with the given obs_std; "
                                              "add log2(127.5) per dim for an 8-bit [0,256) scale"}
        rows += [("test -ELBO bits/dim", report["likelihood"]["neg_elbo_bpd"], None),
                 (f"test -IW bound bits/dim (k={args.k})", report["likelihood"]["neg_iw_bpd"], None)]
    path = out_path(args, "evaluate.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'metric':34s} {'model':>10s} {'real floor':>10s}")
    for name, v, floor in rows:
        print(f"{name:34s} {v:10.4g} {'' if floor is None else format(floor, '10.4g'):>10s}")
    print(f"samples/test nearest-train ratio {nnr['ratio_median']:.3f} (well below 1: copying the training set)")
    print(f"wrote {path}")
    return path


# -----------------------------------------------------------------------------
# CLI

def std_list(s):
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not v or any(not (x >= 0 and math.isfinite(x)) for x in v):
        raise argparse.ArgumentTypeError(f"stds must be finite and >= 0, got {s!r}")
    return v


def non_negative(s):
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Use COMMAND --help for its options.",
                                usage="facegen.py COMMAND RUN [options]")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run", metavar="RUN", help="run folder (its last.pt) or a checkpoint file")
    run.add_argument("--out", help="output file (default: inside the run folder)")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--checkpoint", choices=["last", "best"], default="last", help="which checkpoint of a run folder")
    net.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present")
    net.add_argument("--seed", type=int, default=0, help="seeds every random draw of the command")

    def add(name, fn, parents=(run, net)):
        s = sub.add_parser(name, parents=parents, help=fn.__doc__.split(".")[0].replace("\n", " "),
                           description=fn.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.set_defaults(fn=fn)
        return s

    s = add("sample", cmd_sample)
    s.add_argument("--n", type=positive(int), default=64, help="number of faces")
    s.add_argument("--std", type=non_negative, default=1.0, help="std of z (seed 001: < 1 is closer to the centre)")
    s.add_argument("--nrow", type=positive(int), default=8, help="faces per grid row")
    s = add("reconstruct", cmd_reconstruct)
    s.add_argument("--n", type=positive(int), default=16, help="number of images")
    s.add_argument("--nrow", type=positive(int), default=8, help="images per row")
    s.add_argument("--data", help="folder or .zip of images instead of the run's test split")
    s = add("interpolate", cmd_interpolate)
    s.add_argument("--rows", type=positive(int), default=4, help="number of interpolations")
    s.add_argument("--steps", type=positive(int), default=8, help="decoded faces per interpolation (t = 0 ... 1)")
    s.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    s.add_argument("--noise", action="store_true", help="autoencoders: between prior draws, not encoded test images")
    s.add_argument("--std", type=non_negative, default=1.0, help="std of the noise endpoints")
    s = add("std-sweep", cmd_std_sweep)
    s.add_argument("--n", type=positive(int), default=8, help="faces per row (one eps per column)")
    s.add_argument("--stds", type=std_list, default=[0.25 * i for i in range(1, 9)], help="comma-separated row stds")
    s = add("pca", cmd_pca)
    s.add_argument("--components", type=positive(int), default=8, help="top components: grid rows and sliders")
    s.add_argument("--steps", type=positive(int), default=9, help="grid columns")
    s.add_argument("--range", type=non_negative, default=3.0, help="walk from -range to +range std")
    s.add_argument("--serve", action="store_true", help="then serve the slider explorer on 127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="explorer port (0: any free port)")
    s.add_argument("--size", type=positive(int), default=256, help="explorer face height in pixels")
    s = add("gif", cmd_gif, parents=(run,))
    s.add_argument("--duration-ms", type=positive(int), default=200, help="time per frame")
    s.add_argument("--hold-last-ms", type=positive(int), default=2000, help="time on the last frame")
    s = add("evaluate", cmd_evaluate)
    s.add_argument("--n", type=positive(int), default=512, help="samples and held-out images compared")
    s.add_argument("--k", type=positive(int), default=16, help="importance samples per test image (VAEs)")
    s.add_argument("--patches", type=positive(int), default=128, help="7x7 patches per image and pyramid level")
    s.add_argument("--projections", type=positive(int), default=512, help="SWD random directions")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.fn(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
