"""losses.py against independent references: torch's built-in losses, torch.distributions,
closed forms (the exact ELBO of a linear-Gaussian model, a linear critic's gradient norm) and a
Monte-Carlo KL estimate. float64 wherever exactness is asserted."""
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import MultivariateNormal, Normal, kl_divergence as torch_kl
from torch.testing import assert_close

import losses
from losses import (GAN_LOSSES, critic_gen_loss, critic_loss, d_loss, d_loss_hinge, d_loss_ls, d_loss_ls_sigmoid,
                    g_loss, g_loss_hinge, g_loss_ls, g_loss_ls_sigmoid, gaussian_nll, gradient_penalty,
                    kl_divergence, mse_recon, negative_elbo)

D64 = torch.float64
ZERO = torch.tensor(0.0, dtype=D64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(g, *size):
    return torch.randn(*size, generator=g, dtype=D64)


# ---------------------------------------------------------------------------------------------
# Gaussian NLL, KL, MSE, ELBO
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("obs_std", [0.01, 0.1, 1.0])
def test_gaussian_nll_matches_torch_gaussian_nll_loss_and_normal_log_prob(obs_std):
    g = gen(1)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=D64) * 2 - 1
    mean = x + 0.05 * randn(g, x.shape)
    ours = gaussian_nll(x, mean, obs_std)
    var = torch.full_like(x, obs_std ** 2)
    ref = nn.GaussianNLLLoss(full=True, reduction="sum")(mean, x, var) / x.shape[0]
    assert_close(ours, ref)
    ref2 = -Normal(mean, obs_std).log_prob(x).sum() / x.shape[0]
    assert_close(ours, ref2)


def test_gaussian_nll_tensor_std_and_mse_relation():
    g = gen(2)
    x, mean = randn(g, 2, 3, 4, 4), randn(g, 2, 3, 4, 4)
    std = torch.rand(3, 4, 4, generator=g, dtype=D64) + 0.1     # per-pixel σ, broadcast over batch
    assert_close(gaussian_nll(x, mean, std), -Normal(mean, std).log_prob(x).sum() / 2)
    # with a scalar σ: NLL = SSE / (2σ²) + (D/2) log 2πσ², SSE = mse_recon (per image, batch mean)
    sigma, d = 0.3, 3 * 4 * 4
    sse = ((x - mean) ** 2).sum() / 2
    assert_close(mse_recon(x, mean), sse)
    assert_close(mse_recon(x, mean), F.mse_loss(mean, x, reduction="sum") / 2)
    const = d / 2 * math.log(2 * math.pi * sigma ** 2)
    assert_close(gaussian_nll(x, mean, sigma), sse / (2 * sigma ** 2) + const)


def test_kl_divergence_matches_torch_distributions():
    g = gen(3)
    mu = randn(g, 5, 16)
    logvar = randn(g, 5, 16)
    ref = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert_close(kl_divergence(mu, logvar), ref)
    assert_close(kl_divergence(torch.zeros_like(mu), torch.zeros_like(logvar)), ZERO)


def test_kl_divergence_matches_monte_carlo_estimate():
    # KL(q‖p) = E_q[log q(z) − log p(z)]. With n samples the estimate's standard error is
    # sd/√n, estimated from the samples themselves; 5 standard errors is a two-sided CLT bound
    # with failure probability ~6e-7, and the fixed seed makes the test deterministic anyway.
    g = gen(4)
    mu = randn(g, 3, 4)
    logvar = 0.5 * randn(g, 3, 4)
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)
    n = 200_000
    z = mu + (0.5 * logvar).exp() * randn(g, n, 3, 4)
    per_draw = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(-1)      # (n,): batch mean of sums
    estimate, stderr = per_draw.mean(), per_draw.std() / math.sqrt(n)
    assert stderr < 0.01                                             # the test has power
    assert abs(kl_divergence(mu, logvar) - estimate) < 5 * stderr


