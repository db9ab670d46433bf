"""train.py -- one command trains every facegen model into a run folder.

    python train.py --model vae                       # the Wuga VAE on the built-in synthetic faces
    python train.py --model wgan-gp --data anime.zip  # WGAN-GP on a zip of face images
    python train.py --resume runs/vae                 # continue exactly where it stopped

Read it top to bottom: the models' hyperparameters -> the data -> one update -> the step of each
family (VAE, GAN, VAE-GAN) -> the loop, which wraps each step (autocast, the weight average, meters,
the NaN watch, signals) -> setup (data parallelism, the update hooks) -> the command line."""
import argparse, fcntl, itertools, json, math, os, signal, sys, threading, time, warnings

import torch
import torch.nn as nn

import data
import losses
import models
from data import UsageError

# -----------------------------------------------------------------------------
# Each model's hyperparameters as its report gives them (README "Models"; z sizes are
# models.DEFAULT_LATENT); "ours" marks a value no report states. A flag given on the command line wins.
COMMON_DEFAULTS = dict(image_size="64", batch_size=64, optimizer="adam", betas=(0.9, 0.999), kl_weight=1.0,
                       recon_scale=1.0, obs_std=1.0, recon="mse", gan_loss="bce", n_critic=1, clip=0.0, gp_weight=0.0,
                       flip=False, jitter=0.0, critic_norm="none", seed=0, n_synthetic=10000, test_fraction=0.2,
                       log_every=20, quiet=False, amp=False, compile=False, adv_weight=1.0, conditional=False,
                       balance_labels=False, ema=0.0, reuse_fakes=False)  # every other flag's default is None
LFW = dict(lr=1e-3, epochs=50, recon="mse", flip=True, jitter=0.1)  # report 003 states no lr or epochs: ours
SEED_DEFAULTS = {
    # Wuga VAE (report 000): GNLL with observation sigma 0.01 + KL, lr 1e-4 (Adam: ours), 500 epochs;
    # its VGG16 variant: sigma 0.1, lr 1e-5, z 512
    "vae": dict(lr=1e-4, epochs=500, recon="gnll", obs_std=0.01),
    "vae-vgg": dict(lr=1e-5, epochs=500, recon="gnll", obs_std=0.1),
    # instance-norm VAE (report 001): lambda 1e-5, Adam 1e-3, h-flip, 64x48. Its lambdas (1e-3..1e-6)
    # only make sense against a per-pixel *mean* squared error: we use that. Its "z closer to the centre"
    # by "adding 1" to the KL term: we read it as weight lambda + 1 (README: --kl-weight 1.00001)
    "vae-in": dict(image_size="64x48", lr=1e-3, epochs=30, recon="mse-mean", kl_weight=1e-5, flip=True),
    # LFW report (003): autoencoder and VAE against a summed MSE, KLD weight 0.2 / 0.1 / 0.01 (0.1
    # generated best), h-flip p=0.5 + colour jitter; its VAE-GAN: that VAE + a 5-layer D, KLD 0.01
    "ae": dict(LFW, kl_weight=0.0),
    "vae-lrelu": dict(LFW, kl_weight=0.1),
    "vaegan": dict(LFW, lr=2e-4, betas=(0.5, 0.999), kl_weight=0.01),
    # reports 002-004: DCGAN, batch 128, BCE; Adam (report 004 names it) at 2e-4, betas (0.5, 0.999): ours,
    # the DCGAN paper's. Report 004's G step scores "the constructed fake batch in previous step": --reuse-fakes
    "dcgan": dict(batch_size=128, lr=2e-4, betas=(0.5, 0.999), epochs=25, reuse_fakes=True),
    # report 002: WGAN, weight clipping 0.01, RMSProp 1e-4 (paper: 5e-5), n_critic 5, batch 128;
    # WGAN-GP as Gulrajani et al. run it: lambda 10, n_critic 5, Adam 1e-4 betas (0, 0.9); the report's
    # final setting, "lambda = 5, train D twice": --gp-weight 5 --n-critic 2 (README)
    "wgan": dict(batch_size=128, lr=1e-4, epochs=50, optimizer="rmsprop", gan_loss="wasserstein", n_critic=5, clip=0.01),
    "wgan-gp": dict(batch_size=128, lr=1e-4, betas=(0.0, 0.9), epochs=50, gan_loss="wasserstein", n_critic=5, gp_weight=10.0),
    # report 002's future work, SN-GAN (Miyato et al. 2018): hinge loss, its Adam setting C, batch 64, z 128
    "sngan": dict(lr=2e-4, betas=(0.5, 0.999), epochs=50, gan_loss="hinge"),
}

# -----------------------------------------------------------------------------
# The data: a folder, a .zip or the synthetic faces, decoded once into uint8 (cached), split by
# --seed; batches are cut, scaled to [-1, 1] and augmented on the device. Labels for conditional runs.
def load_data(cfg, device, rank=0, world=1):
    """-> (train Batches, test Batches or None: a GAN needs no held-out images). The test images never train."""
    train_x, test_x, labels = data.run_data(cfg, verbose=rank == 0)
    train_y, test_y, info = labels or (None, None, None)
    if cfg["conditional"] and cfg.setdefault("labels", info) != info:
        raise UsageError(f"the labels changed since this run started: now {info}, the run has {cfg['labels']}")
    if len(train_x) < cfg["batch_size"] * cfg["n_critic"]:  # one step's batches (n_critic: 1 but for GANs)
        raise UsageError(f"only {len(train_x)} training images for one step of --model {cfg['model']}: "
                         f"{cfg['n_critic']} batch(es) of {cfg['batch_size']} (its batch size: see --help); "
                         f"lower --batch-size or add images")
    if not len(test_x) and cfg["family"] in FAMILIES["autoencoders"]:   # --test-fraction 0 is for GANs
        raise UsageError(f"--model {cfg['model']} needs held-out images (its test loss, best.pt, the reconstructions): "
                         f"--test-fraction {cfg['test_fraction']} of {len(train_x)} image(s) holds none out")
    weights = data.balance_weights(train_y) if cfg["balance_labels"] else None
    return (data.Batches(train_x, cfg["batch_size"], seed=cfg["seed"], flip=cfg["flip"], jitter=cfg["jitter"],
                         device=device, rank=rank, world_size=world, labels=train_y, weights=weights),
            data.Batches(test_x, min(cfg["batch_size"], len(test_x)), seed=cfg["seed"], device=device,
                         drop_last=False, labels=test_y) if len(test_x) else None)

