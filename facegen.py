"""facegen.py — pictures and measurements from a trained run.

    python facegen.py sample runs/vae --std 0.5           # seed 001 fig 13: z closer to the centre
    python facegen.py reconstruct runs/vae                # test faces over their reconstructions
    python facegen.py interpolate runs/vae --slerp        # seed 001 figs 5-8, 11-12, 14
    python facegen.py std-sweep runs/vae-lrelu            # seed 003 figs 12-13: rows std 0.25 ... 2.0
    python facegen.py pca runs/vae-lrelu --serve          # seed 003's latent PCA GUI (fig 17)
    python facegen.py gif runs/dcgan --hold-last-ms 3000  # seed 000's "learning fast forward"
    python facegen.py evaluate runs/vae                   # bits/dim, IW bound, SWD, copying check
    python facegen.py gallery runs/gallery/* --out docs --readme README.md   # the README's Results
    python facegen.py sample runs/c --label hair=blond     # conditional runs: requested labels
    python facegen.py attributes runs/c --attr glasses    # rows = attribute values, columns = same z
    python facegen.py control runs/c                      # classifier accuracy on generated faces

RUN is a run folder (its last.pt; --checkpoint best for best.pt) or a checkpoint file. Each command
writes one file, in the run folder unless --out says otherwise, and prints its path. Reading order:
loading a run -> latent geometry -> metrics -> the PCA explorer -> one function per command -> CLI.
"""
import argparse
import collections
import csv
import hashlib
import http.server
import io
import json
import math
import os
import re
import sys
import threading
import urllib.parse
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

