"""facegen.py — pictures and measurements from a trained run.

    python facegen.py sample runs/vae --std 0.5           # seed 001 fig 13: z closer to the centre
    python facegen.py reconstruct runs/vae                # test faces over their reconstructions
    python facegen.py interpolate runs/vae --slerp        # seed 001 figs 5-8, 11-12, 14
    python facegen.py std-sweep runs/vae-lrelu            # seed 003 figs 12-13: rows std 0.25 ... 2.0
    python facegen.py pca runs/vae-lrelu --serve          # seed 003's latent PCA GUI (fig 17)
    python facegen.py gif runs/dcgan --hold-last-ms 3000  # seed 000's "learning fast forward"
    python facegen.py evaluate runs/vae                   # bits/dim, IW bound, SWD, copying check

RUN is a run folder (its last.pt; --checkpoint best for best.pt) or a checkpoint file. Each command
writes one file, in the run folder unless --out says otherwise, and prints its path. Reading order:
loading a run -> latent geometry -> metrics -> the PCA explorer -> one function per command -> CLI.
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
from train import UsageError, load_checkpoint, non_negative, positive, run_data

# -----------------------------------------------------------------------------
# Loading a run: train.load_checkpoint, nets rebuilt from the run's own config.

def load_run(path, checkpoint="last", device="cpu"):
    """A run folder (its {checkpoint}.pt) or a checkpoint file -> (nets in eval mode, config)."""
    if os.path.isdir(path):
        path = os.path.join(path, f"{checkpoint}.pt")
    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or not {"nets", "config"} <= set(state):
        raise UsageError(f"{path} is not a facegen checkpoint (no 'nets' and 'config')")
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
        return run_data(cfg)
    except data.DataError as e:
        raise UsageError(f"the run's data: {e}")


def to_float(x, device="cpu"):
    """uint8 [0, 255] -> float [-1, 1] (train.py's scaling)."""
    return x.to(device).float() / 127.5 - 1


def encoder(nets, command):
    """The run's autoencoder. GANs have none, so a command that encodes refuses them."""
    if "vae" not in nets:
        raise UsageError(f"{command} needs an encoder (autoencoders, vaegan) and this run is a GAN; "
                         "use sample, interpolate, std-sweep or evaluate")
    return nets["vae"]


@torch.no_grad()
def decode(nets, z, batch=256):
    """z (N, latent_dim) -> images (N, 3, H, W) on the CPU, by the VAE decoder or G, in batches."""
    G, dev = models.generator(nets), next(nets.parameters()).device
    return torch.cat([G(z[i:i + batch].to(dev)).float().cpu() for i in range(0, len(z), batch)])


@torch.no_grad()
def encode_dataset(vae, images, batch=256):
    """uint8 images -> (mu, logvar) of q(z|x), each (N, latent_dim), on the CPU (AE: logvar None)."""
    dev, out = next(vae.parameters()).device, []
    for i in range(0, len(images), batch):
        out.append([t if t is None else t.float().cpu() for t in vae.encode(to_float(images[i:i + batch], dev))])
    mu, logvar = zip(*out)
    return torch.cat(mu), None if logvar[0] is None else torch.cat(logvar)


# -----------------------------------------------------------------------------
# Latent geometry.

def slerp(a, b, t):
    """Spherical interpolation (Shoemake 1985; White 2016 for generative models), row by row:

        slerp(a, b; t) = [sin((1 − t) Ω) a + sin(t Ω) b] / sin Ω,   cos Ω = <a, b> / (|a| |b|)

    z ~ N(0, I_d) lives near the shell |z| ≈ √d, but the straight-line midpoint of two draws has
    |z| ≈ √(d/2), closer to the centre than typical samples (seed 001's "z closer to the centre").
    Parallel endpoints fall back to the straight line.
    """
    omega = torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1))[..., None]
    so = torch.sin(omega)
    flat = so.abs() < 1e-6
    arc = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(flat, 1.0, so)
    return torch.where(flat, (1 - t) * a + t * b, arc)


def interpolation_path(a, b, steps, spherical=False):
    """Endpoints (B, d) -> (B, steps, d) at t = 0, 1/(steps − 1), ..., 1: straight line or slerp."""
    t, a, b = torch.linspace(0, 1, steps)[None, :, None], a[:, None], b[:, None]
    return slerp(a, b, t) if spherical else (1 - t) * a + t * b