def update(opt, loss):
    """One update of any net: zero_grad -> backward (this optimizer's gradients only: G's loss passes through D) -> step."""
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=opt.param_groups[0]["params"])
    opt.step()  # a hook runs first: torchrun's gradient average, the norm, --grad-clip (add_update_hooks)

# -----------------------------------------------------------------------------
# A step function takes the nets (forward callables), their optimizers, the step's batches
# ((x, y) pairs; y None without labels), the config and noise(n) -> z ~ N(0, I) (n x latent_dim;
# noise(n, 1, 1, 1, draw=torch.rand) -> eps ~ U[0, 1]), and returns the terms to log. Outputs
# are made .float(): under --amp (bf16 autocast around the step) every loss is computed in fp32.

# --- Autoencoders (ae, vae, vae-vgg, vae-in, vae-lrelu): maximise the ELBO.
def elbo(cfg, x, x_hat, mu, logvar):   # −ELBO with the run's --recon, --obs-std, --kl-weight, --recon-scale
    return losses.negative_elbo(x, x_hat, mu, logvar, cfg["recon"], cfg["obs_std"], cfg["kl_weight"], cfg["recon_scale"])

def vae_step(nets, opts, batches, cfg, noise):
    """One ELBO update of the VAE on a batch x (a CVAE: q(z|x, y), p(x|z, y))."""
    ((x, y),) = batches
    eps = noise(len(x))                                        # ε ~ N(0, I)
    x_hat, mu, logvar = nets["vae"](x, eps, y)                 # x̂ = Dec(μ + σ·ε [, y])
    loss, recon, kl, mse_px = elbo(cfg, x, x_hat, mu, logvar)  # −ELBO = recon + β·KL
    update(opts["vae"], loss)
    return dict(loss=loss, recon=recon, kl=kl, mse_px=mse_px)

# --- GANs (dcgan, wgan, wgan-gp, sngan): Algorithm 1 of Arjovsky et al. 2017 / Gulrajani et al.
# 2017. DCGAN (bce), LSGAN (ls), WGAN, WGAN-GP and SN-GAN (hinge; the spectral norm lives in its D)
# differ only in the loss pair losses.GAN_LOSSES[--gan-loss], n_critic, and what follows a critic
# update (--clip) or joins its loss (--gp-weight).
def critic_step(G, D, opt_D, x, y, cfg, noise, keep=False):
    """One update of D (the critic) on a real batch x and fresh z (conditional: both scored with
    the real batch's labels y, the fakes drawn for them). L_D by --gan-loss:
    bce: −E[log σ(D(x))] − E[log(1 − σ(D(x̃)))];  ls: E[(D(x) − 1)²] + E[D(x̃)²];  ls-sigmoid (report
    004's MSE): E[(σ(D(x)) − 1)²] + E[σ(D(x̃))²];  wasserstein: E[D(x̃)] − E[D(x)];  hinge: E[relu(1 − D(x))] + E[relu(1 + D(x̃))].
    Returns (logged terms, x̃ with G's graph if keep (--reuse-fakes) else None)."""
    with torch.set_grad_enabled(keep):
        kept = G(noise(len(x)), y)                                 # x̃ = G(z [, y]), z ~ N(0, I)
    x_fake = kept.detach()                                         # D's update leaves G alone
    d_real, d_fake = D(x, y).float(), D(x_fake, y).float()         # D(x [, y]), D(x̃ [, y])
    d_loss_fn, _ = losses.GAN_LOSSES[cfg["gan_loss"]]
    loss_d = d_loss_fn(d_real, d_fake)                             # L_D
    gp = None
    if cfg["gp_weight"]:
        eps = noise(len(x), 1, 1, 1, draw=torch.rand, dtype=x.dtype)   # ε ~ U[0, 1] per sample (x̃ may be bf16)
        gp = losses.gradient_penalty(lambda x_mix: D(x_mix, y), x, x_fake.to(x.dtype), eps)
        loss_d = loss_d + cfg["gp_weight"] * gp                    # L_D += λ·E[(‖∇D(x̂)‖₂ − 1)²]
    update(opt_D, loss_d)
    if cfg["clip"]:
        with torch.no_grad():
            for w in opt_D.param_groups[0]["params"]:              # every parameter, BatchNorm's too, as
                w.clamp_(-cfg["clip"], cfg["clip"])                # Arjovsky et al.'s code: w ← clip(w, −c, c)
    return dict(loss_d=loss_d, gp=gp, **score_stats(cfg, d_real, d_fake)), (kept if keep else None)

