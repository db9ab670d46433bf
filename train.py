"""train.py — one command trains every facegen model into a run folder.

    python train.py --model vae                      # seed 000's Wuga VAE on synthetic faces
    python train.py --model wgan-gp --data anime.zip # seed 002's WGAN-GP on a zip of faces
    python train.py --resume runs/vae                # continue exactly where it stopped

Read it top to bottom: the seeds' hyperparameters -> one optimizer update -> the step of each
family (autoencoder, GAN, VAE-GAN) -> the loop. Below the "Machinery" banner sits what a run
needs and a student can skip: the CLI, run setup, checkpoints, the NaN watch, signals, progress
and pictures, and the benchmark last.
"""
import argparse
import contextlib
import csv
import fcntl
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import data
import losses
import models

# -----------------------------------------------------------------------------
# The seeds' hyperparameters, one row per --model (SPEC "Models"); z sizes are models.DEFAULT_LATENT.
# A flag given on the command line wins.
SEED_DEFAULTS = {
    # seed 000 part 1 (Wuga): GNLL with observation sigma 0.01 + KL, Adam 1e-4, z 64, batch 64, 500 epochs
    "vae": dict(image_size="64", batch_size=64, lr=1e-4, epochs=500, recon="gnll", obs_std=0.01),
    # seed 000 part 3: VGG16 encoder/decoder, sigma 0.1, lr 1e-5, z 512
    "vae-vgg": dict(image_size="64", batch_size=64, lr=1e-5, epochs=500, recon="gnll", obs_std=0.1),
    # seed 001: ELBO = reconstruction + lambda*KL, lambda 1e-5, Adam 1e-3, z 64, random h-flip, 64x48.
    # The seed's lambdas (1e-3..1e-6) only make sense against a per-pixel *mean* MSE: we use that.
    "vae-in": dict(image_size="64x48", batch_size=64, lr=1e-3, epochs=30, recon="mse-mean",
                   kl_weight=1e-5, flip=True),
    # seed 003: autoencoder baseline (MSE), h-flip p=0.5 + colour jitter
    "ae": dict(image_size="64", batch_size=64, lr=1e-3, epochs=50, recon="mse", kl_weight=0.0,
               flip=True, jitter=0.1),
    # seed 003: VAE with KLD weight 0.2 / 0.1 / 0.01 relative to a summed MSE (0.1 generated best)
    "vae-lrelu": dict(image_size="64", batch_size=64, lr=1e-3, epochs=50, recon="mse", kl_weight=0.1,
                      flip=True, jitter=0.1),
    # seed 002 / 003 / 004: DCGAN, Adam 2e-4 betas (0.5, 0.999), batch 128, BCE (seed 004: --gan-loss ls);
    # seed 004's G step passes "the constructed fake batch in previous step" through D: --reuse-fakes
    "dcgan": dict(image_size="64", batch_size=128, lr=2e-4, betas=(0.5, 0.999), epochs=25,
                  gan_loss="bce", n_critic=1, reuse_fakes=True),
    # seed 002: WGAN, weight clipping 0.01, RMSProp 1e-4 (paper: 5e-5), n_critic 5, batch 128
    "wgan": dict(image_size="64", batch_size=128, lr=1e-4, epochs=50, optimizer="rmsprop",
                 gan_loss="wasserstein", n_critic=5, clip=0.01),
    # seed 002: WGAN-GP, lambda 10, n_critic 5 (seed also 2), Adam 1e-4 betas (0, 0.9), batch 128
    "wgan-gp": dict(image_size="64", batch_size=128, lr=1e-4, betas=(0.0, 0.9), epochs=50,
                    gan_loss="wasserstein", n_critic=5, gp_weight=10.0),
    # seed 002's future work, SN-GAN (Miyato et al. 2018): spectral norm on D + hinge loss. Of the
    # paper's Adam settings A-F (SN was robust across all), C: lr 2e-4, betas (0.5, 0.999), n_dis 1 --
    # one D step per G step, the cheapest on a CPU. Batch 64 and z 128 as in the paper.
    "sngan": dict(image_size="64", batch_size=64, lr=2e-4, betas=(0.5, 0.999), epochs=50,
                  gan_loss="hinge", n_critic=1),
    # seed 003: VAE-GAN: the seed-003 VAE + a 5-layer D; adversarial + MSE + KLD (0.01)
    "vaegan": dict(image_size="64", batch_size=64, lr=2e-4, betas=(0.5, 0.999), epochs=50,
                   recon="mse", kl_weight=0.01, gan_loss="bce", flip=True, jitter=0.1),
}
COMMON_DEFAULTS = dict(optimizer="adam", betas=(0.9, 0.999), kl_weight=1.0, recon_scale=1.0,
                       obs_std=1.0, recon="mse", gan_loss="bce", n_critic=1, clip=0.0,
                       gp_weight=0.0, flip=False, jitter=0.0, arch=None, critic_norm="none",
                       seed=0, n_synthetic=10000, test_fraction=0.2, log_every=20, quiet=False,
                       amp=False, channels_last=None, compile=False, benchmark=False,
                       grad_clip=None, checkpoint_every=None, max_steps=None, data=None, fused_adam=None,
                       adv_weight=1.0, conditional=False, attr_file=None, attrs=None, balance_labels=False, ema=0.0,
                       reuse_fakes=False)


# -----------------------------------------------------------------------------
# One update: the same four lines for every net of every model.

def optimizer_step(run, name, loss):
    """zero_grad -> backward -> (clip the global gradient norm) -> step, for net `name`.
    Returns the gradient norm when --grad-clip is set (it is then logged), else None.
    The backward computes `name`'s gradients only: G's loss passes through D, whose weight
    gradients would be thrown away (D's next update starts from zero): skipping them saves ~8 %
    of a DCGAN step (README "Per-step work"). Under DDP, see Run.passing_through."""
    opt, net, clip = run.opt[name], run.nets[name], run.cfg["grad_clip"]
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=run.params[name])
    norm = grad_norm(net, clip)
    run.watch(name, loss, norm)  # NaN/Inf bookkeeping on the device: no host sync per step
    opt.step()
    return norm if clip else None


# -----------------------------------------------------------------------------
# Autoencoders (ae, vae, vae-vgg, vae-in, vae-lrelu): maximise the ELBO.

def reconstruction(cfg, x, x_hat):
    """The reconstruction term: Gaussian NLL in nats (gnll), or squared error per image (mse),
    or per pixel (mse-mean, seed 001)."""
    if cfg["recon"] == "gnll":
        return losses.gaussian_nll(x, x_hat, cfg["obs_std"])
    err = losses.mse_recon(x, x_hat)
    return err / x[0].numel() if cfg["recon"] == "mse-mean" else err


def elbo_terms(cfg, x, x_hat, mu, logvar):
    """(loss, recon, kl): loss = recon_scale * recon + beta * KL, the negative ELBO (AE: KL = 0)."""
    recon = reconstruction(cfg, x, x_hat.float())
    kl = losses.kl_divergence(mu.float(), logvar.float()) if logvar is not None else torch.zeros((), device=x.device)
    return losses.elbo_loss(recon, kl, cfg["kl_weight"], cfg["recon_scale"]), recon, kl


def autoencoder_step(run, batches):
    """One update of the VAE on a batch x (labels y for a CVAE: q(z|x, y), p(x|z, y); else None)."""
    ((x, y),) = batches
    with run.autocast():
        x_hat, mu, logvar = run.fwd["vae"](x, run.noise(x.shape[0]), y)  # x̂ = Dec(μ + σ·ε [, y]), ε ~ N(0, I)
    loss, recon, kl = elbo_terms(run.cfg, x, x_hat, mu, logvar)      # −ELBO = recon + β·KL
    norm = optimizer_step(run, "vae", loss)
    return logged(loss=loss, recon=recon, kl=kl, grad_norm=norm)


# -----------------------------------------------------------------------------
# GANs (dcgan, wgan, wgan-gp, sngan): Algorithm 1 of Arjovsky et al. 2017 / Gulrajani et al. 2017.
# DCGAN (bce), LSGAN (ls), WGAN, WGAN-GP and SN-GAN (hinge; the spectral norm lives in its D) differ
# only in the loss pair losses.GAN_LOSSES [--gan-loss], n_critic, and what follows a critic update
# (--clip) or joins its loss (--gp-weight).

