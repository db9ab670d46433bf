"""models.py: every architecture at every supported size runs forward and backward with the
contract's shapes; the reports' architectures have their shapes and parameter counts (checked
against closed-form counts); reparameterize and init_weights have the right statistics; the
WGAN-GP critic is per-sample; checkpoints are written atomically and loaded weights-only, every
bad file refused in one line. Small batches, CPU only."""
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import data
import models as M
from models import (DEFAULT_ARCH, DEFAULT_LATENT, FAMILY, MODELS, build_model, generator, init_weights,
                    latent_dim, reparameterize, supported_sizes)

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def _cases():
    """(name, size, arch, critic_norm) for every model, supported size, arch and critic norm."""
    for name in MODELS:
        for size in supported_sizes(name):
            for arch in (M.ARCHS if name in DEFAULT_ARCH else [None]):
                for norm in (M.CRITIC_NORMS if name == "wgan-gp" else [None]):
                    yield pytest.param(name, size, arch, norm,
                                       id=f"{name}-{size[0]}x{size[1]}-{arch or ''}-{norm or ''}")


def _missing_grads(module):
    return [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


# ---------------------------------------------------------------------------------------------
# Every model, every supported size: shapes, ranges, gradients reach every parameter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,arch,norm", list(_cases()))
def test_forward_backward_shapes_and_gradients(name, size, arch, norm):
    torch.manual_seed(0)
    B, (H, W) = 2, size
    models = build_model(name, size, arch=arch, critic_norm=norm)
    z_dim = latent_dim(models)
    assert z_dim == DEFAULT_LATENT[name]
    expected_keys = {"autoencoder": {"vae"}, "vaegan": {"vae", "D"}}.get(FAMILY[name], {"G", "D"})
    assert set(models.keys()) == expected_keys
    x = torch.rand(B, 3, H, W) * 2 - 1
    loss = 0.0
    if "vae" in models:
        net = models["vae"]
        x_hat, mu, logvar = net(x)
        assert x_hat.shape == (B, 3, H, W) and x_hat.abs().max() <= 1   # tanh output
        assert mu.shape == (B, z_dim)
        if name == "ae":
            assert logvar is None
        else:
            assert logvar.shape == (B, z_dim)
            loss = loss + logvar.sum()
        loss = loss + (x_hat * torch.randn_like(x_hat)).sum() + mu.sum()
    if "G" in models:
        assert models["G"].latent_dim == z_dim
    x_gen = generator(models)(torch.randn(B, z_dim))
    assert x_gen.shape == (B, 3, H, W) and x_gen.abs().max() <= 1
    if "D" in models:
        d_real, d_fake = models["D"](x), models["D"](x_gen)
        assert d_real.shape == (B,) and d_fake.shape == (B,)    # raw scores, one per image
        assert torch.isfinite(d_real).all()
        loss = loss + d_real.sum() - d_fake.sum()
    else:
        loss = loss + x_gen.sum()
    loss.backward()
    assert _missing_grads(models) == []
    print(f"{name} {H}x{W} {arch or ''} {norm or ''}: " +
          ", ".join(f"{k} {count_params(v):,}" for k, v in models.items()))


@pytest.mark.parametrize("name", list(MODELS))
def test_unsupported_size_raises_naming_model_sizes_and_size(name):
    with pytest.raises(ValueError, match=rf"model {re.escape(name)} supports sizes .*64x.*; got 48x40"):
        build_model(name, (48, 40))


def test_bad_names_and_options_raise():
    with pytest.raises(ValueError, match="no generator G to average"):
        build_model("vae", 32, ema=True)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gan")
    with pytest.raises(ValueError, match="arch"):
        build_model("dcgan", 32, arch="stylegan")
    with pytest.raises(ValueError, match="no arch option"):
        build_model("vae", 32, arch="classic")
    with pytest.raises(ValueError, match="critic_norm"):
        build_model("wgan", 32, critic_norm="layer")
    with pytest.raises(ValueError, match="critic_norm"):
        build_model("wgan-gp", 32, critic_norm="batch")
    with pytest.raises(ValueError, match="latent_dim"):
        build_model("vae", 32, latent_dim=0)


def test_registries_cover_every_model_and_int_size_and_latent_override():
    assert set(FAMILY) == set(DEFAULT_LATENT) == set(MODELS)
    assert DEFAULT_ARCH == {"dcgan": "classic", "wgan": "seed002", "wgan-gp": "seed002", "sngan": "classic"}
    assert all((64, 64) in supported_sizes(n) and (32, 32) in supported_sizes(n) for n in MODELS)
    assert (64, 48) in supported_sizes("vae-in") and (32, 24) in supported_sizes("vae-in")
    models = build_model("vae-lrelu", 32, latent_dim=16)                 # int size == (32, 32)
    assert latent_dim(models) == 16 and models["vae"].encode(torch.zeros(2, 3, 32, 32))[0].shape == (2, 16)
    # default arch: dcgan classic (z reshaped to z x 1 x 1), wgan seed002 (Linear projection)
    assert isinstance(build_model("dcgan", 32)["G"][0], nn.Unflatten)
    assert isinstance(build_model("wgan", 32)["G"][0], nn.Linear)


def test_vae_samples_but_ae_is_deterministic():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae, ae = build_model("vae-lrelu", 32)["vae"], build_model("ae", 32)["vae"]
    assert not torch.equal(vae(x)[0], vae(x)[0])          # z = mu + sigma * eps, fresh eps
    assert torch.equal(ae(x)[0], ae(x)[0])                # z = code, no sampling
    code, none = ae.encode(x)
    assert none is None and torch.equal(ae(x)[0], ae.decode(code))


# ---------------------------------------------------------------------------------------------
# Seed architectures: shapes and closed-form parameter counts
# ---------------------------------------------------------------------------------------------

def _conv(c_in, c_out, k):          # conv or transposed conv with bias
    return c_in * c_out * k * k + c_out


def _lin(n_in, n_out):
    return n_in * n_out + n_out


def _shape_of(module, x, fn):
    """Output shape of `module` while `fn(x)` runs (forward hook)."""
    shapes = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    fn(x)
    handle.remove()
    return shapes[0]


@pytest.mark.parametrize("z", [64, 512])      # Wuga VAE part 1 (z 64) and part 2 (z 512)
def test_wuga_vae_shapes_and_parameter_count(z):
    net = build_model("vae", (64, 64), latent_dim=z)["vae"]
    x = torch.zeros(2, 3, 64, 64)
    assert _shape_of(net.encoder, x, net.encode) == (2, 8192)              # flatten 512 x 4 x 4
    unflatten = next(m for m in net.decoder if isinstance(m, nn.Unflatten))
    assert _shape_of(unflatten, torch.zeros(2, z), net.decode) == (2, 256, 8, 8)
    convs = [m for m in net.encoder if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs] == \
        [(c, (5, 5), (2, 2), (2, 2)) for c in (64, 128, 256, 512)]
    assert isinstance(net.head[1], nn.BatchNorm1d) and net.head[1].num_features == 2 * z   # FC.1 + BN
    convts = [m for m in net.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.out_channels, m.stride) for m in convts] == [(256, (2, 2)), (128, (2, 2)), (32, (2, 2)), (3, (1, 1))]
    enc = sum(_conv(a, b, 5) + 2 * b for a, b in [(3, 64), (64, 128), (128, 256), (256, 512)])
    head = _lin(8192, 2 * z) + 2 * (2 * z)
    dec = _lin(z, 256 * 8 * 8) + 2 * 256 + \
        sum(_conv(a, b, 5) + 2 * b for a, b in [(256, 256), (256, 128), (128, 32)]) + _conv(32, 3, 5)
    assert count_params(net) == enc + head + dec