def latent_pca(codes):
    """PCA of codes (N, d) (seed 003) -> (mean (d,), components (k, d), sigma (k,)), k = min(N, d):

        codes − mean = U S Vᵀ (torch.linalg.svd),  component j = row j of Vᵀ,  sigma_j = S_j / √(N − 1)

    sigma_j is the std of the codes along component j, in descending order. Seed 003 keeps every
    component: "the gain lies in the ordering of these dimensions by variance". SVD signs are
    arbitrary; each component is flipped so that its largest entry is positive.
    """
    mean = codes.mean(0)
    _, S, Vh = torch.linalg.svd(codes - mean, full_matrices=False)
    sign = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    return mean, Vh * sign, S / math.sqrt(max(len(codes) - 1, 1))


def from_pca(mean, components, sigma, coeffs):
    """Coefficients (B, K) in std units -> codes z = mean + Σ_j c_j sigma_j v_j."""
    K = coeffs.shape[1]
    return mean + (coeffs * sigma[:K]) @ components[:K]


# -----------------------------------------------------------------------------
# Metrics 1: likelihood bounds for the VAEs, nats per image.

def log_weights(vae, x, obs_std, k, generator, batch=256):
    """Log importance weights (B, k) of k posterior samples per image (Burda et al. 2016):

        z_i = mu + sigma ⊙ eps_i,   eps = randn(k, B, d, generator)   (this draw order)
        log w_i = log p(x|z_i) + log p(z_i) − log q(z_i|x)
        log p(x|z) = −½ Σ_pixels [((x − x_hat)/σ)² + log 2πσ²]   (losses.gaussian_nll, per image)
        log p(z) = −½ Σ (z² + log 2π),   log q(z|x) = −½ Σ (eps² + logvar + log 2π)

    Each log w_i is an unbiased one-sample estimate of the ELBO. vae: anything with
    encode(x) -> (mu, logvar) and decode(z) -> the mean of p(x|z); σ = obs_std. The decoder sees
    up to `batch` samples at a time.
    """
    mu, logvar = vae.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    c, out = 0.5 * math.log(2 * math.pi), []
    for e in eps.split(max(1, batch // len(x))):                       # (j, B, d)
        z = mu + torch.exp(0.5 * logvar) * e
        x_hat = vae.decode(z.flatten(0, 1)).to(x.dtype).view(len(e), *x.shape)
        log_px_z = -(0.5 * ((x - x_hat) / obs_std) ** 2 + math.log(obs_std) + c).flatten(2).sum(2)
        out.append(log_px_z - (0.5 * z ** 2 + c).sum(2) + (0.5 * e ** 2 + 0.5 * logvar + c).sum(2))
    return torch.cat(out).T


def iw_bound(log_w):
    """Importance-weighted bound per row of log_w (B, k) (Burda et al. 2016):

        L_k = log (1/k) Σ_i w_i = logsumexp_i(log w_i) − log k  <=  log p(x)

    L_1 is the ELBO; E[L_k] never decreases with k and tends to log p(x). For the same draws
    L_k >= mean_i log w_i (Jensen): never looser than the k-sample ELBO estimate.
    """
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


def likelihood_std(cfg):
    """σ of p(x|z) = N(x_hat, σ² I) for bits/dim: the run's --obs-std for gnll runs; σ² = ½ for
    mse runs, as Σ(x − x_hat)² = −log N(x; x_hat, ½ I) − (D/2) log π. Any σ gives a valid bound
    for the model p(x|z) = N(g(z), σ² I); this is the one the run's loss implies."""
    return cfg["obs_std"] if cfg["recon"] == "gnll" else math.sqrt(0.5)


@torch.no_grad()
def likelihood_bounds(vae, images, obs_std, k, seed, batch=64):
    """Test images (uint8) -> (−ELBO, −L_k) in nats per image, from the same k draws per image
    (the ELBO estimate is the mean of the k log-weights), with a fixed seed."""
    dev = next(vae.parameters()).device
    g, elbo, iw = torch.Generator(device=dev).manual_seed(seed), [], []
    for i in range(0, len(images), batch):
        lw = log_weights(vae, to_float(images[i:i + batch], dev), obs_std, k, g).double()
        elbo.append(lw.mean(1))
        iw.append(iw_bound(lw))
    return -torch.cat(elbo).mean().item(), -torch.cat(iw).mean().item()


# -----------------------------------------------------------------------------
# Metrics 2: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, app. D).

def _blur(x, gain=1.0):
    """cv2's 5x5 binomial filter [1 4 6 4 1]ᵀ[1 4 6 4 1] / 256 per channel, mirrored borders."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k1[:, None] * k1 / 256 * gain).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def pyr_up(x, shape):
    """cv2.pyrUp to `shape` (H, W): zeros between the pixels, then the blur with 4 x the kernel."""
    up = x.new_zeros(*x.shape[:2], *shape)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x, levels):
    """x (N, C, H, W) -> [L_0, ..., L_{levels−2}, G_{levels−1}], finest first:

        G_0 = x,  G_{i+1} = blur(G_i)[::2, ::2] (cv2.pyrDown),  L_i = G_i − pyr_up(G_{i+1})

    Each L_i is one octave of detail, the last entry the low-pass image; G_i = L_i + pyr_up(G_{i+1}).
    """
    out, g = [], x
    for _ in range(levels - 1):
        down = _blur(g)[:, :, ::2, ::2]
        out.append(g - pyr_up(down, g.shape[2:]))
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

    n_projections directions from `generator`, `chunk` at a time (Karras et al.: 4 x 128).
    Zero for identical sets and symmetric in a, b.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets; got {tuple(a.shape)}, {tuple(b.shape)}")
    total = 0.0
    for start in range(0, n_projections, chunk):
        theta = torch.randn(a.shape[1], min(chunk, n_projections - start), generator=generator)
        theta = (theta / theta.norm(dim=0, keepdim=True)).to(a)
        total += ((a @ theta).sort(0).values - (b @ theta).sort(0).values).abs().mean(0).sum().item()
    return total / n_projections


def swd_pyramid(a, b, generator, n_per_image=128, n_projections=512, size=7, coarsest=16):
    """SWD x 1e3 per Laplacian level, finest first, between image sets a, b (N, C, H, W), as Karras
    et al. 2018 report it: levels down to `coarsest` px, n_per_image random 7x7 neighbourhoods
    per image and level, each channel normalised by its mean and std over the patches, SWD with
    n_projections directions. Two deviations from their code: the patch positions are drawn once
    for both sets (so SWD(a, a) = 0 exactly), and the normalisation pools both sets (theirs
    normalises each set by its own statistics, which hides a global colour or brightness shift).
    """
    if a.shape != b.shape:
        raise ValueError(f"swd_pyramid needs equal-size sets; got {tuple(a.shape)}, {tuple(b.shape)}")
    N, C, H, W = a.shape
    levels = 1 + max(0, int(math.log2(min(H, W) / coarsest)))                 # 64 px: 64, 32, 16
    out = []
    for la, lb in zip(laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)):
        h, w = la.shape[2:]
        s = min(size, h, w)
        top, left = (torch.randint(0, m - s + 1, (N, n_per_image), generator=generator).to(a.device) for m in (h, w))
        da, db = (patch_descriptors(x, top, left, s).view(N * n_per_image, C, -1) for x in (la, lb))
        both = torch.cat([da, db])
        mean, std = both.mean((0, 2), keepdim=True), both.std((0, 2), keepdim=True).clamp_min(1e-8)
        da, db = (((d - mean) / std).flatten(1) for d in (da, db))
        out.append(1e3 * sliced_wasserstein(da, db, n_projections, generator))
    return out


# -----------------------------------------------------------------------------
# Metrics 3: does it copy the training set?

def nearest_rms(queries, reference, chunk=1024):
    """For each image of `queries` (float [-1, 1]) the per-pixel RMS distance sqrt(mean (x − r)²) to
    its nearest image r of `reference` (uint8), scanning the reference in chunks."""
    q = queries.flatten(1).float()
    best = torch.full((len(q),), math.inf, device=q.device)
    for i in range(0, len(reference), chunk):
        r = to_float(reference[i:i + chunk], q.device).flatten(1)
        best = torch.minimum(best, torch.cdist(q, r).min(1).values)
    return best / math.sqrt(q.shape[1])


# -----------------------------------------------------------------------------
# The PCA explorer (seed 003's "face generation GUI"): a local page with a slider per component.

PAGE = """<!doctype html><meta charset="utf-8"><title>facegen latent PCA</title>
<style>body{font-family:sans-serif;display:flex;gap:2em}label{display:block;font-size:13px}</style>
<img id="face" src="face.png" width="%(w)d" height="%(h)d" style="image-rendering:pixelated">
<div><p>Principal components of the training codes, in std units (seed 003)</p><div id="s"></div>
<button onclick="setAll(() => 0)">mean face</button> <button onclick="setAll(randn)">random</button></div>
<script>
const img = document.getElementById("face"), sliders = %(explained)s.map((e, i) => {
  const l = document.createElement("label"), r = document.createElement("input");
  Object.assign(r, {type: "range", min: -3, max: 3, step: 0.05, value: 0, oninput: draw});
  l.append(r, ` PC${i + 1} (${(100 * e).toFixed(1)}%% of the variance)`);
  document.getElementById("s").append(l);
  return r;
});
function draw() { img.src = "face.png?c=" + sliders.map(r => r.value).join(","); }
function randn() { return Math.sqrt(-2 * Math.log(1 - Math.random())) * Math.cos(2 * Math.PI * Math.random()); }
function setAll(f) { sliders.forEach(r => r.value = f()); draw(); }
</script>
"""


class Explorer:
    """The face for slider values c (std units of the top K components), as an upscaled PNG."""

    def __init__(self, nets, mean, components, sigma, k=8, size=256):
        self.nets, self.pca, self.k = nets, (mean, components, sigma), min(k, len(sigma))
        self.explained = (sigma ** 2 / (sigma ** 2).sum())[:self.k].tolist()
        H, W = decode(nets, mean[None]).shape[2:]
        self.shape = (round(size * W / H), size)                                   # PIL: (width, height)

    def coefficients(self, query):
        """Query string 'c=0.5,-1.2' -> (1, K) tensor; components not given are 0."""
        c = [float(v) for v in urllib.parse.parse_qs(query).get("c", [""])[0].split(",") if v.strip()]
        if len(c) > self.k or not all(abs(v) <= 10 for v in c):                    # also refuses nan, inf
            raise ValueError(f"c takes at most {self.k} numbers in [-10, 10]")
        return torch.tensor([c + [0.0] * (self.k - len(c))])

    def face_png(self, coeffs):
        x = decode(self.nets, from_pca(*self.pca, coeffs))
        buf = io.BytesIO()
        Image.fromarray(data.make_grid(x, padding=0)).resize(self.shape, Image.Resampling.NEAREST).save(buf, "PNG")
        return buf.getvalue()

    def page(self):
        return PAGE % {"w": self.shape[0], "h": self.shape[1], "explained": json.dumps(self.explained)}


class ExplorerHandler(http.server.BaseHTTPRequestHandler):
    """GET / -> the page; GET /face.png?c=c1,c2,... -> the face. Requests naming another host
    (DNS rebinding from a web page) are refused."""

    def do_GET(self):
        url, explorer = urllib.parse.urlsplit(self.path), self.server.explorer
        if self.headers.get("Host", "").rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
            return self.send_error(403)
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
    """An HTTPServer for the explorer. It has no authentication, so it listens on 127.0.0.1 only;
    port 0 picks a free port (server.server_address). Run server.serve_forever(), then shutdown()."""
    if host != "127.0.0.1":
        raise UsageError(f"the explorer listens on 127.0.0.1 only; refusing host {host!r}")
    try:
        server = http.server.HTTPServer((host, port), ExplorerHandler)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e} (try --port 0)")
    server.explorer = explorer
    return server


# -----------------------------------------------------------------------------
# Commands: one function each, returning the path it wrote.

def open_run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return load_run(args.run, args.checkpoint, "cuda" if cuda else "cpu")


def run_folder(path):
    """RUN itself, or the folder of the checkpoint file RUN."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def out_path(args, name):
    return args.out or os.path.join(run_folder(args.run), name)


def save(images, args, name, nrow):
    path = out_path(args, name)
    data.save_grid(images, path, nrow=nrow)
    print(f"wrote {path}")
    return path


def cmd_sample(args):
    """A grid of --n faces decoded from z ~ N(0, std² I); std < 1 keeps z closer to the centre
    (seed 001 fig 13): more typical, less varied faces."""
    nets, _ = open_run(args)
    z = args.std * torch.randn(args.n, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    return save(decode(nets, z), args, "sample.png", args.nrow)


def cmd_reconstruct(args):
    """Autoencoders: rows of --nrow test images (the run's held-out split, or --data), each row
    followed by their reconstructions decode(mu)."""
    nets, cfg = open_run(args)
    vae = encoder(nets, "reconstruct")
    try:
        images = (data.load_images(args.data, tuple(cfg["image_size"]), verbose=False) if args.data
                  else run_images(cfg)[1])[:args.n]
    except data.DataError as e:
        raise UsageError(str(e))
    x, x_hat, ncol = to_float(images), decode(nets, encode_dataset(vae, images)[0]), min(args.nrow, len(images))
    rows = lambda t: torch.cat([t, -torch.ones(-len(t) % ncol, *t.shape[1:])]).view(-1, ncol, *t.shape[1:])
    return save(torch.stack([rows(x), rows(x_hat)], 1).flatten(0, 2), args, "reconstruct.png", ncol)


def cmd_interpolate(args):
    """--rows interpolations of --steps faces. Autoencoders: between the codes mu of random pairs
    of test images, shown beside them (first and last columns); GANs, or --noise: between
    z ~ N(0, std² I). --slerp follows the sphere instead of the straight line."""
    nets, cfg = open_run(args)
    g, encode = torch.Generator().manual_seed(args.seed), "vae" in nets and not args.noise
    if encode:
        test = run_images(cfg)[1]
        if len(test) < 2:
            raise UsageError("interpolate needs at least 2 test images")
        ia = torch.randint(len(test), (args.rows,), generator=g)
        ib = (ia + torch.randint(1, len(test), (args.rows,), generator=g)) % len(test)   # never ia
        za, zb = encode_dataset(nets["vae"], test[ia])[0], encode_dataset(nets["vae"], test[ib])[0]
    else:
        za, zb = (args.std * torch.randn(args.rows, models.latent_dim(nets), generator=g) for _ in "ab")
    x = decode(nets, interpolation_path(za, zb, args.steps, args.slerp).flatten(0, 1))
    x = x.view(args.rows, args.steps, *x.shape[1:])
    if encode:
        x = torch.cat([to_float(test[ia])[:, None], x, to_float(test[ib])[:, None]], 1)
    return save(x.flatten(0, 1), args, "interpolate.png", x.shape[1])


def cmd_std_sweep(args):
    """Seed 003 figs 12-13: row r decodes stds[r] · eps with one eps per column, so the rows differ
    only in the scale of z: small std gives 'prototypical' faces, large std unusual ones."""
    nets, _ = open_run(args)
    eps = torch.randn(args.n, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    print("rows: std " + ", ".join(f"{s:g}" for s in args.stds))
    return save(decode(nets, torch.cat([s * eps for s in args.stds])), args, "std_sweep.png", args.n)


def fit_pca(nets, cfg):
    """latent_pca of the posterior means mu of the run's training images."""
    return latent_pca(encode_dataset(encoder(nets, "pca"), run_images(cfg)[0])[0])


def cmd_pca(args):
    """Seed 003's latent PCA: row j walks principal component j of the training codes from −range
    to +range of its std (columns), the other components at the mean code. --serve then opens
    the slider explorer on 127.0.0.1."""
    nets, cfg = open_run(args)
    mean, components, sigma = fit_pca(nets, cfg)
    K = min(args.components, len(sigma))
    coeffs = torch.zeros(K, args.steps, K)
    coeffs[torch.arange(K), :, torch.arange(K)] = torch.linspace(-args.range, args.range, args.steps)
    path = save(decode(nets, from_pca(mean, components, sigma, coeffs.flatten(0, 1))), args, "pca.png", args.steps)
    share = sigma ** 2 / (sigma ** 2).sum()
    print("variance explained: " + ", ".join(f"PC{j + 1} {100 * share[j]:.1f}%" for j in range(K)))
    if args.serve:
        server = make_server(Explorer(nets, mean, components, sigma, K, args.size), port=args.port)
        print(f"explorer at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
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


def evaluate(nets, cfg, n=512, k=16, seed=0, patches=128, projections=512):
    """The SPEC's metrics (no downloaded weights) -> report dict. n samples z ~ N(0, I) against the
    first n test images, beside the floor: a training subset of the same size against them.
    nearest_train_rms: samples' and test images' distance to their nearest training image; a
    ratio well below 1 means copying (or blur toward the mean face: look at the samples).
    likelihood (VAEs): test −ELBO and −L_k in bits/dim = nats / (D ln 2), D = 3 H W, of the
    density of x in [-1, 1]^D under N(x_hat, σ² I), σ from likelihood_std; negative values are
    possible for a small σ. On an 8-bit [0, 256) scale add log2(127.5) ≈ 7 bits/dim."""
    train_x, test_x = run_images(cfg)
    n = min(n, len(test_x), len(train_x))
    if n < 2:
        raise UsageError("evaluate needs at least 2 test and 2 training images")
    g, dev = torch.Generator().manual_seed(seed), next(nets.parameters()).device
    real, floor = to_float(test_x[:n], dev), to_float(train_x[torch.randperm(len(train_x), generator=g)[:n]], dev)
    fake = decode(nets, torch.randn(n, models.latent_dim(nets), generator=g)).to(dev)
    swd = [swd_pyramid(x, real, torch.Generator().manual_seed(seed), patches, projections) for x in (fake, floor)]
    near = [nearest_rms(x, train_x) for x in (fake, real)]
    H, W = cfg["image_size"]
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"], "n": n,
              "seed": seed, "swd_x1e3": {"level_px": [H >> i for i in range(len(swd[0]))],
                                         "samples_vs_test": swd[0], "train_vs_test": swd[1],
                                         "samples_vs_test_mean": sum(swd[0]) / len(swd[0]),
                                         "train_vs_test_mean": sum(swd[1]) / len(swd[1])},
              "nearest_train_rms": {"samples_median": near[0].median().item(), "samples_mean": near[0].mean().item(),
                                    "test_median": near[1].median().item(), "test_mean": near[1].mean().item(),
                                    "ratio_median": (near[0].median() / near[1].median()).item()}}
    if "vae" in nets and nets["vae"].variational:
        sigma, bpd = likelihood_std(cfg), lambda nats: nats / (3 * H * W * math.log(2))
        elbo, iw = likelihood_bounds(nets["vae"], test_x[:n], sigma, k, seed)
        report["likelihood"] = {"obs_std": sigma, "k": k, "neg_elbo_nats": elbo, "neg_iw_nats": iw,
                                "neg_elbo_bpd": bpd(elbo), "neg_iw_bpd": bpd(iw)}
    return report


def cmd_evaluate(args):
    """Write evaluate.json and print a table: see evaluate()."""
    nets, cfg = open_run(args)
    r = evaluate(nets, cfg, args.n, args.k, args.seed, args.patches, args.projections)
    path = out_path(args, "evaluate.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f, indent=2)
    s, nn = r["swd_x1e3"], r["nearest_train_rms"]
    rows = [(f"SWD x1e3, {px} px level", a, b)
            for px, a, b in zip(s["level_px"], s["samples_vs_test"], s["train_vs_test"])]
    rows += [("SWD x1e3, mean", s["samples_vs_test_mean"], s["train_vs_test_mean"]),
             ("nearest-train RMS, median", nn["samples_median"], nn["test_median"]),
             ("nearest-train RMS, mean", nn["samples_mean"], nn["test_mean"])]
    if "likelihood" in r:
        rows += [("test -ELBO, bits/dim", r["likelihood"]["neg_elbo_bpd"], None),
                 (f"test -IW bound k={args.k}, bits/dim", r["likelihood"]["neg_iw_bpd"], None)]
    title = f"{r['model']}: {r['n']} samples / test / training images"
    print(f"  {title:44s} {'model':>10s} {'real floor':>10s}")
    for name, v, floor in rows:
        print(f"  {name:44s} {v:10.4g} {'' if floor is None else format(floor, '10.4g'):>10s}")
    print(f"  nearest-train ratio samples/test {nn['ratio_median']:.3f} (< 1: closer to training faces than "
          f"held-out faces are)\nwrote {path}")
    return path


# -----------------------------------------------------------------------------
# CLI

def number_list(s):
    """'0.25,0.5' -> [0.25, 0.5], each >= 0 (argparse type)."""
    return [non_negative(x) for x in s.split(",")]


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


COMMANDS = {  # name: (function, one-line help)
    "sample": (cmd_sample, "grid of faces from z ~ N(0, std² I)"),
    "reconstruct": (cmd_reconstruct, "test images over their reconstructions (autoencoders)"),
    "interpolate": (cmd_interpolate, "interpolations between encoded test images or noise"),
    "std-sweep": (cmd_std_sweep, "rows of samples at std 0.25 ... 2.0 (seed 003 figs 12-13)"),
    "pca": (cmd_pca, "latent PCA grid, and the slider explorer with --serve (seed 003)"),
    "gif": (cmd_gif, "progress.gif from samples/epoch_*.png"),
    "evaluate": (cmd_evaluate, "SWD, nearest-training-image distance, bits/dim -> evaluate.json"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pictures and measurements from a facegen run "
                                            "(COMMAND --help for each command's options).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run", metavar="RUN", help="run folder (its last.pt) or a checkpoint file")
    run.add_argument("--out", help="output file (default: in the run folder)")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--checkpoint", choices=["last", "best"], default="last", help="which checkpoint of a run folder")
    net.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present")
    net.add_argument("--seed", type=int, default=0, help="seeds every random draw")
    s = {}
    for name, (fn, short) in COMMANDS.items():
        s[name] = sub.add_parser(name, parents=[run] if name == "gif" else [run, net], help=short,
                                 description=fn.__doc__, formatter_class=Help)
        s[name].set_defaults(fn=fn)
    s["sample"].add_argument("--n", type=positive(int), default=64, help="number of faces")
    s["sample"].add_argument("--std", type=non_negative, default=1.0, help="std of z (< 1: closer to the centre)")
    s["sample"].add_argument("--nrow", type=positive(int), default=8, help="faces per grid row")
    s["reconstruct"].add_argument("--n", type=positive(int), default=16, help="number of images")
    s["reconstruct"].add_argument("--nrow", type=positive(int), default=8, help="images per row")
    s["reconstruct"].add_argument("--data", help="folder or .zip of images instead of the run's test split")
    s["interpolate"].add_argument("--rows", type=positive(int), default=4, help="number of interpolations")
    s["interpolate"].add_argument("--steps", type=positive(int), default=8, help="decoded faces per row, t = 0 ... 1")
    s["interpolate"].add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    s["interpolate"].add_argument("--noise", action="store_true", help="autoencoders: between noise, not test images")
    s["interpolate"].add_argument("--std", type=non_negative, default=1.0, help="std of the noise endpoints")
    s["std-sweep"].add_argument("--n", type=positive(int), default=8, help="faces per row (one eps per column)")
    s["std-sweep"].add_argument("--stds", type=number_list, default=[0.25 * i for i in range(1, 9)],
                                help="comma-separated std of each row")
    s["pca"].add_argument("--components", type=positive(int), default=8, help="top components: grid rows, sliders")
    s["pca"].add_argument("--steps", type=positive(int), default=9, help="grid columns")
    s["pca"].add_argument("--range", type=non_negative, default=3.0, help="walk from -range to +range std")
    s["pca"].add_argument("--serve", action="store_true", help="then serve the slider explorer on 127.0.0.1")
    s["pca"].add_argument("--port", type=int, default=8000, help="explorer port (0: any free port)")
    s["pca"].add_argument("--size", type=positive(int), default=256, help="explorer face height in pixels")
    s["gif"].add_argument("--duration-ms", type=positive(int), default=200, help="time per frame")
    s["gif"].add_argument("--hold-last-ms", type=positive(int), default=2000, help="time on the last frame")
    s["evaluate"].add_argument("--n", type=positive(int), default=512, help="samples and test images compared")
    s["evaluate"].add_argument("--k", type=positive(int), default=16, help="importance samples per test image (VAEs)")
    s["evaluate"].add_argument("--patches", type=positive(int), default=128, help="7x7 patches per image and level")
    s["evaluate"].add_argument("--projections", type=positive(int), default=512, help="SWD random directions")
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