def generator_step(G, D, opt_G, n, y, cfg, noise, fakes=None):
    """One update of G on n fresh z (conditional: for labels y), or on `fakes`, the last critic
    update's G(z) with its graph (--reuse-fakes). L_G by --gan-loss:
    bce (non-saturating): −E[log σ(D(G(z)))];  ls: E[(D(G(z)) − 1)²];  ls-sigmoid: E[(σ(D(G(z))) − 1)²];
    wasserstein, hinge: −E[D(G(z))]."""
    if fakes is None:
        fakes = G(noise(n), y)                                     # G(z [, y]), z fresh
    d_gen = D(fakes, y).float()                                    # D(G(z [, y]) [, y])
    _, g_loss_fn = losses.GAN_LOSSES[cfg["gan_loss"]]
    loss_g = g_loss_fn(d_gen)                                      # L_G
    update(opt_G, loss_g)
    return dict(loss_g=loss_g)

def gan_step(nets, opts, batches, cfg, noise):
    """n_critic critic updates, each on its own real batch, then one generator update (for the
    last batch's labels); the logged critic terms are the last one's. --reuse-fakes (dcgan's
    default): G's update scores the last critic update's fakes with the D just updated, as
    report 004 and pytorch/examples do, instead of fresh z (Algorithm 1): one G forward fewer."""
    G, D = nets["G"], nets["D"]
    for i, (x, y) in enumerate(batches):
        critic, fakes = critic_step(G, D, opts["D"], x, y, cfg, noise,
                                    keep=cfg["reuse_fakes"] and i == len(batches) - 1)
    return {**critic, **generator_step(G, D, opts["G"], len(x), y, cfg, noise, fakes)}

def score_stats(cfg, d_real, d_fake):
    """What D says of the batch: the Wasserstein estimate E[D(x)] − E[D(x̃)] (critic), the mean
    probabilities σ(D(x)), σ(D(x̃)) (bce, ls-sigmoid: scores are logits), or the mean raw scores
    (ls: the targets are 1 and 0; hinge: the margins +1 and −1)."""
    if cfg["gan_loss"] == "wasserstein":
        return {"wasserstein": d_real.mean() - d_fake.mean()}
    if cfg["gan_loss"] in ("bce", "ls-sigmoid"):
        d_real, d_fake = torch.sigmoid(d_real), torch.sigmoid(d_fake)
    return {"D(x)": d_real.mean(), "D(G(z))": d_fake.mean()}

# --- VAE-GAN (LFW report): the VAE's decoder is also a GAN generator.
def vaegan_step(nets, opts, batches, cfg, noise):
    """D learns real x (half of its batch) against reconstructions x̂ and decoded noise x_p (a quarter each: the
    report scores three equal batches, which one BCE over all would weigh a third each; we keep the GAN loss's
    real/fake halves); then the VAE minimises w·L_adv on the same x̂ and x_p plus its own −ELBO. Scales: L_adv is of
    order 1 (log 2 when D is undecided), a summed MSE of order 10²-10³ per image: at w = 1 (the report's) the VAE
    barely hears D; w ~ 10²-10³ gives both equal say."""
    ((x, y),) = batches
    vae, D = nets["vae"], nets["D"]
    z_p = noise(len(x))                                            # z_p ~ N(0, I)
    x_hat, mu, logvar = vae(x, noise(len(x)), y)                   # x̂ = Dec(μ + σ·ε [, y])
    x_p = vae.decode(z_p, y)                                       # x_p = Dec(z_p [, y])
    fakes = torch.cat([x_hat, x_p])
    y_fake = None if y is None else torch.cat([y, y])
    d_real, d_fake = D(x, y).float(), D(fakes.detach(), y_fake).float()
    loss_d = losses.d_loss(d_real, d_fake)          # −E[log σ(D(x))] − E[log(1 − σ(D(x̂ ∪ x_p)))]
    update(opts["D"], loss_d)
    adv = losses.g_loss(D(fakes, y_fake).float())                  # −E[log σ(D(x̂ ∪ x_p))]: fool D
    loss_vae, recon, kl, mse_px = elbo(cfg, x, x_hat, mu, logvar)
    loss = cfg["adv_weight"] * adv + loss_vae                      # w·L_adv − ELBO
    update(opts["vae"], loss)
    stats = score_stats(cfg, d_real, d_fake[:len(x)])             # "D(G(z))" here: D(x̂), the reconstructions
    return dict(loss_d=loss_d, **stats, loss=loss, adv=adv, recon=recon, kl=kl, mse_px=mse_px)

STEPS = {"autoencoder": vae_step, "adversarial": gan_step, "wasserstein": gan_step, "vaegan": vaegan_step}