def test_dcgan_classic_matches_the_dcgan_paper_count():
    """Radford et al. G/D at 64 px (pytorch/examples dcgan: G 3,576,704, D 2,765,568 weights
    without biases); ours keeps conv biases, so add one per output channel."""
    models = build_model("dcgan", 64, arch="classic")
    g_w = sum(a * b * 16 for a, b in [(100, 512), (512, 256), (256, 128), (128, 64), (64, 3)]) + 2 * 960
    d_w = sum(a * b * 16 for a, b in [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]) + 2 * 896
    assert (g_w, d_w) == (3_576_704, 2_765_568)
    assert count_params(models["G"]) == g_w + 512 + 256 + 128 + 64 + 3
    assert count_params(models["D"]) == d_w + 64 + 128 + 256 + 512 + 1


@pytest.mark.parametrize("arch,side,n_stride2", [("classic", 64, 4), ("classic", 32, 3),
                                                  ("seed002", 64, 4), ("seed002", 32, 3)])
def test_gan_layer_plan(arch, side, n_stride2):
    models = build_model("dcgan", side, arch=arch)
    k = 5 if arch == "seed002" else 4
    convts = [m for m in models["G"] if isinstance(m, nn.ConvTranspose2d)]
    # seed002: Linear + 4 convT 5x5 s2; classic: convT 4x4 s1 (1 -> 4) then 4 convT 4x4 s2
    assert [m.stride[0] for m in convts] == [1] * (arch == "classic") + [2] * n_stride2
    assert all(m.kernel_size == (k, k) for m in convts) and convts[-1].out_channels == 3
    convs = [m for m in models["D"] if isinstance(m, nn.Conv2d)]
    assert [m.stride[0] for m in convs] == [2] * n_stride2 + [1]
    assert [m.out_channels for m in convs] == [64 * 2 ** i for i in range(n_stride2)] + [1]
    assert convs[-1].kernel_size == (4, 4) and convs[-1].padding == (0, 0)
    first = models["D"][2 if arch == "seed002" else 1]          # report 002's table: BN after the first conv too
    assert isinstance(first, nn.LeakyReLU) and first.negative_slope == 0.2