def critic_step(run, x, y, keep=False):
    """One update of D (the critic) on a real batch x and fresh z (conditional: both scored with
    the real batch's labels y, and the fakes drawn for them; else y is None). L_D by --gan-loss:
    bce: −E[log σ(D(x))] − E[log(1 − σ(D(x̃)))];  ls: E[(D(x) − 1)²] + E[D(x̃)²];
    wasserstein: E[D(x̃)] − E[D(x)];  hinge: E[relu(1 − D(x))] + E[relu(1 + D(x̃))].
    Returns (logged terms, x̃ with G's graph if keep [--reuse-fakes] else None)."""
    cfg, G, D = run.cfg, run.fwd["G"], run.fwd["D"]
    d_loss_fn, _ = losses.GAN_LOSSES[cfg["gan_loss"]]
    with torch.set_grad_enabled(keep), run.autocast():
        kept = G(run.noise(x.shape[0]), y)                             # x̃ = G(z [, y]), z ~ N(0, I)
    x_fake = kept.detach()                                             # D's update leaves G alone
    with run.autocast():
        d_real, d_fake = D(x, y).float(), D(x_fake, y).float()         # D(x [, y]), D(x̃ [, y])
    loss_d = d_loss_fn(d_real, d_fake)                                 # L_D
    gp = None
    if cfg["gp_weight"]:
        critic = lambda x_hat: run.penalty_critic(x_hat, y)            # noqa: E731 -- D(·, y)
        eps = run.noise(x.shape[0], 1, 1, 1, draw=torch.rand, dtype=x.dtype)   # ε ~ U[0, 1] per sample
        gp = losses.gradient_penalty(critic, x, x_fake.to(x.dtype), eps)  # E[(‖∇D(x̂)‖₂ − 1)²]
        loss_d = loss_d + cfg["gp_weight"] * gp                        #   L_D += λ·GP
    norm = optimizer_step(run, "D", loss_d)
    if cfg["clip"]:
        with torch.no_grad():
            for w in run.nets["D"].parameters():
                w.clamp_(-cfg["clip"], cfg["clip"])                    # w ← clip(w, −c, c)
    stats = logged(gp=gp, loss_d=loss_d, grad_norm_D=norm, **score_stats(cfg, d_real, d_fake))
    return stats, (kept if keep else None)


def generator_step(run, n, y, fakes=None):
    """One update of G on n fresh z (conditional: for the labels y), or on `fakes`, the last
    critic update's G(z) with its graph (--reuse-fakes). L_G by --gan-loss:
    bce (non-saturating): −E[log σ(D(G(z)))]; ls: E[(D(G(z)) − 1)²]; wasserstein, hinge: −E[D(G(z))]."""
    _, g_loss_fn = losses.GAN_LOSSES[run.cfg["gan_loss"]]
    with run.autocast(), run.passing_through("D"):
        if fakes is None:
            fakes = run.fwd["G"](run.noise(n), y)                      # G(z [, y]), z fresh
        d_gen = run.fwd["D"](fakes, y).float()                         # D(G(z [, y]) [, y])
    loss_g = g_loss_fn(d_gen)                                          # L_G
    norm = optimizer_step(run, "G", loss_g)
    run.average_generator()                                            # --ema: G_ema follows G
    return logged(loss_g=loss_g, grad_norm_G=norm)


def gan_step(run, batches):
    """n_critic critic updates, each on its own real batch, then one generator update (for the
    last batch's labels). The logged critic terms (loss_d, gp, D(x), D(G(z))) are the last's.
    --reuse-fakes (dcgan's default): G's update scores the last critic update's fakes (with the D
    just updated), as seed 004 and pytorch/examples do, instead of fresh z (Goodfellow et al. 2014
    and the WGAN papers, Algorithm 1): one G forward fewer per step, for G's graph held through
    D's update."""
    for i, (x, y) in enumerate(batches):
        critic, fakes = critic_step(run, x, y, keep=run.cfg["reuse_fakes"] and i == len(batches) - 1)
    x, y = batches[-1]
    return {**critic, **generator_step(run, x.shape[0], y, fakes)}


def score_stats(cfg, d_real, d_fake):
    """What D says of the batch: the Wasserstein estimate E[D(x)] − E[D(x̃)] (critic), the mean
    probabilities σ(D(x)), σ(D(x̃)) (bce: scores are logits), or the mean raw scores (ls: the
    targets are 1 for real, 0 for fake; hinge: the margins are +1, −1; neither are logits)."""
    if cfg["gan_loss"] == "wasserstein":
        return {"wasserstein": d_real.mean() - d_fake.mean()}
    p = torch.sigmoid if cfg["gan_loss"] == "bce" else (lambda s: s)
    return {"D(x)": p(d_real).mean(), "D(G(z))": p(d_fake).mean()}


# -----------------------------------------------------------------------------
# VAE-GAN (seed 003): the VAE's decoder is also a GAN generator.

def vaegan_step(run, batches):
    """D learns real x against reconstructions x̂ and decoded noise x_p; the VAE then minimises
    the adversarial term on the same x̂ and x_p plus its own −ELBO (conditional: all for labels y)."""
    ((x, y),) = batches
    n = x.shape[0]
    z_p = run.noise(n)                                                 # z_p ~ N(0, I)
    with run.autocast():
        x_hat, mu, logvar = run.fwd["vae"](x, run.noise(n), y)         # x̂ = Dec(μ + σ·ε [, y])
        x_p = run.nets["vae"].decode(z_p, y)                           # x_p = Dec(z_p [, y])
    fakes, y2 = torch.cat([x_hat, x_p]), None if y is None else torch.cat([y, y])
    d_out = vaegan_discriminator_step(run, x, y, fakes.detach(), y2)
    return {**d_out, **vaegan_vae_step(run, x, fakes, y2, x_hat, mu, logvar)}


def vaegan_discriminator_step(run, x, y, fakes, y2):
    """L_D = −E[log σ(D(x))] − E[log(1 − σ(D(x̂ ∪ x_p)))]: real -> 1, reconstructions and noise -> 0."""
    with run.autocast():
        d_real, d_fake = run.fwd["D"](x, y).float(), run.fwd["D"](fakes, y2).float()
    loss_d = losses.d_loss(d_real, d_fake)
    optimizer_step(run, "D", loss_d)
    return logged(loss_d=loss_d, **score_stats(run.cfg, d_real, d_fake[: x.shape[0]]))


def vaegan_vae_step(run, x, fakes, y2, x_hat, mu, logvar):
    """L_VAE = w·(−E[log σ(D(x̂ ∪ x_p))]) (fool D) + recon + β·KL (the VAE's −ELBO), w = --adv-weight.
    Scales: the adversarial term is a mean over images of order 1 (log 2 ≈ 0.69 when D is
    undecided); a summed MSE is of order 10²–10³ per image (0.1 per value x 3·64·64 values): at
    w = 1 (seed 003) the VAE barely hears D, w ~ 10²–10³ gives the two terms equal say."""
    with run.autocast(), run.passing_through("D"):
        d_gen = run.fwd["D"](fakes, y2).float()
    elbo, recon, kl = elbo_terms(run.cfg, x, x_hat, mu, logvar)
    adv = losses.g_loss(d_gen)                                         # non-saturating, as for G
    loss = run.cfg["adv_weight"] * adv + elbo                          # w·L_adv − ELBO
    optimizer_step(run, "vae", loss)
    return logged(loss=loss, adv=adv, recon=recon, kl=kl)


STEPS = {"autoencoder": autoencoder_step, "adversarial": gan_step, "wasserstein": gan_step,
         "vaegan": vaegan_step}


def logged(**terms):
    """The terms a step reports, detached (read back only when logged: no host sync per step)."""
    return {k: v.detach() for k, v in terms.items() if v is not None}


# -----------------------------------------------------------------------------
# The loop every family shares.