import data
import losses
import models
import train
from train import UsageError, load_checkpoint, non_negative, positive

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
                                  cfg.get("arch"), cfg.get("critic_norm"), models.label_classes(cfg.get("labels")),
                                  ema=bool(cfg.get("ema")))
        nets.load_state_dict(state["nets"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot rebuild the model of {path}: {str(e).splitlines()[0]}")
    return nets.to(device).eval(), dict(cfg, checkpoint=path, trained_steps=state.get("step"))


def run_images(cfg):
    """The run's own data, split exactly as train.py split it -> (train, test), uint8 N x 3 x H x W."""
    try:
        return data.run_data(cfg)
    except data.DataError as e:
        raise UsageError(f"the run's data: {e}")


def to_float(x, device="cpu"):
    """uint8 [0, 255] -> float [-1, 1] (train.py's scaling)."""
    return x.to(device).float() / 127.5 - 1


def encoder(nets, command):
    """The run's autoencoder. GANs have none, so a command that encodes refuses them; so is a
    conditional one (a CVAE's q(z|x, y) needs every image's labels: not wired into these commands)."""
    if "vae" not in nets:
        raise UsageError(f"{command} needs an encoder (autoencoders, vaegan) and this run is a GAN; "
                         "use sample, interpolate, std-sweep or evaluate")
    if nets["vae"].classes:
        raise UsageError(f"{command} does not handle conditional autoencoders yet; use sample, attributes or control")
    return nets["vae"]


def classes_of(nets):
    """The number of values of each label attribute of a conditional model; () otherwise."""
    return (nets["vae"] if "vae" in nets else nets["G"]).classes


def random_labels(nets, n, generator):
    """n label rows, every attribute's value uniform over its values (None for an unconditional model)."""
    classes = classes_of(nets)
    if not classes:
        return None
    return torch.stack([torch.randint(0, c, (n,), generator=generator) for c in classes], 1)


@torch.no_grad()
def decode(nets, z, y=None, batch=256):
    """z (N, latent_dim) [, labels y (N, K)] -> images (N, 3, H, W) on the CPU, by the VAE decoder
    or G, in batches. A conditional model given no y draws uniform labels (seed 0)."""
    G, dev = models.generator(nets), next(nets.parameters()).device
    if y is None:
        y = random_labels(nets, len(z), torch.Generator().manual_seed(0))
    part = lambda t, i: None if t is None else t[i:i + batch].to(dev)  # noqa: E731
    return torch.cat([G(part(z, i), part(y, i)).float().cpu() for i in range(0, len(z), batch)])


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

        z_i = mu + sigma ⊙ eps_i,   eps = randn(k, B, d, generator)   (models.reparameterize)
        log w_i = log p(x|z_i) + log p(z_i) − log q(z_i|x)
        log p(x|z) = −losses.gaussian_nll(x, x_hat, σ) per image
        log p(z) = −½ Σ (z² + log 2π),   log q(z|x) = −½ Σ (eps² + logvar + log 2π)

    Each log w_i is an unbiased one-sample estimate of the ELBO. vae: anything with
    encode(x) -> (mu, logvar) and decode(z) -> the mean of p(x|z); σ = obs_std. The decoder sees
    up to `batch` samples at a time.
    """
    mu, logvar = vae.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    c, out = 0.5 * math.log(2 * math.pi), []
    for e in eps.split(max(1, batch // len(x))):                       # (j, B, d)
        z = models.reparameterize(mu, logvar, e)                       # (j, B, d)
        x_hat = vae.decode(z.flatten(0, 1)).to(x.dtype)                # (j·B, C, H, W)
        x_rep = x.expand(len(e), *x.shape).flatten(0, 1)
        log_px_z = -losses.gaussian_nll(x_rep, x_hat, obs_std, reduction="none").view(len(e), len(x))
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
    """σ of p(x|z) = N(x_hat, σ² I) for bits/dim. A gnll run trained that likelihood: its
    --obs-std. An MSE run trained no likelihood, so we choose one by convention: σ² = ½, under
    which the summed squared error is the NLL up to a constant (Σ(x − x_hat)² = −log N(x; x_hat,
    ½ I) − (D/2) log π). For mse (summed) runs that is the loss they minimised; an mse-mean run's
    loss is a rescaled objective that no single σ turns into its NLL. Any σ gives a valid bound
    for the model p(x|z) = N(g(z), σ² I), so bits/dim stay comparable between runs of one kind."""
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
#
# The page's state is its URL query (so every view is a permalink): f, the start face, and c, the
# slider values. The face shown is decode(z_f + Σ_j c_j σ_j v_j), v_j the j-th principal component
# and σ_j the codes' std along it; z_f is the mean code (f=mean), the posterior mean μ of held-out
# test image f (autoencoders), or z ~ N(0, I) drawn with seed f (GANs).

PAGE = """<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>facegen latent PCA explorer</title>
<style>
* { box-sizing: border-box }
body { margin: 0; padding: 12px 24px; font: 15px/1.4 system-ui, sans-serif; color: #222; background: #f6f6f6 }
h1 { font-size: 20px; margin: 0 } h2 { font-size: 15px; margin: 14px 0 6px }
#facts { display: flex; flex-wrap: wrap; gap: 0 1.2em } #facts b { color: #222 }
#facts span { max-width: 100%; color: #555; white-space: nowrap; overflow: hidden; text-overflow: ellipsis }
details { color: #444; max-width: 75em; margin: 4px 0 10px } summary { cursor: pointer; color: #1a5fb4 }
main { display: grid; grid-template-columns: minmax(0, 4fr) minmax(0, 5fr); gap: 0 32px; align-items: start;
       grid-template-areas: "view sliders" "starts sliders" ". sliders" }
#view { grid-area: view; position: sticky; top: 0; padding-top: 6px; background: #f6f6f6; z-index: 1 }
#starts { grid-area: starts } #sliders { grid-area: sliders }
#face { display: block; width: 100%; max-width: 70vh; aspect-ratio: var(--aspect); image-rendering: pixelated;
        background: #ddd; border-radius: 6px }
.bar { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 8px 0 }
.bar a, button { font: inherit; font-size: 14px; padding: 3px 10px; border: 1px solid #bbb; border-radius: 5px;
                 background: #fff; color: #222; text-decoration: none; cursor: pointer }
#from { flex-basis: 100%; color: #444 } .note { margin: 0 0 6px; color: #555; font-size: 13px }
img.thumb { width: 60px; aspect-ratio: var(--aspect); image-rendering: pixelated; cursor: pointer; border-radius: 5px;
            border: 3px solid transparent; vertical-align: middle }
img.thumb.on { border-color: #1a73e8 }
.row { margin: 6px 0 12px; padding: 8px 12px 4px; background: #fff; border: 1px solid #ddd; border-radius: 6px }
.head { display: flex; flex-wrap: wrap; gap: 4px 12px; align-items: baseline }
.head output { font: 600 15px ui-monospace, monospace; min-width: 4.5em }
.head .share { flex: 1; color: #666; font-size: 13px } .head button { padding: 0 8px; font-size: 13px }
.strip { display: block; width: 100%; aspect-ratio: calc(var(--n) * var(--aspect)); margin-top: 6px;
         image-rendering: pixelated; cursor: pointer; background: #eee }
/* the slider's ends sit under the centres of the first and last preview faces (thumb 16 px wide) */
input[type=range] { display: block; margin: 4px 0 0 calc(100% / (2 * var(--n)) - 8px);
                    width: calc(100% * (var(--n) - 1) / var(--n) + 16px) }
.ticks { display: grid; grid-template-columns: repeat(var(--n), 1fr); text-align: center; font-size: 12px; color: #666 }
@media (max-width: 760px) {
  body { padding: 8px 10px }
  main { grid-template-columns: minmax(0, 1fr); grid-template-areas: "view" "starts" "sliders" }
  #face { width: auto; max-width: 100%; height: 32vh; margin: 0 auto }
  .bar { justify-content: center }
  #thumbs { display: flex; align-items: center; overflow-x: auto } #thumbs > * { flex: none }  /* one row */
}
</style>
<h1>Latent PCA explorer</h1>
<div id="facts"></div>
<details id="about"><summary>How to read this page</summary><span id="help"></span></details>
<main>
<section id="view">
  <img id="face" alt="the face for the current slider values">
  <div class="bar"><span id="from"></span><a id="save" download>save PNG</a><a id="link">permalink</a>
    <button id="zero">reset all sliders</button></div>
</section>
<section id="starts"><h2>Start from</h2><p class="note" id="startnote"></p><div id="thumbs"></div></section>
<section id="sliders"><h2 id="title"></h2></section>
</main>
<datalist id="ticks"></datalist>
<script>
const I = __INFO__;  // the run, the components and the starting state, written by the server
const $ = id => document.getElementById(id), el = (tag, props) => Object.assign(document.createElement(tag), props);
const pc = j => "PC" + (j + 1), pct = x => (100 * x).toFixed(1) + "%";
const signed = v => (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v).toFixed(2) + "σ";
document.title = `${I.model} · latent PCA · facegen`;
document.body.style.setProperty("--n", I.ticks.length);
document.body.style.setProperty("--aspect", I.aspect);
for (const [k, v] of I.facts) {
  const fact = el("span", {textContent: k + " ", title: v});
  fact.append(el("b", {textContent: v}));
  $("facts").append(fact);
}
$("help").textContent = I.help;
$("about").open = innerWidth > 760;  // narrow windows keep the space for the face
$("title").textContent = `Top ${I.shares.length} principal components (slider: offset from the start face, in σ)`;
I.ticks.forEach(t => $("ticks").append(el("option", {value: t})));

// One request at a time per picture: while one loads, newer values only replace the wish, so
// dragging a slider never floods the server with requests that the browser then cancels.
function loader(img) {
  let wish = null, busy = false;
  const next = () => { if (wish !== img.getAttribute("src")) { busy = true; img.src = wish; } };
  img.onload = () => { busy = false; img.dataset.shown = img.getAttribute("src"); next(); };
  img.onerror = () => { busy = false; img.dataset.failed = img.getAttribute("src"); next(); };
  return url => { wish = url; if (!busy) next(); };
}

let f = I.f, c = I.c.slice(), cumulative = 0;
const face = loader($("face"));
const rows = I.shares.map((share, j) => {
  cumulative += share;
  const row = el("div", {className: "row"}), head = el("div", {className: "head"});
  const out = el("output"), reset = el("button", {textContent: "reset", title: `${pc(j)} back to 0`});
  const strip = el("img", {className: "strip", alt: `the face along ${pc(j)}`,
                           title: "the face at each tick: click one to go there"});
  const r = el("input", {type: "range", min: -I.range, max: I.range, step: I.step, value: c[j]});
  r.setAttribute("list", "ticks");
  r.setAttribute("aria-label", pc(j));
  const share_text = `${pct(share)} of the variance · ${pct(cumulative)} cumulative`;
  head.append(el("b", {textContent: pc(j)}), out, el("span", {className: "share", textContent: share_text}), reset);
  const ticks = el("div", {className: "ticks"});
  I.ticks.forEach(t => ticks.append(el("span", {textContent: (t > 0 ? "+" : "") + +t.toFixed(2)})));
  row.append(head, strip, r, ticks);
  $("sliders").append(row);
  const set = v => { r.value = v; c[j] = +r.value; show(true); };
  r.oninput = () => { c[j] = +r.value; show(false); };
  r.onchange = () => show(true);
  reset.onclick = () => set(0);
  const n = I.ticks.length;
  strip.onclick = e => set(I.ticks[Math.min(n - 1, Math.floor(e.offsetX / strip.clientWidth * n))]);
  c[j] = +r.value;  // a permalink's value, snapped to the slider's step
  return {r, out, strip: loader(strip)};
});

// The start faces: the mean code, then held-out test images (autoencoders) or noise seeds (GANs).
const thumbs = ["mean", ...I.starts].map(v => {
  const t = el("img", {className: "thumb", src: "start.png?f=" + v, alt: name(v), title: name(v)});
  t.dataset.f = v;
  t.onclick = () => start(v);
  $("thumbs").append(t);
  return t;
});
$("startnote").textContent = I.noise ? "The mean of the sampled z, then z ~ N(0, I) drawn with seeds 0, 1, ..."
  : "The mean code, then held-out test images (never trained on): the face becomes the decoder's "
    + "reconstruction of the image you pick.";
if (I.n_faces > 0)
  $("thumbs").append(" ", el("button", {textContent: I.noise ? "random z" : "random test image",
                                        onclick: () => start(Math.floor(Math.random() * I.n_faces))}));
function name(v) {
  return v === "mean" ? "the mean code" : I.noise ? `z ~ N(0, I), seed ${v}` : `held-out test image #${v}`;
}
function start(v) {
  f = String(v);
  rows.forEach((row, j) => { row.r.value = 0; c[j] = 0; });
  show(true);
}
$("zero").onclick = () => start(f);

function show(settled) {  // settled: not mid-drag, so also the preview strips and the URL
  const s = `f=${f}&c=${c.join(",")}`;
  rows.forEach((row, j) => row.out.value = signed(c[j]));
  face("face.png?" + s);
  $("save").href = "face.png?" + s;
  $("save").download = `${I.model}-f${f}-c${c.join("_")}.png`;
  $("link").href = "?" + s;
  if (!settled) return;
  history.replaceState(null, "", "?" + s);
  rows.forEach((row, j) => row.strip(`strip.png?j=${j}&${s}`));
  thumbs.forEach(t => t.classList.toggle("on", t.dataset.f === f));
  const edited = I.noise || f === "mean" ? "" : " (the face is its reconstruction, edited)";
  $("from").textContent = "Start: " + name(f) + edited;
}
show(true);
</script>
"""

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)  # not nan, inf, 1_0 or '٣'


def query_fields(query, names):
    """'f=3&c=1,2' -> {'f': '3', 'c': '1,2'}. Other names, a repeated name, a malformed pair or
    bytes that are not UTF-8 are a ValueError (answered 400, never echoing the input)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       errors="strict", max_num_fields=len(names))
    except ValueError:
        pairs = None
    if pairs is None or len(dict(pairs)) < len(pairs) or not {k for k, _ in pairs} <= set(names):
        raise ValueError(f"the query takes name=value pairs, each of {', '.join(names)} at most once")
    return dict(pairs)


def png_bytes(x, height=None):
    """Faces (B, 3, h, w) in [-1, 1] -> PNG bytes of one row, upscaled (nearest) to `height` px."""
    im = Image.fromarray(data.make_grid(x, nrow=len(x), padding=0))
    if height:
        im = im.resize((round(height * im.width / im.height), height), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


class Explorer:
    """The explorer's pictures for a state (f, c), each a method taking the URL query. The server's
    threads share one Explorer; the nets run under a lock (torch modules are not promised to be
    thread-safe, and one inference at a time is no slower than several competing for the cores).

    pca: (mean, components, sigma) of fit_pca; about: {'model', 'facts': [[name, value], ...],
    'help'} for the page; faces: the held-out test images (uint8), or None for a GAN (start faces
    are then noise seeds); k sliders from -span to +span; size: height of face.png."""

    def __init__(self, nets, pca, about, faces=None, k=8, span=3.0, size=256, n_ticks=7, n_starts=12):
        self.nets, self.pca, self.faces, self.lock = nets, pca, faces, threading.Lock()
        sigma = pca[2]
        self.k, self.span, self.size = min(k, len(sigma)), span, size
        self.n_faces = 2 ** 31 if faces is None else len(faces)
        self.ticks = torch.linspace(-span, span, n_ticks)
        h, w = decode(nets, pca[0][None]).shape[2:]
        share = sigma ** 2 / (sigma ** 2).sum()
        self.info = dict(about, shares=share[:self.k].tolist(), range=span, step=round(span / 60, 2) or 0.01,
                         ticks=self.ticks.tolist(), aspect=w / h, noise=faces is None, n_faces=self.n_faces,
                         starts=list(range(min(n_starts, self.n_faces))))

    def state(self, query, names=("f", "c")):
        """Query 'f=3&c=0.5,-1.2' -> (f, c (K,), fields): f 'mean' or a start index; components
        not given are 0. Anything else is a ValueError."""
        q = query_fields(query, names)
        f, c = q.get("f", "mean"), q.get("c", "")
        if f != "mean" and not (re.fullmatch(r"\d{1,10}", f, re.ASCII) and int(f) < self.n_faces):
            raise ValueError(f"f is 'mean' or a whole number below {self.n_faces}")
        c = c.split(",") if c else []
        if len(c) > self.k or not all(NUMBER.fullmatch(v) and abs(float(v)) <= self.span for v in c):
            raise ValueError(f"c takes at most {self.k} comma-separated numbers in [-{self.span:g}, {self.span:g}]")
        return f, torch.tensor([float(v) for v in c] + [0.0] * (self.k - len(c))), q

    @torch.no_grad()
    def faces_at(self, f, coeffs):
        """Coefficient rows (B, K) -> faces decode(z_f + Σ_j c_j σ_j v_j), (B, 3, H, W)."""
        mean, components, sigma = self.pca
        with self.lock:
            if f == "mean":
                z_f = mean
            elif self.faces is not None:
                z_f = encode_dataset(self.nets["vae"], self.faces[int(f)][None])[0][0]
            else:
                z_f = torch.randn(len(mean), generator=torch.Generator().manual_seed(int(f)))
            return decode(self.nets, from_pca(z_f, components, sigma, coeffs))

    def face_png(self, query):
        f, c, _ = self.state(query)
        return png_bytes(self.faces_at(f, c[None]), self.size)

    def strip_png(self, query):
        """Component j's preview: the current face with c_j at each tick."""
        f, c, q = self.state(query, ("f", "c", "j"))
        j = q.get("j", "")
        if not (re.fullmatch(r"\d{1,3}", j, re.ASCII) and int(j) < self.k):
            raise ValueError(f"j is a component index below {self.k}")
        coeffs = c.repeat(len(self.ticks), 1)
        coeffs[:, int(j)] = self.ticks
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
    """GET / (the page), /face.png, /strip.png (with j=), /start.png; the query is the state.
    A bad query is a 400, another path a 404, a request naming another host (DNS rebinding from a
    web page) a 403. Each read or write on a connection waits at most `timeout` seconds, so a
    client that sends half a request and stalls holds only its own thread, and only that long;
    a client that hangs up is dropped without a word."""
    timeout = 10
    routes = {"/": ("page", "text/html; charset=utf-8"), "/face.png": ("face_png", "image/png"),
              "/strip.png": ("strip_png", "image/png"), "/start.png": ("start_png", "image/png")}

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError):  # the client left, or stalled mid-reply: its loss only
            pass

    def do_GET(self):
        if self.headers.get("Host", "").rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
            return self.send_error(403, "the explorer answers requests for 127.0.0.1 or localhost only")
        try:
            url = urllib.parse.urlsplit(self.path)
            if url.path not in self.routes:
                return self.send_error(404)
            method, kind = self.routes[url.path]
            body = getattr(self.server.explorer, method)(url.query)
        except ValueError as e:
            return self.send_error(400, str(e))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # another run may serve this port tomorrow
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):  # kept for tests and debugging, not printed
        self.server.served.append((getattr(self, "path", None), int(code)))

    def log_message(self, *args):  # quiet: one request per slider move
        pass


def make_server(explorer, host="127.0.0.1", port=0):
    """A ThreadingHTTPServer (one daemon thread per connection) for the explorer. It has no
    authentication, so it listens on 127.0.0.1 only; port 0 picks a free port
    (server.server_address). server.served keeps the last 1000 (path, status) pairs.
    Run server.serve_forever(), then shutdown() and server_close()."""
    if host != "127.0.0.1":
        raise UsageError(f"the explorer listens on 127.0.0.1 only; refusing host {host!r}")
    try:
        server = http.server.ThreadingHTTPServer((host, port), ExplorerHandler)
    except (OSError, OverflowError) as e:
        raise UsageError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e} (try --port 0)")
    server.explorer, server.served = explorer, collections.deque(maxlen=1000)
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


OUT_KINDS = {".png": (".png", ".jpg", ".jpeg", ".webp", ".bmp"), ".gif": (".gif",), ".json": (".json",)}


def out_path(args, name):
    """Where a command writes: --out, or `name` in the run folder. A --out that cannot be that
    file (a folder, a path under a file, another extension, an unwritable folder) is a UsageError."""
    path = args.out or os.path.join(run_folder(args.run), name)
    kinds = OUT_KINDS[os.path.splitext(name)[1]]
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder: name a {kinds[0]} file in it")
    if os.path.splitext(path)[1].lower() not in kinds:
        raise UsageError(f"--out {path}: this command writes a {' / '.join(kinds)} file")
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: {folder} is not a folder" + (" (it is a file)" if os.path.exists(folder) else ""))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: the folder {folder} is not writable")
    return path


def save(images, args, name, nrow, **labels):
    """Write the grid (labels: see data.labelled_grid) to --out or the run folder; print the path."""
    path = out_path(args, name)
    data.save_grid(images, path, nrow=nrow, **labels)
    print(f"wrote {path}")
    return path


def parse_labels(text, info):
    """'hair=blond,glasses=yes' -> {attribute index: value index}, checked against the run's
    labels info {attribute: [values]}."""
    names, chosen = list(info), {}
    for item in filter(None, (text or "").split(",")):
        attr, _, value = item.partition("=")
        if attr not in info or value not in info[attr]:
            raise UsageError(f"--label {item!r}: the run's labels are "
                             + "; ".join(f"{a}={'|'.join(v)}" for a, v in info.items()))
        chosen[names.index(attr)] = info[attr].index(value)
    return chosen


def cmd_sample(args):
    """A grid of --n faces decoded from z ~ N(0, std² I); std < 1 keeps z closer to the centre
    (seed 001 fig 13): more typical, less varied faces. Conditional runs: --label fixes
    attributes (e.g. hair=blond,glasses=yes); the others are drawn uniformly per face."""
    nets, cfg = open_run(args)
    g = torch.Generator().manual_seed(args.seed)
    z = args.std * torch.randn(args.n, models.latent_dim(nets), generator=g)
    y = random_labels(nets, args.n, g)
    if args.label and y is None:
        raise UsageError("--label needs a conditional run (train.py --conditional)")
    for k, v in parse_labels(args.label, cfg.get("labels") or {}).items():
        y[:, k] = v
    return save(decode(nets, z, y), args, "sample.png", args.nrow)


def cmd_attributes(args):
    """The attribute grid: one row per value of --attr, the columns the same --n draws of z (and
    the same values of the other attributes: --label, else their first value), so a row differs
    from the next only in the label."""
    nets, cfg = open_run(args)
    info = cfg.get("labels")
    if not info:
        raise UsageError("attributes needs a conditional run (train.py --conditional)")
    if args.attr not in info:
        raise UsageError(f"--attr must be one of {', '.join(info)}; got {args.attr!r}")
    k, values = list(info).index(args.attr), info[args.attr]
    z = torch.randn(args.n, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    y = torch.zeros(len(values), args.n, len(info), dtype=torch.long)
    for j, v in parse_labels(args.label, info).items():
        y[..., j] = v
    y[..., k] = torch.arange(len(values))[:, None]                       # row r: value r
    print(f"rows: {args.attr} = " + ", ".join(values))
    return save(decode(nets, z.repeat(len(values), 1), y.flatten(0, 1)), args, f"attributes_{args.attr}.png", args.n,
                row_labels=[f"{args.attr}={v}" for v in values], title="rows: the label; columns: the same z")


def cmd_reconstruct(args):
    """Autoencoders: rows of --nrow test images (the run's held-out split, or --data), each row
    followed by their reconstructions decode(mu)."""
    nets, cfg = open_run(args)
    try:
        images = (data.load_images(args.data, tuple(cfg["image_size"]), verbose=False) if args.data
                  else run_images(cfg)[1])[:args.n]
    except data.DataError as e:
        raise UsageError(str(e))
    x, labels = reconstruction_rows(nets, images, args.nrow)
    return save(x, args, "reconstruct.png", min(args.nrow, len(images)), row_labels=labels)


def reconstruction_rows(nets, images, nrow):
    """uint8 images -> (grid images, row labels): rows of nrow inputs, each over its
    reconstructions decode(mu) (no sampling noise)."""
    vae = encoder(nets, "reconstruct")
    x, x_hat, ncol = to_float(images), decode(nets, encode_dataset(vae, images)[0]), min(nrow, len(images))
    rows = lambda t: torch.cat([t, -torch.ones(-len(t) % ncol, *t.shape[1:])]).view(-1, ncol, *t.shape[1:])
    grid = torch.stack([rows(x), rows(x_hat)], 1).flatten(0, 2)
    return grid, ["input", "reconstruction"] * (len(grid) // (2 * ncol))


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
    ends = [""] * args.steps  # mark the ends of each row: t = 0, t = 1 (and the images encoded)
    ends[-1], ends[0] = ("t=1", "t=0") if encode else ("z_B\nt=1", "z_A\nt=0")
    if encode:
        x = torch.cat([to_float(test[ia])[:, None], x, to_float(test[ib])[:, None]], 1)
        ends = ["image\nA", *ends, "image\nB"]
    how = "slerp" if args.slerp else "linear"
    return save(x.flatten(0, 1), args, "interpolate.png", x.shape[1], col_labels=ends,
                title=f"{how}, {'codes of test images A, B' if encode else 'noise z_A to z_B'}")


def cmd_std_sweep(args):
    """Seed 003 figs 12-13: row r decodes stds[r] · eps with one eps per column, so the rows differ
    only in the scale of z: small std gives 'prototypical' faces, large std unusual ones."""
    nets, _ = open_run(args)
    print("rows: std " + ", ".join(f"{s:g}" for s in args.stds))
    x, labels = std_sweep(nets, args.n, args.stds, args.seed)
    return save(x, args, "std_sweep.png", args.n, row_labels=labels)


def std_sweep(nets, n, stds, seed):
    """(images, row labels): row r decodes stds[r] · eps, one eps ~ N(0, I) per column."""
    eps = torch.randn(n, models.latent_dim(nets), generator=torch.Generator().manual_seed(seed))
    return decode(nets, torch.cat([s * eps for s in stds])), [f"std {s:g}" for s in stds]


def fit_pca(nets, train_images=None, n_noise=4096, seed=0):
    """Seed 003's PCA basis (mean, components, sigma): latent_pca of the posterior means μ of the
    training images. A GAN has no encoder, so for GANs: latent_pca of n_noise draws z ~ N(0, I).
    That cloud is isotropic: its components are random orthogonal directions of nearly equal
    variance, so their order means little (the page and the command say so)."""
    if "vae" in nets:
        return latent_pca(encode_dataset(nets["vae"], train_images)[0])
    g = torch.Generator().manual_seed(seed)
    return latent_pca(torch.randn(n_noise, models.latent_dim(nets), generator=g))


def explorer_about(run, cfg, n_train, latent_size):
    """What the explorer page says about a run: its facts, and how to read the components
    (n_train: the training images the PCA saw; None for a GAN's sampled z)."""
    folder, step, (H, W) = run_folder(run), cfg.get("trained_steps"), cfg["image_size"]
    try:  # the epoch of the checkpoint's step: its metrics.csv row
        with open(os.path.join(folder, "metrics.csv"), newline="") as f:
            epoch = ([r["epoch"] for r in csv.DictReader(f) if int(r["step"]) <= step] or ["0"])[-1]
    except (OSError, KeyError, TypeError, ValueError):
        epoch = "?"
    if n_train is None:
        basis = (f"This GAN has no encoder, so the components are those of 4096 draws z ~ N(0, I): an "
                 f"isotropic cloud, where each of the {latent_size} directions has about the same variance, "
                 f"so the components are random orthogonal directions and their order means little.")
    else:
        basis = (f"The components are the principal axes of the codes μ of the {n_train} training images "
                 f"(seed 003), largest variance first; a slider moves the face along one, in units of "
                 f"that component's standard deviation σ.")
    return {"model": cfg["model"], "basis": basis,
            "help": basis + " The strip above each slider shows the face at its ticks (click one to go "
                            "there). Pick a start face; the address bar is a permalink.",
            "facts": [["run", os.path.abspath(folder)], ["model", cfg["model"]],
                      ["checkpoint", os.path.basename(cfg["checkpoint"])], ["epoch", f"{epoch} (step {step})"],
                      ["latent size", str(latent_size)], ["image", f"{H}×{W}"]]}


def cmd_pca(args):
    """Seed 003's latent PCA: row j walks principal component j of the training codes from −range
    to +range of its std (columns), the other components at the mean code. GANs have no encoder:
    their components are those of sampled z ~ N(0, I). --serve then opens the slider explorer on
    127.0.0.1: start from a held-out test face (or noise) and move it along the components."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    nets, cfg = open_run(args)
    train_images, test_images = run_images(cfg) if "vae" in nets else (None, None)
    mean, components, sigma = fit_pca(nets, train_images, seed=args.seed)
    K = min(args.components, len(sigma))
    images, rows, cols = pca_traversal(nets, (mean, components, sigma), K, args.steps, args.range)
    path = save(images, args, "pca.png", args.steps, row_labels=rows, col_labels=cols)
    about = explorer_about(args.run, cfg, None if train_images is None else len(train_images), len(mean))
    if train_images is None:
        print(about["basis"])
    share = sigma ** 2 / (sigma ** 2).sum()
    print("variance explained: " + ", ".join(f"PC{j + 1} {100 * share[j]:.1f}%" for j in range(K)))
    if args.serve:
        explorer = Explorer(nets, (mean, components, sigma), about, test_images, K, args.range, args.size)
        server = make_server(explorer, port=args.port)
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
    frames = data.epoch_frames(os.path.join(folder, "samples"))  # by epoch number; strays ignored
    if not frames:
        raise UsageError(f"no samples/epoch_NNN.png in {folder}")
    path = out_path(args, "progress.gif")
    kept = data.save_gif(frames, path, duration_ms=[args.duration_ms] * (len(frames) - 1) + [args.hold_last_ms])
    print(f"wrote {path} ({kept} frames)")
    return path


def evaluate(nets, cfg, n=512, k=16, seed=0, patches=128, projections=512, draws=4):
    """The SPEC's metrics (no downloaded weights) -> report dict. n samples z ~ N(0, I) against the
    first n test images, beside the floor: a training subset of the same size against them.
    SWD is averaged over `draws` draws (seeds seed, seed + 1, ...), each with its own samples,
    floor subset, patches and directions: one draw of 512 images swings by a third (the floor at
    32x32 drew 43.1, 27.2, 28.4, 28.7 for seeds 0-3); ratio_each keeps each draw's model/floor.
    nearest_train_rms: samples' and test images' distance to their nearest training image; a
    ratio well below 1 means copying (or blur toward the mean face: look at the samples).
    likelihood (VAEs): test −ELBO and −L_k in bits/dim = nats / (D ln 2), D = 3 H W, of the
    density of x in [-1, 1]^D under N(x_hat, σ² I), σ from likelihood_std; negative values are
    possible for a small σ. On an 8-bit [0, 256) scale add log2(127.5) ≈ 7 bits/dim."""
    train_x, test_x = run_images(cfg)
    n = min(n, len(test_x), len(train_x))
    if n < 2:
        raise UsageError("evaluate needs at least 2 test and 2 training images")
    dev = next(nets.parameters()).device
    real, each = to_float(test_x[:n], dev), []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        floor = to_float(train_x[torch.randperm(len(train_x), generator=g)[:n]], dev)
        fake = decode(nets, torch.randn(n, models.latent_dim(nets), generator=g)).to(dev)
        each.append([swd_pyramid(x, real, torch.Generator().manual_seed(seed + d), patches, projections)
                     for x in (fake, floor)])                                 # [model, floor] per level
        if d == 0:                                                               # the first draw's samples
            near = [nearest_rms(x, train_x) for x in (fake, real)]
    swd = [[sum(levels) / draws for levels in zip(*(e[i] for e in each))] for i in (0, 1)]
    H, W = cfg["image_size"]
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"], "n": n,
              "seed": seed, "swd_x1e3": {"level_px": [H >> i for i in range(len(swd[0]))], "draws": draws,
                                         "samples_vs_test": swd[0], "train_vs_test": swd[1],
                                         "samples_vs_test_mean": sum(swd[0]) / len(swd[0]),
                                         "train_vs_test_mean": sum(swd[1]) / len(swd[1]),
                                         "ratio_each": [sum(m) / sum(f) for m, f in each]},
              "nearest_train_rms": {"samples_median": near[0].median().item(), "samples_mean": near[0].mean().item(),
                                    "test_median": near[1].median().item(), "test_mean": near[1].mean().item(),
                                    "ratio_median": (near[0].median() / near[1].median()).item()}}
    if "vae" in nets and nets["vae"].variational:
        sigma, bpd = likelihood_std(cfg), lambda nats: nats / (3 * H * W * math.log(2))
        elbo, iw = likelihood_bounds(nets["vae"], test_x[:n], sigma, k, seed)
        report["likelihood"] = {"obs_std": sigma, "k": k, "neg_elbo_nats": elbo, "neg_iw_nats": iw,
                                "neg_elbo_bpd": bpd(elbo), "neg_iw_bpd": bpd(iw)}
    return report


# -----------------------------------------------------------------------------
# Measured control of a conditional model: classification accuracy score (CAS) per requested label.

def train_classifier(images, labels, classes, epochs=5, seed=0, batch=128, lr=1e-3):
    """models.Classifier fitted to labelled real images (uint8, h-flip augmentation): Adam, the
    cross-entropy of each attribute summed. Returns it in eval mode."""
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
    out = [torch.stack([l.argmax(1) for l in clf(x[i:i + batch].cpu())], 1) for i in range(0, len(x), batch)]
    return torch.cat(out)


def control(nets, cfg, n=256, epochs=5, seed=0):
    """How reliably generated faces carry the requested labels (classification accuracy score,
    Ravuri & Vinyals 2019, read the other way round: a classifier trained on real faces judges
    generated ones). 1. a models.Classifier learns the run's training images and labels;
    2. on the held-out test images, its accuracy per attribute value (recall: of the faces with
    value v, the share it reads as v) -- how well the attribute can be read at all; 3. for every
    attribute k and value v, n faces generated with y_k = v (the other attributes copied from
    random test labels, so they follow the data) and the share it reads as v. Each attribute's
    'balanced' figure is the mean over its values, for real and generated faces alike, so a
    rare value (glasses: 15%) counts as much as a common one."""
    if not cfg.get("labels"):
        raise UsageError("control needs a conditional run (train.py --conditional)")
    train_x, test_x = run_images(cfg)
    train_y, test_y, info = data.run_labels(cfg)
    classes = models.label_classes(info)
    clf = train_classifier(train_x, train_y, classes, epochs, seed)
    read = predict(clf, to_float(test_x))
    g = torch.Generator().manual_seed(seed)
    report = {"run": cfg["checkpoint"], "model": cfg["model"], "trained_steps": cfg["trained_steps"],
              "classifier_epochs": epochs, "n_per_value": n, "n_test": len(test_x), "attributes": {}}
    for k, (attr, values) in enumerate(info.items()):
        real_acc = (read[:, k] == test_y[:, k]).float().mean().item()
        per_value = {}
        for v, name in enumerate(values):
            has = test_y[:, k] == v
            y = test_y[torch.randint(len(test_y), (n,), generator=g)]
            y[:, k] = v
            z = torch.randn(n, models.latent_dim(nets), generator=g)
            got = predict(clf, decode(nets, z, y))[:, k]
            per_value[name] = {"n_test": int(has.sum()),
                               "real": (read[has, k] == v).float().mean().item() if has.any() else None,
                               "generated": (got == v).float().mean().item()}
        real_vals = [p["real"] for p in per_value.values() if p["real"] is not None]
        report["attributes"][attr] = {
            "real_accuracy": real_acc, "values": per_value,
            "real_balanced": sum(real_vals) / len(real_vals),
            "generated_balanced": sum(p["generated"] for p in per_value.values()) / len(per_value)}
    return report


def cmd_control(args):
    """Write control.json and print, per attribute and value, the classifier's accuracy on
    held-out real faces and on faces generated for that value: see control()."""
    nets, cfg = open_run(args)
    r = control(nets, cfg, args.n, args.epochs, args.seed)
    path = out_path(args, "control.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f, indent=2)
    print(f"  {'attribute = value':30s} {'real (test)':>12s} {'generated':>10s}   classifier: {args.epochs} epochs")
    for attr, a in r["attributes"].items():
        for name, p in a["values"].items():
            real = "n/a" if p["real"] is None else f"{100 * p['real']:.1f}%"
            print(f"  {attr + ' = ' + name:30s} {real:>12s} {100 * p['generated']:9.1f}%   ({p['n_test']} test faces)")
        print(f"  {attr + ', balanced':30s} {100 * a['real_balanced']:11.1f}% {100 * a['generated_balanced']:9.1f}%   "
              f"(plain accuracy on test faces {100 * a['real_accuracy']:.1f}%)")
    print(f"wrote {path}")
    return path


def cmd_evaluate(args):
    """Write evaluate.json and print a table: see evaluate()."""
    nets, cfg = open_run(args)
    r = evaluate(nets, cfg, args.n, args.k, args.seed, args.patches, args.projections, args.draws)
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
    title = f"{r['model']}: {r['n']} samples / test / training images, SWD over {s['draws']} draws"
    print(f"  {title:44s} {'model':>10s} {'real floor':>10s}")
    for name, v, floor in rows:
        print(f"  {name:44s} {v:10.4g} {'' if floor is None else format(floor, '10.4g'):>10s}")
    print(f"  SWD ratio model/floor per draw: {', '.join(f'{x:.2f}' for x in s['ratio_each'])}")
    print(f"  nearest-train ratio samples/test {nn['ratio_median']:.3f} (< 1: closer to training faces than "
          f"held-out faces are)\nwrote {path}")
    return path


# -----------------------------------------------------------------------------
# The results gallery: the pictures and figures above for many runs, and the Markdown that
# shows them (the README's Results section). One function per picture, shared with the commands.

def pca_traversal(nets, basis, K, steps, span):
    """Seed 003's PCA grid and its labels -> (images, row labels, column labels): row j walks
    component j of basis = (mean, components, sigma) from -span to +span of its std, the other
    components at the mean code. Rows are labelled with the component's share of the variance."""
    mean, components, sigma = basis
    K, c = min(K, len(sigma)), torch.linspace(-span, span, steps)
    coeffs = torch.zeros(K, steps, K)
    coeffs[torch.arange(K), :, torch.arange(K)] = c
    share = sigma ** 2 / (sigma ** 2).sum()
    rows = [f"PC{j + 1}\n{100 * share[j]:.1f}% var" for j in range(K)]
    cols = [f"{v:+.3g}\nsd" if v else "mean" for v in c.tolist()]
    return decode(nets, from_pca(mean, components, sigma, coeffs.flatten(0, 1))), rows, cols


def epoch_seconds(rows, cfg):
    """metrics.csv rows -> (each epoch's images over its measured rate, all of them at the best
    rate). A row completed after an interruption timed only its resumed part: its seconds alone
    would undercount the epoch, its rate does not."""
    steps = [int(r["step"]) for r in rows]
    images = [(s - p) * cfg["batch_size"] * train.steps_per_update(cfg) for s, p in zip(steps, [0] + steps[:-1])]
    rates = [float(r["images_per_s"]) for r in rows]
    secs = [n / v if v > 0 else float(r["seconds"]) for n, v, r in zip(images, rates, rows)]
    return secs, sum(images) / max(max(rates), 1e-9)


def train_command(cfg):
    """The train.py command that reproduces a run: --model and every flag whose value differs from
    that model's seed defaults (config.json holds every resolved flag; the run's output folder
    --out is part of it; --resume, --quiet and --device are not)."""
    base, cfg = train.resolve(train.parse_args(["--model", cfg["model"]])), {**train.BEFORE_FLAG, **cfg}
    skip = {"model", "resume", "quiet", "device", "benchmark", "bench_steps", "family", "data_fingerprint"}
    words = ["python train.py --model", cfg["model"]]
    for k, v in cfg.items():
        if k in skip or k not in base or v is None or json.dumps(v) == json.dumps(base[k]):
            continue
        flag = "--" + k.replace("_", "-")
        if k in ("channels_last", "fused_adam") and not v:  # unset: train.resolve_speed's choice
            continue
        if k == "betas":
            words += [f"--beta{i + 1} {b:g}" for i, (b, b0) in enumerate(zip(v, base[k])) if b != b0]
        elif k == "image_size":
            words.append(f"{flag} {v[0]}" if v[0] == v[1] else f"{flag} {v[0]}x{v[1]}")
        elif isinstance(v, bool):
            words.append(flag if v else "--no-" + flag[2:])
        else:
            words.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(words)


def machine():
    """This machine in words: the GPU, or the CPU as train.py's speed notes describe it."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else train.describe_cpu()


def test_bits_per_dim(cfg, rows):
    """A VAE's test -ELBO of each metrics.csv row in bits/dim, at evaluate's sigma (likelihood_std):
    the logged test recon re-expressed as -log N(x; x_hat, sigma^2 I), plus the test KL."""
    (H, W), sigma = cfg["image_size"], likelihood_std(cfg)
    D = 3 * H * W
    out = []
    for r in rows:
        recon, kl = float(r["test_recon"]), float(r["test_kl"])
        if cfg["recon"] != "gnll":  # squared error per image -> the Gaussian NLL at sigma
            sq = recon * D if cfg["recon"] == "mse-mean" else recon
            recon = sq / (2 * sigma ** 2) + D / 2 * math.log(2 * math.pi * sigma ** 2)
        out.append((recon + kl) / (D * math.log(2)))
    return out


def goal(cfg, report, bpd):
    """What a run reached against issue 17's goals: a GAN's SWD within 1.25x of the real-vs-real
    floor at 32x32 (1.5x at 64x64); a VAE's test bits/dim plateaued: the last 3 epochs took under
    5% of the run's whole fall."""
    said = []
    if cfg["family"] in ("adversarial", "wasserstein", "vaegan"):
        s = report["swd_x1e3"]
        target = 1.25 if max(cfg["image_size"]) <= 32 else 1.5
        ratio = s["samples_vs_test_mean"] / s["train_vs_test_mean"]
        said.append(f"SWD {ratio:.2f}x floor: {'reached' if ratio <= target else 'not reached'} (goal {target}x)")
    if "likelihood" in report and len(bpd) >= 4:
        last, total = bpd[-4] - bpd[-1], bpd[0] - bpd[-1]
        share = last / total if total > 0 else float("inf")
        trend = "plateaued" if 0 <= share < 0.05 else "still falling" if last > 0 else "rising"
        of_fall = f", {100 * share:.1f}% of the run's fall" if total > 0 else f", {-total:+.3g} over the whole run"
        said.append(f"test bits/dim {trend}: {-last:+.3g} over the last 3 epochs{of_fall}")
    elif "likelihood" in report:
        said.append("bits/dim: too few epochs to tell a plateau")
    return "; ".join(said) or "no goal set (not a GAN, no likelihood)"


def gallery_run(run, args, pca_run):
    """One run's pictures into args.out (PNG) and its figures (a dict, also NAME.json there)."""
    folder = run_folder(run)
    name = os.path.basename(os.path.normpath(folder))
    nets, cfg = load_run(run, args.checkpoint, "cuda" if args.device == "cuda" or
                         (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    rows = train.read_metrics(os.path.join(folder, "metrics.csv"))
    points = train.read_metrics(os.path.join(folder, "steps.csv"))
    if not rows:
        raise UsageError(f"{folder} has no metrics.csv rows: train it for an epoch first")
    pics, out = {}, lambda kind: os.path.join(args.out, f"{name}_{kind}.png")
    count = 32 if max(cfg["image_size"]) <= 32 else 16                   # 64 px grids: keep docs/ small
    z = torch.randn(count, models.latent_dim(nets), generator=torch.Generator().manual_seed(args.seed))
    data.save_grid(decode(nets, z), out("samples"), nrow=8, title=f"{name}: z ~ N(0, I), epoch {rows[-1]['epoch']}")
    pics["samples"] = out("samples")
    if "vae" in nets:
        train_x, test_x = run_images(cfg)
        x, labels = reconstruction_rows(nets, test_x[:8], 8)
        data.save_grid(x, out("recon"), nrow=8, row_labels=labels, title=f"{name}: held-out test images")
        pics["recon"] = out("recon")
        if cfg["model"] == "vae-lrelu":
            stds = [0.25 * i for i in range(1, 9)]
            x, labels = std_sweep(nets, 8, stds, args.seed)
            data.save_grid(x, out("std_sweep"), nrow=8, row_labels=labels, title="z = std x eps, one eps per column")
            pics["std_sweep"] = out("std_sweep")
        if pca_run and os.path.samefile(folder, pca_run):
            x, row_labels, col_labels = pca_traversal(nets, fit_pca(nets, train_x), 6, 7, 3.0)
            data.save_grid(x, out("pca"), nrow=7, row_labels=row_labels, col_labels=col_labels,
                           title=f"{name}: principal components of the training codes")
            pics["pca"] = out("pca")
    data.plot_losses(rows, out("loss"), points, train.loss_units(cfg))
    pics["loss"] = out("loss")
    report = gallery_evaluate(nets, cfg, args, os.path.join(args.out, f"{name}.json"))
    bpd = test_bits_per_dim(cfg, rows) if "likelihood" in report else []
    secs, at_best = epoch_seconds(rows, cfg)
    command = train_command({**cfg, "out": folder})   # into the folder it is shown from, wherever it trained
    facts = {"name": name, "model": cfg["model"], "command": command, "epochs": int(rows[-1]["epoch"]),
             "steps": int(rows[-1]["step"]), "wall_s": sum(secs), "at_best_rate_s": at_best,
             "test_bits_per_dim_by_epoch": bpd, "goal": goal(cfg, report, bpd), "evaluate": report,
             "pictures": {k: os.path.basename(v) for k, v in pics.items()}}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(facts, f, indent=2)
    print(f"{name}: {facts['goal']}")
    return facts, cfg


def gallery_evaluate(nets, cfg, args, cached):
    """evaluate() of the run, or the figures of an earlier gallery of the very same checkpoint
    (same bytes, same --n, --seed and --draws) found in `cached`: evaluation is the slow part."""
    with open(cfg["checkpoint"], "rb") as f:
        key = [hashlib.blake2b(f.read(), digest_size=16).hexdigest(), args.n, args.seed, args.draws]
    try:
        with open(cached) as f:
            old = json.load(f)["evaluate"]
        if old["gallery_key"] == key and not args.fresh:
            return old
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return dict(evaluate(nets, cfg, args.n, seed=args.seed, draws=args.draws), gallery_key=key)


def gallery_markdown(entries, pictures, where, machine_text):
    """The Results section: one table of figures, one of commands, then each run's pictures
    (in the folder `pictures`), linked relative to the folder `where` the Markdown will live in."""
    link = lambda name: os.path.relpath(os.path.join(pictures, name), where).replace(os.sep, "/")
    minutes = lambda s: f"{int(s // 60)} min {int(s % 60):02d} s"
    cfg, n = entries[0][1], entries[0][0]["evaluate"]["n"]
    source = f"`{cfg['data']}`" if cfg.get("data") else f"the built-in synthetic faces ({cfg['n_synthetic']} drawn)"
    split = f"{100 * (1 - cfg['test_fraction']):.0f}/{100 * cfg['test_fraction']:.0f}"
    lines = [f"Trained on {source}, {split} train/test split, on {machine_text}. Wall time: each epoch's "
             f"images over its measured rate (metrics.csv), summed (in brackets, all of them at the best epoch's rate: "
             f"the machine was shared with other work). Figures from `python facegen.py evaluate RUN` on {n} samples and as many held-out "
             f"test images: sliced Wasserstein distance (x1e3, mean over the Laplacian-pyramid levels) beside the "
             f"real-vs-real floor (training vs test images) and their ratio, overall and per level, each the mean over "
             f"{entries[0][0]['evaluate']['swd_x1e3']['draws']} draws (its own samples, floor subset, patches and "
             f"directions; in brackets the lowest and highest draw's ratio: one draw is not enough); test -ELBO "
             f"and the k=16 importance-weighted bound in bits/dim (VAEs); the nearest-training-image ratio (median "
             f"distance of samples to their nearest training image over that of test images: near 1, no copying).",
             "", "| run | size | epochs (steps) | wall time | SWD x1e3 (floor) | ratio | per level | "
                 "bits/dim -ELBO (IW) | nearest-train | against the goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for facts, cfg in entries:
        r, s = facts["evaluate"], facts["evaluate"]["swd_x1e3"]
        levels = ", ".join(f"{px} px {a / b:.2f}x" for px, a, b in
                           zip(s["level_px"], s["samples_vs_test"], s["train_vs_test"]))
        lik = r.get("likelihood")
        done = f"{facts['epochs']}" + (f" of {cfg['epochs']}" if facts["epochs"] < cfg["epochs"] else "")
        cells = [facts["name"], "x".join(map(str, cfg["image_size"])), f"{done} ({facts['steps']})",
                 f"{minutes(facts['wall_s'])} ({minutes(facts['at_best_rate_s'])})",
                 f"{s['samples_vs_test_mean']:.1f} ({s['train_vs_test_mean']:.1f})",
                 f"{s['samples_vs_test_mean'] / s['train_vs_test_mean']:.2f}x "
                 f"({min(s['ratio_each']):.2f}-{max(s['ratio_each']):.2f})", levels,
                 f"{lik['neg_elbo_bpd']:.3f} ({lik['neg_iw_bpd']:.3f})" if lik else "-",
                 f"{r['nearest_train_rms']['ratio_median']:.2f}", facts["goal"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| run | command |", "| --- | --- |"]
    lines += [f"| {facts['name']} | `{facts['command']}` |" for facts, _ in entries]
    captions = {"samples": "samples", "recon": "test images over their reconstructions",
                "std_sweep": "std sweep (seed 003 figs 12-13)", "pca": "latent PCA traversal (seed 003)"}
    for facts, _ in entries:
        pics = facts["pictures"]
        lines += ["", f"**{facts['name']}** ({facts['model']}): {facts['goal']}; [loss curves]({link(pics['loss'])})",
                  "", " ".join(f"![{facts['name']} {captions[k]}]({link(v)})" for k, v in pics.items() if k != "loss")]
    return "\n".join(lines) + "\n"


def cmd_gallery(args):
    """Regenerate the results gallery from run folders: for each run a sample grid, for
    autoencoders a labelled reconstruction grid, for seed 003's VAE (vae-lrelu) the std sweep,
    for one VAE (--pca) the PCA traversal, its loss curves, and `evaluate`'s figures with the
    run's command, epochs and wall time. Writes the PNGs, NAME.json per run and results.md
    (Markdown for the README's Results section; --readme also replaces the block between
    <!-- gallery --> and <!-- /gallery --> in that file)."""
    os.makedirs(args.out, exist_ok=True)
    folders = [run_folder(r) for r in args.runs]
    models_of = {}
    for f in folders:
        try:
            with open(os.path.join(f, "config.json")) as fh:
                models_of[f] = json.load(fh)["model"]
        except (OSError, ValueError, KeyError, TypeError):
            models_of[f] = None
    pca_run = ([f for f in folders if os.path.basename(os.path.normpath(f)) == args.pca] if args.pca else
               [f for f in folders if models_of[f] == "vae-lrelu"] or
               [f for f in folders if models.FAMILY.get(models_of[f]) == "autoencoder" and models_of[f] != "ae"])
    if args.pca and not pca_run:
        raise UsageError(f"--pca {args.pca}: no run folder of that name among RUN")
    entries = [gallery_run(r, args, pca_run[0] if pca_run else None) for r in args.runs]
    machine_text = args.machine or machine()
    path = os.path.join(args.out, "results.md")
    with open(path, "w") as f:
        f.write(gallery_markdown(entries, args.out, args.out, machine_text))
    print(f"wrote {path}")
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        start = text.find("\n<!-- gallery -->\n") + 1  # markers on lines of their own
        end = text.find("\n<!-- /gallery -->", start) + 1
        if not 0 < start < end:
            raise UsageError(f"{args.readme} has no <!-- gallery --> ... <!-- /gallery --> block (each on its own line)")
        block = gallery_markdown(entries, args.out, os.path.dirname(os.path.abspath(args.readme)), machine_text)
        with open(args.readme, "w") as f:
            f.write(text[:start] + "<!-- gallery -->\n" + block + text[end:])
        print(f"updated {args.readme}")
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
    "gallery": (cmd_gallery, "the README's results gallery from run folders: pictures, figures, Markdown"),
    "attributes": (cmd_attributes, "conditional runs: rows = the values of one attribute, columns = the same z"),
    "control": (cmd_control, "conditional runs: does a classifier trained on real faces read the requested labels?"),
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
    net.add_argument("--seed", type=train.seed, default=0, help="seeds every random draw")
    s = {}
    for name, (fn, short) in COMMANDS.items():
        parents = [net] if name == "gallery" else [run] if name == "gif" else [run, net]
        s[name] = sub.add_parser(name, parents=parents, help=short,
                                 description=fn.__doc__, formatter_class=Help)
        s[name].set_defaults(fn=fn)
    s["sample"].add_argument("--n", type=positive(int), default=64, help="number of faces")
    s["sample"].add_argument("--std", type=non_negative, default=1.0, help="std of z (< 1: closer to the centre)")
    s["sample"].add_argument("--nrow", type=positive(int), default=8, help="faces per grid row")
    s["sample"].add_argument("--label", help="conditional runs: fixed labels, e.g. hair=blond,glasses=yes")
    s["attributes"].add_argument("--attr", required=True, help="the attribute whose values make the rows")
    s["attributes"].add_argument("--n", type=positive(int), default=8, help="columns: draws of z")
    s["attributes"].add_argument("--label", help="values of the other attributes (default: their first)")
    s["control"].add_argument("--n", type=positive(int), default=256, help="generated faces per attribute value")
    s["control"].add_argument("--epochs", type=positive(int), default=5, help="classifier training epochs")
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
    s["pca"].add_argument("--range", type=non_negative, default=3.0, help="grid and sliders: from -range to +range std")
    s["pca"].add_argument("--serve", action="store_true", help="then serve the slider explorer on 127.0.0.1")
    s["pca"].add_argument("--port", type=int, default=8000, help="explorer port, 0..65535 (0: any free port)")
    s["pca"].add_argument("--size", type=positive(int), default=256, help="explorer face height in pixels")
    s["gif"].add_argument("--duration-ms", type=positive(int), default=200, help="time per frame")
    s["gif"].add_argument("--hold-last-ms", type=positive(int), default=2000, help="time on the last frame")
    s["evaluate"].add_argument("--n", type=positive(int), default=512, help="samples and test images compared")
    s["evaluate"].add_argument("--k", type=positive(int), default=16, help="importance samples per test image (VAEs)")
    s["evaluate"].add_argument("--patches", type=positive(int), default=128, help="7x7 patches per image and level")
    s["evaluate"].add_argument("--projections", type=positive(int), default=512, help="SWD random directions")
    for cmd in ("evaluate", "gallery"):
        s[cmd].add_argument("--draws", type=positive(int), default=4,
                            help="SWD averaged over this many draws of samples, floor subset, patches, directions")
    s["gallery"].add_argument("runs", metavar="RUN", nargs="+", help="run folders (or checkpoints)")
    s["gallery"].add_argument("--out", default="docs", help="folder for the PNGs, NAME.json and results.md")
    s["gallery"].add_argument("--n", type=positive(int), default=512, help="evaluate: samples and test images compared")
    s["gallery"].add_argument("--pca", help="the run (folder name) whose PCA traversal to draw (default: a vae-lrelu run)")
    s["gallery"].add_argument("--machine", help="where the runs trained, in words (default: this machine)")
    s["gallery"].add_argument("--readme", help="also write the Markdown into this file's <!-- gallery --> block")
    s["gallery"].add_argument("--fresh", action="store_true",
                              help="re-evaluate even when NAME.json holds this checkpoint's figures")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source line
    try:
        args.fn(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed after the checks (disk full, ...)
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
