"""train.py: every --model runs and writes a complete run folder; resume is bitwise exact;
training actually learns; refusals are clear. Small synthetic data, CPU, a few steps."""
import copy
import csv
import json
import os

import pytest
import torch

import data
import facegen
import losses
import models
import train

SIZE = {"vae-in": "32x24"}  # smallest supported size per model; 32x32 otherwise
AUTOENCODERS = ["vae", "vae-vgg", "vae-in", "ae", "vae-lrelu"]
ALL = AUTOENCODERS + ["dcgan", "wgan", "wgan-gp", "vaegan", "sngan"]


def run_train(out, model, *extra):
    argv = ["--model", model, "--image-size", SIZE.get(model, "32"), "--n-synthetic", "160",
            "--batch-size", "8", "--out", str(out), "--quiet", *extra]
    return train.main(argv)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["nets"]


@pytest.mark.parametrize("model", ALL)
def test_every_model_writes_a_complete_run_folder(tmp_path, model):
    out = tmp_path / model
    assert run_train(out, model, "--max-steps", "2", "--epochs", "1") == 0
    for f in ["config.json", "metrics.csv", "loss.png", "last.pt", "progress.gif", "samples/epoch_001.png"]:
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == model and cfg["batch_size"] == 8 and cfg["max_steps"] == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and int(rows[0]["step"]) == 2
    per_step = cfg["n_critic"] if models.FAMILY[model] in ("adversarial", "wasserstein") else 1
    # images/s is the images the 2 steps consumed over the epoch's seconds
    assert float(rows[0]["images_per_s"]) * float(rows[0]["seconds"]) == pytest.approx(2 * per_step * 8, rel=1e-3)
    if models.FAMILY[model] == "autoencoder":
        assert (out / "recon/epoch_001.png").is_file() and (out / "best.pt").is_file()
        assert "test_loss" in rows[0] and "kl" in rows[0]
    if models.FAMILY[model] != "autoencoder" and cfg["gan_loss"] == "bce":
        assert "D(x)" in rows[0] and "D(G(z))" in rows[0]  # their values: test_logged_d_of_x_is_the_mean_probability
    if models.FAMILY[model] == "wasserstein":
        assert "wasserstein" in rows[0]
    nets = {"autoencoder": ["vae"], "vaegan": ["D", "vae"]}.get(models.FAMILY[model], ["D", "G"])
    assert all(float(rows[0][f"grad_norm_{n}"]) > 0 for n in nets)   # every update's gradient norm, per net
    assert not any(k.startswith("grad_norm") and k[10:] not in nets for k in rows[0])
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["format"] == models.FORMAT and state["rng"]["cuda"] == []  # no CUDA here


SEEDS = {  # SPEC "Models" / README: each report's hyperparameters, as resolved with no flags
    "vae": dict(image_size=[64, 64], recon="gnll", obs_std=0.01, lr=1e-4, latent_dim=64, batch_size=64, epochs=500,
                kl_weight=1.0, optimizer="adam"),
    "vae-vgg": dict(image_size=[64, 64], recon="gnll", obs_std=0.1, lr=1e-5, latent_dim=512, batch_size=64),
    "vae-in": dict(image_size=[64, 48], recon="mse-mean", kl_weight=1e-5, latent_dim=64, lr=1e-3, optimizer="adam",
                   flip=True),
    "ae": dict(recon="mse", kl_weight=0.0, flip=True, jitter=0.1, latent_dim=128),
    "vae-lrelu": dict(recon="mse", kl_weight=0.1, flip=True, jitter=0.1),
    "dcgan": dict(arch="classic", gan_loss="bce", lr=2e-4, betas=(0.5, 0.999), batch_size=128, latent_dim=100,
                  optimizer="adam", n_critic=1),
    "wgan": dict(arch="seed002", gan_loss="wasserstein", optimizer="rmsprop", lr=1e-4, clip=0.01, n_critic=5,
                 batch_size=128, gp_weight=0.0),
    "wgan-gp": dict(arch="seed002", gan_loss="wasserstein", critic_norm="none", optimizer="adam", lr=1e-4,
                    betas=(0.0, 0.9), n_critic=5, gp_weight=10.0, batch_size=128, clip=0.0),
    "vaegan": dict(recon="mse", kl_weight=0.01, gan_loss="bce", latent_dim=128, adv_weight=1.0),
    "sngan": dict(gan_loss="hinge", lr=2e-4, betas=(0.5, 0.999), n_critic=1, latent_dim=128),
}