# -----------------------------------------------------------------------------
# The loop every family shares: what wraps a step (autocast, the weight average, meters and the
# NaN watch, signals) is applied here, around it.
def train(run):
    """Batches -> the family's step -> meters -> progress, metrics, pictures, checkpoints. An epoch
    starts at batch run.pos: a run stopped mid-epoch goes on with the very next batch (exact resume)."""
    cfg, step_fn, per_step = run.cfg, STEPS[run.cfg["family"]], run.cfg["n_critic"]   # a GAN step: n_critic batches
    rows = [r for r in models.read_csv(os.path.join(run.logs, "metrics.csv")) if int(r["epoch"]) <= run.epoch]  # later: redone
    progress = Progress(run)
    while run.epoch < cfg["epochs"]:
        fits = (len(run.batches) - run.pos) // per_step          # whole steps left in this epoch
        n = max(0, min(fits, run.total - run.step))
        if n == 0 and not (fits == 0 and run.pos > 0):            # (else: saved before its row was written)
            break
        t0, it = time.time(), run.batches.epoch(run.epoch, start=run.pos)
        for i in range(n):
            batches = list(itertools.islice(it, per_step))
            if cfg["channels_last"]:
                batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg["amp"]):
                out = step_fn(run.fwd, run.opts, batches, cfg, run.noise)
            if "G_ema" in run.nets:
                models.update_ema(run.nets["G_ema"], run.nets["G"], cfg["ema"], run.step)
            run.count({**out, **run.norms}, per_step)
            if run.stopping():  # Ctrl-C / SIGTERM came during the step: it is complete, save here
                raise KeyboardInterrupt
            if run.step % cfg["log_every"] == 0:
                run.check_finite()
                progress.update(run, (i + 1) * per_step * cfg["batch_size"] / max(time.time() - t0, 1e-9))
            if cfg["checkpoint_every"] and run.step % cfg["checkpoint_every"] == 0:
                run.checkpoint()
        end_epoch(run, rows, n == fits, time.time() - t0, n * per_step * cfg["batch_size"], progress.points)
    if run.main and os.path.isdir(samples := os.path.join(run.out, "samples")):
        data.save_gif(samples, os.path.join(run.out, "progress.gif"))

def end_epoch(run, rows, completes, seconds, n_images, points=()):
    """metrics.csv's row, loss.png, the pictures, best.pt (lowest test loss) and last.pt."""
    run.check_finite()
    row = {"epoch": run.epoch + 1, "step": run.step, **run.means(), **test_losses(run),
           "images_per_s": n_images / max(seconds, 1e-9), "seconds": seconds}
    if run.main:
        rows.append(row)
        models.write_csv(os.path.join(run.out, "metrics.csv"), rows)
        data.plot_losses(rows, os.path.join(run.out, "loss.png"), points)
        write_pictures(run, run.epoch + 1)
        print(f"epoch {run.epoch + 1}/{run.cfg['epochs']} {fmt(row, skip=1)}", flush=True)
    if completes:  # a partial epoch (--max-steps) keeps its sums: a resume completes its row
        run.epoch, run.pos, run.meter, run.meter_n = run.epoch + 1, 0, {}, 0
    if row.get("test_loss", math.inf) < run.best:  # best.pt first: a kill between the two never leaves
        run.best = row["test_loss"]                 # a last.pt whose `best` is not in best.pt
        run.checkpoint("best.pt")
    run.checkpoint("last.pt")

def test_losses(run):
    """The autoencoders' test losses; a fixed seed on a forked RNG leaves training's draws alone."""
    if "vae" not in run.nets:
        return {}
    vae, totals = run.nets["vae"].eval(), {}
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(run.cfg["seed"])
        for x, y in run.test_batches.epoch(0):
            for k, v in zip(("test_loss", "test_recon", "test_kl", "test_mse_px"), elbo(run.cfg, x, *vae(x, None, y))):
                totals[k] = totals.get(k, 0.0) + float(v) * len(x)
    vae.train()
    return {k: v / len(run.test_batches.images) for k, v in totals.items()}

def write_pictures(run, epoch):
    """Report 000's 'learning fast forward': the same z every epoch; 8 test images over their recons."""
    nets, name = run.nets, f"epoch_{epoch:03d}.png"
    nets.eval()
    with torch.no_grad():
        samples = models.generator(nets)(run.fixed_z, run.sample_y)
        data.save_grid(samples.float().cpu(), os.path.join(run.out, "samples", name))
        if "vae" in nets:
            x, y = run.fixed_x, run.fixed_y
            x_hat = nets["vae"].decode(nets["vae"].encode(x, y)[0], y)
            data.save_grid(torch.cat([x, x_hat]).float().cpu(), os.path.join(run.out, "recon", name), nrow=len(x))
    nets.train()

def fmt(d, skip=0):
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(d.items())[skip:])

class Progress:
    """Every --log-every steps: a point in steps.csv (each term's mean since the last one) and a progress line with
    images/s (on a terminal each time, else every 30 s)."""

    def __init__(self, run):
        self.path, self.last, self.quiet = os.path.join(run.out, "steps.csv"), 0.0, run.cfg["quiet"] or not run.main
        self.points = [p for p in models.read_csv(os.path.join(run.logs, "steps.csv")) if int(p["step"]) <= run.step]
        if run.main and (self.points or os.path.exists(self.path)):  # a resume keeps the points up to its step
            models.write_csv(self.path, self.points)
        self.prev = (run.epoch, run.means(), run.meter_n)  # the sums at a point: the next one averages the steps after it

    def update(self, run, rate):
        means, n = run.means(), run.meter_n
        (epoch, prev, prev_n), self.prev = self.prev, (run.epoch, means, n)
        prev, prev_n = (prev, prev_n) if epoch == run.epoch else ({}, 0)   # a new epoch's sums started at 0
        if n > prev_n:  # window mean = (sum now - sum at the previous point) / steps between
            self.points.append({"epoch": run.epoch + 1, "step": run.step,
                                **{k: (v * n - prev.get(k, 0.0) * prev_n) / (n - prev_n) for k, v in means.items()}})
            if run.main:
                models.write_csv(self.path, self.points[-1:], append=len(self.points) > 1)
        eta = (run.total - run.step) * run.cfg["n_critic"] * run.cfg["batch_size"] / max(rate, 1e-9)
        if not self.quiet and (sys.stdout.isatty() or time.time() - self.last >= 30):
            self.last = time.time()
            print(f"epoch {run.epoch + 1} step {run.step}/{run.total} {fmt(means)} | {rate:.0f} img/s | eta {eta:.0f}s",
                  flush=True)

