"""Every facegen loss, each a small pure tensor function with its equation.

One reduction throughout: sum over pixels / latent dimensions, mean over the batch, so the
VAE losses (and the negative ELBO) are in nats per image. GAN losses are means over the batch
of one score per image. Discriminators/critics return raw scores (logits): the sigmoid lives
inside the BCE and ls-sigmoid losses, never in the network.

    loss                          equation                           source
    gaussian_nll                  ½ Σ[((x − μ)/σ)² + log 2πσ²]       Kingma & Welling 2014, Wuga VAE
    kl_divergence                 −½ Σ(1 + log σ² − μ² − σ²)         Kingma & Welling 2014, Wuga VAE
    mse_recon                     Σ (x − x_hat)²                     the LFW report
    negative_elbo                 recon_scale·recon + kl_weight·KL   Wuga, Perriu, the LFW report
    d_loss, g_loss                BCE on logits, non-saturating G    Goodfellow 2014; the GAN reports
    d_loss_ls, g_loss_ls          least squares on raw scores        Mao 2017 (LSGAN), Akbari
    d/g_loss_ls_sigmoid           least squares on σ(logits)         Akbari (D outputs σ; MSE)
    critic_loss, critic_gen_loss  E[D(x̃)] − E[D(x)];  −E[D(x̃)]     Arjovsky 2017, anime GAN report
    gradient_penalty              E[(‖∇D(x̂)‖₂ − 1)²], λ by caller   Gulrajani 2017, anime GAN report
    d_loss_hinge, g_loss_hinge    E[relu(1 − D(x))] + E[relu(1 + D(x̃))]; −E[D(x̃)]   Miyato 2018 (SN-GAN)

The reports (seed reports 000-004): the Wuga VAE (Reuveni & Gisser on Wuga's method), Perriu's
CelebA VAE, the anime GAN report (Chen, Ning & Lin), the LFW report (Xu), Akbari's anime DCGAN.

Weight clipping (WGAN) is a parameter update, not a loss: it lives beside the training loop.
"""
import math

import torch
import torch.nn.functional as F

def _batch_mean(t):
    """Sum each sample's terms (every dim but the first), then average over the batch."""
    return t.flatten(1).sum(1).mean()

# ---- VAE: reconstruction, KL, ELBO -----------------------------------------------------------
def gaussian_nll(x, mean, obs_std, reduction="mean"):
    """Gaussian negative log-likelihood of x under N(mean, σ²I), σ fixed (Kingma & Welling 2014).

        -log p(x|z) = ½ Σ_pixels [ ((x − mean)/σ)² + log 2πσ² ]

    Reduction: sum over C·H·W, mean over the batch (nats per image); reduction="none" keeps
    one sum per image (shape B), as facegen.py's importance-weighted bound needs.
    σ = obs_std: a float or a tensor broadcastable to x: the Wuga VAE's "GNLL var" (its
    observation std: 0.01, or 0.1 for the VGG model).

    Deviation: the Wuga report writes the GNLL as 0.5·Σ(x − ŷ)² / (var² + log var), not a
    likelihood: for var = 0.01 the denominator is ≈ −4.6, so minimising it would *reward*
    reconstruction error. We compute the real Gaussian NLL above, with σ = var.
    """
    var = torch.as_tensor(obs_std, dtype=x.dtype) ** 2  # σ²; a float stays a CPU scalar: no copy to the GPU, no sync
    nll = 0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return _batch_mean(nll) if reduction == "mean" else nll.flatten(1).sum(1)

def kl_divergence(mu, logvar):
    """KL( N(mu, diag e^logvar) ‖ N(0, I) ) in closed form (Kingma & Welling 2014, appendix B).

        KL = −½ Σ_latents (1 + logvar − mu² − e^logvar)

    Reduction: sum over latent dimensions, mean over the batch. The Wuga report has the same formula.
    """
    return _batch_mean(-0.5 * (1 + logvar - mu ** 2 - logvar.exp()))

def mse_recon(x, x_hat):
    """Squared-error reconstruction loss (the LFW report's autoencoder and VAE use MSE).

        L = Σ_pixels (x − x_hat)²

    Reduction: sum over C·H·W, mean over the batch. Up to constants it is gaussian_nll with
    σ² = ½; nn.MSELoss's default (mean over pixels too) is this divided by C·H·W.
    """
    return _batch_mean((x - x_hat) ** 2)

