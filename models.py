"""Every facegen network, in reading order: reparameterize, init_weights, the VAE -> conv_stack -> the autoencoders
-> the GAN G and D -> build_model / from_config, G's weight average -> the device and its speed switches -> a run
folder's checkpoints and logs. Shape comments are C x H x W of one sample for a 64x64 input (64x48 for vae-in); every
size is computed with the conv arithmetic."""
import copy, csv, io, math, os, pickle, re, sys, warnings, zipfile

import torch
from torch import nn

import data

# name -> family (which training loop), and the latent size of its report
FAMILY = {"vae": "autoencoder", "vae-vgg": "autoencoder", "vae-in": "autoencoder", "ae": "autoencoder",
          "vae-lrelu": "autoencoder", "dcgan": "adversarial", "wgan": "wasserstein", "wgan-gp": "wasserstein",
          "vaegan": "vaegan", "sngan": "adversarial"}
DEFAULT_LATENT = {"vae": 64, "vae-vgg": 512, "vae-in": 64, "ae": 128, "vae-lrelu": 128,
                  "dcgan": 100, "wgan": 100, "wgan-gp": 100, "vaegan": 128, "sngan": 128}
MODELS = tuple(FAMILY)
ARCHS = ("classic", "seed002")
DEFAULT_ARCH = {"dcgan": "classic", "wgan": "seed002", "wgan-gp": "seed002", "sngan": "classic"}
CRITIC_NORMS = ("none", "layer")

def supported_sizes(name):
    """Image sizes (H, W) that build_model accepts for `name` (each one is tested)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return [(64, 48), (32, 24), (64, 64), (32, 32)] if name == "vae-in" else [(64, 64), (32, 32)]  # Perriu: 64x48

def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps,  sigma = exp(0.5 * logvar),  eps ~ N(0, I)  (Kingma & Welling 2014):
    z is a differentiable function of mu and logvar. eps: given, or drawn from the global RNG."""
    if eps is None:
        eps = torch.randn_like(mu)
    std = torch.exp(0.5 * logvar)
    return mu + std * eps