def test_elbo_of_linear_gaussian_with_exact_posterior_is_log_evidence():
    # Model: z ~ N(0, I_k), x|z ~ N(Wz + b, σ²I_d), so p(x) = N(b, WWᵀ + σ²I) exactly.
    # With orthogonal columns (WᵀW = diag(s²)) the posterior N(m, S) is diagonal:
    #   S = (I + WᵀW/σ²)⁻¹,  m = S Wᵀ(x − b)/σ²,
    # and E_q[log p(x|z)] = −NLL(x; Wm + b, σ) − ½ tr(WᵀW S)/σ² in closed form. When q is the
    # exact posterior the ELBO equals log p(x): no sampling, equality to float64 precision.
    g = gen(5)
    B, k, shape = 6, 5, (3, 4, 4)
    d = 3 * 4 * 4
    Q, _ = torch.linalg.qr(randn(g, d, k))                              # orthonormal columns
    s = torch.rand(k, generator=g, dtype=D64) * 2 + 0.5
    W, b, sigma = Q * s, randn(g, d), 0.4
    p_x = MultivariateNormal(b, W @ W.T + sigma ** 2 * torch.eye(d, dtype=D64))
    x = p_x.sample((B,))

    S = 1 / (1 + s ** 2 / sigma ** 2)                                   # diag of posterior cov
    m = ((x - b) @ W) * S / sigma ** 2                                  # (B, k) posterior means
    logvar = S.log().expand(B, k)

    def neg_elbo(mu):
        x_mean = (mu @ W.T + b).view(B, *shape)
        trace = (s ** 2 * S).sum()                                      # tr(WᵀW S)
        one_point = negative_elbo(x.view(B, *shape), x_mean, mu, logvar, "gnll", sigma)[0]   # weights (1, 1)
        return one_point + 0.5 * trace / sigma ** 2                     # + E_q over z of the NLL's rest

    log_px = p_x.log_prob(x).mean()
    assert_close(-neg_elbo(m), log_px)
    # any other q is a strict lower bound
    assert -neg_elbo(m + 0.1) < log_px - 1e-3


def test_negative_elbo_terms_and_weights_against_torch():
    g = gen(7)
    x, x_hat, mu, logvar = randn(g, 4, 3, 5, 5), randn(g, 4, 3, 5, 5), randn(g, 4, 6), randn(g, 4, 6) * 0.3
    kl = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(ZERO, 1.0)).sum(1).mean()
    sse = F.mse_loss(x_hat, x, reduction="sum") / 4
    nll = -Normal(x_hat, 0.1).log_prob(x).sum() / 4
    for recon, want in (("mse", sse), ("mse-mean", sse / 75), ("gnll", nll)):   # Wuga VAE part 2: KL×10, GNLL/100
        loss, r, k, mse_px = negative_elbo(x, x_hat, mu, logvar, recon, obs_std=0.1, kl_weight=10, recon_scale=0.01)
        assert_close(r, want)
        assert_close(k, kl)
        assert_close(loss, 0.01 * want + 10 * kl)
        assert_close(mse_px, F.mse_loss(x_hat, x) / 4)                  # per pixel, images in [0, 1]
    loss, _, k, _ = negative_elbo(x, x_hat, None, None, "mse")           # an autoencoder: no KL
    assert_close(loss, sse)
    assert float(k) == 0.0


# ---------------------------------------------------------------------------------------------
# BCE GAN losses
# ---------------------------------------------------------------------------------------------

def test_bce_losses_match_torch():
    g = gen(6)
    real, fake = randn(g, 8) * 3, randn(g, 8) * 3
    bce = F.binary_cross_entropy_with_logits
    ones, zeros = torch.ones_like(real), torch.zeros_like(fake)
    assert_close(d_loss(real, fake), bce(real, ones) + bce(fake, zeros))
    assert_close(g_loss(fake), bce(fake, torch.ones_like(fake)))
    # the textbook form on probabilities, fine for moderate logits
    p_real, p_fake = real.sigmoid(), fake.sigmoid()
    assert_close(d_loss(real, fake), F.binary_cross_entropy(p_real, torch.ones_like(p_real))
                 + F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake)))
    assert_close(g_loss(fake), -p_fake.log().mean())


def test_bce_losses_finite_for_huge_logits():
    real = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    fake = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    ld, lg = d_loss(real, fake), g_loss(fake)
    assert torch.isfinite(ld) and torch.isfinite(lg)
    # exact values: softplus(1e4) = 1e4, softplus(−1e4) = 0, softplus(0) = log 2
    assert_close(ld, torch.tensor((1e4 + math.log(2)) / 3 * 2))
    assert_close(lg, torch.tensor((1e4 + math.log(2)) / 3))
    real_grad, fake_grad = torch.autograd.grad(ld + lg, (real, fake))
    assert torch.isfinite(real_grad).all() and torch.isfinite(fake_grad).all()


def test_g_loss_is_non_saturating():
    # When D confidently rejects a fake (logit −10) the non-saturating loss still has gradient
    # ≈ −1/B; the saturating log(1 − D(G(z))) would give only ≈ −sigmoid(−10)/B ≈ −4.5e-5/B.
    fake = torch.full((4,), -10.0, dtype=D64, requires_grad=True)
    (grad,) = torch.autograd.grad(g_loss(fake), fake)
    assert_close(grad, -torch.sigmoid(-fake.detach()) / 4)
    assert (grad < -0.24).all()


# ---------------------------------------------------------------------------------------------
# Least-squares and Wasserstein losses
# ---------------------------------------------------------------------------------------------