def test_vaegan_discriminator_is_five_conv_bn_lrelu():
    D = build_model("vaegan", 64)["D"]
    assert sum(isinstance(m, nn.Conv2d) for m in D) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D) == 3
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())


def test_vae_vgg_is_vgg16():
    net = build_model("vae-vgg", 32)["vae"]
    convs = [m for m in net.encoder if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.encoder) == 5
    assert sum(isinstance(m, nn.Upsample) for m in net.decoder) == 5
    assert sum(isinstance(m, nn.Conv2d) for m in net.decoder) == 13
    assert net.head.in_features == 512 * 1 * 1                    # 32 px: 5 pools -> 1 x 1


@pytest.mark.parametrize("size,grid", [((64, 48), (256, 4, 3)), ((32, 24), (128, 4, 3))])
def test_vae_in_is_perriu_plan(size, grid):
    net = build_model("vae-in", size)["vae"]
    assert _shape_of(net.encoder, torch.zeros(2, 3, *size), net.encode) == (2, math.prod(grid))
    unflatten = next(m for m in net.decoder if isinstance(m, nn.Unflatten))
    assert tuple(unflatten.unflattened_size) == grid
    assert not any(isinstance(m, BN) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.affine for m in norms)
    n_conv = 8 if size[0] == 64 else 6
    assert sum(isinstance(m, nn.Conv2d) for m in net.encoder) == n_conv
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.decoder) == n_conv