@pytest.mark.parametrize("model", ALL)
def test_seed_defaults_are_the_reports_hyperparameters(model):
    cfg = train.resolve(train.parse_args(["--model", model]))
    got = {k: tuple(cfg[k]) if k == "betas" else cfg[k] for k in SEEDS[model]}
    assert got == SEEDS[model]
    assert models.latent_dim(models.build_model(model, (32, 24) if model == "vae-in" else 32,
                                                latent_dim=cfg["latent_dim"])) == cfg["latent_dim"]


def test_the_wuga_reports_kl_and_recon_weights_are_flags():
    cfg = train.resolve(train.parse_args(["--model", "vae", "--kl-weight", "10", "--recon-scale", "0.01"]))
    assert (cfg["kl_weight"], cfg["recon_scale"]) == (10.0, 0.01)


def test_tests_run_on_the_cpu_unless_they_ask_for_cuda():
    """conftest.py hides the GPUs: --device auto must not pick CUDA (cudnn.benchmark, NCCL)."""
    import os
    if os.environ.get("FACEGEN_TEST_CUDA") == "1":
        pytest.skip("FACEGEN_TEST_CUDA=1: this session asked for the GPU")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


def same_state(a, b):
    """Nets, optimizer state (Adam moments / RMSProp square averages, step counts) bitwise."""
    a, b = torch.load(a, map_location="cpu", weights_only=True), torch.load(b, map_location="cpu", weights_only=True)
    assert a["nets"].keys() == b["nets"].keys()
    for k in a["nets"]:
        assert torch.equal(a["nets"][k], b["nets"][k]), k
    for net, st in a["optimizers"].items():
        assert st["state"].keys() == b["optimizers"][net]["state"].keys() and st["state"]
        for i, s in st["state"].items():
            for key, v in s.items():
                w = b["optimizers"][net]["state"][i][key]
                assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (net, i, key)


def rows_without_timing(path):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in csv.DictReader(open(path))]


# (the Wuga vae, stopped mid-epoch and at epoch ends: test_robustness's kills)
# ae: flip + colour jitter (augmentation RNG); wgan: RMSProp + clipping;
# wgan-gp: the penalty's eps; vaegan: two nets, noise decoded outside the VAE's forward
# stop: at an epoch's end (--epochs 1), or mid-epoch at --max-steps 3 (then the resume completes
# the epoch's metrics row from the checkpoint's sums)
@pytest.mark.parametrize("model,extra,stop", [
    ("ae", [], "--epochs"), ("wgan", ["--n-critic", "2"], "--max-steps"),    # 2 steps an epoch: 3 is mid-epoch 2
    ("wgan-gp", ["--n-critic", "2"], "--epochs"), ("vaegan", [], "--max-steps"),
    ("sngan", ["--conditional"], "--max-steps"),  # sngan: the spectral norm's u buffers and the labels
    ("dcgan", ["--ema", "0.9"], "--epochs")])     # the moving average of G
def test_resume_is_bitwise_exact(tmp_path, model, extra, stop):
    straight, split = tmp_path / "straight", tmp_path / "split"
    small = ["--n-synthetic", "50"]  # 40 training images: 5 batches an epoch
    assert run_train(straight, model, "--epochs", "2", *small, *extra) == 0
    first = ["--epochs", "1"] if stop == "--epochs" else ["--epochs", "2", "--max-steps", "3"]
    assert run_train(split, model, *first, *small, *extra) == 0
    st = torch.load(split / "last.pt", map_location="cpu", weights_only=True)
    assert (st["step"], st["pos"] > 0) == (3, True) if stop == "--max-steps" else (st["epoch"], st["pos"]) == (1, 0)
    assert run_train(split, model, "--resume", str(split), "--epochs", "2", "--max-steps", "1000", *small) == 0
    same_state(straight / "last.pt", split / "last.pt")
    rows = rows_without_timing(straight / "metrics.csv")
    assert len(rows) == 2 and rows == rows_without_timing(split / "metrics.csv")