def negative_elbo(x, x_hat, mu, logvar, recon="gnll", obs_std=1.0, kl_weight=1.0, recon_scale=1.0):
    """Weighted negative ELBO of a batch -> (L, recon, KL, mse_px):

        L = recon_scale · recon + kl_weight · KL(q(z|x) ‖ N(0, I))      (an autoencoder, logvar None: KL = 0)

    recon: gaussian_nll with σ = obs_std ("gnll", nats), mse_recon ("mse", per image) or mse_recon per pixel
    ("mse-mean": the scale of Perriu's λ). With gnll at z ~ q(z|x) (a one-sample estimate of −E_q[log p(x|z)])
    and both weights 1 this is −ELBO = −E_q[log p(x|z)] + KL(q‖p), nats per image: Perriu's "ELBO = E_q[log q(z|x)
    − log p(z)] − E_q[log p(x|z)]", a loss to minimise. The weights reproduce the reports' experiments:
      Wuga part 2: "KL × 10, GNLL / 100" -> kl_weight=10, recon_scale=0.01 (then kl_weight=50);
      Perriu: λ·KL with λ = 1e-5 (1e-3 … 1e-6 explored) -> recon="mse-mean", kl_weight=λ;
      the LFW report: MSE + KLD weight 0.1 / 0.01 (0.2 tried) -> recon="mse", kl_weight=w;
      β-VAE (Higgins et al. 2017) is kl_weight = β.
    Only weights (1, 1) with the Gaussian NLL give a bound on −log p(x) in nats. mse_px, only logged: the mean squared
    error per pixel of images in [0, 1] (x is in [-1, 1]), the figure the LFW report compares its models by.
    Network outputs (bf16 under autocast) are computed in x's precision.
    """
    x_hat = x_hat.to(x.dtype)
    if recon == "gnll":
        nll = gaussian_nll(x, x_hat, obs_std)                        # −log p(x | z)
    elif recon == "mse-mean":
        nll = mse_recon(x, x_hat) / x[0].numel()                     # per pixel
    else:
        nll = mse_recon(x, x_hat)                                    # Σ (x − x̂)² per image
    kl = (torch.zeros((), device=x.device) if logvar is None        # a plain autoencoder: no KL
          else kl_divergence(mu.to(x.dtype), logvar.to(x.dtype)))   # KL(q(z|x) ‖ N(0, I))
    mse_px = (x_hat.detach() - x).pow(2).mean() / 4                  # [-1, 1] -> [0, 1]: squared errors / 4
    return recon_scale * nll + kl_weight * kl, nll, kl, mse_px