def train(run):
    """Batches -> the family's step -> meters; at the end of each epoch a metrics.csv row, the
    pictures and the checkpoints; progress.gif at the end."""
    cfg = run.cfg
    rows = [r for r in read_metrics(run.rows_path) if int(r["epoch"]) <= run.epoch]  # later rows: redone
    progress = Progress(run, cfg["quiet"] or not run.main)  # also the loss curve's points: steps.csv
    for steps, completes in epochs_to_run(run):
        t0, n_images = time.time(), 0
        for xs in steps:
            run.count(take_step(run, xs), len(xs))
            n_images += len(xs) * cfg["batch_size"]
            if run.stopping():  # Ctrl-C / SIGTERM arrived during the step: it is complete, save here
                raise KeyboardInterrupt
            if run.step % cfg["log_every"] == 0:
                run.check_finite()
                progress.update(run, n_images / max(time.time() - t0, 1e-9))
            if cfg["checkpoint_every"] and run.step % cfg["checkpoint_every"] == 0:
                run.checkpoint()
        progress.clear()
        end_epoch(run, rows, completes, time.time() - t0, n_images, progress.points)
        progress.mark(run)  # the epoch's sums restart: so does the next point's window
    if run.main:
        frames = data.epoch_frames(os.path.join(run.out, "samples"))
        if frames:
            data.save_gif(frames, os.path.join(run.out, "progress.gif"))
    return rows


def epochs_to_run(run):
    """The epochs left, as (steps, completes): `steps` yields each step's list of batches
    (n_critic of them for a GAN), `completes` says whether the epoch ends with them.

    Exact resume: an epoch starts at batch run.pos, so a run stopped mid-epoch (--max-steps,
    --checkpoint-every, a signal) continues with the very next batch. A run that stops at
    --max-steps mid-epoch still writes that epoch's row (marked by its step count) and keeps
    the epoch's sums, so a resume completes the same row. A checkpoint taken after an epoch's
    last step but before the epoch was closed yields that epoch once more, with no steps."""
    cfg, per_step, total = run.cfg, steps_per_update(run.cfg), total_steps(run)
    while run.epoch < cfg["epochs"]:
        fits = (len(run.batches) - run.pos) // per_step          # whole steps left in this epoch
        n = max(0, min(fits, total - run.step))
        if n == 0 and not (fits == 0 and run.pos > 0):
            return
        it = run.batches.epoch(run.epoch, start=run.pos)
        yield (list(itertools.islice(it, per_step)) for _ in range(n)), n == fits


def total_steps(run):
    """Optimizer steps of the whole run: --epochs of whole steps, or --max-steps if fewer."""
    total = run.cfg["epochs"] * (len(run.batches) // steps_per_update(run.cfg))
    return min(total, run.cfg["max_steps"] or total)


def steps_per_update(cfg):
    """Batches one optimizer step consumes: n_critic for GANs (a fresh real batch per critic step)."""
    return cfg["n_critic"] if cfg["family"] in ("adversarial", "wasserstein") else 1


def pair(batch):
    """A batch as (x, y): Batches yields x alone when it holds no labels (then y is None)."""
    return batch if isinstance(batch, tuple) else (batch, None)


def take_step(run, batches):
    """One step of the run's family on its batches, each made an (x, y) pair (y None without
    labels; NHWC first with --channels-last)."""
    pairs = [pair(b) for b in batches]
    if run.cfg["channels_last"]:
        pairs = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in pairs]
    return STEPS[run.cfg["family"]](run, pairs)


def end_epoch(run, rows, completes, seconds, n_images, points=()):
    """The metrics.csv row (train means, test losses, images/s), loss.png (the rows and the
    steps.csv points), the pictures, then best.pt (lowest test loss) and last.pt."""
    run.check_finite()
    row = {"epoch": run.epoch + 1, "step": run.step, **run.means(), **test_losses(run),
           "images_per_s": n_images / max(seconds, 1e-9), "seconds": seconds}
    if run.main:
        rows.append(row)
        write_metrics(run.metrics_path, rows)
        data.plot_losses(rows, os.path.join(run.out, "loss.png"), points, loss_units(run.cfg))
        write_pictures(run, run.epoch + 1)
        print(f"epoch {run.epoch + 1}/{run.cfg['epochs']} {fmt({k: v for k, v in row.items() if k != 'epoch'})}", flush=True)
    if completes:  # a partial epoch (--max-steps) keeps its sums: a resume completes its row
        run.epoch, run.pos = run.epoch + 1, 0
        run.meter, run.meter_n = {}, 0
    if row.get("test_loss", math.inf) < run.best:  # best.pt first: a kill between the two never
        run.best = row["test_loss"]                 # leaves best.pt behind last.pt
        run.checkpoint("best.pt")
    run.checkpoint("last.pt")


def loss_units(cfg):
    """Each logged term's quantity and unit: loss.png's y-axis labels (ASCII: pillow's default
    font has no Greek)."""
    recon = {"gnll": f"Gaussian NLL (sigma {cfg['obs_std']:g}), nats/image",
             "mse": "squared error/image (sum over pixels)",
             "mse-mean": "mean squared error/pixel"}[cfg["recon"]]
    units = {"recon": recon, "kl": "KL, nats/image", "grad_norm": "gradient L2 norm",
             "grad_norm_D": "gradient L2 norm", "grad_norm_G": "gradient L2 norm",
             "adv": "BCE -log D(x_hat, x_p), nats", "wasserstein": "E[D(x)] - E[D(G(z))], critic units",
             "gp": "(|grad D(x_mix)| - 1)^2"}
    if cfg["family"] in ("autoencoder", "vaegan"):
        weighted = cfg["kl_weight"] != 1 or cfg["recon_scale"] != 1
        loss = ("-ELBO, nats/image" if cfg["recon"] == "gnll" and not weighted
                else "recon (no KL)" if cfg["kl_weight"] == 0 and cfg["recon_scale"] == 1
                else f"{cfg['recon_scale']:g} recon + {cfg['kl_weight']:g} KL".removeprefix("1 "))
        units["loss"] = ("adv + " if cfg["family"] == "vaegan" else "") + loss
    d_loss, g_loss, score = {
        "bce": ("BCE, nats (real + fake)", "BCE -log D(G(z)), nats", "sigmoid(score), probability"),
        "ls": ("squared error (real + fake)", "squared error (D(G(z)) - 1)^2", "raw score (targets 1, 0)"),
        "hinge": ("E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]", "-E[D(G(z))], score units", "raw score (margins +1, -1)"),
        "wasserstein": ("E[D(G(z))] - E[D(x)]" + (" + lambda GP" if cfg["gp_weight"] else "") + ", critic units",
                        "-E[D(G(z))], critic units", None)}[cfg["gan_loss"]]
    units.update(loss_d=d_loss, loss_g=g_loss)
    if score:
        units["D(x)"] = units["D(G(z))"] = score
    return units


# =============================================================================
# Machinery: what a run needs and a reader of the algorithm can skip.
# =============================================================================

# -----------------------------------------------------------------------------
# Command line

# Flags that may change on --resume; any other flag must agree with the run's config.json.
# What a run recorded before a flag existed did, where that flag's default has since changed
# (--resume and the gallery's command read an old config.json through it).
BEFORE_FLAG = {"reuse_fakes": False}
RESUMABLE = {"epochs", "max_steps", "out", "device", "quiet", "log_every", "checkpoint_every",
             "resume", "benchmark", "bench_steps", "compile", "amp", "channels_last", "ema"}

# Family-specific flags and the families that use them; giving one to another family is refused
# (seed 003's VAE-GAN is BCE with one D step per VAE step, as the seed describes it).
_AE, _GAN = {"autoencoder", "vaegan"}, {"adversarial", "wasserstein"}
FAMILY_FLAGS = {"recon": _AE, "obs_std": _AE, "kl_weight": _AE, "recon_scale": _AE, "arch": _GAN,
                "critic_norm": _GAN, "gan_loss": _GAN, "n_critic": _GAN, "clip": _GAN, "gp_weight": _GAN,
                "ema": _GAN, "reuse_fakes": _GAN, "adv_weight": {"vaegan"}}


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def positive(kind):
    def parse(s):
        v = kind(s)
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
        return v
    return parse