def init_weights(module):
    """The Wuga VAE's and DCGAN's init, for `model.apply(init_weights)`:
    Conv, ConvTranspose, Linear:  w ~ N(0, 0.02^2),  b = 0.
    BatchNorm (1d, 2d):           gamma ~ N(1, 0.02^2),  beta = 0.
    InstanceNorm / GroupNorm keep PyTorch's gamma = 1, beta = 0 (the reports' rule names BN only)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

class VAE(nn.Module):
    """Encoder q(z|x) = N(mu, diag exp(logvar)), decoder x_hat = g(z) (Kingma & Welling 2014). encoder: x ->
    flat features; head: features -> [mu, logvar] (B, 2z) (Perriu's two Linears in one); decoder: a Generator.
    variational=False: the plain autoencoder. Conditional: a CVAE (Sohn et al. 2015), q(z|x, y) and p(x|z, y)."""
    def __init__(self, encoder, head, decoder, variational=True):
        super().__init__()
        self.encoder, self.head, self.decoder, self.variational = encoder, head, decoder, variational
        self.latent_dim, self.classes = decoder.latent_dim, decoder.classes

    def encode(self, x, y=None):
        """x (B, 3, H, W) -> (mu, logvar), each (B, latent_dim); AE: (code, None). A CVAE's head reads y too."""
        h = self.encoder(x)
        if self.classes:
            h = torch.cat([h, one_hot(y, self.classes).to(h.dtype)], 1)
        h = self.head(h)
        return h.chunk(2, dim=1) if self.variational else (h, None)

    def decode(self, z, y=None):
        """z (B, latent_dim) -> x_hat (B, 3, H, W) in [-1, 1]; a CVAE decodes p(x|z, y)."""
        return self.decoder(z, y)

    def forward(self, x, eps=None, y=None):
        """x -> (x_hat, mu, logvar); a VAE always samples z = mu + sigma * eps, the AE uses z = mu."""
        mu, logvar = self.encode(x, y)
        z = mu if logvar is None else reparameterize(mu, logvar, eps)
        return self.decode(z, y), mu, logvar

def one_hot(y, classes):
    """Labels y (B, K), entry k in range(classes[k]) -> (B, sum(classes)): the K one-hot codes side by side."""
    return torch.cat([nn.functional.one_hot(y[:, k], n) for k, n in enumerate(classes)], 1).float()

class Generator(nn.Sequential):
    """z (B, latent_dim) -> image (B, 3, H, W) in [-1, 1]: GAN generators and VAE decoders.
    classes (values per attribute): forward(z, y) decodes [z, one_hot(y)] (Mirza & Osindero 2014)."""
    def __init__(self, latent_dim, *layers, classes=()):
        super().__init__(*layers)
        self.latent_dim, self.classes = latent_dim, tuple(classes)

    def forward(self, z, y=None):
        if self.classes:
            z = torch.cat([z, one_hot(y, self.classes).to(z.dtype)], 1)    # [z, y] (B, z + sum(classes))
        return super().forward(z)

def _norm(kind, c):  # 'layer': GroupNorm(1, C), the WGAN-GP paper's per-sample layer norm. 'instance' learns a scale
    return {"batch": [nn.BatchNorm2d(c)], "instance": [nn.InstanceNorm2d(c, affine=True)],  # and shift as BN does
            "layer": [nn.GroupNorm(1, c)], "none": []}[kind]      # (report 001's table implies affine=False: ours)

def _act(kind):  # in place: each overwrites the norm's / conv's output, which nothing else reads
    return {"relu": [nn.ReLU(inplace=True)], "lrelu": [nn.LeakyReLU(0.2, inplace=True)], "tanh": [nn.Tanh()],
            None: []}[kind]

def conv_stack(shape, spec, norm="batch", act="relu", transpose=False, norm_first=True):
    """Layers [conv -> norm -> act] for every entry of `spec`; returns (nn.Sequential, out shape).
    shape: input (C, H, W). spec: (c_out, k, stride, pad[, output_pad if transpose]) per conv, "pool"
    (2x2 max-pool) or "up" (x2 nearest). norm_first=False: no norm after the first conv. Arithmetic:
        conv:  H' = floor((H + 2p - k) / s) + 1
        convT: H' = (H - 1) s - 2p + k + output_pad"""
    c, h, w = shape
    layers, n_conv = [], 0
    for entry in spec:
        if entry in ("pool", "up"):
            layers.append(nn.MaxPool2d(2) if entry == "pool" else nn.Upsample(scale_factor=2, mode="nearest"))
            h, w = (h // 2, w // 2) if entry == "pool" else (2 * h, 2 * w)
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
    """The DCGAN 'project and reshape': z (B, z_dim) -> Linear -> `shape` (C, H, W) -> norm -> act."""
    return [nn.Linear(z_dim, math.prod(shape)), nn.Unflatten(1, shape)] + _norm(norm, shape[0]) + _act(act)

def _vae(z, classes, enc, head, start, dec, out, norm="batch", act="relu", variational=True):
    """VAE(enc + Flatten, head, decoder [project z to `start`, dec, out]); callers build the
    projection last, after dec and out: the order the layers draw their default init from the RNG."""
    decoder = Generator(z, *_project(z + sum(classes), start, norm, act), *dec, *out, classes=classes)
    return VAE(nn.Sequential(*enc, nn.Flatten()), head, decoder, variational)

# ---- autoencoders ---------------------------------------------------------------------------
def _vae_wuga(size, z, classes=()):
    """Wuga VAE: conv 5x5 s2 p2 -> BN -> ReLU x4; FC.1 Linear -> 2z with BN, identity activation;
    decoder Linear -> 256 x H/8 x W/8 -> BN -> ReLU -> convT 5x5 s2 x3 -> convT s1 -> tanh. The report calls
    the decoder "a mirror image of the encoder" but translated Wuga's code line by line: this is that code's."""
    enc, (c, h, w) = conv_stack((3, *size), [(c, 5, 2, 2) for c in (64, 128, 256, 512)],
                                "batch", "relu")     # 64 x 32 x 32, 128 x 16 x 16, 256 x 8 x 8, 512 x 4 x 4
    head = nn.Sequential(nn.Linear(c * h * w + sum(classes), 2 * z), nn.BatchNorm1d(2 * z))  # 8192 -> [mu, logvar]
    start = (256, size[0] // 8, size[1] // 8)                              # 256 x 8 x 8
    # output_padding 1 makes a 5x5 s2 p2 convT double exactly (TF 'same' padding in Wuga's code)
    dec, shape = conv_stack(start, [(c, 5, 2, 2, 1) for c in (256, 128, 32)],
                            "batch", "relu", transpose=True)  # 256 x 16 x 16, 128 x 32 x 32, 32 x 64 x 64
    out, _ = conv_stack(shape, [(3, 5, 1, 2, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    return _vae(z, classes, enc, head, start, dec, out)

def _vae_vgg(size, z, classes=()):
    """Wuga VAE part 3: VGG16's 13 conv 3x3 in 5 blocks, each ended by a 2x2 max-pool; mirrored decoder of
    [x2 upsample + 3x3 convs]. Deviation: the report shows no norm layers; we add BN after every conv
    (without it the gradients of 26 convs from N(0, 0.02^2) init explode)."""
    def _c3(*channels):   # VGG's 3x3 'same' convolutions (stride 1, pad 1)
        return [(c, 3, 1, 1) for c in channels]
    enc, (c, h, w) = conv_stack((3, *size), [*_c3(64, 64), "pool",          # 64 x 32 x 32
                                             *_c3(128, 128), "pool",        # 128 x 16 x 16
                                             *_c3(256, 256, 256), "pool",   # 256 x 8 x 8
                                             *_c3(512, 512, 512), "pool",   # 512 x 4 x 4
                                             *_c3(512, 512, 512), "pool"],  # 512 x 2 x 2
                                "batch", "relu")
    head = nn.Linear(c * h * w + sum(classes), 2 * z)                       # 2048 -> [mu, logvar]
    dec, shape = conv_stack((c, h, w), ["up", *_c3(512, 512, 512),         # 512 x 4 x 4
                                        "up", *_c3(512, 512, 256),         # 256 x 8 x 8
                                        "up", *_c3(256, 256, 128),         # 128 x 16 x 16
                                        "up", *_c3(128, 64),               # 64 x 32 x 32
                                        "up", *_c3(64)], "batch", "relu")  # 64 x 64 x 64
    out, _ = conv_stack(shape, _c3(3), "none", "tanh")                  # 3 x 64 x 64
    return _vae(z, classes, enc, head, (c, h, w), dec, out)

def _vae_in(size, z, classes=()):
    """Perriu's VAE: conv (k4 s2 halves, k3 s1 keeps) + InstanceNorm + ReLU, FC mu / FC logvar; decoder
    FC -> reshape -> mirrored convT stack -> tanh. 32-pixel-high images drop the 256-channel stage (to 4x3)."""
    enc_spec = [(32, 4, 2, 1), (32, 3, 1, 1),       # 32 x 32 x 24
                (64, 4, 2, 1), (64, 3, 1, 1),       # 64 x 16 x 12
                (128, 4, 2, 1), (128, 3, 1, 1),     # 128 x 8 x 6
                (256, 4, 2, 1), (256, 3, 1, 1)]     # 256 x 4 x 3
    # the report's Table 2 gives the 256->128 k4 layer stride 1 (4x3 -> 5x4, no doubling); we use stride 2
    dec_spec = [(256, 3, 1, 1, 0),                        # 256 x 4 x 3
                (128, 4, 2, 1, 0), (128, 3, 1, 1, 0),     # 128 x 8 x 6
                (64, 4, 2, 1, 0), (64, 3, 1, 1, 0),       # 64 x 16 x 12
                (32, 4, 2, 1, 0), (32, 3, 1, 1, 0)]       # 32 x 32 x 24
    if size[0] < 64:
        enc_spec, dec_spec = enc_spec[:-2], dec_spec[2:]
    enc, start = conv_stack((3, *size), enc_spec, "instance", "relu")    # 256 x 4 x 3
    head = nn.Linear(math.prod(start) + sum(classes), 2 * z)            # 3072 -> [mu, logvar]
    dec, shape = conv_stack(start, dec_spec, "instance", "relu", transpose=True)
    out, _ = conv_stack(shape, [(3, 4, 2, 1, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 48
    # the report: "Fully connected layer, Reshape input" with no norm or activation in between
    return _vae(z, classes, enc, head, start, dec, out, "none", None)

def _conv_ae(size, z, channels, variational, classes=()):
    """The LFW report's nets: [conv 4x4 s2 p1 + BN + LeakyReLU(0.2)] per channel count, a Linear bottleneck
    (code or [mu, logvar]), Linear -> reshape + BN + LeakyReLU, mirrored convT stack -> tanh.
    The report gives no figures: k4 s2 p1 and the channels are ours."""
    enc, start = conv_stack((3, *size), [(c, 4, 2, 1) for c in channels],  # vae-lrelu: 32 x 32 x 32,
                            "batch", "lrelu")                              # ..., 256 x 4 x 4
    head = nn.Linear(math.prod(start) + sum(classes), 2 * z if variational else z)  # 4096 -> [mu, logvar]
    dec, shape = conv_stack(start, [(c, 4, 2, 1, 0) for c in channels[-2::-1]],  # 128 x 8 x 8,
                            "batch", "lrelu", transpose=True)                   # ..., 32 x 32 x 32
    out, _ = conv_stack(shape, [(3, 4, 2, 1, 0)], "none", "tanh", transpose=True)  # 3 x 64 x 64
    return _vae(z, classes, enc, head, start, dec, out, "batch", "lrelu", variational)

_AUTOENCODERS = {
    "vae": _vae_wuga, "vae-vgg": _vae_vgg, "vae-in": _vae_in,
    # ae: depth 3 (the LFW baseline), 128 x 8 x 8 at 64 px; vae-lrelu: 4 conv + 4 convT, 256 x 4 x 4
    "ae": lambda size, z, classes=(): _conv_ae(size, z, (32, 64, 128), False, classes),
    "vae-lrelu": lambda size, z, classes=(): _conv_ae(size, z, (32, 64, 128, 256), True, classes),
}

# ---- GANs: DCGAN generator and discriminator / critic, 'seed002' and 'classic' variants -------
def _gan_channels(side):  # DCGAN: 64 maps at side/2, doubling at every halving down to 4 x 4
    return [64 * 2 ** i for i in range(int(math.log2(side)) - 2)]  # 64 px: 64, 128, 256, 512

def _generator(side, z, arch, classes=()):
    """seed002 (report 002's layout): z -> Linear -> 512 x 4 x 4 + BN + ReLU -> convT 5x5 s2
    (256, 128, 64, 3) -> tanh. classic (Radford et al. 2016, Akbari's report): z x 1 x 1 -> convT
    4x4 s1 p0 -> 512 x 4 x 4 -> convT 4x4 s2 p1 up to 3 x 64 x 64; BN + ReLU but last, tanh. Report 003's
    DCGAN (4 convT; D with BN after LeakyReLU) is not built apart: classic stands for it."""
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

def _discriminator(side, arch, norm, spectral=False, classes=(), norm_first=False):
    """seed002: conv 5x5 s2 p2 (64, 128, 256, 512) + norm + LeakyReLU(0.2) -> conv 4x4 valid -> 1 x 1 x 1
    score; classic: conv 4x4 s2 p1. No norm on the first conv (the DCGAN paper's practice) unless norm_first
    (report 002's DCGAN table). spectral: SN on every conv."""
    k, p = (5, 2) if arch == "seed002" else (4, 1)
    body, shape = conv_stack((3, side, side), [(c, k, 2, p) for c in _gan_channels(side)],
                             norm, "lrelu", norm_first=norm_first)   # 64x32x32, ..., 512x4x4
    score, _ = conv_stack(shape, [(1, 4, 1, 0)], "none", None)       # 1 x 1 x 1
    layers = [*body, *score]
    if spectral:
        layers = [SpectralNorm(m) if isinstance(m, nn.Conv2d) else m for m in layers]
    return Discriminator(*layers, classes=classes, features=shape[0])

class Discriminator(nn.Sequential):
    """x (B, 3, H, W) -> raw score (B,): a logit (BCE/LS losses) or a critic value; the sigmoid
    lives inside the loss. Conditional: the projection discriminator (Miyato & Koyama 2018),
        D(x, y) = ψ(φ(x)) + Σ_k V_k[y_k]ᵀ φ(x),   φ(x) = the last features summed over H x W,
    one row V_k[v] (C,) per value v of attribute k (controls the class far better than concat)."""
    def __init__(self, *layers, classes=(), features=0):   # features: C of φ(x)
        super().__init__(*layers)
        self.classes = tuple(classes)
        if self.classes:
            # V: a Parameter (D's modules stay the unconditional D's), attribute k's rows from offsets[k], 0 at init
            self.embed = nn.Parameter(torch.zeros(sum(self.classes), features))
            self.register_buffer("offsets", torch.tensor([0, *self.classes[:-1]]).cumsum(0), persistent=False)

    def forward(self, x, y=None):
        if not self.classes:
            return super().forward(x).reshape(len(x))   # (B, 1, 1, 1) -> (B,)
        h = x
        for layer in list(self)[:-1]:
            h = layer(h)                                   # C x 4 x 4
        v = self.embed[y + self.offsets].sum(1)            # Σ_k V_k[y_k] (B, C)
        return self[-1](h).reshape(len(x)) + (v * h.sum((2, 3))).sum(1)   # ψ(φ(x)) + ⟨Σ_k V_k[y_k], φ(x)⟩

class SpectralNorm(nn.Module):
    """Spectral norm (Miyato et al. 2018, Algorithm 1), written out, not torch's parametrizations.spectral_norm:
    a conv with W_SN = W / σ(W), σ its largest singular value, is 1-Lipschitz, and so is D. σ of W (out, in·k·k)
    by power iteration with a persistent left singular vector u (a buffer), one step per training forward:
        v ← Wᵀu / ‖Wᵀu‖,   u ← W v / ‖W v‖        (no gradient: u is a constant for backprop)
        σ(W) ≈ uᵀ W v' = ‖Wᵀu‖,  v' = Wᵀu / ‖Wᵀu‖   (its gradient u v'ᵀ is the paper's)"""
    def __init__(self, layer, eps=1e-12):
        super().__init__()
        self.layer, self.eps = layer, eps
        u = torch.randn(layer.weight.shape[0])                  # (out,): from the global RNG
        self.register_buffer("u", u / u.norm().clamp_min(eps))

    def sigma(self):
        W = self.layer.weight.flatten(1)                        # (out, in·k·k)
        if self.training:                                       # eval: u is frozen
            with torch.no_grad():
                v = W.t().float() @ self.u
                v = v / v.norm().clamp_min(self.eps)            # v ← Wᵀu / ‖Wᵀu‖
                u = W.float() @ v
                self.u.copy_(u / u.norm().clamp_min(self.eps))  # u ← Wv / ‖Wv‖
        u = self.u.clone()          # a copy in the graph: the next forward updates the buffer in place
        return (W.t() @ u.to(W.dtype)).norm()                   # σ = ‖Wᵀu‖

    def forward(self, x):
        layer, w = self.layer, self.layer.weight / self.sigma()  # W_SN = W / σ(W)
        return nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

# Least squares (ls, ls-sigmoid) pulls D's score to 0 / 1. BatchNorm makes each conv's output blind to its weights'
# scale, so Adam's ~lr steps on N(0, 0.02²) weights move normalised features by ~0.01·√fan_in std, the score by
# ~1.5 a D update: past the target gap (ls: D oscillates; ls-sigmoid: D saturates, G's gradient vanishes), and G collapses
# to one texture. eps 0.8 ≫ the pre-activations' variance (≤ 0.01 in training): BN only centres them, and D's steps
# stay ~1 % relative changes of its weights.
LS_BN_EPS = 0.8   # PyTorch-GAN's lsgan.py: BatchNorm2d(c, 0.8), whose second positional argument is eps
LS_LOSSES = ("ls", "ls-sigmoid")

def build_model(name, image_size=(64, 64), latent_dim=None, arch=None, critic_norm=None, classes=(), ema=False,
                gan_loss=None):
    """Model `name` for `image_size` ((H, W) or an int), init_weights applied, as an nn.ModuleDict: {"vae"}
    (autoencoders), {"G", "D"} (GANs) or {"vae", "D"} (vaegan). None -> DEFAULT_LATENT / DEFAULT_ARCH;
    critic_norm "layer": wgan-gp only. classes (values per attribute, e.g. (5, 2, 2)): conditional nets,
    projection D. ema adds "G_ema", a frozen copy of G for train.py's moving average (GANs only).
    gan_loss in LS_LOSSES: D's BatchNorm layers get eps LS_BN_EPS (every other loss: PyTorch's 1e-5)."""
    sizes = supported_sizes(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if size not in sizes:
        raise ValueError(f"model {name} supports sizes {', '.join(f'{h}x{w}' for h, w in sizes)}; "
                         f"got {'x'.join(map(str, size))}")
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
    elif name == "vaegan":  # the LFW report's D: 5 conv, BN, LeakyReLU: the classic DCGAN D
        models = {"vae": _AUTOENCODERS["vae-lrelu"](size, z, classes),
                  "D": _discriminator(size[0], "classic", "batch", classes=classes)}
    else:
        # WGAN-GP's critic has no BatchNorm (it couples a batch's samples: the anime GAN report);
        # SN-GAN (Miyato et al. 2018): SN on every conv of D, no BN. Deviation: unlike Miyato & Koyama,
        # the projection's V gets no SN (it is small).
        norm = {"wgan-gp": critic_norm, "sngan": "none"}.get(name, "batch")
        models = {"G": _generator(size[0], z, arch, classes),
                  "D": _discriminator(size[0], arch, norm, name == "sngan", classes,
                                      norm_first=name == "dcgan" and arch == "seed002")}
    if gan_loss in LS_LOSSES and "D" in models:
        for m in models["D"].modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = LS_BN_EPS
    models = nn.ModuleDict(models).apply(init_weights)
    if ema:
        if "G" not in models:
            raise ValueError(f"model {name} has no generator G to average (ema: GANs only)")
        models["G_ema"] = copy.deepcopy(models["G"]).requires_grad_(False)
    return models

def label_classes(labels):
    """{attribute: [values]} (a run's cfg["labels"]) -> the number of values of each, () for None."""
    return tuple(len(v) for v in (labels or {}).values())

def from_config(cfg):
    """The nets of a run's config.json (train.py and facegen.py both build them here)."""
    try:
        return build_model(cfg["model"], tuple(cfg["image_size"]), cfg["latent_dim"], cfg["arch"],
                           cfg["critic_norm"], label_classes(cfg.get("labels")), bool(cfg.get("ema")),
                           cfg.get("gan_loss"))
    except ValueError as e:
        raise data.UsageError(str(e)) from None

def generator(models):
    """(z (B, latent_dim)[, y]) -> images (B, 3, H, W): the VAE's decode, G_ema if kept, else G."""
    return models["vae"].decode if "vae" in models else models["G_ema"] if "G_ema" in models else models["G"]

def latent_dim(models):
    """Latent size of a built model (what generator(models) expects)."""
    return (models["vae"] if "vae" in models else models["G"]).latent_dim

def update_ema(G_ema, G, decay, t):
    """--ema: G_ema ← d·G_ema + (1 − d)·G after G's update at step t, d = min(decay, (1 + t)/(10 + t))
    so a short run's average is not stuck at the initial weights (Yazıcı et al. 2019); BatchNorm
    statistics are copied from G, not averaged."""
    d = min(decay, (1 + t) / (10 + t))
    with torch.no_grad():
        for a, w in zip(G_ema.parameters(), G.parameters()):
            a.lerp_(w, 1 - d)
        for a, b in zip(G_ema.buffers(), G.buffers()):
            a.copy_(b)

class Classifier(nn.Module):
    """x (B, 3, H, W) -> one logit vector (B, classes[k]) per attribute: facegen.py's `control`
    reads whether generated faces carry the asked labels. 3 x [conv 4x4 s2 + BN + LeakyReLU]."""
    def __init__(self, image_size, classes):
        super().__init__()
        body, shape = conv_stack((3, *image_size), [(32, 4, 2, 1), (64, 4, 2, 1), (128, 4, 2, 1)],
                                 "batch", "lrelu")                       # 128 x H/8 x W/8
        self.body, self.classes = nn.Sequential(*body, nn.Flatten()), tuple(classes)
        self.head = nn.Linear(math.prod(shape), sum(classes))

    def forward(self, x):
        return self.head(self.body(x)).split(self.classes, 1)

def pick_device(name):   # 'auto' (CUDA when available) | 'cpu' | 'cuda' -> torch.device
    if name == "cuda" and not torch.cuda.is_available():
        raise data.UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")

def settle_speed(cfg, device, say=True):
    """Speed switches, recorded in config.json: unset, NHWC on CPU and fused Adam (README, Speed: which machines).
    --amp needs native bf16 (CUDA Ampere on; AVX512-BF16 or AMX on x86); elsewhere emulated bf16 is far slower: fp32."""
    cpu = device.type == "cpu"
    native = (torch.ops.mkldnn._is_mkldnn_bf16_supported() and any(torch.cpu.get_capabilities().get(k) for k in
              ("avx512_bf16", "amx_bf16", "bf16"))) if cpu else torch.cuda.is_bf16_supported(including_emulation=False)
    if cfg["amp"] and not native and say:
        print(f"note: --amp ignored: this {'CPU' if cpu else 'GPU'} has no native bf16, where bf16 autocast runs "
              f"~25x slower than fp32; training in fp32 (config.json records amp: false)", file=sys.stderr)
    cfg["amp"] = cfg["amp"] and native
    cfg["channels_last"] = cpu if cfg["channels_last"] is None else cfg["channels_last"]
    cfg["fused_adam"] = cfg["optimizer"] == "adam" if cfg["fused_adam"] is None else cfg["fused_adam"]

FORMAT = 2   # checkpoints: atomic, weights-only, versioned; load_checkpoint refuses any other FORMAT

def save_checkpoint(state, path):
    """torch.save({**state, "format": FORMAT}) with data.atomic: a kill at any moment leaves the old file or the new."""
    with data.atomic(path, "wb") as f:
        torch.save({**state, "format": FORMAT}, f)

def run_folder(path):   # a run folder itself, or the folder of a checkpoint file in it
    return path if os.path.isdir(path) else os.path.dirname(path) or "."

def read_csv(path):
    """metrics.csv / steps.csv rows (dicts of strings); [] if missing. Damaged lines are skipped, with one warning."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
        rows = list(csv.DictReader(io.StringIO(text)))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        warnings.warn(f"could not read {str(path)!r} ({type(e).__name__}: {e}); going on without it", stacklevel=2)
        return []
    good = [r for r in (rows if text.endswith("\n") else rows[:-1]) if _log_row(r)]   # no line end: cut short
    if len(good) < len(rows):
        warnings.warn(f"skipped {len(rows) - len(good)} damaged line(s) in {str(path)!r}", stacklevel=2)
    return good

def _log_row(r):
    try:
        int(r["epoch"]), int(r["step"]), [float(v) for v in r.values() if v != ""]   # None: a missing field
        return True
    except (KeyError, TypeError, ValueError):
        return False

def write_csv(path, rows, append=False):   # the header: the union of the rows' keys; append: one log line, no rewrite
    with data.atomic(path, append=append) as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        if not append:
            w.writeheader()
        w.writerows(rows)

def load_checkpoint(path, map_location="cpu"):
    """The one checkpoint loader: `path` is a checkpoint or a run folder (its last.pt). weights_only:
    one carrying pickled code is refused and nothing in it runs. Every problem: data.UsageError."""
    run = os.path.isdir(path)
    path = os.path.join(path, "last.pt") if run else str(path)
    if not os.path.isfile(path):
        started = run and os.path.isfile(os.path.join(os.path.dirname(path), "config.json"))
        why = (": the run stopped before its first checkpoint; start it again (the same command, without --resume)"
               if started else ": not a run folder (train.py writes last.pt into its --out)" if run else "")
        raise data.UsageError(f"no checkpoint at {path}{why}")
    damaged = f"cannot read the checkpoint {path}: damaged, truncated or not a PyTorch checkpoint"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        if (what := describe_file(path)) == "it is a zip archive":
            raise data.UsageError(f"{damaged} (its zip archive is incomplete)")
        raise data.UsageError(f"{path} is not a PyTorch checkpoint: {what}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a global (code or a class)
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise data.UsageError(f"refusing to load {path}: it carries pickled code or objects "
                              f"({found.group(1) if found else 'not plain tensors and containers'}), which a "
                              f"facegen checkpoint never does; nothing in it was run") from None
    except Exception as e:  # a damaged, truncated or foreign file
        first = (str(e).strip().splitlines() or [""])[0]
        raise data.UsageError(f"{damaged} ({type(e).__name__}: {first})") from None
    if not (isinstance(state, dict) and {"nets", "config"} <= state.keys()):
        raise data.UsageError(f"{path} is not a facegen checkpoint (it has no nets and config)")
    if state.get("format") != FORMAT:
        raise data.UsageError(f"{path} was written by an older version of facegen; train it again with this one")
    return state

MAGIC = {b"PK\x03\x04": "a zip archive", b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image",
         b"GIF8": "a GIF image", b"\x1f\x8b": "gzip data", b"BM": "a BMP image", b"RIFF": "a RIFF file (WebP, WAV...)",
         b"\x80": "a bare pickle (not torch.save's zip format)", b"%PDF": "a PDF document"}

def describe_file(path):
    """What a file looks like from its first bytes, for error messages."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return f"it is {what}"
    try:
        return "it is text" if head.decode("utf-8") else "it is empty"
    except UnicodeDecodeError:
        return "its bytes are not any format facegen knows"