def test_an_autoencoder_overfits_one_fixed_batch():
    """Training learns, as a property of one step (train.vae_step -> train.update) rather than of
    how a run happens to go: 30 Adam steps on the same 8 images must take the summed squared error
    far below its start (a machine-independent margin: it reaches ~5 % of the start at lr 1e-3
    and 3e-3, we ask for < 30 %; a wrong sign, a missing step or a detached loss stays near 100 %)."""
    cfg = train.resolve(train.parse_args(["--model", "ae", "--image-size", "32", "--n-synthetic", "40",
                                          "--batch-size", "8", "--no-flip", "--jitter", "0", "--lr", "1e-3",
                                          "--device", "cpu", "--out", "unused"]))
    run = train.Run(cfg)
    x, _ = next(run.batches.epoch(0))
    seen = [float(train.vae_step(run.fwd, run.opts, [(x, None)], cfg, run.noise)["recon"].detach()) for _ in range(30)]
    assert min(seen[-5:]) < 0.3 * seen[0], seen[::10]


def test_wgan_critic_weights_stay_clipped(tmp_path):
    out = tmp_path / "wgan"
    assert run_train(out, "wgan", "--max-steps", "2", "--clip", "0.01") == 0
    for k, v in weights(out / "last.pt").items():
        if k.startswith("D.") and v.is_floating_point() and "running" not in k:
            assert v.abs().max() <= 0.01 + 1e-9, k


def test_resume_refuses_disagreeing_flags(tmp_path, capsys):
    out = tmp_path / "vae"
    assert run_train(out, "vae", "--max-steps", "1") == 0
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--model", "dcgan"]) == 2
    assert train.main(["--resume", str(out), "--latent-dim", "7"]) == 2
    err = capsys.readouterr().err
    assert "model dcgan" in err and "latent_dim 7" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--lr", "0"], ["--batch-size", "-1"], ["--epochs", "0"], ["--latent-dim", "0"]])
def test_invalid_numbers_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "vae", *argv])
    assert e.value.code == 2


