"""Every facegen architecture, the reparameterisation trick and the seeds' weight init.

Reading order: shared pieces (reparameterize, init_weights, conv_stack) -> autoencoders
(seeds 000, 001, 003) -> GAN generators and discriminators (seeds 002, 004) -> build_model, the
one constructor that train.py and facegen.py share.

Shape comments are C x H x W of one sample for a 64x64 input (64x48 for vae-in); every size in
the code is computed from the image size with the conv arithmetic, never typed in.
"""
import copy
import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Registry: names, families, seed defaults
# ---------------------------------------------------------------------------------------------

MODELS = {
    "vae": "seed 000 part 1-2 (Wuga VAE): 4 conv 5x5 s2 + BN + ReLU, FC+BN -> (mu, logvar), FC -> convT 5x5 decoder",
    "vae-vgg": "seed 000 part 3: VGG16 conv encoder (13 conv 3x3, BN, max-pool), mirrored upsample+conv decoder",
    "vae-in": "seed 001: 8 conv + InstanceNorm + ReLU, FC mu/logvar, FC -> 8 convT + IN decoder, 64x48 faces",
    "ae": "seed 003 baseline: convolutional autoencoder, depth 3, BN + LeakyReLU, no sampling",
    "vae-lrelu": "seed 003 VAE: 4 conv + 4 convT, BN + LeakyReLU(0.2), FC mu/logvar",
    "dcgan": "seeds 002/003/004: DCGAN generator + discriminator (arch 'classic' or 'seed002')",
    "wgan": "seed 002: DCGAN generator + critic (D with BN, raw score), weight clipping",
    "wgan-gp": "seed 002: DCGAN generator + critic without BatchNorm (critic_norm 'none' or 'layer')",
    "vaegan": "seed 003: the vae-lrelu net + 5-layer conv discriminator (BN, LeakyReLU)",
    "sngan": "seed 002's future work: DCGAN generator + spectrally normalised D without BN, hinge loss",
}
FAMILY = {"vae": "autoencoder", "vae-vgg": "autoencoder", "vae-in": "autoencoder",
          "ae": "autoencoder", "vae-lrelu": "autoencoder", "dcgan": "adversarial",
          "wgan": "wasserstein", "wgan-gp": "wasserstein", "vaegan": "vaegan", "sngan": "adversarial"}
DEFAULT_LATENT = {"vae": 64, "vae-vgg": 512, "vae-in": 64, "ae": 128, "vae-lrelu": 128,
                  "dcgan": 100, "wgan": 100, "wgan-gp": 100, "vaegan": 128, "sngan": 128}
ARCHS = ("classic", "seed002")
DEFAULT_ARCH = {"dcgan": "classic", "wgan": "seed002", "wgan-gp": "seed002", "sngan": "classic"}
CRITIC_NORMS = ("none", "layer")

_SIZES = {name: [(64, 64), (32, 32)] for name in MODELS}
_SIZES["vae-in"] = [(64, 48), (32, 24), (64, 64), (32, 32)]   # seed 001 trains on 64x48 (H x W)


def supported_sizes(name):
    """Image sizes (H, W) that build_model accepts for `name` (each one is tested)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return list(_SIZES[name])


# ---------------------------------------------------------------------------------------------
# Reparameterisation trick and weight init (exactly one of each)
# ---------------------------------------------------------------------------------------------

def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps,  sigma = exp(0.5 * logvar),  eps ~ N(0, I)  (Kingma & Welling 2013).

    Sampling z ~ N(mu, sigma^2) is not differentiable in (mu, sigma); drawing the noise eps
    separately makes z a deterministic, differentiable function of mu and logvar. eps defaults to
    a draw from the global RNG (torch.manual_seed makes it reproducible); train.py passes its own
    under DistributedDataParallel so every rank uses its slice of one global draw.
    """
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def init_weights(module):
    """Seed 000 (Wuga) and DCGAN init, for `model.apply(init_weights)`.

    Conv, ConvTranspose, Linear:  w ~ N(0, 0.02^2),  b = 0.
    BatchNorm (1d, 2d):           gamma ~ N(1, 0.02^2),  beta = 0.
    InstanceNorm / GroupNorm keep PyTorch's gamma = 1, beta = 0: the seeds state the rule for
    BatchNorm only.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def count_params(module):
    """Number of scalar parameters in `module`."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Building blocks: one conv-stack builder that also computes the output shape