def non_negative(s):
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def beta(s):
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def seed(s):
    v = int(s)
    if not 0 <= v < 2 ** 63 - 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63 - 1), got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a face VAE or GAN (seeds 000-004). Unset flags take the seed's value "
                    "for --model (see SEED_DEFAULTS in train.py and the README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--model", choices=sorted(SEED_DEFAULTS), help="what to train (required unless --resume)")
    g.add_argument("--data", default=None, help="folder or .zip of face images; default: built-in synthetic faces")
    g.add_argument("--n-synthetic", type=positive(int), default=None, help="how many synthetic faces to draw")
    g.add_argument("--image-size", default=None, help="int or HxW, e.g. 64 or 64x48 (default: the model's seed size)")
    g.add_argument("--epochs", type=positive(int), default=None, help="passes over the training set")
    g.add_argument("--max-steps", type=positive(int), default=None, help="stop after N optimizer steps (generator steps for GANs)")
    g.add_argument("--batch-size", type=positive(int), default=None, help="global batch size")
    g.add_argument("--lr", type=positive(float), default=None, help="learning rate (both nets for GANs)")
    g.add_argument("--latent-dim", type=positive(int), default=None, help="size of z")
    g.add_argument("--seed", type=seed, default=None, help="seeds weights, data split, order and augmentation")
    g.add_argument("--test-fraction", type=fraction, default=None, help="held-out part of the data (never trains)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present")
    g.add_argument("--out", default=None, help="run folder (default: runs/MODEL)")
    g.add_argument("--resume", default=None, help="run folder or checkpoint to continue exactly")
    g = p.add_argument_group("autoencoders (ae, vae*, vaegan)")
    g.add_argument("--recon", choices=["gnll", "mse", "mse-mean"], default=None,
                   help="reconstruction term: Gaussian NLL with --obs-std, summed squared error, or per-pixel mean")
    g.add_argument("--obs-std", type=positive(float), default=None, help="observation sigma of the Gaussian likelihood (seed 000 'var')")
    g.add_argument("--kl-weight", type=non_negative, default=None, help="beta / lambda on the KL term (seed 000 part 2: 10 or 50)")
    g.add_argument("--recon-scale", type=positive(float), default=None, help="factor on the reconstruction term (seed 000 part 2: 0.01 = NLL/100)")
    g = p.add_argument_group("GANs (dcgan, wgan, wgan-gp, sngan)")
    g.add_argument("--arch", choices=["classic", "seed002"], default=None, help="DCGAN layout: 5-layer 4x4 (seed 004) or linear + 5x5 (seed 002)")
    g.add_argument("--critic-norm", choices=["none", "layer"], default=None, help="wgan-gp critic normalisation (no BatchNorm)")
    g.add_argument("--gan-loss", choices=list(losses.GAN_LOSSES), default=None,
                   help="bce (non-saturating), ls (seed 004 MSE), wasserstein, hinge (SN-GAN)")
    g.add_argument("--n-critic", type=positive(int), default=None, help="critic steps per generator step, each on a fresh real batch")
    g.add_argument("--clip", type=non_negative, default=None, help="WGAN weight clipping c (critic weights kept in [-c, c])")
    g.add_argument("--gp-weight", type=non_negative, default=None, help="WGAN-GP lambda")
    g.add_argument("--ema", type=beta, default=None, metavar="DECAY",
                   help="keep G_ema, a moving average of G's weights with this decay (e.g. 0.999), and "
                        "draw samples from it; 0: off. May be added on --resume (it starts from G)")
    g.add_argument("--reuse-fakes", action=argparse.BooleanOptionalAction, default=None,
                   help="G's update scores the last critic update's fakes (seed 004, pytorch/examples), not "
                        "fresh z (Algorithm 1): one G forward fewer per step. Default: on for dcgan, off otherwise")
    g.add_argument("--optimizer", choices=["adam", "rmsprop"], default=None, help="optimizer for every net")
    g.add_argument("--beta1", type=beta, default=None, help="Adam beta1, in [0, 1)")
    g.add_argument("--beta2", type=beta, default=None, help="Adam beta2, in [0, 1)")
    g.add_argument("--adv-weight", type=non_negative, default=None,
                   help="vaegan: weight w of the adversarial term in w*L_adv + recon + beta*KL (seed 003: 1)")
    g = p.add_argument_group("conditional generation (every model)")
    g.add_argument("--conditional", action="store_true", default=None,
                   help="condition on labels: G/decoder take [z, one-hot y], the encoder y too (CVAE), "
                        "D is a projection D. Labels: the synthetic faces' hair/glasses/beard, else "
                        "subfolder names, or --attr-file")
    g.add_argument("--attr-file", default=None, help="CelebA-style list_attr_celeba.txt (±1 per attribute) for --data")
    g.add_argument("--attrs", type=lambda s: [a for a in s.split(",") if a], default=None,
                   help="comma-separated columns of --attr-file, e.g. Smiling,Male (default: all)")
    g.add_argument("--balance-labels", action="store_true", default=None,
                   help="draw the training images so every attribute's values are equally frequent "
                        "(rare ones repeat; an epoch is still one dataset's worth of draws)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flip p=0.5")
    g.add_argument("--jitter", type=non_negative, default=None, help="colour jitter strength (brightness/contrast/saturation)")
    g = p.add_argument_group("robustness and logging")
    g.add_argument("--grad-clip", type=positive(float), default=None, help="clip the global gradient norm (seed 000 part 3's exploding gradients)")
    g.add_argument("--checkpoint-every", type=positive(int), default=None, help="also write last.pt every N steps (mid-epoch resume)")
    g.add_argument("--log-every", type=positive(int), default=None, help="steps between progress lines and NaN checks")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress line, only the per-epoch summary")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", default=None,
                   help="bf16 autocast where bf16 is native (CUDA Ampere on; CPU with AVX512-BF16/AMX); elsewhere one note, then fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: what measured fastest on this device, see README Speed)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    g.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="one-kernel Adam update (default: on; off for a run recorded before it was)")
    g.add_argument("--benchmark", action="store_true", default=None,
                   help="time steady-state steps of the fast path against a plain eager baseline, print images/s and ratios, then exit")
    g.add_argument("--bench-steps", type=positive(int), default=None, help="timed steps per benchmark variant (default: 3 on CPU, 20 on CUDA)")
    return p.parse_args(argv)


def resolve(args):
    """Fill unset flags from the model's seed defaults; returns a plain dict (config.json)."""
    defaults = dict(COMMON_DEFAULTS, arch=models.DEFAULT_ARCH.get(args.model),
                    latent_dim=models.DEFAULT_LATENT[args.model], **SEED_DEFAULTS[args.model])
    cfg = {k: v for k, v in vars(args).items() if v is not None}
    cfg = {**vars(args), **defaults, **cfg}
    b1, b2 = cfg.pop("beta1", None), cfg.pop("beta2", None)
    cfg["betas"] = (cfg["betas"][0] if b1 is None else b1, cfg["betas"][1] if b2 is None else b2)
    cfg["out"] = cfg["out"] or os.path.join("runs", args.model)
    try:
        cfg["image_size"] = list(data.parse_size(cfg["image_size"]))
    except ValueError as e:
        raise UsageError(str(e))
    cfg["family"] = models.FAMILY[args.model]
    given = {k for k, v in vars(args).items() if v is not None}
    unused = [k for k, fams in FAMILY_FLAGS.items() if k in given and cfg["family"] not in fams]
    if unused:
        raise UsageError(f"--model {args.model} does not use " + ", ".join("--" + k.replace("_", "-") for k in unused))
    # flags that only mean something with another setting of this run
    for flag, needs, ok in (("beta1", "--optimizer adam", cfg["optimizer"] == "adam"),
                            ("beta2", "--optimizer adam", cfg["optimizer"] == "adam"),
                            ("fused_adam", "--optimizer adam", cfg["optimizer"] == "adam"),
                            ("obs_std", "--recon gnll", cfg["recon"] == "gnll"),
                            ("attr_file", "--conditional", cfg["conditional"]),
                            ("balance_labels", "--conditional", cfg["conditional"]),
                            ("attrs", "--conditional --attr-file", cfg["conditional"] and cfg["attr_file"]),
                            ("kl_weight", "a variational model (ae has no KL term)", args.model != "ae")):
        if flag in given and not ok:
            raise UsageError(f"--{flag.replace('_', '-')} only applies with {needs}; "
                             f"this run has --model {args.model} --optimizer {cfg['optimizer']}"
                             + (f" --recon {cfg['recon']}" if cfg["family"] in _AE else ""))
    return cfg