def test_least_squares_losses():
    g = gen(7)
    real, fake = randn(g, 8), randn(g, 8)
    ones, zeros = torch.ones_like(real), torch.zeros_like(fake)
    assert_close(d_loss_ls(real, fake), F.mse_loss(real, ones) + F.mse_loss(fake, zeros))
    assert_close(g_loss_ls(fake), F.mse_loss(fake, torch.ones_like(fake)))
    assert_close(d_loss_ls(ones, zeros), ZERO)                  # D's optimum
    assert_close(g_loss_ls(ones), ZERO)                         # G fools D
    f = torch.full((4,), 0.2, dtype=D64, requires_grad=True)
    (grad,) = torch.autograd.grad(g_loss_ls(f), f)
    assert (grad < 0).all()                                     # descent pushes D(G(z)) up to 1


def test_ls_sigmoid_losses_are_mse_on_torch_sigmoid_bounded_and_saturating():
    g = gen(8)
    real, fake = 3 * randn(g, 8), 3 * randn(g, 8)
    p_real, p_fake = torch.sigmoid(real), torch.sigmoid(fake)
    assert_close(d_loss_ls_sigmoid(real, fake),
                 F.mse_loss(p_real, torch.ones_like(p_real)) + F.mse_loss(p_fake, torch.zeros_like(p_fake)))
    assert_close(g_loss_ls_sigmoid(fake), F.mse_loss(p_fake, torch.ones_like(p_fake)))
    wrong = torch.full((4,), 1e4, dtype=D64)                    # D entirely wrong, scores huge
    assert_close(d_loss_ls_sigmoid(-wrong, wrong), torch.tensor(2.0, dtype=D64))   # the bound: 1 per term
    assert_close(d_loss_ls(-wrong, wrong), torch.tensor((1e4 + 1) ** 2 + 1e8, dtype=D64))  # raw: unbounded
    # saturating: a confidently rejected fake (logit −10) gets gradient 2(σ − 1)σ(1 − σ)/B ≈ −9e-5/B
    f = torch.full((4,), -10.0, dtype=D64, requires_grad=True)
    (grad,) = torch.autograd.grad(g_loss_ls_sigmoid(f), f)
    p = torch.sigmoid(f.detach())
    assert_close(grad, 2 * (p - 1) * p * (1 - p) / 4)
    assert (grad.abs() < 1e-4).all()


def test_wasserstein_losses_and_signs():
    real = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    fake = torch.tensor([-1.0, 0.0, 1.0, 4.0], requires_grad=True)   # batch sizes may differ
    loss = critic_loss(real, fake)
    assert_close(loss, torch.tensor(1.0 - 3.0))                 # mean(fake) − mean(real) < 0
    g_real, g_fake = torch.autograd.grad(loss, (real, fake))
    assert_close(g_real, torch.full((3,), -1 / 3))              # critic raises real scores
    assert_close(g_fake, torch.full((4,), 1 / 4))               # ... and lowers fake scores
    gen_loss = critic_gen_loss(fake)
    assert_close(gen_loss, torch.tensor(-1.0))
    (g_gen,) = torch.autograd.grad(gen_loss, fake)
    assert (g_gen < 0).all()                                    # generator raises fake scores


def test_gan_losses_table():
    assert GAN_LOSSES == {"bce": (d_loss, g_loss), "ls": (d_loss_ls, g_loss_ls),
                          "ls-sigmoid": (d_loss_ls_sigmoid, g_loss_ls_sigmoid),
                          "wasserstein": (critic_loss, critic_gen_loss), "hinge": (d_loss_hinge, g_loss_hinge)}


def test_hinge_losses_match_torch_hinge_embedding_loss_and_a_loop():
    g = gen(9)
    real, fake = 2 * randn(g, 64), 2 * randn(g, 48)
    # nn.HingeEmbeddingLoss with target −1 is max(0, margin − s): margin 1 on s = D(x) and on s = −D(x̃)
    hinge = nn.HingeEmbeddingLoss(margin=1.0)
    ref = hinge(real, -torch.ones_like(real)) + hinge(-fake, -torch.ones_like(fake))
    assert_close(d_loss_hinge(real, fake), ref)
    loop = sum(max(0.0, 1 - r) for r in real.tolist()) / 64 + sum(max(0.0, 1 + f) for f in fake.tolist()) / 48
    assert_close(d_loss_hinge(real, fake).item(), loop)
    assert_close(g_loss_hinge(fake), -fake.mean())
    # beyond the margin nothing is learned: real scores > 1 and fake scores < −1 cost 0, gradient 0
    r, f = torch.tensor([1.5, 3.0], requires_grad=True), torch.tensor([-1.2, -4.0], requires_grad=True)
    loss = d_loss_hinge(r, f)
    loss.backward()
    assert loss.item() == 0 and r.grad.abs().sum() == 0 and f.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Gradient penalty
# ---------------------------------------------------------------------------------------------