# ---------------------------------------------------------------------------------------------

def _norm(kind, c):
    """Normalisation over c channels. 'layer' is GroupNorm(1, C): each sample normalised over its
    own C x H x W with a per-channel affine (the WGAN-GP paper's layer norm), so a sample's
    output never depends on the rest of the batch and the gradient penalty stays per-sample."""
    return {"batch": [nn.BatchNorm2d(c)],
            "instance": [nn.InstanceNorm2d(c, affine=True)],   # affine: learned gamma, beta like BN
            "layer": [nn.GroupNorm(1, c)],
            "none": []}[kind]


def _act(kind):
    # in place: each activation overwrites the norm's / conv's output, which nothing else reads
    # (their backward needs their input), saving one activation-sized allocation per layer
    return {"relu": [nn.ReLU(inplace=True)], "lrelu": [nn.LeakyReLU(0.2, inplace=True)], "tanh": [nn.Tanh()],
            None: []}[kind]


def conv_stack(shape, spec, norm="batch", act="relu", transpose=False, norm_first=True):
    """Layers [conv -> norm -> act] for every entry of `spec`; returns (nn.Sequential, out shape).

    shape: input (C, H, W). spec entries: (c_out, k, stride, pad) for a conv, or
    (c_out, k, stride, pad, output_pad) for a transposed conv (transpose=True), or "pool"
    (2x2 max-pool) / "up" (x2 nearest upsampling). norm_first=False leaves the first conv
    without normalisation (DCGAN discriminators). Output sizes follow the conv arithmetic:
        conv:  H' = floor((H + 2p - k) / s) + 1
        convT: H' = (H - 1) s - 2p + k + output_pad
    """
    c, h, w = shape
    layers, n_conv = [], 0
    for entry in spec:
        if entry == "pool":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
            continue
        if entry == "up":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            h, w = 2 * h, 2 * w
            continue
        c_out, k, s, p, *op = entry
        if transpose:
            op = op[0] if op else 0
            layers.append(nn.ConvTranspose2d(c, c_out, k, s, p, output_padding=op))
            h, w = ((n - 1) * s - 2 * p + k + op for n in (h, w))
        else:
            layers.append(nn.Conv2d(c, c_out, k, s, p))
            h, w = ((n + 2 * p - k) // s + 1 for n in (h, w))
        layers += _norm(norm if (norm_first or n_conv) else "none", c_out) + _act(act)
        c, n_conv = c_out, n_conv + 1
    return nn.Sequential(*layers), (c, h, w)


def _project(z_dim, shape, norm, act):
    """z (B, z_dim) -> Linear -> reshape to `shape` (C, H, W) -> norm -> act.
    The DCGAN 'project and reshape'; the norm is per channel, after the reshape."""
    return [nn.Linear(z_dim, math.prod(shape)), nn.Unflatten(1, shape)] + _norm(norm, shape[0]) + _act(act)


class SpectralNorm(nn.Module):
    """A conv or linear layer whose weight is divided by its largest singular value (Miyato et al.
    2018): W_SN = W / σ(W), so the layer is 1-Lipschitz and D, a stack of them with LeakyReLU, is too.

    σ(W) of the matrix W (out, in·k·k) is estimated by power iteration with a persistent left
    singular vector u (a buffer: it is saved in checkpoints, so a resumed run continues the very
    same estimate). One iteration per training forward, as in the paper's Algorithm 1:
        v ← Wᵀu / ‖Wᵀu‖,   u ← W v / ‖W v‖        (no gradient: u is a constant for backprop)
        σ(W) ≈ uᵀ W v' = ‖Wᵀu‖,  v' = Wᵀu / ‖Wᵀu‖   (its gradient u v'ᵀ is the paper's)
    In eval mode u is frozen. Hand-written rather than torch.nn.utils.parametrizations.spectral_norm
    so the reader sees the ten lines that are the method; tests check σ against
    torch.linalg.matrix_norm(W, ord=2).
    """

    def __init__(self, layer, eps=1e-12):
        super().__init__()
        self.layer, self.eps = layer, eps
        u = torch.randn(layer.weight.shape[0])                  # (out,): from the global RNG
        self.register_buffer("u", u / u.norm().clamp_min(eps))

    def sigma(self):
        """Power-iteration estimate of the spectral norm of the layer's weight (one step in training)."""
        W = self.layer.weight.flatten(1)                        # (out, in·k·k)
        if self.training:
            with torch.no_grad():
                v = W.t().float() @ self.u
                v = v / v.norm().clamp_min(self.eps)            # v ← Wᵀu / ‖Wᵀu‖
                u = W.float() @ v
                self.u.copy_(u / u.norm().clamp_min(self.eps))  # u ← Wv / ‖Wv‖
        u = self.u.clone()          # a copy in the graph: the next forward updates the buffer in place
        return (W.t() @ u.to(W.dtype)).norm()                   # σ = ‖Wᵀu‖

    def forward(self, x):
        layer, w = self.layer, self.layer.weight / self.sigma()  # W_SN = W / σ(W)
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(x, w, layer.bias)
        return nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def one_hot(y, classes):
    """Labels y (B, K), entry k in range(classes[k]) -> (B, sum(classes)): the K one-hot codes side by side."""
    return torch.cat([nn.functional.one_hot(y[:, k], n) for k, n in enumerate(classes)], 1).float()


class Generator(nn.Sequential):
    """z (B, latent_dim) -> image (B, 3, H, W) in [-1, 1]. GAN generators and VAE decoders.
    Conditional (classes = the number of values of each of K attributes): forward(z, y) decodes
    [z, one_hot(y)], so the first layer takes latent_dim + sum(classes) inputs (Mirza & Osindero
    2014's concatenation: the simplest way to give G the label, and the same code for a CVAE)."""

    def __init__(self, latent_dim, *layers, classes=()):
        super().__init__(*layers)
        self.latent_dim, self.classes = latent_dim, tuple(classes)

    def forward(self, z, y=None):
        if self.classes:
            z = torch.cat([z, one_hot(y, self.classes).to(z.dtype)], 1)    # [z, y] (B, z + sum(classes))
        return super().forward(z)


class Discriminator(nn.Sequential):
    """x (B, 3, H, W) -> raw score (B,): a logit for the BCE/LS losses, a critic value for the
    Wasserstein ones. No sigmoid here: it lives inside the loss (numerically stable).

    Conditional: the projection discriminator (Miyato & Koyama 2018),
        D(x, y) = ψ(φ(x)) + Σ_k V_k[y_k]ᵀ φ(x),   φ(x) = the last features summed over H x W,
    one embedding row V_k[v] (C,) per value v of attribute k. Chosen over concatenating y to
    D's input: the label enters as an inner product with the features D already computes, which
    is what the paper shows controls the class far better, and needs no label-sized input channels.
    """

    def __init__(self, *layers, classes=()):
        super().__init__(*layers)
        self.classes = tuple(classes)
        if self.classes:
            c = next(m for m in reversed(layers) if isinstance(m, (nn.Conv2d, SpectralNorm)))
            c = (c.layer if isinstance(c, SpectralNorm) else c).in_channels          # C of φ(x)
            # V: every attribute's rows stacked, attribute k's starting at offsets[k] (a Parameter,
            # not a module, so the Sequential's layers stay exactly the unconditional D's). V = 0
            # at first: D starts as the unconditional D and learns what each label adds.
            self.embed = nn.Parameter(torch.zeros(sum(self.classes), c))
            self.register_buffer("offsets", torch.tensor([0, *self.classes[:-1]]).cumsum(0), persistent=False)

    def forward(self, x, y=None):
        if not self.classes:
            return super().forward(x).reshape(len(x))   # (B, 1, 1, 1) -> (B,)
        *body, last = self
        h = x
        for layer in body:
            h = layer(h)                                   # C x 4 x 4
        score = last(h).reshape(len(x))                    # ψ(φ(x)) (B,)
        v = self.embed[y + self.offsets].sum(1)            # Σ_k V_k[y_k] (B, C)
        return score + (v * h.sum((2, 3))).sum(1)          # + ⟨Σ_k V_k[y_k], φ(x)⟩


class VAE(nn.Module):
    """Encoder q(z|x) = N(mu, diag exp(logvar)), decoder x_hat = g(z) (Kingma & Welling 2013).

    encoder: x -> flat features; head: features -> [mu, logvar] (B, 2 z), split in half (one
    Linear to 2z is the same map as seed 001's two Linears for mu and logvar); decoder: a
    Generator. variational=False is the plain autoencoder: the head outputs the code itself,
    encode returns (code, None) and forward decodes z = code without sampling.
    """

    def __init__(self, encoder, head, decoder, variational=True):
        super().__init__()
        self.encoder, self.head, self.decoder = encoder, head, decoder
        self.variational = variational
        self.latent_dim, self.classes = decoder.latent_dim, decoder.classes

    def encode(self, x, y=None):
        """x (B, 3, H, W) -> (mu, logvar), each (B, latent_dim); AE: (code, None).
        Conditional (a CVAE, Sohn et al. 2015): q(z|x, y), the head reads [features, one_hot(y)]."""
        h = self.encoder(x)
        if self.classes:
            h = torch.cat([h, one_hot(y, self.classes).to(h.dtype)], 1)
        h = self.head(h)
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z, y=None):
        """z (B, latent_dim) -> x_hat (B, 3, H, W) in [-1, 1]; a CVAE decodes p(x|z, y)."""
        return self.decoder(z, y)

    def forward(self, x, eps=None, y=None):
        """x -> (x_hat, mu, logvar); a VAE always samples z = mu + sigma * eps, the AE uses z = mu."""
        mu, logvar = self.encode(x, y)
        z = mu if logvar is None else reparameterize(mu, logvar, eps)
        return self.decode(z, y), mu, logvar