def test_clear_errors_exit_2(tmp_path, capsys):
    assert train.main(["--model", "vae", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert train.main(["--model", "vae", "--image-size", "40", "--out", str(tmp_path / "o")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main(["--model", "vae", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "missing" in err[0] and ("does not exist" in err[0] or "No such file" in err[0])
    assert "--model vae supports image sizes 64x64, 32x32" in err[1]
    assert "no images" in err[2]


def test_gan_step_is_n_critic_critic_updates_on_fresh_batches_then_one_generator_update(tmp_path, monkeypatch):
    calls, batches, real_gan = [], [], train.STEPS["wasserstein"]

    def spy(run, name, loss, update):
        frozen = {k: p.clone() for k, p in run.nets["D"].named_parameters()} if name == "G" else {}
        update()
        for k, p in run.nets["D"].named_parameters():  # the G update leaves D alone
            assert name != "G" or torch.equal(p, frozen[k]), k
        calls.append(name)

    def spy_gan(nets, opts, xs, cfg, noise):
        batches.append(xs)
        return real_gan(nets, opts, xs, cfg, noise)

    spy_updates(monkeypatch, spy)
    monkeypatch.setitem(train.STEPS, "wasserstein", spy_gan)
    assert run_train(tmp_path / "w", "wgan-gp", "--n-critic", "3", "--max-steps", "2") == 0
    assert calls == ["D", "D", "D", "G"] * 2
    assert all(len(xs) == 3 and not torch.equal(xs[0][0], xs[1][0]) for xs in batches)  # (x, y) pairs


@pytest.mark.parametrize("model,extra", [("dcgan", []), ("wgan-gp", ["--n-critic", "2"])])
def test_reuse_fakes_scores_the_last_critic_fakes_with_the_updated_d(tmp_path, monkeypatch, model, extra):
    """--reuse-fakes: one G forward per step (per critic batch), and G's update is the gradient of
    L_G(D'(x̃)) for the last critic batch's x̃ = G(z) and D' the critic after its update, computed
    here independently from copies of the nets; with --no-reuse-fakes G runs once more, on fresh z."""
    events, checked = [], []

    def spy(run, name, loss, update):
        if name == "G":  # recompute G's gradient from copies: the kept fakes' z, D as updated
            G, D = copy.deepcopy(run.nets["G"]), copy.deepcopy(run.nets["D"])
            G.load_state_dict(events[-1][1])                     # G's BatchNorm buffers before that forward
            x_fake = G(events[-1][2])
            grads = torch.autograd.grad(losses.GAN_LOSSES[run.cfg["gan_loss"]][1](D(x_fake).float()),
                                        list(G.parameters()))
        update()
        if name == "G":
            checked.append(all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
                               for p, g in zip(run.nets["G"].parameters(), grads)))

    def setup(run):
        G = run.nets["G"]
        G.register_forward_pre_hook(
            lambda m, i: events.append(("G", copy.deepcopy(m.state_dict()), i[0].clone()))
            if m.training and m is G else None)                  # not sampling, not the copy below

    spy_updates(monkeypatch, spy)
    spy_run(monkeypatch, setup)
    n_critic = int(extra[1]) if extra else 1
    assert run_train(tmp_path / "r", model, "--max-steps", "2", "--reuse-fakes", *extra) == 0
    assert sum(k == "G" for k, *_ in events) == 2 * n_critic and checked == [True, True]
    events.clear()
    assert run_train(tmp_path / "f", model, "--max-steps", "2", "--no-reuse-fakes", *extra) == 0
    assert sum(k == "G" for k, *_ in events) == 2 * (n_critic + 1)


@pytest.mark.parametrize("model,updated", [("dcgan", "G"), ("vaegan", "vae")])
def test_the_generator_update_computes_no_discriminator_gradient(tmp_path, monkeypatch, model, updated):
    """G's (the VAE-GAN's VAE's) loss passes through D: its backward leaves D's .grad exactly as
    D's own update left them (computing more would cost ~8 % of a step, for nothing), and gives
    every parameter of the net it updates a gradient."""
    checked = []

    def spy(run, name, loss, update):
        before = [p.grad.clone() for p in run.nets["D"].parameters()] if name == updated else None
        update()
        if before is not None:
            assert all(torch.equal(p.grad, g) for p, g in zip(run.nets["D"].parameters(), before))
            assert all(p.grad is not None for p in run.nets[name].parameters())
            checked.append(name)

    spy_updates(monkeypatch, spy)
    assert run_train(tmp_path / model, model, "--max-steps", "2") == 0
    assert checked == [updated] * 2


def spy_run(monkeypatch, setup):
    """Call setup(run) on the Run that train.main builds, before it trains (via train.train)."""
    real = train.train

    def spy(run):
        setup(run)
        return real(run)

    monkeypatch.setattr(train, "train", spy)


def spy_updates(monkeypatch, spy):
    """Route every train.update(opt, loss) of the run train.main builds through
    spy(run, name, loss, update), name the optimizer's net; update() does the real update."""
    runs, real = [], train.update

    def update(opt, loss):
        name = next(k for k, o in runs[-1].opts.items() if o is opt)
        spy(runs[-1], name, loss, lambda: real(opt, loss))

    monkeypatch.setattr(train, "update", update)
    spy_run(monkeypatch, runs.append)


def test_vaegan_d_sees_real_reconstructions_and_decoded_noise(tmp_path, monkeypatch):
    """D's fake batch is [the VAE's reconstructions of this batch ; decoder outputs of fresh
    noise], both rows checked against what the decoder produced in that step, not only the shapes."""
    events = []

    def setup(run):
        vae, D = run.nets["vae"], run.nets["D"]
        vae.register_forward_pre_hook(lambda m, i: events.append(("x", i[0].detach().clone())) if m.training else None)
        vae.decoder.register_forward_hook(lambda m, i, o: events.append(("dec", o.detach().clone())) if m.training else None)
        D.register_forward_pre_hook(lambda m, i: events.append(("D", i[0].detach().clone())) if m.training else None)

    spy_run(monkeypatch, setup)
    assert run_train(tmp_path / "vg", "vaegan", "--max-steps", "2") == 0
    kinds = [k for k, _ in events]
    assert kinds == ["x", "dec", "dec", "D", "D", "D"] * 2, kinds
    for step in range(2):
        (_, x), (_, x_hat), (_, x_p), (_, d1), (_, d2), (_, d3) = events[6 * step: 6 * step + 6]
        assert x.shape[0] == 8 and torch.equal(d1, x)                      # D(x): the real batch
        assert torch.equal(d2, torch.cat([x_hat, x_p]))                    # D step: reconstructions, then noise
        assert torch.equal(d3, d2)                                         # VAE step: the same fakes
        assert not torch.equal(x_hat, x_p)


def test_logged_d_of_x_is_the_mean_probability(tmp_path, monkeypatch):
    """metrics.csv's D(x) and D(G(z)) are sigmoid(score) averaged over the epoch's steps."""
    seen = []
    real_d, real_g = losses.GAN_LOSSES["bce"]

    def d_loss(d_real, d_fake):
        seen.append((torch.sigmoid(d_real).mean().item(), torch.sigmoid(d_fake).mean().item()))
        return real_d(d_real, d_fake)

    monkeypatch.setitem(losses.GAN_LOSSES, "bce", (d_loss, real_g))
    assert run_train(tmp_path / "d", "dcgan", "--max-steps", "3") == 0
    row = next(csv.DictReader(open(tmp_path / "d" / "metrics.csv")))
    assert len(seen) == 3
    assert float(row["D(x)"]) == pytest.approx(sum(a for a, _ in seen) / 3, rel=1e-5)
    assert float(row["D(G(z))"]) == pytest.approx(sum(b for _, b in seen) / 3, rel=1e-5)


@pytest.mark.parametrize("model,extra,check", [
    ("dcgan", ["--gan-loss", "ls"], "ls"),
    ("wgan-gp", ["--critic-norm", "layer", "--n-critic", "1"], "layer"),
    ("dcgan", ["--arch", "seed002"], "seed002"),
])
def test_gan_variants_train(tmp_path, monkeypatch, model, extra, check):
    """--gan-loss ls, --critic-norm layer and --arch seed002 actually train with what they name."""
    calls = []
    if check == "ls":
        real_d, real_g = losses.GAN_LOSSES["ls"]
        monkeypatch.setitem(losses.GAN_LOSSES, "ls", (lambda r, f: calls.append("d") or real_d(r, f),
                                                      lambda f: calls.append("g") or real_g(f)))
    out = tmp_path / model
    assert run_train(out, model, "--max-steps", "2", *extra) == 0
    st = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    fresh = models.build_model(model, 32, arch=st["config"]["arch"], critic_norm=st["config"]["critic_norm"])
    assert set(fresh.state_dict()) == set(st["nets"]) and st["step"] == 2
    assert any(not torch.equal(v, st["nets"][k]) for k, v in fresh.state_dict().items())   # it trained
    if check == "ls":
        assert calls == ["d", "g"] * 2 and st["config"]["gan_loss"] == "ls"
    if check == "layer":
        assert any(isinstance(m, torch.nn.GroupNorm) for m in fresh["D"].modules())
    if check == "seed002":
        assert isinstance(fresh["G"][0], torch.nn.Linear) and st["nets"]["G.0.weight"].shape[1] == 100


def test_fixed_noise_is_the_same_every_epoch_and_after_a_resume(tmp_path, monkeypatch):
    """samples/epoch_NNN.png are G(z) for one fixed z: the frames of the 'learning fast forward'."""
    zs = []

    def setup(run):
        run.nets["G"].register_forward_pre_hook(lambda m, i: None if m.training else zs.append(i[0].detach().clone()))

    spy_run(monkeypatch, setup)
    out = tmp_path / "g"
    assert run_train(out, "dcgan", "--epochs", "2", "--n-synthetic", "30") == 0
    assert run_train(out, "dcgan", "--resume", str(out), "--epochs", "3", "--n-synthetic", "30") == 0
    assert len(zs) == 3 and zs[0].shape == (64, 100)
    assert all(torch.equal(z, zs[0]) for z in zs)
    frames = sorted(p.name for p in (out / "samples").iterdir())
    assert frames == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert (out / "samples" / "epoch_001.png").read_bytes() != (out / "samples" / "epoch_003.png").read_bytes()


def test_best_pt_holds_the_epoch_with_the_lowest_test_loss(tmp_path):
    """Whatever the trajectory: best.pt is the state after the epoch whose metrics row has the
    lowest test_loss, and records that loss."""
    out = tmp_path / "ae"
    assert run_train(out, "ae", "--epochs", "3", "--n-synthetic", "30", "--lr", "3e-3") == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    best_row = min(rows, key=lambda r: float(r["test_loss"]))
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == int(best_row["epoch"]) and best["step"] == int(best_row["step"])
    assert best["best"] == pytest.approx(float(best_row["test_loss"]), rel=1e-9)
    if best_row is rows[-1]:
        same_state(out / "best.pt", out / "last.pt")


def test_flags_of_another_family_are_refused(capsys):
    assert train.main(["--model", "vaegan", "--n-critic", "5"]) == 2
    assert train.main(["--model", "dcgan", "--kl-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert "--model vaegan does not use --n-critic" in err and "--model dcgan does not use --kl-weight" in err


def test_a_gan_needs_n_critic_batches(tmp_path, capsys):
    # 128 training images = 4 batches of 32: fewer than one WGAN step (5 critic batches)
    assert train.main(["--model", "wgan", "--image-size", "32", "--n-synthetic", "160", "--batch-size", "32",
                       "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: only 128 training images for one step of --model wgan: 5 batch(es) of 32"), err
    assert not (tmp_path / "w" / "last.pt").exists()


# -----------------------------------------------------------------------------
# Speed switches (README "Speed"): each trains, resumes, and (where the arithmetic is the same
# on every resume) resumes bitwise exactly. The smallest model: ae at 32x32, 3 batches an epoch.

SPEED = ["--n-synthetic", "30", "--no-flip", "--jitter", "0"]


@pytest.mark.parametrize("switch", ["--channels-last", "--fused-adam", "--amp", "--compile"])
def test_speed_switch_trains_and_resumes(tmp_path, monkeypatch, capsys, switch):
    if switch == "--compile":
        # Inductor's C++ code generation needs a compiler and a minute on 2 cores; what is ours to
        # test is that train.py trains through the compiled views and checkpoints plain state
        # dicts. aot_eager runs the same dynamo capture and AOT autograd, without codegen.
        import functools
        import importlib
        try:
            importlib.import_module("torch._dynamo")
        except Exception as e:  # pragma: no cover
            pytest.skip(f"torch.compile unusable here: {e}")
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    resumable = switch != "--fused-adam"  # fused Adam is fixed for a run: a resume keeps the run's
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(split, "ae", "--max-steps", "1", switch, *SPEED) == 0
    assert run_train(split, "ae", "--resume", str(split), "--max-steps", "2", *SPEED, *([switch] if resumable else [])) == 0
    st = torch.load(split / "last.pt", map_location="cpu", weights_only=True)
    assert st["step"] == 2 and all(torch.isfinite(v).all() for v in st["nets"].values() if v.is_floating_point())
    assert not any(k.startswith("_orig_mod") or "module." in k for k in st["nets"])  # plain state dicts
    key = switch[2:].replace("-", "_")
    if switch == "--amp":
        # bf16 autocast where the CPU has native bf16, else one note and fp32 (config records which)
        assert st["config"]["amp"] or "--amp ignored" in capsys.readouterr().err
    else:
        assert st["config"][key] is True

    if switch in ("--channels-last", "--fused-adam"):  # same kernels before and after the resume
        assert run_train(straight, "ae", "--max-steps", "2", switch, *SPEED) == 0
        same_state(straight / "last.pt", split / "last.pt")


def test_compile_trains_wgan_gp_whose_penalty_needs_a_double_backward(tmp_path, monkeypatch):
    """torch.compile (AOT autograd) has no double backward: under --compile the critic that the
    gradient penalty differentiates through stays eager, and the run trains."""
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out = tmp_path / "wgan-gp"
    assert run_train(out, "wgan-gp", "--compile", "--max-steps", "1", "--n-critic", "1") == 0
    st = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert st["step"] == 1 and float(st["meter"]["gp"]) > 0


# ---------------------------------------------------------------------------------------------
# Conditional models, the VAE-GAN's adversarial weight
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["sngan", "vae-lrelu", "vaegan", "wgan-gp"])
def test_conditional_smoke_every_family(tmp_path, model):
    out = tmp_path / model
    extra = ["--n-critic", "1"] if model == "wgan-gp" else []
    argv = ["--model", model, "--conditional", "--image-size", "32", "--n-synthetic", "64", "--batch-size", "8",
            "--max-steps", "2", "--epochs", "1", "--out", str(out), "--quiet", *extra]
    assert train.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["labels"] == {"hair": ["dark", "brown", "blond", "grey", "colourful"],
                             "glasses": ["no", "yes"], "beard": ["no", "yes"]}
    nets = models.build_model(model, 32, classes=models.label_classes(cfg["labels"]))
    nets.load_state_dict(weights(out / "last.pt"))               # the conditional nets, exactly


def test_conditional_steps_see_the_labels_of_their_batch(tmp_path, monkeypatch):
    seen, real_step = [], train.critic_step

    def spy(G, D, opt_D, x, y, cfg, noise, keep=False):
        seen.append((x, y))
        return real_step(G, D, opt_D, x, y, cfg, noise, keep)

    monkeypatch.setattr(train, "critic_step", spy)
    assert run_train(tmp_path / "c", "sngan", "--conditional", "--max-steps", "2") == 0
    train_y = data.run_data(json.loads((tmp_path / "c" / "config.json").read_text()))[2][0]
    for x, y in seen:
        assert y.shape == (8, 3) and y.dtype == torch.long
    batches = data.Batches(data.run_data(json.loads((tmp_path / "c" / "config.json").read_text()))[0], 8,
                           seed=0, labels=train_y)
    for (x, y), (bx, by) in zip(seen, batches.epoch(0)):        # the rows of the data's own batches
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_conditional_flags_are_refused_where_they_mean_nothing(tmp_path, capsys):
    assert train.main(["--model", "dcgan", "--attr-file", "x.txt"]) == 2
    assert train.main(["--model", "dcgan", "--adv-weight", "10"]) == 2
    assert train.main(["--model", "sngan", "--conditional", "--attrs", "Smiling", "--attr-file", "x.txt",
                       "--image-size", "32", "--n-synthetic", "64", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--attr-file only applies with --conditional" in err and "does not use --adv-weight" in err
    assert "synthetic faces carry their own labels" in err and "Traceback" not in err


@pytest.mark.parametrize("w", [0.0, 50.0])
def test_vaegan_adv_weight_scales_only_the_adversarial_term(tmp_path, w):
    out = tmp_path / f"w{w}"
    assert run_train(out, "vaegan", "--max-steps", "3", "--adv-weight", str(w)) == 0
    row = next(csv.DictReader(open(out / "metrics.csv")))
    loss, adv, recon, kl = (float(row[k]) for k in ("loss", "adv", "recon", "kl"))
    # epoch means are linear: mean(loss) = w·mean(adv) + mean(recon) + β·mean(kl), β = 0.01 (the LFW report)
    assert loss == pytest.approx(w * adv + recon + 0.01 * kl, rel=1e-4)


def test_ema_is_the_moving_average_of_the_generator_and_changes_no_training(tmp_path, monkeypatch):
    start, after = [], []
    spy_run(monkeypatch, lambda run: start.extend(p.detach().clone() for p in run.nets["G"].parameters()))

    def record(run, name, loss, update):
        update()
        if name == "G":
            after.append([p.detach().clone() for p in run.nets["G"].parameters()])

    spy_updates(monkeypatch, record)
    assert run_train(tmp_path / "ema", "dcgan", "--max-steps", "6", "--ema", "0.9") == 0
    avg = start
    for t, w in enumerate(after):                       # the decay warms up: min(0.9, (1 + t) / (10 + t))
        d = min(0.9, (1 + t) / (10 + t))
        avg = [d * a + (1 - d) * x for a, x in zip(avg, w)]
    state = weights(tmp_path / "ema" / "last.pt")
    params = dict(models.build_model("dcgan", 32, ema=True)["G_ema"].named_parameters())
    got = [state["G_ema." + k] for k in params]       # the parameters, in G's order (buffers below)
    assert len(after) == 6 and len(got) == len(avg)
    assert all(torch.allclose(g, a, atol=1e-6) for g, a in zip(got, avg))
    assert not torch.allclose(got[0], after[-1][0])    # an average, not G itself
    for k, v in state.items():                          # BatchNorm statistics: G's own
        if k.startswith("G_ema.") and "running" in k:
            assert torch.equal(v, state["G." + k[6:]])
    # training is untouched: G and D as in a run without --ema; samples come from G_ema
    monkeypatch.undo()
    assert run_train(tmp_path / "plain", "dcgan", "--max-steps", "6") == 0
    plain = weights(tmp_path / "plain" / "last.pt")
    assert plain.keys() == {k for k in state if not k.startswith("G_ema.")}
    assert all(torch.equal(plain[k], state[k]) for k in plain)
    nets, _ = facegen.load_run(str(tmp_path / "ema"))
    assert models.generator(nets) is nets["G_ema"]


def test_ema_can_be_added_on_resume_and_starts_from_g(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "dcgan", "--max-steps", "2") == 0
    g2 = weights(out / "last.pt")
    assert run_train(out, "dcgan", "--resume", str(out), "--max-steps", "3", "--ema", "0.99") == 0
    g3 = weights(out / "last.pt")
    d = min(0.99, (1 + 2) / (10 + 2))                   # the update after step 3 (t = 2) from G at step 2
    for k, v in g3.items():
        if k.startswith("G_ema.") and "running" not in k and "num_batches" not in k:
            assert torch.allclose(v, d * g2["G." + k[6:]] + (1 - d) * g3["G." + k[6:]], atol=1e-6), k
    assert sum(k.startswith("G_ema.") for k in g3) == sum(k.startswith("G.") for k in g3)


# -----------------------------------------------------------------------------
# The loss curve's points (steps.csv) and --help

def test_loss_points_every_log_every_steps_survive_a_resume_bitwise(tmp_path):
    """steps.csv: a point every --log-every steps, each term's mean since the previous point
    (an epoch's end starts a new window); a resume keeps the points up to its checkpoint, drops
    any written after it, and goes on to the very bytes an uninterrupted run writes."""
    argv = ["--model", "ae", "--epochs", "2", "--log-every", "2", "--image-size", "32", "--n-synthetic", "64",
            "--batch-size", "16", "--quiet"]                                  # 51 train images: 3 steps/epoch
    assert train.main([*argv, "--out", str(tmp_path / "straight")]) == 0
    straight = models.read_csv(tmp_path / "straight" / "steps.csv")
    assert [int(p["step"]) for p in straight] == [2, 4, 6] and [int(p["epoch"]) for p in straight] == [1, 2, 2]
    assert set(straight[0]) == {"epoch", "step", "loss", "recon", "kl", "mse_px", "grad_norm_vae"}
    rows = models.read_csv(tmp_path / "straight" / "metrics.csv")              # epoch 1 = steps 1-3
    assert float(rows[0]["recon"]) != pytest.approx(float(straight[0]["recon"]), rel=1e-6)  # a window, not the epoch
    cut = tmp_path / "cut"
    assert train.main([*argv, "--out", str(cut), "--max-steps", "4"]) == 0
    assert [int(p["step"]) for p in models.read_csv(cut / "steps.csv")] == [2, 4]
    with open(cut / "steps.csv", "a") as f:                                  # a point written after the checkpoint
        f.write("2,5,1,1,0,1\n")
    assert train.main(["--resume", str(cut), "--max-steps", "6", "--quiet"]) == 0
    assert (cut / "steps.csv").read_bytes() == (tmp_path / "straight" / "steps.csv").read_bytes()
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(cut / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)                           # logging left training alone


def test_help_ends_with_every_models_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    table = text[text.index("per-model defaults"):].splitlines()[1:]
    assert [line.split()[0] for line in table[:len(train.SEED_DEFAULTS)]] == list(train.SEED_DEFAULTS)
    for line, model in zip(table, train.SEED_DEFAULTS):          # what a run without flags resolves to
        cfg = train.resolve(train.parse_args(["--model", model]))
        assert f"lr={cfg['lr']}" in line and f"epochs={cfg['epochs']}" in line, line