class LinearCritic(nn.Module):
    """f(x) = ⟨w, x⟩ per sample: ∇ₓf = w everywhere, so GP = (‖w‖₂ − 1)² exactly."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)                   # (B,)


class Recorder(nn.Module):
    """Wraps a critic and keeps the x̂ it was called with."""

    def __init__(self, critic):
        super().__init__()
        self.critic, self.seen = critic, None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.critic(x)


def test_gradient_penalty_linear_critic_is_exact_and_not_per_pixel():
    g = gen(8)
    w = randn(g, 3, 8, 8) * 0.3
    critic = LinearCritic(w.clone())
    real, fake = randn(g, 4, 3, 8, 8), randn(g, 4, 3, 8, 8)
    gp = gradient_penalty(critic, real, fake)
    assert gp.dtype == D64
    expected = (w.norm() - 1) ** 2
    assert_close(gp, expected)
    # the common bug: a norm over channels per pixel, averaged; it gives a very different value
    per_pixel = ((w.norm(dim=0) - 1) ** 2).mean()
    assert abs(per_pixel - expected) > 1.0
    # the target norm is 1, not 0: a unit-norm critic has zero penalty
    assert_close(gradient_penalty(LinearCritic(w / w.norm()), real, fake), ZERO)


def test_gradient_penalty_reaches_critic_parameters_not_generator():
    g = gen(9)
    w = randn(g, 3, 8, 8) * 0.3
    critic = LinearCritic(w.clone())
    g_param = torch.tensor(1.5, dtype=D64, requires_grad=True)       # stands in for G's weights
    real = randn(g, 4, 3, 8, 8)
    fake = g_param * randn(g, 4, 3, 8, 8)
    gradient_penalty(critic, real, fake).backward()                  # needs create_graph=True
    # d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w/‖w‖
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0
    assert_close(critic.w.grad, 2 * (w.norm() - 1) * w / w.norm())
    # fake is detached inside: no gradient reaches G, even through a critic whose input
    # gradient depends on x̂ (quadratic f(x) = ½ Σ w x², ∇f = w ⊙ x̂)
    def quadratic(x):
        return 0.5 * (critic.w * x ** 2).flatten(1).sum(1)

    gradient_penalty(quadratic, real, fake).backward()
    assert g_param.grad is None


def test_gradient_penalty_eps_per_sample():
    torch.manual_seed(0)
    B = 6
    real, fake = torch.randn(B, 3, 8, 8, dtype=D64), torch.randn(B, 3, 8, 8, dtype=D64)
    rec = Recorder(LinearCritic(torch.ones(3, 8, 8, dtype=D64)))
    gradient_penalty(rec, real, fake)
    # x̂ = ε x + (1 − ε) x̃  =>  ε = (x̂ − x̃) / (x − x̃), one value per sample
    eps = ((rec.seen - fake) / (real - fake)).flatten(1)
    assert_close(eps, eps[:, :1].expand_as(eps))                     # constant within a sample
    assert eps[:, 0].std() > 0.05                                    # varies across samples
    assert ((eps >= 0) & (eps <= 1)).all()
    # drawn in real's dtype: a float32 ε promoted to float64 would sit on the float32 grid
    assert (eps - eps.float().double()).abs().max() > 1e-12


def test_gradient_penalty_conv_critic_matches_per_sample_loop():
    # A small conv critic (no BatchNorm): the batched penalty must equal the penalty computed
    # one sample at a time on the same x̂, with the norm over each sample's C·H·W gradient.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.LeakyReLU(0.2),         # 4 x 4 x 4
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 1)).double()       # (B, 1)
    rec = Recorder(net)
    real, fake = torch.randn(5, 3, 8, 8, dtype=D64), torch.randn(5, 3, 8, 8, dtype=D64)
    gp = gradient_penalty(rec, real, fake)                           # critic returns (B, 1): fine
    ref = []
    for xi in rec.seen:
        xi = xi[None].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(net(xi).sum(), xi)
        ref.append((gi.norm() - 1) ** 2)
    assert_close(gp, torch.stack(ref).mean())


def test_gradient_penalty_leaves_lambda_to_caller():
    params = inspect.signature(losses.gradient_penalty).parameters
    assert list(params)[:3] == ["critic", "real", "fake"]
    # anything more is optional (e.g. eps, which a DDP rank passes as its slice of one draw), never lambda
    assert all(p.default is not inspect.Parameter.empty for p in list(params.values())[3:]), list(params)
    assert not any(name in params for name in ("lam", "lambda_", "gp_weight", "weight"))
    w = torch.full((3, 8, 8), 0.5, dtype=D64)                         # ‖w‖ = 0.5·√192
    x = torch.zeros(2, 3, 8, 8, dtype=D64)
    assert_close(gradient_penalty(LinearCritic(w), x, x), (w.norm() - 1) ** 2)   # no λ = 10 inside