def config_from(args):
    """Resolve the flags, or on --resume take the run's config and refuse disagreeing flags."""
    if not args.resume:
        if not args.model:
            raise UsageError("--model is required (or --resume a run)")
        return resolve(args), None
    state = load_checkpoint(args.resume)
    saved = {**BEFORE_FLAG, **state["config"]}
    fresh = resolve(argparse.Namespace(**{**vars(args), "model": args.model or saved["model"]}))
    given = {"betas" if k in ("beta1", "beta2") else k for k, v in vars(args).items()
             if v is not None and k not in RESUMABLE}
    same = lambda a, b: json.dumps(a) == json.dumps(b)
    differ = [f"{k} {fresh[k]} (the run has {saved.get(k)})" for k in sorted(given)
              if not same(fresh[k], saved.get(k))]
    if differ:
        raise UsageError("--resume: these flags disagree with the run's config: " + "; ".join(differ))
    # a run saved before a flag existed resumes with that flag's default (the old behaviour)
    cfg = {**fresh, **saved, "resume": args.resume}
    cfg.update({k: v for k, v in vars(args).items() if k in RESUMABLE and v is not None})
    cfg["out"] = args.out or run_folder(args.resume)  # the folder given, wherever it was copied or moved
    return cfg, state


def run_folder(path):
    """A run folder itself, or the folder of a checkpoint file in it."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


# -----------------------------------------------------------------------------
# Run setup

def run_labels(cfg):
    """A conditional run's labels -> (train, test, info); records info ({attribute: values}) in
    cfg["labels"] (config.json), which facegen.py rebuilds the nets from. A resume must find the
    same attributes and values."""
    try:
        train_y, test_y, info = data.run_labels(cfg)
    except data.DataError as e:
        raise UsageError(str(e))
    if cfg.get("labels", info) != info:
        raise UsageError(f"the labels changed since this run started: now {info}, the run has {cfg['labels']}")
    cfg["labels"] = info
    return train_y, test_y, info


class Run:
    """Everything one training run holds: config, nets, optimizers, data, counters.

    `nets` are the plain modules: what the optimizers update and the checkpoints save.
    `fwd` are the callables the steps run forward passes through: the same modules, wrapped in
    DistributedDataParallel under torchrun (which all-reduces their gradients in backward) and/or
    torch.compile'd. Updates always go through optimizer_step(run, name, loss)."""

    def __init__(self, cfg, resume_state=None):
        self.cfg, self.out = cfg, cfg["out"]
        self.metrics_path = os.path.join(self.out, "metrics.csv")
        # the rows so far: the resumed run's (it may have been copied to another --out)
        self.rows_path = os.path.join(run_folder(cfg["resume"]), "metrics.csv") if cfg.get("resume") else self.metrics_path
        # --- device and processes (torchrun sets RANK / WORLD_SIZE)
        want = cfg["device"]
        if want == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA device is available")
        self.device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1:
            if cfg["batch_size"] % self.world:
                raise UsageError(f"--batch-size {cfg['batch_size']} is not divisible by {self.world} processes")
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        self.main = self.rank == 0
        resolve_speed(cfg, self.device, say=self.main)  # unset speed switches: this device's fastest
        # --- labels of a conditional run first: the nets' input sizes depend on the classes
        labels = run_labels(cfg) if cfg["conditional"] else None
        # --- nets and optimizers (nets first: an unsupported image size is refused before any data is decoded)
        torch.manual_seed(cfg["seed"])
        try:
            self.nets = models.build_model(cfg["model"], image_size=tuple(cfg["image_size"]),
                                           latent_dim=cfg["latent_dim"], arch=cfg["arch"],
                                           critic_norm=cfg["critic_norm"],
                                           classes=models.label_classes(cfg.get("labels")),
                                           ema=bool(cfg["ema"])).to(self.device)
        except ValueError as e:
            raise UsageError(str(e))
        per_rank = cfg["batch_size"] // self.world
        if per_rank < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.nets.modules()):
            raise UsageError(f"--model {cfg['model']} has BatchNorm, which needs at least 2 images per "
                             f"batch and process; this run has {per_rank}: use --batch-size >= {2 * self.world}")
        if cfg["channels_last"]:
            self.nets = self.nets.to(memory_format=torch.channels_last)
        if self.world > 1 and self.device.type == "cuda":  # batch statistics over the global batch
            self.nets = nn.SyncBatchNorm.convert_sync_batchnorm(self.nets)  # (CPU/gloo has no SyncBatchNorm)
        self.latent_dim = models.latent_dim(self.nets)
        trained = {k: m for k, m in self.nets.items() if k != "G_ema"}  # G_ema follows G, no optimizer
        self.opt = {k: self.make_optimizer(m.parameters()) for k, m in trained.items()}
        self.params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in trained.items()}
        self.fwd = trained
        if self.world > 1:
            self.fwd = {k: DistributedDataParallel(m) for k, m in trained.items()}
        if cfg["compile"]:
            self.fwd = {k: torch.compile(m) for k, m in self.fwd.items()}
        self.penalty_critic = self.fwd.get("D")  # what the WGAN-GP penalty differentiates through
        # --- data: decoded once (cached), split 80/20 by seed, batches drawn on the training device
        try:
            train_images, test = data.run_data(cfg, verbose=self.main and not cfg["benchmark"])
            data.check_enough(len(train_images), cfg["batch_size"] * steps_per_update(cfg))  # one step's batches
            if not len(test):
                raise data.DataError(f"the test split is empty ({len(train_images)} image(s) in all): "
                                     f"the held-out images give the test loss and the pictures; use more images")
        except data.DataError as e:
            raise UsageError(str(e))
        train_y, test_y = labels[:2] if labels else (None, None)
        self.batches = data.Batches(train_images, cfg["batch_size"], seed=cfg["seed"], flip=cfg["flip"],
                                    jitter=cfg["jitter"], device=self.device, rank=self.rank, world_size=self.world,
                                    labels=train_y, weights=data.balance_weights(train_y) if cfg["balance_labels"] else None)
        self.test_batches = data.Batches(test, min(cfg["batch_size"], max(len(test), 1)), seed=cfg["seed"],
                                         device=self.device, drop_last=False, labels=test_y)
        # --- the fixed z and test images of the per-epoch pictures (a private generator);
        # conditional: the samples take the labels of the first 64 test images, in turn
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        self.fixed_z = torch.randn(64, self.latent_dim, generator=gen).to(self.device)
        x, y = pair(next(iter(self.test_batches.epoch(0))))
        self.fixed_x, self.fixed_y = x[:8], None if y is None else y[:8]
        self.sample_y = None if test_y is None else test_y[torch.arange(64) % len(test_y)].to(self.device)
        # --- counters, meters, the NaN watch, signals
        self.epoch, self.pos, self.step, self.best = 0, 0, 0, math.inf
        self.meter, self.meter_n = {}, 0
        self.first_bad = {}  # net -> [first step with a non-finite loss, ... gradient] (device)
        self.term_bad = {}   # logged term -> first step it was not finite (device)
        self.stop = []       # signals received; the loop stops after the step in flight
        if resume_state is not None:
            self.load_state(resume_state)

    def noise(self, n, *shape, draw=torch.randn, dtype=None):
        """n draws of N(0, I) in latent space (or of `draw`, e.g. torch.rand, with `shape`): this
        rank's slice of one draw for the global batch, so N processes see exactly the noise one
        process would (and 1 process: a plain draw)."""
        eps = draw(n * self.world, *(shape or (self.latent_dim,)), device=self.device, dtype=dtype)
        return eps[self.rank * n:(self.rank + 1) * n]

    def make_optimizer(self, params):
        cfg = self.cfg
        if cfg["optimizer"] == "rmsprop":
            return torch.optim.RMSprop(params, lr=cfg["lr"])
        fused = cfg["fused_adam"] if cfg["fused_adam"] is not None else self.device.type == "cuda"
        return torch.optim.Adam(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), fused=fused or None)

    def average_generator(self):
        """--ema d, after each G update: G_ema ← d_t·G_ema + (1 − d_t)·G, d_t = min(d, (1 + t)/(10 + t))
        at step t, so a short run's average is not stuck at the initial weights (Yazıcı et al. 2019
        on averaging GAN weights); BatchNorm statistics are copied from G, not averaged."""
        if "G_ema" not in self.nets:
            return
        d = min(self.cfg["ema"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for a, w in zip(self.nets["G_ema"].parameters(), self.nets["G"].parameters()):
                a.lerp_(w, 1 - d)
            for a, b in zip(self.nets["G_ema"].buffers(), self.nets["G"].buffers()):
                a.copy_(b)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg["amp"])

    def passing_through(self, name):
        """For a forward pass through net `name` whose loss updates another net (D in G's step):
        backward computes none of `name`'s gradients (optimizer_step), so under DDP its reducer
        must not wait for them (no_sync); its BatchNorm buffers are still broadcast as usual."""
        return self.fwd[name].no_sync() if self.world > 1 else contextlib.nullcontext()

    def count(self, out, n_batches):
        """After a step: advance the counters and add its logged terms to the epoch's device-side
        sums, noting the first step at which a term was not finite (no host sync)."""
        self.pos, self.step, self.meter_n = self.pos + n_batches, self.step + 1, self.meter_n + 1
        for k, v in out.items():
            v = v.float()
            self.meter[k] = self.meter[k] + v if k in self.meter else v
            bad = torch.where(torch.isfinite(v), NEVER, self.step)
            self.term_bad[k] = torch.minimum(self.term_bad[k], bad) if k in self.term_bad else bad

    def global_meter(self):
        """The epoch's sums of the logged terms over the global batch: under torchrun the ranks'
        sums averaged (a collective: every rank calls it), so metrics.csv reads the same whether
        the run used 1 or N processes."""
        if self.world == 1 or not self.meter:
            return dict(self.meter)
        flat = torch.stack(list(self.meter.values()))
        torch.distributed.all_reduce(flat)
        return dict(zip(self.meter, flat / self.world))

    def means(self):
        """The epoch's mean of each logged term so far (one host read)."""
        return {k: float(v) / max(self.meter_n, 1) for k, v in self.global_meter().items()}

    def stopping(self):
        """Did a signal ask the run to stop? Under torchrun the ranks agree (any rank's signal
        stops them all after the same step), so they save the same state together."""
        if self.world == 1:
            return bool(self.stop)
        flag = torch.tensor([len(self.stop)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def state(self):
        return {"nets": self.nets.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.opt.items()},
                "epoch": self.epoch, "pos": self.pos, "step": self.step, "best": self.best,
                "meter": {k: v.detach().cpu() for k, v in self.meter.items()}, "meter_n": self.meter_n,
                "rng": rng_state(), "config": self.cfg}

    def load_state(self, st):
        """Restore a checkpoint; one that does not fit this run (tampered, another model, missing
        keys, wrong shapes) is a UsageError naming what failed."""
        try:
            nets = {k: v for k, v in st["nets"].items() if "G_ema" in self.nets or not k.startswith("G_ema.")}
            if "G_ema" in self.nets and not any(k.startswith("G_ema.") for k in nets):  # --ema added on
                nets.update({"G_ema." + k[2:]: v for k, v in nets.items() if k.startswith("G.")})  # resume
            self.nets.load_state_dict(nets)
            for k, o in self.opt.items():
                o.load_state_dict(st["optimizers"][k])
            self.epoch, self.pos, self.step = int(st["epoch"]), int(st["pos"]), int(st["step"])
            self.best = float(st["best"])
            self.meter = {k: v.to(self.device) for k, v in st["meter"].items()}
            self.meter_n = int(st["meter_n"])
            set_rng_state(st["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UsageError(f"the checkpoint does not fit --model {self.cfg['model']}: "
                             f"{type(e).__name__}: {first}")

    # --- the NaN/Inf watch: recorded on the device every step, read back every --log-every
    # steps and before every save, so it names the exact first bad step however rarely it reads.

    def watch(self, name, loss, norm):
        """Keep, on the device, the first step whose loss or gradient norm of `name` was not finite."""
        ok = torch.isfinite(torch.stack([loss.detach().float(), norm.float()]))   # [loss, gradient]
        bad = torch.where(ok, NEVER, self.step + 1)
        self.first_bad[name] = torch.minimum(self.first_bad[name], bad) if name in self.first_bad else bad

    def check_finite(self):
        """Stop at the first NaN/Inf before anything is saved: names the updates and loss terms
        that went non-finite at the first bad step, then checks every weight and buffer."""
        kept = os.path.join(self.out, "last.pt")
        kept = (f"{kept} still holds the last good checkpoint" if os.path.exists(kept)
                else "no checkpoint had been written yet")
        bad = {f"{name} {kind}": s for name, rec in self.first_bad.items()
               for kind, s in zip(("loss", "gradient"), rec.tolist()) if s < NEVER}
        terms = {k: int(s) for k, s in self.term_bad.items() if s < NEVER}
        if bad or terms:
            step = min([*bad.values(), *terms.values()])
            where = [u for u, s in bad.items() if s == step]
            what = ", ".join(k for k, s in terms.items() if s == step)
            what += f" ({', '.join(where)} not finite)" if what and where else ""
            raise FloatingPointError(
                f"NaN/Inf in {what or ', '.join(where)} at step {step} (epoch {self.epoch + 1}); "
                f"training stopped and nothing non-finite was saved: {kept}. "
                f"Try a lower --lr or --grad-clip (e.g. --grad-clip 1)")
        for name, m in self.nets.items():
            ts = [t for t in m.state_dict().values() if t.is_floating_point()]
            if ts and not torch.stack([torch.isfinite(t).all() for t in ts]).all():
                raise FloatingPointError(f"NaN/Inf in the weights of {name} at step {self.step} "
                                         f"(epoch {self.epoch + 1}); nothing non-finite was saved: {kept}")

    def checkpoint(self, name="last.pt"):
        self.check_finite()
        self.meter = self.global_meter()  # every rank holds, and the checkpoint keeps, the global sums
        if self.main:
            save_checkpoint(self.state(), os.path.join(self.out, name))


NEVER = 2 ** 62  # "no non-finite value seen yet" in the NaN/Inf watch


def grad_norm(net, clip=None):
    """The global gradient norm of `net`, clipped to `clip` when given (else only read)."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=next(net.parameters()).device)


def lock_folder(out):
    """An exclusive flock on OUT/.lock, held until it is closed or the process ends (the kernel
    drops it when a process dies, so a killed run never leaves a stale lock). A folder locked by
    another train.py is refused at once. Only rank 0 locks (None elsewhere): it speaks for the run."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{out} is in use: another train.py holds its lock; wait for it to end, "
                         f"or train into another --out")
    return fd


def prepare_out(out, fresh, lock=None):
    """Create the run folder (with samples/ and recon/), prove it writable, lock it (unless
    `lock` already holds it), and sweep the temp files of a checkpoint write a kill interrupted.
    A run folder belongs to one run: a fresh run (not --resume, or a resume into another --out)
    refuses a folder that holds a run (its config.json or last.pt). Returns the lock."""
    given = lock
    try:
        for sub in ("", "samples", "recon"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):  # per process: DDP ranks race
            pass
        lock = lock if lock is not None else lock_folder(out)
        if lock is None:
            return None
        held = [f for f in ("last.pt", "config.json") if os.path.isfile(os.path.join(out, f))]
        if fresh and held:
            raise UsageError(f"{out} already holds a run ({held[0]}): continue it with --resume {out}, "
                             f"or train into another --out (or delete the folder)")
        for name in os.listdir(out):  # under the lock: no running process owns these
            if name.startswith(".tmp-") and name.endswith(".pt"):
                os.remove(os.path.join(out, name))
        return lock
    except BaseException as e:
        if lock is not None and given is None:  # ours to release; the caller releases `given`
            os.close(lock)
        if isinstance(e, OSError):
            raise UsageError(f"cannot write the run folder {out}: {e.strerror or e}")
        raise


# -----------------------------------------------------------------------------
# Checkpoints: atomic, weights-only, holding everything an exact restart needs.

def save_checkpoint(state, path):
    """Write to a temp file in the same folder, flush and fsync it, os.replace it over `path`,
    then fsync the folder: a kill or a power cut at any moment leaves the old checkpoint or the
    new one, never half of one. If writing fails (disk full, ...) the temp file is removed, the
    old checkpoint is untouched, and an OSError says so. A SIGKILL can still leave a temp file
    behind: prepare_out() sweeps those when the run starts again."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the mode any other output file gets
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(f"could not write the checkpoint {path} ({e.strerror or e}); "
                          f"the previous one is unchanged") from e
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)


def load_checkpoint(path, map_location="cpu"):
    """The one checkpoint loader (train.py --resume and facegen.py). `path` is a checkpoint or a
    run folder (its last.pt). weights_only=True: a checkpoint can hold tensors and plain
    containers, never code -- one carrying a pickled object is refused, and nothing in it runs.
    Every problem is a UsageError (one line, exit code 2)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
        if not os.path.isfile(path):
            raise UsageError(f"no checkpoint at {path}: the run stopped before its first checkpoint "
                             f"(start it again without --resume)")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise UsageError(f"cannot read the checkpoint {path}: damaged, truncated or not a PyTorch "
                                 f"checkpoint (its zip archive is incomplete)")
        raise UsageError(f"{path} is not a PyTorch checkpoint: {describe_file(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a global (code or a class)
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UsageError(f"refusing to load {path}: it carries pickled code or objects "
                         f"({found.group(1) if found else 'not plain tensors and containers'}), which a "
                         f"facegen checkpoint never does; nothing in it was run")
    except Exception as e:  # a damaged, truncated or foreign file
        raise UsageError(f"cannot read the checkpoint {path}: damaged, truncated or not a PyTorch "
                         f"checkpoint ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    if not (isinstance(state, dict) and {"nets", "config"} <= state.keys()):
        raise UsageError(f"{path} is not a facegen checkpoint (it has no nets and config)")
    return state


MAGIC = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"\x1f\x8b", "gzip data"), (b"BM", "a BMP image"), (b"RIFF", "a RIFF file (WebP, WAV...)"),
         (b"\x80", "a bare pickle (not torch.save's zip format)"), (b"%PDF", "a PDF document")]


def describe_file(path):
    """What a file looks like from its first bytes, for error messages."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "it is empty"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return f"it is {what}"
    try:
        head.decode("utf-8")
        return "it is text"
    except UnicodeDecodeError:
        return "its bytes are not any format facegen knows"


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    np.random.set_state(tuple(a.numpy() if torch.is_tensor(a) else a for a in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Signals, progress, metrics and pictures

def catch_signals(run):
    """The first SIGINT/SIGTERM asks the loop to stop after the step in flight (so the saved
    state is a whole step: exact resume); a second one interrupts at once."""
    def handler(signum, frame):
        run.stop.append(signum)
        if len(run.stop) > 1:
            raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


class Progress:
    """Every --log-every steps: a point of the loss curve (each logged term's mean over the steps
    since the previous point, the epoch's start or the resume) appended to steps.csv, and a
    progress line that a terminal redraws in place (plain lines every 30 s otherwise). A resumed
    run keeps the points up to its checkpoint and redoes the later ones: none is duplicated."""

    def __init__(self, run, quiet):
        self.quiet, self.tty, self.last, self.main = quiet, sys.stdout.isatty(), 0.0, run.main
        self.path = os.path.join(run.out, "steps.csv")
        old = os.path.join(os.path.dirname(run.rows_path), "steps.csv")  # the resumed run's
        self.points = [p for p in read_metrics(old) if int(p["step"]) <= run.step]
        self.header = None
        if self.main and (self.points or os.path.exists(self.path)):
            self.rewrite()
        self.mark(run)

    def mark(self, run):
        """Remember the epoch's sums so far: the next point averages the steps after this."""
        self.prev = (run.means(), run.meter_n)

    def rewrite(self):
        if self.points:
            write_metrics(self.path, self.points)
            self.header = list(self.points[0])
        elif os.path.exists(self.path):  # points of an attempt that never reached a checkpoint
            os.remove(self.path)

    def update(self, run, rate):
        """Every rank calls this (run.means() is a collective under torchrun); rank 0 writes."""
        means, n = run.means(), run.meter_n
        (prev, prev_n), self.prev = self.prev, (means, n)
        if n > prev_n:  # window mean = (sum now - sum at the previous point) / steps between
            point = {"epoch": run.epoch + 1, "step": run.step,
                     **{k: (v * n - prev.get(k, 0.0) * prev_n) / (n - prev_n) for k, v in means.items()}}
            self.points.append(point)
            if self.main and list(point) == self.header:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.header).writerow(point)
            elif self.main:
                self.rewrite()
        total, images_per_step = total_steps(run), steps_per_update(run.cfg) * run.cfg["batch_size"]
        text = (f"epoch {run.epoch + 1} step {run.step}/{total} {fmt(means)} "
                f"| {rate:.0f} img/s | eta {(total - run.step) * images_per_step / max(rate, 1e-9):.0f}s")
        now = time.time()
        if self.quiet or (not self.tty and now - self.last < 30):
            return
        self.last = now
        print(("\r" + text[:150].ljust(150)) if self.tty else text, end="" if self.tty else "\n", flush=True)

    def clear(self):
        if self.tty and not self.quiet:
            print("\r" + " " * 150 + "\r", end="", flush=True)


def fmt(d):
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def read_metrics(path):
    """metrics.csv's rows (dicts of strings); a damaged file is a UsageError, never a traceback."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            int(r["epoch"])
        return rows
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}: {e}); move it aside to continue "
                         f"(the checkpoint still holds the run)")


def write_metrics(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def test_losses(run):
    """Test-set loss of the autoencoders (eval mode, fixed sampling noise that does not disturb
    the training RNG, so an interrupted and a straight run stay bitwise equal)."""
    if "vae" not in run.nets:
        return {}
    cfg, vae = run.cfg, run.nets["vae"]
    vae.eval()
    totals, n = {}, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"])
        for x, y in map(pair, run.test_batches.epoch(0)):
            loss, recon, kl = elbo_terms(cfg, x, *vae(x, None, y))
            terms = {"test_loss": loss, "test_recon": recon, "test_kl": kl}
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v) * x.shape[0]
            n += x.shape[0]
    vae.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


def write_pictures(run, epoch):
    """Frames of the 'learning fast forward' (seed 000): the same z every epoch; for autoencoders
    8 fixed test images over their reconstructions (decoded from mu: no sampling noise)."""
    nets = run.nets
    was_training = nets.training
    nets.eval()
    with torch.no_grad():
        decode = models.generator(nets)
        data.save_grid(decode(run.fixed_z, run.sample_y).float().cpu(),
                       os.path.join(run.out, "samples", f"epoch_{epoch:03d}.png"))
        if "vae" in nets:
            x, y = run.fixed_x, run.fixed_y
            mu, _ = nets["vae"].encode(x, y)
            x_hat = nets["vae"].decode(mu, y)
            data.save_grid(torch.cat([x, x_hat]).float().cpu(), os.path.join(run.out, "recon", f"epoch_{epoch:03d}.png"),
                           nrow=x.shape[0])
    nets.train(was_training)


# -----------------------------------------------------------------------------
# Entry point

def main(argv=None):
    """Exit codes: 0 done, 1 a write failed (disk full...), 2 usage, 3 NaN/Inf, 130 interrupted.
    Every one prints one line, no traceback; none of them leaves a damaged or non-finite last.pt."""
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source line
    out = lock = None
    try:
        cfg, state = config_from(args)
        out = cfg["out"]
        if cfg["benchmark"]:
            benchmark(cfg)
            return 0
        resumed_here = cfg.get("resume") and os.path.realpath(run_folder(cfg["resume"])) == os.path.realpath(out)
        lock = lock_folder(out) if os.path.isdir(out) else None  # a busy folder is refused at once
        if not cfg.get("resume"):
            cfg["data_fingerprint"] = data.fingerprint(cfg["data"], tuple(cfg["image_size"]), cfg["n_synthetic"], cfg["seed"])
        run = Run(cfg, state)  # builds and loads everything, writes nothing
        lock = prepare_out(out, fresh=not resumed_here, lock=lock)
        if run.main:
            tmp = os.path.join(run.out, "config.json.tmp")
            with open(tmp, "w") as f:
                json.dump(cfg, f, indent=2)
            os.replace(tmp, os.path.join(run.out, "config.json"))
        handlers = catch_signals(run)
        try:
            train(run)
            if run.world > 1:  # rank 0 writes the last pictures: no rank tears gloo/NCCL down before it ends
                torch.distributed.barrier()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the work, resume later with --resume
            if len(run.stop) > 1:  # a second signal: the step was cut short, keep the last checkpoint
                print(f"\ninterrupted twice; {run.out}/last.pt holds the last checkpoint", file=sys.stderr)
                return 130
            run.checkpoint()
            print(f"\ninterrupted at step {run.step}; saved {run.out}/last.pt (resume with --resume {run.out})")
            return 130
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        hint = f"; fix it, then continue with --resume {out}" if out and os.path.isfile(os.path.join(out, "last.pt")) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training, or a second Ctrl-C while saving
        print("\ninterrupted; nothing more was saved", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            os.close(lock)  # releases the run folder
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if run.main:  # rank 0 speaks for the run
        print(f"done: {run.out}")
    return 0


# -----------------------------------------------------------------------------
# Speed switches: their defaults on the machine a run starts on, and --benchmark.

# What measured fastest on CPU: NHWC 1.11-1.17x and fused Adam 1.03-1.12x, together 1.13-1.27x, for
# the DCGAN and the VAE on a 2-core AMD EPYC with AVX-512 + bf16 and under an AVX2-only simulation
# (README "Speed"). Neither changes what is computed, only the rounding.
CPU_DEFAULTS = dict(channels_last=True, fused_adam=True)


def native_bf16(device):
    """Whether bf16 autocast runs on bf16 hardware. CUDA: a GPU with native bf16 (Ampere on).
    CPU: bf16 instructions (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm; torch.cpu.get_capabilities)
    that oneDNN, which runs the convolutions, will use (torch.ops.mkldnn._is_mkldnn_bf16_supported,
    which honours ONEDNN_MAX_CPU_ISA). Without them bf16 convolutions fall back to slow kernels:
    25x slower than fp32 on a 2-core AVX2-only EPYC (issue 12)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get else {"avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    try:
        onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        onednn = False
    return bool(onednn and any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16")))


def describe_cpu():
    """'AMD EPYC, ATen AVX512, native bf16 yes': what a CPU speed figure depends on."""
    get = getattr(torch.cpu, "get_capabilities", None)
    name = (get() if get else {}).get("cpu_name") or "CPU"
    return (f"{name}, {torch.get_num_threads()} threads, ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {'yes' if native_bf16(torch.device('cpu')) else 'no'}")


def resolve_speed(cfg, device, say=True):
    """Settle the speed switches for this device, in cfg (so config.json records them).
    --amp without native bf16 trains in fp32 and says so in one line (config.json: amp false):
    bf16 there would be ~25x slower, and fp32 gives the same model. Unset switches take what
    measured fastest (CPU_DEFAULTS; CUDA: fused Adam). A resumed run keeps its recorded choice:
    NHWC and fused Adam round differently, and resume is bitwise exact (a run recorded before
    these defaults existed has fused_adam null, which Run.make_optimizer still reads as CUDA-only)."""
    if cfg["amp"] and not native_bf16(device):
        if say:
            what = "GPU" if device.type == "cuda" else f"CPU ({describe_cpu()})"
            print(f"note: --amp ignored: this {what} has no native bf16, where bf16 autocast runs ~25x "
                  f"slower than fp32; training in fp32 (config.json records amp: false)", file=sys.stderr)
        cfg["amp"] = False
    if cfg.get("resume"):
        return cfg
    measured = CPU_DEFAULTS if device.type == "cpu" else dict(channels_last=None, fused_adam=True)
    for k, v in measured.items():
        if cfg[k] is None and not (k == "fused_adam" and cfg["optimizer"] != "adam"):
            cfg[k] = bool(v)
    return cfg


BASELINE = dict(plain=True, channels_last=False, amp=False, compile=False, fused_adam=False)
SWITCHES = [  # (label, change on top of the resident-data loop)
    ("channels_last (NHWC)", dict(channels_last=True)),
    ("fused Adam", dict(fused_adam=True)),
    ("bf16 autocast (--amp)", dict(amp=True)),
    ("torch.compile (--compile)", dict(compile=True)),
]
HOPELESS = 0.5  # a configuration below this fraction of the baseline after one round is not timed again


def plain_batches(run, cfg):
    """The baseline's data path: a DataLoader over the uint8 images on the host, scaled and
    augmented per batch on the host, then copied to the device (as most training scripts do)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(run.batches.images.cpu()),
                                         batch_size=cfg["batch_size"], shuffle=True, drop_last=True)
    gen = torch.Generator().manual_seed(cfg["seed"])
    while True:
        for (x,) in loader:
            x = data.augment(x.float() / 127.5 - 1, gen, flip=cfg["flip"], jitter=cfg["jitter"])
            yield x.to(run.device)


class Timed:
    """One configuration, built once and warmed up; `rate(steps)` times steps with device sync."""

    def __init__(self, cfg, warmup=2):
        self.cfg, self.run = cfg, Run(cfg)
        self.per_step = steps_per_update(cfg)
        self.source = plain_batches(self.run, cfg) if cfg["plain"] else \
            itertools.chain.from_iterable(self.run.batches.epoch(e) for e in itertools.count())
        self.cuda = self.run.device.type == "cuda"
        for _ in range(warmup):
            self.one()

    def one(self):
        out = take_step(self.run, [next(self.source) for _ in range(self.per_step)])
        if self.cfg["plain"]:
            float(next(iter(out.values())))  # a plain loop reads loss.item() every step

    def rate(self, steps):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            self.one()
        if self.cuda:
            torch.cuda.synchronize()
        return steps * self.per_step * self.cfg["batch_size"] / (time.perf_counter() - t)


def best_rates(timed, steps, rounds):
    """Interleave the configurations for `rounds` rounds and keep each one's best round, so a
    burst of load from elsewhere on the machine penalises no configuration in particular.
    One below HOPELESS x timed[0] (the baseline) after the first round is hopeless: it is not
    timed again (a 25x slower switch would otherwise take most of the benchmark's time).
    Returns (best rates, indices dropped after round 1)."""
    best, dropped = [0.0] * len(timed), set()
    for r in range(rounds):
        for i, t in enumerate(timed):
            if i not in dropped:
                best[i] = max(best[i], t.rate(steps))
        if r == 0:
            dropped = {i for i, b in enumerate(best) if i and b < HOPELESS * best[0]}
    return best, dropped


def benchmark(cfg, rounds=3):
    """Each switch alone on top of resident data, then all the switches that paid together,
    each as images/s and as a ratio to the plain eager fp32 NCHW baseline. --amp is skipped
    where there is no native bf16 (it would train in fp32); a hopeless switch is dropped."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("--benchmark runs in one process; time DDP with a torchrun --max-steps run")
    if cfg["conditional"]:
        raise UsageError("--benchmark times the unconditional models; drop --conditional")
    base = Timed(dict(cfg, **BASELINE))
    device = base.run.device
    steps = cfg["bench_steps"] or (20 if device.type == "cuda" else 3)
    h, w = cfg["image_size"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    print(f"benchmark {cfg['model']} {h}x{w} batch {cfg['batch_size']} on {where}: best of {rounds} "
          f"interleaved rounds of {steps} steps", flush=True)
    switches, skipped = [], []
    for label, change in SWITCHES:
        if change.get("compile") and not cfg["compile"]:
            continue
        if change.get("amp") and not native_bf16(device):
            skipped.append(f"{label}: skipped, no native bf16 here (--amp trains in fp32 on this machine)")
            continue
        if change.get("fused_adam") and cfg["optimizer"] != "adam":
            continue
        switches.append((label, change))
    resident = dict(cfg, **dict(BASELINE, plain=False))
    configs = [("baseline: eager fp32 NCHW, DataLoader + host augmentation, loss read every step", None),
               ("uint8 data resident on the device, augmentation there, no per-step sync", resident)]
    configs += [(f"resident + {label}", dict(resident, **change)) for label, change in switches]
    timed = [base] + [Timed(c) for _, c in configs[1:]]
    rates, dropped = best_rates(timed, steps, rounds)
    for i, ((label, _), r, t) in enumerate(zip(configs, rates, timed)):
        mem = f"  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if t.cuda else ""
        gone = f"  (hopeless: < {HOPELESS}x the baseline after round 1, dropped)" if i in dropped else ""
        print(f"{r:10.1f} img/s  {r / rates[0]:5.2f}x  {label}{mem}{gone}")
    for line in skipped:
        print(f"{'':24s}{line}")
    paid = [change for (_, change), r in zip(switches, rates[2:]) if r > 1.02 * rates[1]]
    fast = dict(resident)
    for change in paid:
        fast.update(change)
    del timed[1:]
    (base_rate, best), _ = best_rates([base, Timed(fast)], steps, rounds)
    names = [k for k in ("channels_last", "fused_adam", "amp", "compile") if fast[k]]
    print(f"{best:10.1f} img/s  {best / base_rate:5.2f}x  fast path: resident data + {' + '.join(names) or 'nothing else'} "
          f"(baseline re-timed beside it: {base_rate:.1f} img/s)")
    defaults = resolve_speed(dict(cfg, amp=False), device, say=False)
    print(f"defaults of a run here: channels_last {defaults['channels_last']}, fused Adam "
          f"{defaults['fused_adam']}, amp off unless --amp (honoured only with native bf16)")
    return base_rate, best

if __name__ == "__main__":
    sys.exit(main())