# ---------------------------------------------------------------------------------------------
# Autoencoders
# ---------------------------------------------------------------------------------------------

def _vae_wuga(size, z, classes=()):
    """Seed 000 (Wuga): conv 5x5 s2 p2 -> BN -> ReLU x4; FC.1 Linear -> 2z with BN, identity
    activation; decoder Linear -> 256 x H/8 x W/8 -> BN -> ReLU -> convT 5x5 s2 x3 -> convT s1 -> tanh."""
    H, W = size
    enc, (c, h, w) = conv_stack((3, H, W), [
        (64, 5, 2, 2),      # 64 x 32 x 32
        (128, 5, 2, 2),     # 128 x 16 x 16
        (256, 5, 2, 2),     # 256 x 8 x 8
        (512, 5, 2, 2),     # 512 x 4 x 4
    ], "batch", "relu")
    n = c * h * w + sum(classes)  # 8192 (+ the one-hot labels of a CVAE)
    head = nn.Sequential(nn.Linear(n, 2 * z), nn.BatchNorm1d(2 * z))        # [mu, logvar] (2z)
    start = (256, H // 8, W // 8)                                          # 256 x 8 x 8
    # output_padding 1 makes a 5x5 s2 p2 convT double exactly (TF 'same' padding in Wuga's code)
    dec, shape = conv_stack(start, [
        (256, 5, 2, 2, 1),  # 256 x 16 x 16
        (128, 5, 2, 2, 1),  # 128 x 32 x 32
        (32, 5, 2, 2, 1),   # 32 x 64 x 64
    ], "batch", "relu", transpose=True)
    out, _ = conv_stack(shape, [(3, 5, 1, 2, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    decoder = Generator(z, *_project(z + sum(classes), start, "batch", "relu"), *dec, *out, classes=classes)
    return VAE(nn.Sequential(*enc, nn.Flatten()), head, decoder)


def _c3(*channels):
    """VGG's 3x3 'same' convolutions (stride 1, pad 1) to each of `channels`."""
    return [(c, 3, 1, 1) for c in channels]


def _vae_vgg(size, z, classes=()):
    """Seed 000 part 3: VGG16's 13 conv 3x3 in 5 blocks, each block ended by a 2x2 max-pool, as
    encoder; mirrored decoder of [x2 nearest upsample + 3x3 convs]. The seed shows no norm
    layers; we add BN after every conv (the seed fought exploding gradients, and BN is what makes
    a 26-conv net trainable from N(0, 0.02^2) init)."""
    H, W = size
    enc, (c, h, w) = conv_stack((3, H, W), [
        *_c3(64, 64), "pool",           # 64 x 32 x 32
        *_c3(128, 128), "pool",         # 128 x 16 x 16
        *_c3(256, 256, 256), "pool",    # 256 x 8 x 8
        *_c3(512, 512, 512), "pool",    # 512 x 4 x 4
        *_c3(512, 512, 512), "pool",    # 512 x 2 x 2
    ], "batch", "relu")
    head = nn.Linear(c * h * w + sum(classes), 2 * z)                   # 2048 -> [mu, logvar]
    dec, shape = conv_stack((c, h, w), [
        "up", *_c3(512, 512, 512),      # 512 x 4 x 4
        "up", *_c3(512, 512, 256),      # 256 x 8 x 8
        "up", *_c3(256, 256, 128),      # 128 x 16 x 16
        "up", *_c3(128, 64),            # 64 x 32 x 32
        "up", *_c3(64),                 # 64 x 64 x 64
    ], "batch", "relu")
    out, _ = conv_stack(shape, _c3(3), "none", "tanh")                  # 3 x 64 x 64
    decoder = Generator(z, *_project(z + sum(classes), (c, h, w), "batch", "relu"), *dec, *out, classes=classes)
    return VAE(nn.Sequential(*enc, nn.Flatten()), head, decoder)


def _vae_in(size, z, classes=()):
    """Seed 001: conv (k4 s2 halves, k3 s1 keeps) + InstanceNorm + ReLU, FC mu / FC logvar;
    decoder FC -> reshape -> the mirrored convT stack -> tanh. 32-pixel-high images drop the
    deepest (256-channel) stage, so 32x24 ends on the same 4x3 grid as 64x48."""
    H, W = size
    enc_spec = [
        (32, 4, 2, 1),      # 32 x 32 x 24
        (32, 3, 1, 1),      # 32 x 32 x 24
        (64, 4, 2, 1),      # 64 x 16 x 12
        (64, 3, 1, 1),      # 64 x 16 x 12
        (128, 4, 2, 1),     # 128 x 8 x 6
        (128, 3, 1, 1),     # 128 x 8 x 6
        (256, 4, 2, 1),     # 256 x 4 x 3
        (256, 3, 1, 1),     # 256 x 4 x 3
    ]
    # seed's Table 2 gives the 256->128 k4 layer stride 1 (4x3 -> 5x4, no doubling); we use stride 2
    dec_spec = [
        (256, 3, 1, 1, 0),  # 256 x 4 x 3
        (128, 4, 2, 1, 0),  # 128 x 8 x 6
        (128, 3, 1, 1, 0),  # 128 x 8 x 6
        (64, 4, 2, 1, 0),   # 64 x 16 x 12
        (64, 3, 1, 1, 0),   # 64 x 16 x 12
        (32, 4, 2, 1, 0),   # 32 x 32 x 24
        (32, 3, 1, 1, 0),   # 32 x 32 x 24
    ]
    if H < 64:
        enc_spec, dec_spec = enc_spec[:-2], dec_spec[2:]
    enc, start = conv_stack((3, H, W), enc_spec, "instance", "relu")    # 256 x 4 x 3
    head = nn.Linear(math.prod(start) + sum(classes), 2 * z)            # 3072 -> [mu, logvar]
    dec, shape = conv_stack(start, dec_spec, "instance", "relu", transpose=True)
    out, _ = conv_stack(shape, [(3, 4, 2, 1, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 48
    # seed: "Fully connected layer, Reshape input" with no norm or activation in between
    decoder = Generator(z, *_project(z + sum(classes), start, "none", None), *dec, *out, classes=classes)
    return VAE(nn.Sequential(*enc, nn.Flatten()), head, decoder)


def _conv_ae(size, z, channels, variational, classes=()):
    """Seed 003: conv 4x4 s2 p1 + BN + LeakyReLU(0.2) per channel count, a Linear bottleneck
    (the AE's code, or the VAE's [mu, logvar]), Linear -> reshape + BN + LeakyReLU, then the
    mirrored convT 4x4 s2 p1 stack -> tanh. Seed 003's figures are not in the text: kernel 4,
    stride 2, pad 1 (the DCGAN halving layer) and channels 32, 64, ... are our choice."""
    H, W = size
    enc, start = conv_stack((3, H, W), [(c, 4, 2, 1) for c in channels],  # vae-lrelu: 32 x 32 x 32,
                            "batch", "lrelu")                              # ..., 256 x 4 x 4
    head = nn.Linear(math.prod(start) + sum(classes), 2 * z if variational else z)  # 4096 -> [mu, logvar]
    dec, shape = conv_stack(start, [(c, 4, 2, 1, 0) for c in channels[-2::-1]],  # 128 x 8 x 8,
                            "batch", "lrelu", transpose=True)                   # ..., 32 x 32 x 32
    out, _ = conv_stack(shape, [(3, 4, 2, 1, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    decoder = Generator(z, *_project(z + sum(classes), start, "batch", "lrelu"), *dec, *out, classes=classes)
    return VAE(nn.Sequential(*enc, nn.Flatten()), head, decoder, variational)


AE_CHANNELS = (32, 64, 128)                # depth 3 (seed 003 baseline): 128 x 8 x 8 at 64 px
VAE_LRELU_CHANNELS = (32, 64, 128, 256)    # 4 conv + 4 convT: 256 x 4 x 4 at 64 px

_AUTOENCODERS = {
    "vae": _vae_wuga,
    "vae-vgg": _vae_vgg,
    "vae-in": _vae_in,
    "ae": lambda size, z, classes=(): _conv_ae(size, z, AE_CHANNELS, False, classes),
    "vae-lrelu": lambda size, z, classes=(): _conv_ae(size, z, VAE_LRELU_CHANNELS, True, classes),
}


# ---------------------------------------------------------------------------------------------
# GANs: DCGAN generator and discriminator / critic, seed 002 and classic (seed 004) variants
# ---------------------------------------------------------------------------------------------

def _gan_channels(side):
    """DCGAN channel plan: 64 maps at side/2, doubling at every halving down to 4 x 4.
    64 px -> [64, 128, 256, 512]; 32 px -> [64, 128, 256] (one stage fewer)."""
    return [64 * 2 ** i for i in range(int(math.log2(side)) - 2)]


def _generator(side, z, arch, classes=()):
    """seed002: z -> Linear -> 512 x 4 x 4 + BN + ReLU -> convT 5x5 s2 (256, 128, 64, 3) -> tanh.
    classic (seed 004, Radford et al. 2016): z as z x 1 x 1 -> convT 4x4 s1 p0 -> 512 x 4 x 4,
    then convT 4x4 s2 p1 up to 3 x 64 x 64, BN + ReLU after all but the last, tanh."""
    ch = _gan_channels(side)[::-1]                                    # 512, 256, 128, 64
    z_in = z + sum(classes)                                           # [z, one_hot(y)]
    if arch == "seed002":
        head = _project(z_in, (ch[0], 4, 4), "batch", "relu")        # 512 x 4 x 4
        body, shape = conv_stack((ch[0], 4, 4), [(c, 5, 2, 2, 1) for c in ch[1:]],
                                 "batch", "relu", transpose=True)     # 256x8x8, 128x16x16, 64x32x32
        out, _ = conv_stack(shape, [(3, 5, 2, 2, 1)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    else:
        head = [nn.Unflatten(1, (z_in, 1, 1))]                       # z x 1 x 1
        body, shape = conv_stack((z_in, 1, 1), [(ch[0], 4, 1, 0, 0)] + [(c, 4, 2, 1, 0) for c in ch[1:]],
                                 "batch", "relu", transpose=True)     # 512x4x4, ..., 64x32x32
        out, _ = conv_stack(shape, [(3, 4, 2, 1, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    return Generator(z, *head, *body, *out, classes=classes)


def _discriminator(side, arch, norm, spectral=False, classes=()):
    """seed002: conv 5x5 s2 p2 (64, 128, 256, 512) + norm + LeakyReLU(0.2), no norm on the first
    layer -> conv 4x4 valid -> 1 x 1 x 1 score. classic: the same with conv 4x4 s2 p1 (5 layers).
    norm 'batch' for DCGAN/WGAN; 'none' or 'layer' for the WGAN-GP critic (per-sample).
    spectral: every conv wrapped in SpectralNorm (SN-GAN; norm 'none': SN replaces BN)."""
    k, p = (5, 2) if arch == "seed002" else (4, 1)
    body, shape = conv_stack((3, side, side), [(c, k, 2, p) for c in _gan_channels(side)],
                             norm, "lrelu", norm_first=False)        # 64x32x32, ..., 512x4x4
    score, _ = conv_stack(shape, [(1, 4, 1, 0)], "none", None)       # 1 x 1 x 1
    layers = [*body, *score]
    if spectral:
        layers = [SpectralNorm(m) if isinstance(m, nn.Conv2d) else m for m in layers]
    return Discriminator(*layers, classes=classes)


# ---------------------------------------------------------------------------------------------
# build_model: the one constructor train.py and facegen.py share
# ---------------------------------------------------------------------------------------------

def build_model(name, image_size=(64, 64), latent_dim=None, arch=None, critic_norm=None, classes=(), ema=False):
    """Build model `name` for images of `image_size` ((H, W) or an int) with init_weights applied.

    Returns an nn.ModuleDict:
      autoencoders (vae, vae-vgg, vae-in, ae, vae-lrelu): {"vae": net}
      dcgan, wgan, wgan-gp, sngan:                         {"G": generator, "D": discriminator}
      vaegan:                                              {"vae": vae-lrelu net, "D": discriminator}
    latent_dim None -> DEFAULT_LATENT[name]. arch ("classic" | "seed002", None -> DEFAULT_ARCH)
    applies to dcgan, wgan, wgan-gp, sngan only; critic_norm ("none" | "layer", None -> "none") to
    wgan-gp only; any other model rejects an arch, and a critic_norm other than None/"none".
    classes (the number of values of each attribute, e.g. (5, 2, 2)) makes it conditional: G and
    the decoder take [z, one_hot(y)], the encoder reads y too (CVAE), D is a projection D.
    ema adds "G_ema", a frozen copy of G that train.py keeps as a moving average of G's weights
    (GANs only); generator() then draws from it.
    Raises ValueError for an unknown name, unsupported size or bad option.
    """
    sizes = supported_sizes(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if size not in sizes:
        got = "x".join(map(str, size))
        raise ValueError(f"model {name} supports sizes {', '.join(f'{h}x{w}' for h, w in sizes)}; got {got}")
    z = DEFAULT_LATENT[name] if latent_dim is None else int(latent_dim)
    if z < 1:
        raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}")
    if arch is not None and name not in DEFAULT_ARCH:
        raise ValueError(f"model {name} has no arch option (only {', '.join(DEFAULT_ARCH)}); got {arch!r}")
    arch = arch or DEFAULT_ARCH.get(name)
    if name in DEFAULT_ARCH and arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    critic_norm = critic_norm or "none"
    if critic_norm not in CRITIC_NORMS or (critic_norm != "none" and name != "wgan-gp"):
        raise ValueError(f"critic_norm {critic_norm!r}: 'none' or 'layer', and 'layer' only for wgan-gp")

    if FAMILY[name] == "autoencoder":
        models = {"vae": _AUTOENCODERS[name](size, z, classes)}
    elif name == "vaegan":
        # seed 003's D: 5 conv layers, BN, LeakyReLU -- the classic DCGAN discriminator
        models = {"vae": _AUTOENCODERS["vae-lrelu"](size, z, classes),
                  "D": _discriminator(size[0], "classic", "batch", classes=classes)}
    elif name == "sngan":
        # Miyato et al. 2018: spectral norm on every layer of D, and no BatchNorm there. The
        # projection's V is not normalised (Miyato & Koyama do): a deviation, V is small.
        models = {"G": _generator(size[0], z, arch, classes),
                  "D": _discriminator(size[0], arch, "none", spectral=True, classes=classes)}
    else:
        # seed 002: WGAN-GP removes BatchNorm from the critic (it couples the samples of a batch)
        norm = critic_norm if name == "wgan-gp" else "batch"
        models = {"G": _generator(size[0], z, arch, classes), "D": _discriminator(size[0], arch, norm, classes=classes)}
    models = nn.ModuleDict(models)
    models.apply(init_weights)
    if ema:
        if "G" not in models:
            raise ValueError(f"model {name} has no generator G to average (ema: GANs only)")
        models["G_ema"] = copy.deepcopy(models["G"]).requires_grad_(False)
    return models


class Classifier(nn.Module):
    """x (B, 3, H, W) -> one logit vector per attribute, (B, classes[k]) each: the attribute reader
    of facegen.py's `control` (it measures whether generated faces carry the requested labels).
    3 x [conv 4x4 s2 + BN + LeakyReLU(0.2)] (32, 64, 128 maps) -> one Linear for every attribute."""

    def __init__(self, image_size, classes):
        super().__init__()
        body, shape = conv_stack((3, *image_size), [(32, 4, 2, 1), (64, 4, 2, 1), (128, 4, 2, 1)],
                                 "batch", "lrelu")                       # 128 x H/8 x W/8
        self.body, self.classes = nn.Sequential(*body, nn.Flatten()), tuple(classes)
        self.head = nn.Linear(math.prod(shape), sum(classes))

    def forward(self, x):
        return self.head(self.body(x)).split(self.classes, 1)


def label_classes(labels):
    """{attribute: [values]} (a run's cfg["labels"]) -> the number of values of each, () for None."""
    return tuple(len(v) for v in (labels or {}).values())


def generator(models):
    """The map (z (B, latent_dim)[, y]) -> images (B, 3, H, W) of a built model: VAE decode, or G
    (its moving average G_ema when the run keeps one)."""
    return models["vae"].decode if "vae" in models else models["G_ema"] if "G_ema" in models else models["G"]


def latent_dim(models):
    """Latent size of a built model (what generator(models) expects)."""
    return (models["vae"] if "vae" in models else models["G"]).latent_dim