# ---- GAN (binary cross-entropy on logits, non-saturating generator) --------------------------
def d_loss(real_logits, fake_logits):
    """Discriminator BCE (Goodfellow et al. 2014), D(x) = sigmoid(l):

        L_D = −E[log D(x)] − E[log(1 − D(G(z)))]
            = mean softplus(−l_real) + mean softplus(l_fake)

    i.e. BCE(real → 1) + BCE(fake → 0), each a mean over its batch (Akbari: "the sum of loss for
    real and fake"). softplus(l) = log(1 + e^l) never forms sigmoid(l), so it and its gradient
    stay finite for logits of any size.
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

def g_loss(fake_logits):
    """Non-saturating generator loss (Goodfellow et al. 2014, §3):

        L_G = −E[log D(G(z))] = mean softplus(−l_fake)     (mean over the batch)

    Minimising log(1 − D(G(z))) instead (the anime GAN report's slide) saturates: its gradient
    vanishes when D confidently rejects the fakes. This is BCE(fake → 1), Akbari's "real labels".
    """
    return F.softplus(-fake_logits).mean()

# ---- Least-squares GAN (Akbari's "MSE" loss) -------------------------------------------------
def d_loss_ls(real_out, fake_out):
    """Least-squares discriminator loss (LSGAN, Mao et al. 2017, with a = 0, b = c = 1):

        L_D = mean (D(x) − 1)² + mean D(G(z))²     on raw scores (no sigmoid), means over the batch

    Akbari: "the loss function ... is MSE; discriminator's loss is the sum of loss for real and
    fake images". Deviation: the paper's ½ on each term is dropped because the report sums the MSEs.
    """
    return ((real_out - 1) ** 2).mean() + (fake_out ** 2).mean()

def g_loss_ls(fake_out):
    """Least-squares generator loss (Mao et al. 2017, c = 1): L_G = mean (D(G(z)) − 1)² over the batch."""
    return ((fake_out - 1) ** 2).mean()

def d_loss_ls_sigmoid(real_logits, fake_logits):
    """Akbari's loss as the report describes it: D outputs a probability σ(l) (§3.1), and its loss
    is the MSE against the labels, real 1 and fake 0, summed over the two batches (§3.3):

        L_D = mean (σ(l_real) − 1)² + mean σ(l_fake)²     (means over each batch)

    The probabilities are bounded, so no D update can carry them past the targets (unlike the raw
    scores of d_loss_ls). The price is the saturating GAN's (Goodfellow et al. 2014): the gradient
    2(σ − t)·σ(1 − σ) vanishes once σ nears 0 or 1, so a D that is confidently wrong barely moves.
    """
    return ((torch.sigmoid(real_logits) - 1) ** 2).mean() + (torch.sigmoid(fake_logits) ** 2).mean()

def g_loss_ls_sigmoid(fake_logits):
    """Akbari's G loss: the MSE of σ(l_fake) against "the real labels" 1 (§3.5), mean over the batch:

        L_G = mean (σ(l_fake) − 1)²

    Saturating: when D confidently rejects a fake (σ → 0) its gradient −2σ(1 − σ) vanishes too.
    """
    return ((torch.sigmoid(fake_logits) - 1) ** 2).mean()

# ---- Wasserstein GAN (critic with weight clipping, or with gradient penalty) -----------------
def critic_loss(real_scores, fake_scores):
    """WGAN critic loss (Arjovsky et al. 2017, Algorithm 1), to minimise:

        L_D = E[D(G(z))] − E[D(x)]     (mean over each batch)

    −L_D estimates the Wasserstein-1 distance when D is 1-Lipschitz (clipping or a penalty).
    """
    return fake_scores.mean() - real_scores.mean()

def critic_gen_loss(fake_scores):
    """WGAN generator loss (Arjovsky et al. 2017): L_G = −E[D(G(z))], mean over the batch.

    Deviation: the anime GAN report writes the G objective as +(1/m) Σ D(G(z)); minimising that
    would push the fakes *away* from what the critic scores as real. We use the paper's sign.
    """
    return -fake_scores.mean()

def gradient_penalty(critic, real, fake, eps=None):
    """WGAN-GP gradient penalty (Gulrajani et al. 2017, Algorithm 1), *without* λ:

        GP = E_x̂[ (‖∇_x̂ D(x̂)‖₂ − 1)² ],   x̂ = ε x + (1 − ε) x̃,   ε ~ U[0, 1]

    ε is drawn once per sample (shape B×1×1×1, or given as `eps`) and the norm is taken over all
    C·H·W values of each sample's gradient (a per-pixel norm is a common bug). Mean over the
    batch. The caller adds λ·GP to critic_loss (λ = 10 in the paper; the anime GAN report tried
    0.5 and 5). create_graph=True keeps the penalty differentiable w.r.t. the critic's
    parameters; fake is detached: the penalty trains the critic only. The per-sample gradient is
    only meaningful for a critic without BatchNorm (samples in a batch must not interact).
    """
    if eps is None:  # train.py passes its rank's slice of one global draw under torchrun
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), dtype=real.dtype, device=real.device)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    # Σ_i D(x̂_i) has gradient ∇D(x̂_i) in row i, since each score depends on its own sample only.
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    grad_norm = grad.flatten(1).norm(2, dim=1)                              # (B,)
    return ((grad_norm - 1) ** 2).mean()

# ---- Hinge loss (SN-GAN, the anime GAN report's future work) ---------------------------------
def d_loss_hinge(real_scores, fake_scores):
    """Hinge discriminator loss (Lim & Ye 2017; Miyato et al. 2018, eq. 17 with SN), to minimise:

        L_D = E[relu(1 − D(x))] + E[relu(1 + D(x̃))]     on raw scores, mean over each batch

    A real image scored above +1, or a fake below −1, costs nothing: D stops pushing samples it
    already separates by the margin, and its gradient comes from the ones near the boundary.
    """
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()

def g_loss_hinge(fake_scores):
    """Hinge generator loss (Miyato et al. 2018): L_G = −E[D(x̃)], mean over the batch: the
    Wasserstein generator loss; only D's loss has the margin."""
    return -fake_scores.mean()

# name (train.py's --gan-loss) -> (discriminator/critic loss, generator loss)
GAN_LOSSES = {
    "bce": (d_loss, g_loss),
    "ls": (d_loss_ls, g_loss_ls),
    "ls-sigmoid": (d_loss_ls_sigmoid, g_loss_ls_sigmoid),
    "wasserstein": (critic_loss, critic_gen_loss),
    "hinge": (d_loss_hinge, g_loss_hinge),
}