# -----------------------------------------------------------------------------
# Setup: a run's state, and what wraps its steps.
NEVER = 2 ** 62  # "no non-finite value seen yet" in the NaN/Inf watch

class Run:
    """A run's state: config, device, nets (`fwd`: what the steps call), optimizers, data, meters."""

    def __init__(self, cfg, state=None):
        self.cfg, self.out = cfg, cfg["out"]
        self.logs = models.run_folder(cfg["resume"]) if cfg.get("resume") else self.out  # the logs so far (--out may differ)
        # under torchrun (RANK, WORLD_SIZE set) each process trains its share of every global batch
        self.device = models.pick_device(cfg["device"])
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1:
            if cfg["batch_size"] % self.world:
                raise UsageError(f"--batch-size {cfg['batch_size']} is not divisible by {self.world} processes")
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN may pick its fastest kernels
        self.main = self.rank == 0
        models.settle_speed(cfg, self.device, say=self.main)
        self.batches, self.test_batches = load_data(cfg, self.device, self.rank, self.world)
        self.total = min(cfg["epochs"] * (len(self.batches) // cfg["n_critic"]), cfg["max_steps"] or math.inf)  # its steps
        torch.manual_seed(cfg["seed"])  # init_weights draws from it
        nets = models.from_config(cfg).to(self.device)
        if cfg["batch_size"] // self.world < 2 and any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in nets.modules()):
            raise UsageError(f"BatchNorm needs 2 images per batch and process: use --batch-size >= {2 * self.world}")
        nets = nets.to(memory_format=torch.channels_last) if cfg["channels_last"] else nets
        if self.world > 1 and self.device.type == "cuda":  # batch statistics over the global batch (not on gloo)
            nets = nn.SyncBatchNorm.convert_sync_batchnorm(nets)
        self.nets, self.latent_dim = nets, models.latent_dim(nets)
        trained = {k: m for k, m in nets.items() if k != "G_ema"}  # G_ema follows G, no optimizer
        adam = dict(betas=tuple(cfg["betas"]), fused=cfg["fused_adam"] or None)
        self.opts = {k: torch.optim.RMSprop(m.parameters(), lr=cfg["lr"]) if cfg["optimizer"] == "rmsprop" else
                     torch.optim.Adam(m.parameters(), lr=cfg["lr"], **adam) for k, m in trained.items()}
        self.fwd = {k: torch.compile(m) if cfg["compile"] and not (k == "D" and cfg["gp_weight"]) else m  # --compile:
                    for k, m in trained.items()}   # not D under a gradient penalty (torch.compile: no double backward)
        self.norms = add_update_hooks(self)
        # the pictures: a fixed z, 8 test images; conditional: the first 64 test images' labels
        z_gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # private: the training RNG is left alone
        self.fixed_z = torch.randn(64, self.latent_dim, generator=z_gen).to(self.device)
        held = self.test_batches or self.batches  # a GAN may hold out nothing (--test-fraction 0)
        x, y = next(held.epoch(0))
        self.fixed_x, self.fixed_y, labels = x[:8], None if y is None else y[:8], held.labels
        self.sample_y = None if labels is None else labels[torch.arange(64, device=labels.device) % len(labels)]
        self.epoch, self.pos, self.step, self.best = 0, 0, 0, math.inf
        self.meter, self.meter_n, self.first_bad, self.stop, self.saving = {}, 0, {}, [], False  # stop: signals
        if state is not None:
            self.load_state(state)

    def noise(self, n, *shape, draw=torch.randn, dtype=None):
        """N(0, I) in latent space (or `draw` of `shape`): this rank's slice of one global draw."""
        eps = draw(n * self.world, *(shape or (self.latent_dim,)), device=self.device, dtype=dtype)
        return eps[self.rank * n:(self.rank + 1) * n]

    def count(self, out, n_batches):
        """Add a step's terms to the sums, noting each one's first non-finite step (on the device)."""
        self.pos, self.step, self.meter_n = self.pos + n_batches, self.step + 1, self.meter_n + 1
        for k, v in ((k, v.detach().float()) for k, v in out.items() if v is not None):
            self.meter[k] = self.meter[k] + v if k in self.meter else v
            bad = torch.where(torch.isfinite(v), NEVER, self.step)
            self.first_bad[k] = torch.minimum(self.first_bad[k], bad) if k in self.first_bad else bad

    def means(self):
        """The epoch's mean of each term; under torchrun averaged over the ranks (a collective)."""
        if self.world > 1 and self.meter:
            flat = torch.stack(list(self.meter.values()))
            torch.distributed.all_reduce(flat)
            self.meter = dict(zip(self.meter, flat / self.world))  # every rank holds the global sums
        return {k: float(v) / max(self.meter_n, 1) for k, v in self.meter.items()}

    def stopping(self):
        """Did a signal ask the run to stop? Under torchrun any rank's signal stops them all."""
        if self.world == 1:
            return bool(self.stop)
        flag = torch.tensor([len(self.stop)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def check_finite(self):
        """Stop at the first NaN/Inf in a loss, gradient norm or weight, before anything is saved."""
        bad = {k: int(s) for k, s in self.first_bad.items() if s < NEVER} or {  # else the weights: an update with
            f"the weights of {k}": self.step for k, m in self.nets.items()      # a finite gradient can still overflow
            if not torch.stack([torch.isfinite(t).all() for t in m.state_dict().values() if t.is_floating_point()]).all()}
        if bad:
            step, kept = min(bad.values()), os.path.join(self.out, "last.pt")
            kept = f"{kept} holds the last good checkpoint" if os.path.exists(kept) else "no checkpoint was written yet"
            raise FloatingPointError(f"NaN/Inf in {', '.join(k for k, s in bad.items() if s == step)} at step "
                                     f"{step} (epoch {self.epoch + 1}); training stopped and nothing non-finite was "
                                     f"saved: {kept}. Try a lower --lr or --grad-clip (e.g. --grad-clip 1)")

    def checkpoint(self, name="last.pt"):
        self.check_finite()
        self.means()  # under torchrun: the global sums, which the checkpoint keeps
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        state = {"format": models.FORMAT, "nets": self.nets.state_dict(), "config": self.cfg, "rng": rng,
                 "optimizers": {k: o.state_dict() for k, o in self.opts.items()},
                 "epoch": self.epoch, "pos": self.pos, "step": self.step, "best": self.best,
                 "meter": {k: v.detach().cpu() for k, v in self.meter.items()}, "meter_n": self.meter_n}
        if self.main:
            self.saving = True  # a second Ctrl-C waits for the write to end (main's on_signal)
            try:
                models.save_checkpoint(state, os.path.join(self.out, name))
            finally:
                self.saving = False

    def load_state(self, st):
        """Restore a checkpoint; one that does not fit this run is a UsageError naming what failed."""
        try:
            nets = {k: v for k, v in st["nets"].items() if "G_ema" in self.nets or not k.startswith("G_ema.")}
            if "G_ema" in self.nets and not any(k.startswith("G_ema.") for k in nets):  # --ema added on resume
                nets.update({"G_ema." + k[2:]: v for k, v in nets.items() if k.startswith("G.")})
            self.nets.load_state_dict(nets)
            for k, o in self.opts.items():
                o.load_state_dict(st["optimizers"][k])
            self.epoch, self.pos, self.step, self.best = int(st["epoch"]), int(st["pos"]), int(st["step"]), float(st["best"])
            self.meter, self.meter_n = {k: v.to(self.device) for k, v in st["meter"].items()}, int(st["meter_n"])
            torch.set_rng_state(st["rng"]["torch"])
            if st["rng"].get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise UsageError(f"the checkpoint does not fit --model {self.cfg['model']}: {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:300]}")

def add_update_hooks(run):
    """What wraps every update: a hook between backward and step. Under torchrun it averages the
    gradients over the processes (data parallelism in one all-reduce); then it reads their norm or
    clips it (--grad-clip), for the loop to log as grad_norm_NET: the NaN watch sees it there."""
    def hook(opt, name):
        params = opt.param_groups[0]["params"]
        grads = [p.grad for p in params if p.grad is not None]
        if run.world > 1:
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            for g, part in zip(grads, (flat / run.world).split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        clip = run.cfg["grad_clip"]
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.nn.utils.get_total_norm(grads)
        norms[f"grad_norm_{name}"] = norm
    norms = {}
    for name, opt in run.opts.items():
        opt.register_step_pre_hook(lambda opt, args, kwargs, name=name: hook(opt, name))
    return norms

# -----------------------------------------------------------------------------
# The run folder, signals and the command line.
def claim_folder(out, fresh):
    """Create the run folder and hold a flock on OUT/.lock while the process lives (none is left
    stale); refuse a busy folder, or for a fresh run one that holds a run. Rank 0 only."""
    if not out.isprintable():
        raise UsageError(f"--out {out!r}: a folder name with a newline or other control character is refused")
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    try:
        os.makedirs(out, exist_ok=True)  # samples/ and recon/ (autoencoders) come with their first pictures
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot write the run folder {out}: {e.strerror or e}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fresh and os.path.isfile(os.path.join(out, "last.pt")):
            raise UsageError(f"{out} already holds a run (last.pt): continue it with --resume {out}, "
                             f"or train into another --out")
        if fresh and os.path.isfile(os.path.join(out, "config.json")):  # a run that died before its first checkpoint
            print(f"note: {out} holds a run that stopped before its first checkpoint; starting it again")
    except (BlockingIOError, UsageError) as e:
        os.close(fd)
        raise e if isinstance(e, UsageError) else UsageError(
            f"{out} is in use: another train.py holds its lock; wait for it to end, or train into another --out")
    for name in os.listdir(out):  # under the lock: no running process owns these
        if name.startswith(".tmp-"):  # a write a kill cut short
            os.remove(os.path.join(out, name))
    return fd

# Flags that may change on --resume; any other flag must agree with the run's config.json.
RESUMABLE = {"epochs", "max_steps", "out", "device", "quiet", "log_every", "checkpoint_every",
             "resume", "compile", "amp", "channels_last", "ema"}
# The flags of these groups belong to these families; giving one to another family is refused.
FAMILIES = {"autoencoders": {"autoencoder", "vaegan"}, "vaegan": {"vaegan"}, "GANs": {"adversarial", "wasserstein"}}
ON_OFF, SWITCH, M = argparse.BooleanOptionalAction, "store_true", "(default: per model, below)"
EXTRA = {"--betas": dict(nargs=2, metavar=("B1", "B2")), "--device": dict(default="auto")}  # else default None: unset
FLAGS = [  # (group, flag, type | choices | action, help)
    ("run", "--model", sorted(SEED_DEFAULTS), "what to train (required unless --resume)"),
    ("run", "--data", str, "folder or .zip of face images (default: the built-in synthetic faces)"),
    ("run", "--n-synthetic", data.between(int, 1, 10 ** 6), "how many synthetic faces to draw (default: 10000)"),
    ("run", "--image-size", str, f"int or HxW, e.g. 64 or 64x48 {M}"),
    ("run", "--epochs", data.between(int, 1, 10 ** 6), f"passes over the training set {M}"),
    ("run", "--max-steps", data.between(int, 1, 10 ** 9), "stop after N steps (a GAN step ends with one G update)"),
    ("run", "--batch-size", data.between(int, 1, 65536), f"global batch size {M}"),
    ("run", "--lr", data.positive_float, f"learning rate of every net {M}"),
    ("run", "--latent-dim", data.between(int, 1, 8192), "size of z (default: vae, vae-in 64; dcgan, wgan, wgan-gp 100; "
                                                "vae-vgg 512; others 128)"),
    ("run", "--seed", data.seed_int, "seeds weights, data split, order and augmentation (default: 0)"),
    ("run", "--test-fraction", data.unit_interval, "held-out share of the images, never trained on; 0 for GANs: "
                                                   "all train, and facegen.py evaluate cannot run (default: 0.2)"),
    ("run", "--device", ["auto", "cpu", "cuda"], "auto: CUDA when present (default: auto)"),
    ("run", "--out", str, "run folder (default: runs/MODEL, or the next free runs/MODEL-2, -3, ...)"),
    ("run", "--resume", str, "run folder or checkpoint to continue exactly"),
    ("autoencoders", "--recon", ["gnll", "mse", "mse-mean"], f"Gaussian NLL, summed or per-pixel squared error {M}"),
    ("autoencoders", "--obs-std", data.positive_float, f"observation sigma of the Gaussian NLL {M}"),
    ("autoencoders", "--kl-weight", data.non_negative, f"beta on the KL term {M}"),
    ("autoencoders", "--recon-scale", data.positive_float, "factor on the reconstruction term (default: 1)"),
    ("vaegan", "--adv-weight", data.non_negative, "w in w*L_adv + recon + beta*KL (default: 1)"),
    ("GANs", "--arch", list(models.ARCHS), f"classic: 5 convT 4x4; seed002: linear + 4 convT 5x5 {M}"),
    ("GANs", "--critic-norm", list(models.CRITIC_NORMS), "wgan-gp critic normalisation (default: none)"),
    ("GANs", "--gan-loss", list(losses.GAN_LOSSES), f"bce (non-saturating), ls (LSGAN), ls-sigmoid (report 004's MSE on σ(D)), wasserstein, hinge {M}"),
    ("GANs", "--n-critic", data.between(int, 1, 100), f"critic updates per G update, each on its own batch {M}"),
    ("GANs", "--clip", data.non_negative, f"WGAN weight clipping: critic weights kept in [-c, c] {M}"),
    ("GANs", "--gp-weight", data.non_negative, f"WGAN-GP lambda {M}"),
    ("GANs", "--ema", data.unit_interval, "sample from G_ema, a moving average of G with this decay (e.g. 0.999)"),
    ("GANs", "--reuse-fakes", ON_OFF, f"G's update scores the critic's fakes, not fresh z {M}"),
    ("optimizer", "--optimizer", ["adam", "rmsprop"], f"for every net {M}"),
    ("optimizer", "--betas", data.unit_interval, f"Adam's beta1 beta2, e.g. --betas 0.5 0.999 {M}"),
    ("optimizer", "--grad-clip", data.positive_float, "clip each net's global gradient norm to this"),
    ("labels", "--conditional", SWITCH, "condition every net on labels: synthetic factors, subfolders or --attr-file"),
    ("labels", "--attr-file", str, "CelebA-style list_attr_celeba.txt (+-1 per attribute) for --data"),
    ("labels", "--attrs", lambda s: [a for a in s.split(",") if a], "columns of --attr-file, e.g. Smiling,Male"),
    ("labels", "--balance-labels", SWITCH, "draw images so that each label value is equally frequent"),
    ("augmentation", "--flip", ON_OFF, f"random horizontal flip, p = 0.5 {M}"),
    ("augmentation", "--jitter", data.non_negative, f"colour jitter strength {M}"),
    ("logging and speed", "--checkpoint-every", data.between(int, 1, 10 ** 9), "also write last.pt every N steps"),
    ("logging and speed", "--log-every", data.between(int, 1, 10 ** 9), "steps between progress lines and NaN checks (default: 20)"),
    ("logging and speed", "--quiet", SWITCH, "only the per-epoch summary"),
    ("logging and speed", "--amp", SWITCH, "bf16 autocast where bf16 is native (else fp32)"),
    ("logging and speed", "--channels-last", ON_OFF, "NHWC memory format (default: on for CPU)"),
    ("logging and speed", "--compile", SWITCH, "torch.compile the networks"),
    ("logging and speed", "--fused-adam", ON_OFF, "one-kernel Adam update (default: on)"),
]

def parse_args(argv=None):
    table = "\n".join(f"  {m:10s}" + " ".join(f"{k}={v}" for k, v in d.items()) for m, d in SEED_DEFAULTS.items())
    every = " ".join(f"{k}={COMMON_DEFAULTS[k]}" for k in ("image_size", "batch_size", "optimizer", "betas", "n_critic"))
    p = argparse.ArgumentParser(description="Train a face VAE or GAN into a run folder.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"per-model defaults (the reports' values; a flag given wins):\n{table}\n"
                                       f"  unless given above: {every}")
    groups = {g: p.add_argument_group(g) for g in dict.fromkeys(group for group, *_ in FLAGS)}
    for group, flag, kind, text in FLAGS:
        how = dict(choices=kind) if isinstance(kind, list) else dict(action=kind) if kind in (ON_OFF, SWITCH) \
            else dict(type=kind)
        groups[group].add_argument(flag, **how, help=text, **{"default": None, **EXTRA.get(flag, {})})
    return p.parse_args(argv)

def resolve(args):
    """Unset flags take the model's defaults -> config.json's dict; flags that do nothing are refused."""
    defaults = dict(COMMON_DEFAULTS, arch=models.DEFAULT_ARCH.get(args.model),
                    latent_dim=models.DEFAULT_LATENT[args.model], **SEED_DEFAULTS[args.model])
    given = {k for k, v in vars(args).items() if v is not None}
    cfg = {**vars(args), **defaults, **{k: v for k, v in vars(args).items() if v is not None}}
    cfg["out"] = cfg["out"] or os.path.join("runs", args.model)
    for k in ("data", "attr_file"):  # as absolute paths: a resume from another folder finds them
        cfg[k] = cfg[k] if cfg[k] in (None, "synthetic") else os.path.abspath(os.path.expanduser(cfg[k]))
    cfg["image_size"] = list(data.parse_size(cfg["image_size"]))
    if tuple(cfg["image_size"]) not in models.supported_sizes(args.model):
        raise UsageError(f"--model {args.model} supports image sizes " + ", ".join(f"{h}x{w}" for h, w in
                         models.supported_sizes(args.model)) + f"; got {'x'.join(map(str, cfg['image_size']))}")
    cfg["family"] = models.FAMILY[args.model]
    unused = [flag for group, flag, *_ in FLAGS
              if flag[2:].replace("-", "_") in given and cfg["family"] not in FAMILIES.get(group, [cfg["family"]])]
    if unused:
        raise UsageError(f"--model {args.model} does not use " + ", ".join(unused))
    adam, cond = ("--optimizer adam", cfg["optimizer"] == "adam"), ("--conditional", cfg["conditional"])
    for flag, (needs, ok) in dict(betas=adam, fused_adam=adam, obs_std=("--recon gnll", cfg["recon"] == "gnll"),
                                  attr_file=cond, balance_labels=cond, attrs=("--attr-file", cfg["attr_file"]),
                                  kl_weight=("a variational model (ae has no KL term)", args.model != "ae")).items():
        if flag in given and not ok:
            raise UsageError(f"--{flag.replace('_', '-')} only applies with {needs} (this run: --model {args.model})")
    return cfg

def config_from(args):
    """Resolve the flags, or on --resume take the run's config and refuse disagreeing flags."""
    if not args.resume:
        if not args.model:
            raise UsageError("--model is required (or --resume a run)")
        cfg = resolve(args)
        if not args.out:  # a fresh run never stops on an earlier run's default folder: runs/vae, runs/vae-2, ...
            base = cfg["out"]   # runs/MODEL
            cfg["out"] = next(o for i in itertools.count(1) if not any(os.path.exists(os.path.join(
                o := base + (f"-{i}" if i > 1 else ""), f)) for f in ("last.pt", "config.json")))
            if cfg["out"] != base:
                print(f"note: {base} holds a run; this one trains into {cfg['out']}")
        return cfg, None
    state = models.load_checkpoint(args.resume)
    saved = state["config"]
    fresh = resolve(argparse.Namespace(**{**vars(args), "model": args.model or saved["model"]}))
    given = {k for k, v in vars(args).items() if v is not None and k not in RESUMABLE}
    differ = [f"{k} {fresh[k]} (the run has {saved.get(k)})" for k in sorted(given)
              if json.dumps(fresh[k]) != json.dumps(saved.get(k))]
    if differ:
        raise UsageError("--resume: these flags disagree with the run's config: " + "; ".join(differ))
    cfg = {**fresh, **saved, "resume": args.resume}
    cfg.update({k: v for k, v in vars(args).items() if k in RESUMABLE and v is not None})
    cfg["out"] = args.out or models.run_folder(args.resume)  # the folder given, wherever it was copied or moved
    return cfg, state

def main(argv=None):
    """Exit codes: 0 done, 1 a write failed, 2 usage, 3 NaN/Inf, 130 interrupted; one line each."""
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source line
    out = lock = run = None
    try:
        cfg, state = config_from(args)
        out = cfg["out"]
        resumed_here = cfg.get("resume") and os.path.realpath(models.run_folder(cfg["resume"])) == os.path.realpath(out)
        lock = claim_folder(out, fresh=not resumed_here)
        run = Run(cfg, state)  # builds and loads everything
        if run.main:
            data.write_json(os.path.join(out, "config.json"), cfg)
        def on_signal(signum, frame):  # the first stops the loop after the step in flight, a second at
            run.stop.append(signum)     # once, unless a checkpoint is being written: that one ends first
            if len(run.stop) > 1 and not run.saving:
                raise KeyboardInterrupt
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                    if threading.current_thread() is threading.main_thread()}
        try:
            train(run)
            if run.world > 1:  # no rank tears the process group down before rank 0's last pictures
                torch.distributed.barrier()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the work, resume later with --resume
            if len(run.stop) > 1:  # a second signal cut the step short: the last checkpoint stands
                raise
            run.checkpoint()
            print(f"\ninterrupted at step {run.step}; saved {out}/last.pt (resume with --resume {out})")
            return 130
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
    except (UsageError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 3
    except OSError as e:
        hint = f"; fix it, then continue with --resume {out}" if out and os.path.isfile(os.path.join(out, "last.pt")) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training, or a second signal
        kept = out and os.path.isfile(os.path.join(out, "last.pt"))
        print(f"\ninterrupted; {f'{out}/last.pt holds the last checkpoint' if kept else 'nothing was saved'}", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            os.close(lock)  # releases the run folder
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if run.main:
        print(f"done: {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