@pytest.mark.parametrize("name,depth,flat", [("ae", 3, 128 * 8 * 8), ("vae-lrelu", 4, 256 * 4 * 4)])
def test_lfw_report_autoencoders(name, depth, flat):
    net = build_model(name, 64)["vae"]
    assert [m.stride for m in net.encoder if isinstance(m, nn.Conv2d)] == [(2, 2)] * depth
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.decoder) == depth
    assert all(m.negative_slope == 0.2 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    assert net.head.in_features == flat


# ---------------------------------------------------------------------------------------------
# reparameterize
# ---------------------------------------------------------------------------------------------

def test_reparameterize_value_and_gradients_to_mu_and_logvar():
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    z = reparameterize(mu, logvar)
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    sigma = torch.exp(0.5 * logvar.detach())
    assert_close(z, mu.detach() + sigma * eps)
    w = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    (w * z).sum().backward()
    assert_close(mu.grad, w)                                 # dz/dmu = 1
    assert_close(logvar.grad, w * 0.5 * sigma * eps)         # dz/dlogvar = 0.5 sigma eps
    assert (logvar.grad != 0).all()


def test_reparameterize_moments():
    n = 200_000
    mu = torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64).expand(n, 3)
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25)], dtype=torch.float64).expand(n, 3)
    sigma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.manual_seed(0)
    z = reparameterize(mu, logvar)
    # 5 standard errors: SE(mean) = sigma / sqrt(n), SE(std) ~ sigma / sqrt(2n) for a Gaussian;
    # a correct sampler fails with probability < 1e-5 whatever the seed, while sigma = exp(logvar)
    # (std 4 instead of 2) or a dropped mu misses by hundreds of SEs.
    assert ((z.mean(0) - mu[0]).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((z.std(0) - sigma).abs() < 5 * sigma / math.sqrt(2 * n)).all()


# ---------------------------------------------------------------------------------------------
# init_weights
# ---------------------------------------------------------------------------------------------

def _filled(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


@pytest.mark.parametrize("layer", [nn.Conv2d(256, 256, 5), nn.ConvTranspose2d(256, 256, 5), nn.Linear(2048, 1024)])
def test_init_weights_conv_linear_statistics(layer):
    _filled(layer, 1.0).apply(init_weights)                 # start far from the target so it can fail
    w, n = layer.weight, layer.weight.numel()               # ~1.6M / 2.1M weights
    # mean within 5 SE (0.02 / sqrt(n) ~ 1.6e-5); std within 1 % (SE of std ~ 0.06 %)
    assert abs(w.mean().item()) < 5 * 0.02 / math.sqrt(n)
    assert abs(w.std().item() - 0.02) < 0.01 * 0.02
    assert (layer.bias == 0).all()


def test_init_weights_batchnorm_statistics_and_other_norms_default():
    bn = _filled(nn.BatchNorm2d(8192), 0.5).apply(init_weights)
    # gamma ~ N(1, 0.02^2) over 8192 channels: mean within 5 SE (1.1e-3), std within 10 % (SE ~0.8 %)
    assert abs(bn.weight.mean().item() - 1) < 5 * 0.02 / math.sqrt(8192)
    assert abs(bn.weight.std().item() - 0.02) < 0.1 * 0.02
    assert (bn.bias == 0).all()
    bn1 = _filled(nn.BatchNorm1d(4096), 0.5).apply(init_weights)
    assert abs(bn1.weight.mean().item() - 1) < 0.01 and (bn1.bias == 0).all()
    # InstanceNorm / GroupNorm: left alone (documented choice: the seeds' rule names BatchNorm only)
    inorm = _filled(nn.InstanceNorm2d(4, affine=True), 0.5).apply(init_weights)
    assert (inorm.weight == 0.5).all()


def test_build_model_applies_init_weights():
    torch.manual_seed(0)
    models = build_model("vae", 64)
    convs = [m for m in models.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    big = max(convs, key=lambda m: m.weight.numel())         # 256 x 512 x 5 x 5 = 3.3M weights
    assert abs(big.weight.std().item() - 0.02) < 0.01 * 0.02   # PyTorch's default would be ~0.005
    assert all((m.bias == 0).all() for m in convs)
    gammas = torch.cat([m.weight.detach() for m in models.modules() if isinstance(m, BN)])
    assert abs(gammas.mean().item() - 1) < 0.005 and abs(gammas.std().item() - 0.02) < 0.003
    assert all((m.bias == 0).all() for m in models.modules() if isinstance(m, BN))
    inorms = [m for m in build_model("vae-in", (32, 24)).modules() if isinstance(m, nn.InstanceNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in inorms)


# ---------------------------------------------------------------------------------------------
# WGAN-GP critic: no BatchNorm, per-sample outputs (needed for a valid gradient penalty)
# ---------------------------------------------------------------------------------------------

def _cross_sample_grad(D, x):
    """|d D(x)_0 / d x_j| summed over the other samples j != 0, in training mode."""
    D.train()
    x = x.clone().requires_grad_(True)
    D(x)[0].backward()
    return x.grad[1:].abs().sum().item(), x.grad[0].abs().sum().item()


@pytest.mark.parametrize("arch", M.ARCHS)
@pytest.mark.parametrize("critic_norm", M.CRITIC_NORMS)
def test_wgan_gp_critic_is_per_sample(arch, critic_norm):
    torch.manual_seed(0)
    D = build_model("wgan-gp", 32, arch=arch, critic_norm=critic_norm)["D"]
    assert not any(isinstance(m, BN) for m in D.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in D.modules()) == (critic_norm == "layer")
    x = torch.randn(4, 3, 32, 32)
    other, own = _cross_sample_grad(D, x)
    assert other == 0 and own > 0
    assert_close(D(x[:1]), D(x)[:1])                         # alone or in a batch: same score


def test_batchnorm_critic_couples_samples():
    """The check above can fail: the WGAN critic (BN, training mode) mixes the batch."""
    torch.manual_seed(0)
    D = build_model("wgan", 32)["D"]
    assert any(isinstance(m, BN) for m in D.modules())
    other, _ = _cross_sample_grad(D, torch.randn(4, 3, 32, 32))
    assert other > 0


# ---------------------------------------------------------------------------------------------
# The README's parameter counts are the code's
# ---------------------------------------------------------------------------------------------

def _readme_row(name):
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    assert rows, f"README has no Models row for {name}"
    return rows[0]


@pytest.mark.parametrize("name,size,kwargs", [
    ("vae", 64, {}), ("vae", 64, {"latent_dim": 512}), ("vae-vgg", 64, {}), ("vae-in", (64, 48), {}),
    ("ae", 64, {}), ("vae-lrelu", 64, {}), ("dcgan", 64, {"arch": "classic"}), ("dcgan", 64, {"arch": "seed002"}),
    ("wgan", 64, {}), ("wgan-gp", 64, {"critic_norm": "none"}), ("vaegan", 64, {}), ("sngan", 64, {}),
])
def test_readme_parameter_counts(name, size, kwargs):
    """Every count the README's Models table quotes is what build_model builds (all nets)."""
    n = count_params(build_model(name, size, **kwargs))
    assert f"{n:,}" in _readme_row(name), (name, kwargs, f"{n:,}")


# ---------------------------------------------------------------------------------------------
# Spectral normalisation (SN-GAN)
# ---------------------------------------------------------------------------------------------

def test_spectral_norm_power_iteration_matches_matrix_2_norm():
    torch.manual_seed(0)  # the weights too: how fast the iteration converges depends on σ₂/σ₁
    layer = nn.Conv2d(8, 16, 4, 2, 1)
    sn = M.SpectralNorm(layer)
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    exact = torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(2, 8, 8, 8)
    for _ in range(100):                        # one power-iteration step per training forward
        sn(x)
    torch.testing.assert_close(sn.sigma().detach(), exact, rtol=1e-4, atol=0)
    # the layer it computes uses W / σ(W): spectral norm 1, and the map matches F.conv2d with it
    sn.eval()
    w_sn = layer.weight / sn.sigma()
    assert abs(torch.linalg.matrix_norm(w_sn.detach().reshape(len(w_sn), -1), ord=2).item() - 1) < 1e-3
    ref = F.conv2d(x, w_sn, layer.bias, 2, 1)
    torch.testing.assert_close(sn(x), ref)
    u = sn.u.clone()
    sn(x)
    assert torch.equal(sn.u, u)                 # eval: the estimate is frozen


def test_spectral_norm_gradient_is_the_papers_u_v_transpose():
    # with u held constant, dσ/dW = u vᵀ (Miyato et al. 2018, eq. 12's first term)
    torch.manual_seed(1)
    sn = M.SpectralNorm(nn.Conv2d(3, 5, 2)).eval()
    W = sn.layer.weight                         # (5, 3, 2, 2): the matrix is (5, 12)
    sigma = sn.sigma()
    (g,) = torch.autograd.grad(sigma, W)
    v = W.detach().flatten(1).t() @ sn.u
    v = v / v.norm()
    torch.testing.assert_close(g.flatten(1), torch.outer(sn.u, v))


def test_sngan_discriminator_is_spectrally_normalised_without_batchnorm():
    nets = build_model("sngan", 32)
    D = nets["D"]
    sns = [m for m in D if isinstance(m, M.SpectralNorm)]
    assert len(sns) == 4 and not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert all(k.endswith(".u") for k in D.state_dict() if "layer" not in k)   # u buffers are checkpointed
    assert D(torch.zeros(3, 3, 32, 32)).shape == (3,)


# ---------------------------------------------------------------------------------------------
# Conditional models: concatenated labels in G / the decoder / the encoder, a projection D
# ---------------------------------------------------------------------------------------------

CLASSES = (5, 2, 2)


def test_projection_discriminator_adds_the_label_embeddings_inner_product():
    torch.manual_seed(0)
    D = build_model("sngan", 32, classes=CLASSES)["D"].eval()
    with torch.no_grad():
        D.embed.normal_()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[0, 1, 0], [4, 0, 1], [2, 1, 1], [0, 0, 0]])
    phi = nn.Sequential(*list(D)[:-1])(x)                       # φ(x): C x 4 x 4
    psi = list(D)[-1](phi).flatten()                            # ψ(φ(x))
    V = D.embed.detach()
    rows = [V[y[i, 0]] + V[5 + y[i, 1]] + V[7 + y[i, 2]] for i in range(4)]   # one row per attribute value
    ref = psi + torch.stack([r @ phi[i].sum((1, 2)) for i, r in enumerate(rows)])
    assert_close(D(x, y), ref, rtol=1e-5, atol=1e-4)
    # V = 0 (as built): D(x, y) is the unconditional score for every label
    D0 = build_model("sngan", 32, classes=CLASSES)["D"].eval()
    assert_close(D0(x, y), nn.Sequential(*list(D0))(x).flatten())


def test_conditional_generator_and_cvae_use_the_label():
    torch.manual_seed(0)
    nets = build_model("dcgan", 32, classes=CLASSES).eval()
    z = torch.randn(2, 100)
    a, b = torch.tensor([[0, 0, 0]] * 2), torch.tensor([[3, 1, 1]] * 2)
    assert M.one_hot(b, CLASSES).tolist() == [[0, 0, 0, 1, 0, 0, 1, 0, 1]] * 2
    assert not torch.allclose(nets["G"](z, a), nets["G"](z, b))
    vae = build_model("vae-lrelu", 32, classes=CLASSES)["vae"].eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(vae.encode(x, a)[0], vae.encode(x, b)[0])              # q(z|x, y)
    assert not torch.allclose(vae.decode(z.new_zeros(2, 128), a), vae.decode(z.new_zeros(2, 128), b))
    # unconditional models are untouched: same parameters as before, y ignored
    assert count_params(build_model("dcgan", 32)) < count_params(build_model("dcgan", 32, classes=CLASSES))


def test_classifier_reads_one_logit_vector_per_attribute():
    clf = M.Classifier((32, 32), CLASSES)
    out = clf(torch.zeros(3, 3, 32, 32))
    assert [o.shape for o in out] == [(3, 5), (3, 2), (3, 2)]


# ---------------------------------------------------------------------------------------------
# from_config: a run's config.json -> its nets
# ---------------------------------------------------------------------------------------------

def test_from_config_builds_what_build_model_builds_and_refuses_in_one_line():
    cfg = {"model": "dcgan", "image_size": [32, 32], "latent_dim": 16, "arch": "seed002", "critic_norm": None,
           "labels": {"hair": ["a", "b", "c", "d", "e"], "glasses": [0, 1], "beard": [0, 1]}, "ema": 0.99}
    torch.manual_seed(0)
    nets = M.from_config(cfg)
    torch.manual_seed(0)
    ref = build_model("dcgan", (32, 32), latent_dim=16, arch="seed002", classes=CLASSES, ema=True)
    assert list(nets.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in nets.state_dict().items())
    with pytest.raises(data.UsageError, match="model vae supports sizes 64x64, 32x32; got 40x40"):
        M.from_config(dict(cfg, model="vae", image_size=[40, 40], arch=None, labels=None, ema=None))


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights-only loads, one line for every bad file
# ---------------------------------------------------------------------------------------------

STATE = {"nets": {"w": torch.ones(3)}, "config": {"model": "vae"}, "step": 2}


def test_checkpoint_round_trip_carries_the_format(tmp_path):
    M.save_checkpoint(STATE, str(tmp_path / "last.pt"))
    raw = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == M.FORMAT == 2 and "format" not in STATE
    for target in (tmp_path, tmp_path / "last.pt", str(tmp_path / "last.pt")):   # a run folder or the file
        state = M.load_checkpoint(target)
        assert torch.equal(state["nets"]["w"], torch.ones(3)) and state["step"] == 2
    assert os.listdir(tmp_path) == ["last.pt"]                                    # no temp file left
    umask = os.umask(0o22)
    os.umask(umask)
    assert os.stat(tmp_path / "last.pt").st_mode & 0o777 == 0o666 & ~umask       # not mkstemp's 0600


def test_a_checkpoint_without_the_format_is_refused_in_one_line(tmp_path):
    for i, fmt in enumerate([None, 1, 3]):
        path = tmp_path / f"{i}.pt"
        torch.save(dict(STATE) if fmt is None else dict(STATE, format=fmt), path)
        with pytest.raises(data.UsageError) as e:
            M.load_checkpoint(str(path))
        assert str(e.value) == f"{path} was written by an older version of facegen; train it again with this one"


def _enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _half_written(obj, f, *args, **kwargs):   # the disk fills up halfway through torch.save
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    f.flush()
    _enospc()


def _interrupted(obj, f, *args, **kwargs):    # Ctrl-C in the middle of the write
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    raise KeyboardInterrupt


@pytest.mark.parametrize("fault", ["write", "fsync", "replace", "interrupt"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    path = tmp_path / "last.pt"
    M.save_checkpoint(STATE, str(path))
    before = path.read_bytes()
    target, fake = {"write": ("torch.save", _half_written), "fsync": ("os.fsync", _enospc),
                    "replace": ("os.replace", _enospc), "interrupt": ("torch.save", _interrupted)}[fault]
    monkeypatch.setattr(target, fake)
    expected = KeyboardInterrupt if fault == "interrupt" else OSError
    with pytest.raises(expected) as e:
        M.save_checkpoint(dict(STATE, nets={"w": torch.zeros(3)}), str(path))
    monkeypatch.undo()
    if expected is OSError:
        assert str(e.value) == f"could not write {str(path)!r} (No space left on device)"
    assert path.read_bytes() == before
    assert torch.equal(M.load_checkpoint(str(path))["nets"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


class Payload:
    """Unpickling this calls `func(*args)`: the classic malicious-checkpoint payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["open", "system"])
def test_pickled_code_is_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = Payload(open, str(marker), "w") if kind == "open" else Payload(os.system, f"touch {marker}")
    torch.save(dict(STATE, format=M.FORMAT, x=payload), tmp_path / "last.pt")
    for target in (tmp_path, tmp_path / "last.pt"):
        with pytest.raises(data.UsageError) as e:
            M.load_checkpoint(target)
        msg = str(e.value)
        assert msg.startswith("refusing to load") and "pickled code" in msg and "nothing in it was run" in msg
        assert ("io.open" if kind == "open" else "posix.system") in msg and "\n" not in msg
    assert not marker.exists()


def test_every_torch_load_in_models_is_weights_only():
    import pathlib
    src = pathlib.Path(M.__file__).read_text()
    calls = [line for line in src.splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for line in calls)


def test_bad_checkpoint_files_say_what_they_are(tmp_path):
    good = tmp_path / "good.pt"
    M.save_checkpoint(STATE, str(good))
    files = {
        "face.pt": (b"\x89PNG\r\n\x1a\n" + os.urandom(64), "is not a PyTorch checkpoint: it is a PNG image"),
        "photo.pt": (b"\xff\xd8\xff\xe0" + os.urandom(64), "is not a PyTorch checkpoint: it is a JPEG image"),
        "empty.pt": (b"", "is not a PyTorch checkpoint: it is empty"),
        "notes.pt": ("héllo\n".encode(), "is not a PyTorch checkpoint: it is text"),
        "bare.pt": (b"\x80\x04K\x01.", "is not a PyTorch checkpoint: it is a bare pickle"),
        "noise.pt": (b"\x07\xfe\xff" + bytes(range(128, 256)), "its bytes are not any format facegen knows"),
        "truncated.pt": (good.read_bytes()[: good.stat().st_size // 3],
                         "damaged, truncated or not a PyTorch checkpoint (its zip archive is incomplete)"),
    }
    for name, (content, says) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data.UsageError) as e:
            M.load_checkpoint(str(tmp_path / name))
        assert says in str(e.value) and str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), name
    torch.save({"weight": torch.ones(2)}, tmp_path / "state_dict.pt")           # a foreign torch file
    with pytest.raises(data.UsageError, match="not a facegen checkpoint"):
        M.load_checkpoint(str(tmp_path / "state_dict.pt"))
    with pytest.raises(data.UsageError, match="^no checkpoint at .*missing.pt$"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "run").mkdir()
    with pytest.raises(data.UsageError, match="not a run folder"):
        M.load_checkpoint(str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(data.UsageError, match="stopped before its first checkpoint; start it again"):
        M.load_checkpoint(str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# Least squares: D's BatchNorm eps (models.LS_BN_EPS)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch", [("dcgan", "classic"), ("dcgan", "seed002"), ("wgan", None)])
def test_least_squares_give_d_batchnorm_ls_eps_and_every_other_loss_the_same_nets(name, arch):
    torch.manual_seed(0)
    plain = build_model(name, 32, arch=arch)
    for loss in ("bce", "wasserstein", "hinge", "ls", "ls-sigmoid"):
        ls = loss in ("ls", "ls-sigmoid")
        torch.manual_seed(0)
        nets = build_model(name, 32, arch=arch, gan_loss=loss)
        for k in plain:                                              # same weights, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(plain[k].state_dict().values(),
                                                         nets[k].state_dict().values()))
        d_eps = {m.eps for m in nets["D"].modules() if isinstance(m, nn.BatchNorm2d)}
        assert d_eps == ({M.LS_BN_EPS} if ls else {1e-5})
        assert {m.eps for m in nets["G"].modules() if isinstance(m, BN)} == {1e-5}   # G untouched
        assert (str(nets) == str(plain)) == (not ls)                # nothing else differs
    cfg = dict(model=name, image_size=[32, 32], latent_dim=None, arch=arch, critic_norm=None, gan_loss="ls")
    assert {m.eps for m in M.from_config(cfg)["D"].modules() if isinstance(m, nn.BatchNorm2d)} == {M.LS_BN_EPS}


def test_ls_batchnorm_eps_lets_the_weights_scale_reach_the_score():
    """PyTorch's eps: BN undoes a conv's weight scale, so the score ignores it (and Adam's ~lr steps on
    N(0, 0.02²) weights are large relative changes). LS_BN_EPS ≫ the initial pre-activations' variance:
    BN only centres them, and D(x) − b (b: the score conv's bias) scales with the conv's weights."""
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for loss in ("bce", "ls"):
        torch.manual_seed(0)
        D = build_model("dcgan", 32, gan_loss=loss)["D"]
        b = D[-1].bias.detach()
        before = D(x).detach() - b
        with torch.no_grad():
            [m for m in D if isinstance(m, nn.Conv2d)][1].weight.mul_(2)   # the first conv followed by BN
        after = D(x).detach() - b
        target = before if loss == "bce" else 2 * before
        assert (after - target).norm() < 0.01 * before.norm()         # the other target: ~1.0 · before.norm()


def test_seed002_dcgan_discriminator_has_batchnorm_after_every_conv_as_report_002_tables_it():
    """Report 002's DCGAN table: BN after every D conv, the first too; wgan (no such table) keeps the DCGAN
    paper's practice of none on the first, and so does the classic layout."""
    def after_first_conv(name, arch):
        return type(list(M.build_model(name, 64, arch=arch)["D"])[1]).__name__
    assert after_first_conv("dcgan", "seed002") == "BatchNorm2d"
    assert after_first_conv("dcgan", "classic") == after_first_conv("wgan", "seed002") == "LeakyReLU"


def test_pick_device_and_run_folder(tmp_path, monkeypatch):
    assert M.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.pick_device("auto") == torch.device("cpu")
    with pytest.raises(data.UsageError, match="no CUDA device"):
        M.pick_device("cuda")
    (tmp_path / "run").mkdir()
    assert M.run_folder(str(tmp_path / "run")) == str(tmp_path / "run")
    assert M.run_folder(str(tmp_path / "run" / "last.pt")) == str(tmp_path / "run")
    assert M.run_folder("last.pt") == "."
