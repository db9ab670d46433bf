"""facegen.py: every command writes the picture it promises, refusals are one clear line, and the
metrics agree with closed forms (a linear-Gaussian VAE, shifted image sets, exact copies).
One tiny VAE and one tiny DCGAN run are trained once for the whole module (32x32, CPU)."""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import facegen
import train

H = W = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = ["--image-size", "32", "--n-synthetic", "64", "--batch-size", "16", "--quiet"]
    assert train.main(["--model", "vae", "--epochs", "1", "--out", str(root / "vae"), *common]) == 0
    assert train.main(["--model", "dcgan", "--epochs", "2", "--out", str(root / "dcgan"), *common]) == 0
    return {"vae": root / "vae", "dcgan": root / "dcgan"}


def grid_size(n, nrow, h=H, w=W, pad=2):
    """(width, height) of data.make_grid's picture: min(nrow, n) columns, ceil(n / ncol) rows."""
    ncol = min(nrow, n)
    return ncol * (w + pad) + pad, -(-n // ncol) * (h + pad) + pad


def has_grid(path, n, nrow):
    """The picture holds make_grid's grid of n images in its bottom-right corner (labels, if any,
    left of it and above it: facegen.labelled_grid)."""
    (w, h), (gw, gh) = Image.open(path).size, grid_size(n, nrow)
    return w >= gw and h >= gh


def tiles(path, rows, cols, h=H, w=W, pad=2):
    """The grid at `path` (its bottom-right corner) cut back into its images: uint8 (rows, cols, h, w, 3)."""
    a = np.asarray(Image.open(path).convert("RGB"))
    a = a[a.shape[0] - rows * (h + pad) - pad:, a.shape[1] - cols * (w + pad) - pad:]
    at = lambda i, size: pad + i * (size + pad)                       # first pixel of tile i
    return np.stack([np.stack([a[at(r, h):at(r, h) + h, at(c, w):at(c, w) + w] for c in range(cols)])
                     for r in range(rows)])


def run_cli(*argv):
    return facegen.main([str(a) for a in argv])


def uint8_hwc(x):
    """float [-1, 1] (3, h, w) -> uint8 (h, w, 3), as make_grid writes it."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


# -----------------------------------------------------------------------------
# Loading and refusals

def test_load_run_rebuilds_the_trained_nets_in_eval_mode(runs):
    nets, cfg = facegen.load_run(str(runs["vae"]))
    saved = torch.load(runs["vae"] / "last.pt", map_location="cpu", weights_only=True)["nets"]
    assert not nets.training and cfg["model"] == "vae" and cfg["image_size"] == [H, W]
    for k, v in nets.state_dict().items():
        assert torch.equal(v, saved[k]), k
    best, _ = facegen.load_run(str(runs["vae"]), checkpoint="best")
    assert set(best.state_dict()) == set(saved)
    nets_file, _ = facegen.load_run(str(runs["vae"] / "last.pt"))
    assert torch.equal(next(iter(nets_file.state_dict().values())), next(iter(saved.values())))


@pytest.mark.parametrize("argv", [["reconstruct", "dcgan"], ["sample", "missing"],
                                  ["sample", "dcgan", "--checkpoint", "best"],       # GANs keep no best.pt
                                  ["interpolate", "vae", "--device", "cuda"]])
def test_user_errors_are_one_line_exit_2(runs, argv, capsys, tmp_path):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present: --device cuda is not an error here")
    argv = [str(runs.get(a, tmp_path / a)) if i == 1 else a for i, a in enumerate(argv)]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_every_command_has_help():
    for cmd in facegen.COMMANDS:
        with pytest.raises(SystemExit) as e:
            facegen.parse_args([cmd, "--help"])
        assert e.value.code == 0


@pytest.mark.parametrize("argv", [["sample", "--n", "1000000000"], ["sample", "--n", "0"], ["sample", "--std", "nan"],
                                  ["pca", "--steps", "65"], ["pca", "--port", "70000"],
                                  ["pca", "--port", "-1"], ["pca", "--range", "inf"], ["interpolate", "--steps", "1"],
                                  ["std-sweep", "--stds", ",".join(["1"] * 65)], ["evaluate", "--k", "0"],
                                  ["std-sweep", "--stds", ",".join(["1"] * 17)], ["interpolate", "--rows", "65"],
                                  ["evaluate", "--patches", "129"],
                                  ["sample", "--seed", "-1"], ["gif", "--hold-last-ms", "100000000"]])
def test_sizes_and_counts_are_bounded_at_parse_time(argv, capsys):
    """Refused by argparse (exit 2, naming the flag) before any run is loaded: RUN need not exist."""
    with pytest.raises(SystemExit) as e:
        facegen.parse_args([argv[0], "no-such-run", *argv[1:]])
    assert e.value.code == 2 and f"argument {argv[-2]}: " in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Pictures

@pytest.mark.parametrize("model", ["vae", "dcgan"])
def test_sample_grid_size_seed_and_std(runs, model, tmp_path):
    assert run_cli("sample", runs[model], "--n", 10, "--nrow", 4) == 0
    assert Image.open(runs[model] / "sample.png").size == grid_size(10, 4)
    a, b, c = (tmp_path / f"{s}.png" for s in "abc")
    run_cli("sample", runs[model], "--n", 4, "--out", a)
    run_cli("sample", runs[model], "--n", 4, "--out", b)
    run_cli("sample", runs[model], "--n", 4, "--out", c, "--seed", 1)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
    run_cli("sample", runs[model], "--n", 4, "--std", 0, "--out", a)   # z = 0 for every face
    t = tiles(a, 1, 4)[0]
    assert all(np.array_equal(t[0], t[i]) for i in range(4))


def test_reconstruct_shows_the_runs_test_images_over_their_reconstructions(runs, tmp_path):
    assert run_cli("reconstruct", runs["vae"], "--n", 6, "--nrow", 4) == 0
    path = runs["vae"] / "reconstruct.png"
    assert has_grid(path, 16, 4)                                     # 2 row pairs of 4, 2 blanks
    nets, cfg = facegen.load_run(str(runs["vae"]))
    _, test, _ = data.run_data(cfg)
    t = tiles(path, 4, 4)
    assert np.array_equal(t[0, 0], test[0].permute(1, 2, 0).numpy())  # top row: the test images
    assert np.array_equal(t[2, 1], test[5].permute(1, 2, 0).numpy())
    x_hat = facegen.decode(nets, facegen.encode_dataset(nets["vae"], test[:1]))
    assert np.array_equal(t[1, 0], uint8_hwc(x_hat[0]))               # below it: decode(mu)
    assert (t[2, 2:] == 0).all() and (t[3, 2:] == 0).all()          # padding after image 6
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    assert run_cli("reconstruct", runs["vae"], "--data", folder, "--out", tmp_path / "r.png") == 0
    assert has_grid(tmp_path / "r.png", 6, 3)


@pytest.mark.parametrize("model,extra", [("vae", []), ("vae", ["--slerp", "--noise"]), ("dcgan", ["--slerp"])])
def test_interpolate_grid(runs, model, extra, tmp_path):
    out = tmp_path / "i.png"
    assert run_cli("interpolate", runs[model], "--rows", 3, "--steps", 5, "--out", out, *extra) == 0
    cols = 5 + 2 * (model == "vae" and "--noise" not in extra)       # real endpoints beside encodings
    assert has_grid(out, 3 * cols, cols)
    t = tiles(out, 3, cols)
    assert not np.array_equal(t[0, 0], t[0, -1])                     # two different endpoints
    if cols == 7:                                                     # real images at both ends
        _, cfg = facegen.load_run(str(runs[model]))
        test = [x.permute(1, 2, 0).numpy() for x in data.run_data(cfg)[1]]
        assert any(np.array_equal(t[0, 0], x) for x in test) and any(np.array_equal(t[0, -1], x) for x in test)


def test_slerp_and_lerp_paths():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 256, generator=g), torch.randn(5, 256, generator=g)
    for spherical in (False, True):
        p = facegen.interpolation_path(a, b, 9, spherical)
        torch.testing.assert_close(p[:, 0], a)
        torch.testing.assert_close(p[:, -1], b)
    u, v = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    mid = facegen.interpolation_path(u, v, 3, spherical=True)[:, 1]
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(5))       # slerp stays on the sphere
    torch.testing.assert_close(mid, (u + v) / (u + v).norm(dim=1, keepdim=True))
    assert (facegen.interpolation_path(u, v, 3)[:, 1].norm(dim=1) < 0.8).all()  # lerp: towards the centre
    torch.testing.assert_close(facegen.slerp(u, 2 * u, torch.tensor(0.5)), 1.5 * u)  # parallel: a line


def test_std_sweep_rows_differ_only_by_scale(runs, tmp_path):
    assert run_cli("std-sweep", runs["vae"], "--n", 3) == 0
    assert has_grid(runs["vae"] / "std_sweep.png", 8 * 3, 3)                     # 0.25 ... 2.0
    out = tmp_path / "s.png"
    assert run_cli("std-sweep", runs["dcgan"], "--n", 4, "--stds", "0,1,1", "--out", out) == 0
    t = tiles(out, 3, 4)
    assert all(np.array_equal(t[0, 0], t[0, i]) for i in range(4))   # std 0: all the same face
    assert np.array_equal(t[1], t[2]) and not np.array_equal(t[1, 0], t[1, 1])  # same eps per column


@pytest.mark.parametrize("model", ["vae", "dcgan"])
def test_pca_grid_walks_components_around_a_face_not_the_mean_code(runs, model):
    """The centre column is a held-out test face's code (autoencoders: image --seed mod N) or z ~ N(0, I) with
    seed --seed (GANs): the mean code decodes to a blob, and a GAN's z = 0 to a black face."""
    assert run_cli("pca", runs[model], "--components", 4, "--steps", 5, "--seed", 1) == 0
    path = runs[model] / "pca.png"
    assert has_grid(path, 20, 5) and Image.open(path).size != grid_size(20, 5)  # labelled: PC k, -3 sd ...
    t = tiles(path, 4, 5)
    assert all(np.array_equal(t[0, 2], t[r, 2]) for r in range(4))  # centre column: the start face
    assert not np.array_equal(t[0, 0], t[0, 4])
    nets, cfg = facegen.load_run(str(runs[model]))
    z = (facegen.encode_dataset(nets["vae"], data.run_data(cfg)[1][1:2]) if model == "vae"
         else torch.randn(1, 100, generator=torch.Generator().manual_seed(1)))
    assert np.abs(t[0, 2].astype(int) - uint8_hwc(facegen.decode(nets, z)[0]).astype(int)).max() <= 1


def test_pca_traversal_labels_rows_by_variance_and_columns_by_sd(runs):
    nets, cfg = facegen.load_run(str(runs["vae"]))
    basis = facegen.fit_pca(nets, data.run_data(cfg)[0])
    x, rows, cols = facegen.pca_traversal(nets, basis, 3, 5, 2.0)
    share = basis[2] ** 2 / (basis[2] ** 2).sum()
    assert x.shape == (15, 3, 32, 32)
    assert rows == [f"PC{j + 1}\n{100 * share[j]:.1f}% var" for j in range(3)]
    assert cols == ["-2\nsd", "-1\nsd", "mean", "+1\nsd", "+2\nsd"]
    torch.testing.assert_close(x[2], x[7])                            # centre column: the mean code


def test_labelled_commands_mark_rows_and_ends(runs, tmp_path):
    def band(path, n, nrow):                                          # what lies outside the faces
        a = np.asarray(Image.open(path).convert("RGB"))
        gw, gh = grid_size(n, nrow)
        return a, a[-gh:, :-gw], a[:-gh]
    assert run_cli("reconstruct", runs["vae"], "--n", 4, "--nrow", 4, "--out", tmp_path / "r.png") == 0
    a, left, top = band(tmp_path / "r.png", 8, 4)
    assert a.shape[:2] == (2 * 34 + 2, left.shape[1] + 4 * 34 + 2) and (left < 128).any() and top.size == 0
    assert run_cli("std-sweep", runs["vae"], "--n", 3, "--out", tmp_path / "s.png") == 0
    a, left, _ = band(tmp_path / "s.png", 24, 3)
    rows = [left[r * 34 + 2:r * 34 + 34] for r in range(8)]           # one label per row: std 0.25 ... 2
    assert all((r < 128).any() for r in rows) and not np.array_equal(rows[0], rows[1])
    for extra, n in (([], 12), (["--noise"], 8)):                     # t=0 / t=1 (and image A / B) above the ends
        assert run_cli("interpolate", runs["vae"], "--rows", 2, "--steps", 4, "--out", tmp_path / "i.png", *extra) == 0
        a, _, top = band(tmp_path / "i.png", n, n // 2)
        assert (top < 128).any()


def test_latent_pca_matches_the_covariance_eigendecomposition():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    codes = torch.randn(500, 6, generator=g, dtype=torch.float64) @ mix + 3
    mean, V, sigma = facegen.latent_pca(codes)
    evals, evecs = torch.linalg.eigh(torch.cov(codes.T))
    torch.testing.assert_close(sigma ** 2, evals.flip(0))
    torch.testing.assert_close((V @ evecs.flip(1)).abs(), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(mean, codes.mean(0))
    assert (sigma[:-1] >= sigma[1:]).all()
    z = facegen.from_pca(mean, V, sigma, torch.tensor([[2.0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(((z - mean) @ V[0]).item(), 2 * sigma[0].item())


def test_gif_holds_the_last_frame(runs, tmp_path):
    out = tmp_path / "p.gif"
    assert run_cli("gif", runs["dcgan"], "--duration-ms", 100, "--hold-last-ms", 900, "--out", out) == 0
    im = Image.open(out)
    assert im.n_frames == 2
    durations = []
    for i in range(im.n_frames):
        im.seek(i)
        durations.append(im.info["duration"])
    assert durations == [100, 900]
    assert run_cli("gif", tmp_path, "--out", out) == 2                # no samples/ folder


# -----------------------------------------------------------------------------
# Metrics: sliced Wasserstein on Laplacian pyramids

def _np_blur(a, gain=1.0):
    """cv2's 5x5 binomial blur, separable, mirrored (BORDER_REFLECT_101) borders: numpy, float64."""
    k = np.array([1.0, 4, 6, 4, 1]) / 16
    p = np.pad(a, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    rows = sum(k[i] * p[:, :, i:i + a.shape[2], :] for i in range(5))
    return gain * sum(k[j] * rows[:, :, :, j:j + a.shape[3]] for j in range(5))


def test_laplacian_pyramid_matches_an_independent_pyrdown_pyrup():
    """Each level against a separate numpy implementation of cv2's pyrDown / pyrUp (not the
    reconstruction identity G = L + up(G'), which holds for any up/down by construction)."""
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pyr = facegen.laplacian_pyramid(x, 3)
    assert [p.shape[2:] for p in pyr] == [(64, 48), (32, 24), (16, 12)]
    g0 = x.numpy()
    g1 = _np_blur(g0)[:, :, ::2, ::2]
    g2 = _np_blur(g1)[:, :, ::2, ::2]

    def up(g, shape):
        u = np.zeros(g.shape[:2] + shape)
        u[:, :, ::2, ::2] = g
        return _np_blur(u, gain=4.0)

    torch.testing.assert_close(pyr[2], torch.from_numpy(g2))
    torch.testing.assert_close(pyr[1], torch.from_numpy(g1 - up(g2, (32, 24))))
    torch.testing.assert_close(pyr[0], torch.from_numpy(g0 - up(g1, (64, 48))))
    flat = facegen.laplacian_pyramid(torch.full((1, 3, 32, 32), 0.3), 2)
    assert flat[0].abs().max() < 1e-6 and torch.allclose(flat[1], torch.tensor(0.3))  # detail of a flat image: 0
    # a smooth image has far less detail than white noise of the same range
    smooth = facegen.laplacian_pyramid(smooth_images(2, 0).double(), 2)[0].abs().mean()
    noise = facegen.laplacian_pyramid(torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1, 2)[0].abs().mean()
    assert smooth < 0.2 * noise


def test_sliced_wasserstein_zero_symmetric_and_one_dimensional_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 20, generator=g), torch.randn(300, 20, generator=g) + 0.5
    sw = lambda p, q: facegen.sliced_wasserstein(p, q, 256, torch.Generator().manual_seed(1))
    assert sw(a, a) == 0 and sw(a, b) > 0
    assert sw(a, b) == pytest.approx(sw(b, a), rel=1e-6)
    # in 1-D every direction is ±1: SWD = W_1 = mean |sorted a − sorted b| (here a pure shift)
    assert sw(a[:, :1], a[:, :1] + 0.7) == pytest.approx(0.7, rel=1e-5)
    with pytest.raises(ValueError):
        sw(a, b[:10])


def smooth_images(n, seed):
    """Random images with structure: 8x8 noise upsampled to 32x32, in [-1, 1]."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)


def test_swd_pyramid_zero_for_identical_sets_and_grows_with_a_shift():
    x = smooth_images(16, 0)
    swd = lambda a, b: facegen.swd_pyramid(a, b, torch.Generator().manual_seed(0), n_per_image=16, n_projections=64)
    assert swd(x, x) == [0.0, 0.0]
    means = [sum(swd(x, x + s)) / 2 for s in (0.0, 0.1, 0.5)]
    assert means[0] == 0 < means[1] < means[2]
    assert swd(x, x + 0.5) == pytest.approx(swd(x + 0.5, x), rel=1e-5, abs=1e-5)
    noise = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert sum(swd(x, smooth_images(16, 2))) < sum(swd(x, noise))    # smooth sets are closer to each other


def test_nearest_rms_finds_exact_copies():
    ref = (smooth_images(12, 5) * 127.5 + 127.5).round().to(torch.uint8)
    q = facegen.to_float(ref[[3, 7]])
    torch.testing.assert_close(facegen.nearest_rms(q, ref, chunk=5), torch.zeros(2), atol=1e-3, rtol=0)
    d = facegen.nearest_rms(q + 0.1, ref)                             # a uniform offset of 0.1: RMS 0.1
    assert torch.all(d <= 0.1 + 1e-4)
    assert facegen.nearest_rms(facegen.to_float(ref[:1]), ref[1:]).item() > 0.05


# -----------------------------------------------------------------------------
# Metrics: ELBO and importance-weighted bound against a linear-Gaussian VAE (exact log p(x))

class LinearGaussian(torch.nn.Module):
    """p(z) = N(0, I), p(x|z) = N(W z + b, s² I): log p(x) = log N(x; b, W Wᵀ + s² I) exactly.
    W has orthogonal columns, so the true posterior is diagonal; `shift`/`scale` spoil the encoder."""

    def __init__(self, d=4, D=10, s=0.5, shift=0.0, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        self.W = q * torch.linspace(0.5, 2.0, d, dtype=torch.float64)   # orthogonal columns
        self.b, self.s = torch.randn(D, generator=g, dtype=torch.float64), s
        self.shift, self.scale = shift, scale
        self.register_buffer("dummy", torch.zeros(1, dtype=torch.float64))

    def encode(self, x, y=None):
        prec = 1 + (self.W ** 2).sum(0) / self.s ** 2                 # diagonal of I + WᵀW / s²
        mu = (x - self.b) @ self.W / self.s ** 2 / prec
        return mu + self.shift, torch.log(self.scale ** 2 / prec).expand_as(mu)

    def decode(self, z, y=None):
        return z @ self.W.T + self.b

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.W.shape[1], generator=g, dtype=torch.float64)
        return self.decode(z) + self.s * torch.randn(n, len(self.b), generator=g, dtype=torch.float64)


def test_exact_posterior_makes_every_weight_equal_log_px():
    m = LinearGaussian()
    x = m.sample(8)
    lw = facegen.log_weights(m, x, m.s, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lw, m.log_px(x)[:, None].expand(-1, 5))
    torch.testing.assert_close(facegen.iw_bound(lw), m.log_px(x))


def test_one_sample_weight_matches_torch_distributions_with_the_same_noise():
    m = LinearGaussian(shift=0.3, scale=1.5)
    x = m.sample(6)
    lw = facegen.log_weights(m, x, m.s, 3, torch.Generator().manual_seed(7))
    eps = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mu, logvar = m.encode(x)
    N = torch.distributions.Normal
    for i in range(3):
        z = mu + (0.5 * logvar).exp() * eps[i]
        ref = (N(m.decode(z), m.s).log_prob(x).sum(1) + N(0.0, 1.0).log_prob(z).sum(1)
               - N(mu, (0.5 * logvar).exp()).log_prob(z).sum(1))
        torch.testing.assert_close(lw[:, i], ref)
    torch.testing.assert_close(facegen.iw_bound(lw[:, :1]), lw[:, 0])  # k = 1: the one-sample ELBO


def test_iw_bound_tightens_with_k_between_the_elbo_and_log_px():
    m = LinearGaussian(shift=0.4)                                      # q(z|x): the posterior, shifted
    x = m.sample(64)
    mu, logvar = m.encode(x)
    # exact ELBO of the linear-Gaussian model: E_q log p(x|z) − KL(q ‖ p)
    var = logvar.exp()
    recon = -0.5 * ((((x - m.decode(mu)) ** 2).sum(1) + (var * (m.W ** 2).sum(0)).sum(1)) / m.s ** 2
                    + x.shape[1] * math.log(2 * math.pi * m.s ** 2))
    elbo = recon - 0.5 * (mu ** 2 + var - 1 - logvar).sum(1)
    lw = facegen.log_weights(m, x, m.s, 4000, torch.Generator().manual_seed(0), batch=100_000)
    torch.testing.assert_close(lw.mean(), elbo.mean(), atol=0.05, rtol=0)   # k = 1 in expectation
    bounds = [facegen.iw_bound(facegen.log_weights(m, x, m.s, k, torch.Generator().manual_seed(0), 100_000)).mean()
              for k in (1, 5, 50, 2000)]
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3] <= m.log_px(x).mean() + 0.01
    assert m.log_px(x).mean() - bounds[3] < 0.1 * (m.log_px(x).mean() - elbo.mean())


def test_iw_bound_on_the_trained_vae_never_looser_than_the_elbo(runs):
    nets, cfg = facegen.load_run(str(runs["vae"]))
    _, test, _ = data.run_data(cfg)
    x = facegen.to_float(test[:4])
    sigma = facegen.likelihood_std(cfg)
    assert sigma == cfg["obs_std"] == 0.01
    with torch.no_grad():
        lws = {k: facegen.log_weights(nets["vae"], x, sigma, k, torch.Generator().manual_seed(0)).double()
               for k in (1, 5, 50)}
    iw = {k: facegen.iw_bound(lw).mean().item() for k, lw in lws.items()}
    for lw in lws.values():
        assert (facegen.iw_bound(lw) >= lw.mean(1) - 1e-6).all()
    assert iw[1] <= iw[5] <= iw[50]


def test_likelihood_std_for_mse_runs_is_root_half():
    assert facegen.likelihood_std({"recon": "mse", "obs_std": 1.0}) == pytest.approx(math.sqrt(0.5))
    # Σ(x − x_hat)² and the N(x_hat, ½ I) negative log-likelihood differ by the constant (D/2) log π
    x, x_hat = torch.randn(2, 12), torch.randn(2, 12)
    nll = -torch.distributions.Normal(x_hat, math.sqrt(0.5)).log_prob(x).sum(1)
    torch.testing.assert_close(nll - ((x - x_hat) ** 2).sum(1), torch.full((2,), 6 * math.log(math.pi)))


# -----------------------------------------------------------------------------
# evaluate

def test_evaluate_averages_its_swd_over_draws_of_consecutive_seeds(runs):
    """draws=3 at seed 5 = the mean of three one-draw evaluations at seeds 5, 6, 7, per level, and
    each draw's ratio is that draw's own model/floor; the draws differ (else averaging is moot)."""
    nets, cfg = facegen.load_run(str(runs["dcgan"]))
    kw = dict(n=8, patches=16, projections=64)
    one = [facegen.evaluate(nets, cfg, seed=s, draws=1, **kw)["swd_x1e3"] for s in (5, 6, 7)]
    three = facegen.evaluate(nets, cfg, seed=5, draws=3, **kw)["swd_x1e3"]
    for key in ("samples_vs_test", "train_vs_test"):
        assert three[key] == pytest.approx([sum(o[key][i] for o in one) / 3 for i in range(2)], rel=1e-6)
    assert three["ratio_each"] == pytest.approx([o["samples_vs_test_mean"] / o["train_vs_test_mean"] for o in one])
    assert len({round(o["train_vs_test_mean"], 6) for o in one}) == 3


@pytest.mark.parametrize("model", ["vae", "dcgan"])
def test_evaluate_writes_a_finite_report_and_one_readable_verdict(runs, model, capsys):
    argv = ["evaluate", runs[model], "--n", 8, "--k", 3, "--patches", 16, "--projections", 64]
    assert run_cli(*argv) == 0
    r = json.loads((runs[model] / "evaluate.json").read_text())
    assert r["model"] == model and r["n"] == 8
    s, nn = r["swd_x1e3"], r["nearest_train_rms"]
    assert s["level_px"] == [32, 16] and len(s["samples_vs_test"]) == len(s["train_vs_test"]) == 2
    numbers = [*s["samples_vs_test"], *s["train_vs_test"], s["samples_vs_test_mean"], s["train_vs_test_mean"],
               *nn.values()]
    assert all(math.isfinite(v) and v > 0 for v in numbers)
    assert s["samples_vs_test_mean"] > s["train_vs_test_mean"]        # untrained samples are far from faces
    out, err = capsys.readouterr()
    assert "SWD x1e3, mean" in out and "nearest-train RMS, median" in out
    assert s["draws"] == 4 and len(s["ratio_each"]) == 4 and "per draw" in out
    assert s["ratio"] == pytest.approx(s["samples_vs_test_mean"] / s["train_vs_test_mean"])
    assert f"SWD {s['ratio']:.2f}x the real-vs-real floor" in out and "lower is better" in out and "from 8 samples" in out
    assert err.count("warning: ") == 1 and "too noisy" in err and err.count("\n") == 1  # 8 samples: too few
    argv[argv.index("--n") + 1] = 200                                 # more than the run's 13 test images
    assert run_cli(*argv) == 0
    err = capsys.readouterr().err
    assert "warning: SWD from 13 samples (--n 200, 13 test images)" in err and err.count("\n") == 1
    if model == "vae":
        lik = r["likelihood"]
        assert lik["k"] == 3 and lik["obs_std"] == 0.01
        assert all(math.isfinite(lik[k]) for k in ("neg_elbo_bpd", "neg_iw_bpd", "neg_elbo_nats", "neg_iw_nats"))
        assert lik["neg_iw_nats"] <= lik["neg_elbo_nats"]
        assert lik["neg_elbo_bpd"] == pytest.approx(lik["neg_elbo_nats"] / (3 * H * W * math.log(2)))
        assert "bits/dim" in out
    else:
        assert "likelihood" not in r and "bits/dim" not in out


# -----------------------------------------------------------------------------
# Conditional runs: sample --label, the attribute grid, measured control

@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "cvae"
    assert train.main(["--model", "vae-lrelu", "--conditional", "--epochs", "1", "--out", str(out), "--image-size", "32",
                       "--n-synthetic", "64", "--batch-size", "16", "--quiet"]) == 0
    return out


def test_attribute_grid_rows_are_the_values_and_columns_the_same_z(cond_run, tmp_path):
    out = tmp_path / "a.png"
    assert run_cli("attributes", cond_run, "--attr", "hair", "--n", "3", "--label", "glasses=yes", "--out", out) == 0
    t = tiles(out, 5, 3)
    (w, h), (gw, gh) = Image.open(out).size, grid_size(15, 3)
    assert w > gw + 20 and h > gh  # + a band of row labels (hair=dark ...) and a title line
    nets, _ = facegen.load_run(cond_run)
    z = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    for r in range(5):                                   # row r: hair value r, glasses yes, beard no
        want = facegen.decode(nets, z, torch.tensor([[r, 1, 0]] * 3))
        for c in range(3):
            assert np.abs(t[r, c].astype(int) - uint8_hwc(want[c]).astype(int)).max() <= 1, (r, c)


def test_sample_label_is_checked_against_the_runs_labels(cond_run, runs, tmp_path, capsys):
    assert run_cli("sample", cond_run, "--n", "4", "--label", "beard=yes", "--out", tmp_path / "s.png") == 0
    assert Image.open(tmp_path / "s.png").size == grid_size(4, 8)
    assert run_cli("sample", cond_run, "--label", "hair=pink", "--out", tmp_path / "x.png") == 2
    assert run_cli("sample", runs["dcgan"], "--label", "hair=blond", "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "hair=dark|brown|blond|grey|colourful" in err and "needs a conditional run" in err


def test_control_reports_real_and_generated_accuracy_per_value(cond_run, tmp_path):
    out = tmp_path / "control.json"
    assert run_cli("control", cond_run, "--n", "4", "--epochs", "1", "--out", out) == 0
    r = json.loads(out.read_text())
    assert list(r["attributes"]) == ["hair", "glasses", "beard"]
    hair = r["attributes"]["hair"]
    assert list(hair["values"]) == ["dark", "brown", "blond", "grey", "colourful"]
    gen = [v["generated"] for v in hair["values"].values()]
    assert all(0 <= g <= 1 and g * 4 == round(g * 4) for g in gen)       # shares of 4 faces
    assert hair["generated_balanced"] == pytest.approx(sum(gen) / 5)


def test_pca_of_one_code_is_refused_and_of_few_keeps_their_rank():
    with pytest.raises(data.UsageError, match="at least 2 codes"):
        facegen.latent_pca(torch.randn(1, 8))
    codes = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, V, sigma = facegen.latent_pca(codes)                       # 3 points span a plane: 2 components
    assert V.shape == (2, 8) and (sigma > 0).all()
    torch.testing.assert_close(((codes - mean) @ V.T) @ V, codes - mean)  # the plane holds every code
    share = facegen.variance_share(sigma)
    assert torch.isfinite(share).all() and share.sum().item() == pytest.approx(1)
    assert facegen.variance_share(torch.zeros(2)).tolist() == [0, 0]  # codes that never vary: no nan


def test_conditional_autoencoder_encodes_and_decodes_with_each_faces_labels(cond_run, tmp_path, capsys):
    nets, cfg = facegen.load_run(str(cond_run))
    _, test, _ = data.run_data(cfg)
    _, test_y, _ = data.run_data(cfg)[2]
    vae = nets["vae"]

    def own(i):                                                     # test face i's reconstruction, its labels
        return facegen.decode(nets, facegen.encode_dataset(vae, test[i:i + 1], test_y[i:i + 1]), test_y[i:i + 1])[0]

    def near(tile, x):
        return np.abs(tile.astype(int) - uint8_hwc(x).astype(int)).max() <= 1
    assert run_cli("reconstruct", cond_run, "--n", 3, "--nrow", 3, "--out", tmp_path / "r.png") == 0
    t = tiles(tmp_path / "r.png", 2, 3)
    assert all(near(t[1, i], own(i)) for i in range(3))            # decode(mu(x, y), y), y the face's own labels
    assert run_cli("interpolate", cond_run, "--rows", 2, "--steps", 3, "--out", tmp_path / "i.png") == 0
    t = tiles(tmp_path / "i.png", 2, 5)
    for row in t:                                                   # A, t=0 ... t=1, B
        a, b = (next(i for i in range(len(test)) if np.array_equal(row[c], test[i].permute(1, 2, 0).numpy()))
                for c in (0, 4))
        mu_b = facegen.encode_dataset(vae, test[b:b + 1], test_y[b:b + 1])
        assert near(row[1], own(a)) and near(row[3], facegen.decode(nets, mu_b, test_y[a:a + 1])[0])  # A's labels
    assert run_cli("pca", cond_run, "--components", 3, "--steps", 3, "--seed", 2, "--out", tmp_path / "p.png") == 0
    t = tiles(tmp_path / "p.png", 3, 3)
    assert all(near(t[r, 1], own(2)) for r in range(3))             # around test face 2, with its labels
    explorer = facegen.Explorer(nets, facegen.fit_pca(nets, data.run_data(cfg)[0], labels=data.run_data(cfg)[2][0]),
                                {}, test, k=3, labels=test_y)
    assert near(pixels(explorer.face_png("f=2&c=0")), own(2))
    assert run_cli("std-sweep", cond_run, "--n", 3, "--stds", "1,1", "--out", tmp_path / "s.png") == 0
    t = tiles(tmp_path / "s.png", 2, 3)
    assert np.array_equal(t[0], t[1])                               # the same labels down each column
    assert run_cli("evaluate", cond_run, "--n", 4, "--k", 2, "--patches", 8, "--projections", 16, "--draws", 1,
                   "--out", tmp_path / "e.json") == 0
    lik = json.loads((tmp_path / "e.json").read_text())["likelihood"]  # the bound on log p(x|y), test labels
    assert math.isfinite(lik["neg_elbo_nats"]) and lik["neg_iw_nats"] <= lik["neg_elbo_nats"]
    capsys.readouterr()
    assert run_cli("reconstruct", cond_run, "--data", tmp_path, "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err                                   # images without labels
    assert err.startswith("error: reconstruct --data") and err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def pixels(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


def test_a_run_without_held_out_images_says_so_in_one_line(runs, tmp_path, capsys):
    state = torch.load(runs["vae"] / "last.pt", map_location="cpu", weights_only=True)
    state["config"]["test_fraction"] = 0.0
    torch.save(state, tmp_path / "last.pt")
    for argv in (["evaluate"], ["reconstruct"], ["interpolate"], ["pca"]):
        assert run_cli(*argv, tmp_path, "--out", tmp_path / ("x.json" if argv == ["evaluate"] else "x.png")) == 2
        err = capsys.readouterr().err
        assert err == f"error: {argv[0]} needs held-out test images and this run kept none (its test_fraction is 0)\n"
    assert run_cli("interpolate", tmp_path, "--noise", "--out", tmp_path / "n.png") == 0  # noise needs none


def test_out_with_a_control_character_is_refused(runs, tmp_path, capsys):
    for name in ("a\nwrote b.png", "a\rb.png", "a\x1b[31mb.png"):
        assert run_cli("sample", runs["dcgan"], "--n", 1, "--out", tmp_path / name) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and "control character" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error,says", [(OSError(28, "No space left on device", "/d/p.gif"),
                                         "No space left on device: /d/p.gif"),
                                        (OSError(28, "No space left on device"), "No space left on device"),
                                        (OSError("cannot write /d/p.gif: disk full"), "cannot write /d/p.gif: disk full")])
def test_a_failed_write_is_one_line_with_the_cause_and_the_file(runs, tmp_path, monkeypatch, capsys, error, says):
    def full(*args, **kw):
        raise error
    monkeypatch.setattr(data, "save_gif", full)
    assert run_cli("gif", runs["dcgan"], "--out", tmp_path / "p.gif") == 1
    assert capsys.readouterr().err == f"error: {says}\n"


def test_labelled_grid_pastes_the_grid_unchanged_and_writes_labels_beside_it():
    grid = data.make_grid(torch.rand(6, 3, 16, 16) * 2 - 1, nrow=3)
    out = np.asarray(facegen.labelled_grid(grid, (16, 16), row_labels=["a", "bb"], col_labels=["x", "y", "z"], title="T"))
    h, w = grid.shape[:2]
    assert (out[-h:, -w:] == grid).all()                        # bottom-right: the grid itself
    assert out[:-h].min() < 100 and out[:, :-w].min() < 100     # dark text above it and left of it
    rows_only = np.asarray(facegen.labelled_grid(grid, (16, 16), row_labels=["a", "bb"]))
    assert rows_only.shape[0] == h and rows_only.shape[1] > w    # row labels add no band on top
