"""train.py: every --model runs and writes a complete run folder; resume is bitwise exact;
training actually learns; refusals are clear. Small synthetic data, CPU, a few steps."""
import csv
import json
import os

import pytest
import torch

import data
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
    return torch.load(path, weights_only=True)["nets"]


@pytest.mark.parametrize("model", ALL)
def test_every_model_writes_a_complete_run_folder(tmp_path, model):
    out = tmp_path / model
    assert run_train(out, model, "--max-steps", "2", "--epochs", "1") == 0
    for f in ["config.json", "metrics.csv", "loss.png", "last.pt", "progress.gif", "samples/epoch_001.png"]:
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == model and cfg["batch_size"] == 8 and cfg["max_steps"] == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and int(rows[0]["step"]) == 2 and float(rows[0]["images_per_s"]) > 0
    if models.FAMILY[model] == "autoencoder":
        assert (out / "recon/epoch_001.png").is_file() and (out / "best.pt").is_file()
        assert "test_loss" in rows[0] and "kl" in rows[0]
    if models.FAMILY[model] != "autoencoder" and cfg["gan_loss"] == "bce":
        assert 0 < float(rows[0]["D(x)"]) < 1 and 0 < float(rows[0]["D(G(z))"]) < 1
    if models.FAMILY[model] == "wasserstein":
        assert "wasserstein" in rows[0]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) >= {"torch", "numpy", "python"}


def test_seed_defaults_are_the_seeds_hyperparameters(tmp_path):
    cfg = train.resolve(train.parse_args(["--model", "wgan-gp"]))
    assert (cfg["lr"], cfg["betas"], cfg["n_critic"], cfg["gp_weight"], cfg["batch_size"]) == (1e-4, (0.0, 0.9), 5, 10.0, 128)
    cfg = train.resolve(train.parse_args(["--model", "vae"]))
    assert (cfg["obs_std"], cfg["lr"], cfg["latent_dim"], cfg["batch_size"], cfg["epochs"]) == (0.01, 1e-4, 64, 64, 500)
    cfg = train.resolve(train.parse_args(["--model", "sngan"]))
    assert (cfg["gan_loss"], cfg["lr"], cfg["betas"], cfg["n_critic"], cfg["latent_dim"]) == ("hinge", 2e-4, (0.5, 0.999), 1, 128)
    cfg = train.resolve(train.parse_args(["--model", "wgan"]))
    assert (cfg["optimizer"], cfg["clip"], cfg["n_critic"]) == ("rmsprop", 0.01, 5)
    cfg = train.resolve(train.parse_args(["--model", "vae", "--kl-weight", "10", "--recon-scale", "0.01"]))
    assert (cfg["kl_weight"], cfg["recon_scale"]) == (10.0, 0.01)


# the conditional sngan covers both the spectral norm's u buffers and the labels' resume
@pytest.mark.parametrize("model,extra", [("vae", []), ("wgan-gp", ["--n-critic", "2"]), ("sngan", ["--conditional"])])
def test_resume_is_bitwise_exact(tmp_path, model, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, model, "--epochs", "2", *extra) == 0
    assert run_train(split, model, "--epochs", "1", *extra) == 0
    assert run_train(split, model, "--resume", str(split), "--epochs", "2") == 0
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mid_epoch_resume_is_bitwise_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, "vae", "--epochs", "1") == 0
    assert run_train(split, "vae", "--epochs", "1", "--max-steps", "5", "--checkpoint-every", "5") == 0
    assert torch.load(split / "last.pt", weights_only=True)["pos"] == 5
    assert run_train(split, "vae", "--resume", str(split), "--max-steps", "1000") == 0
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_test_loss_falls(tmp_path):
    out = tmp_path / "vae"
    assert run_train(out, "vae", "--epochs", "4", "--n-synthetic", "400", "--lr", "1e-3", "--obs-std", "0.1") == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    first, last = float(rows[0]["test_loss"]), float(rows[-1]["test_loss"])
    assert last < 0.8 * first, (first, last)


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
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err


def test_gan_step_is_n_critic_critic_updates_on_fresh_batches_then_one_generator_update(tmp_path, monkeypatch):
    calls, batches = [], []
    real_step, real_gan = train.optimizer_step, train.STEPS["wasserstein"]

    def spy_step(run, name, loss):
        frozen = {k: p.clone() for k, p in run.nets["D"].named_parameters()} if name == "G" else {}
        norm = real_step(run, name, loss)
        for k, p in run.nets["D"].named_parameters():  # the G update leaves D alone
            assert name != "G" or torch.equal(p, frozen[k]), k
        calls.append(name)
        return norm

    def spy_gan(run, xs):
        batches.append(xs)
        return real_gan(run, xs)

    monkeypatch.setattr(train, "optimizer_step", spy_step)
    monkeypatch.setitem(train.STEPS, "wasserstein", spy_gan)
    assert run_train(tmp_path / "w", "wgan-gp", "--n-critic", "3", "--max-steps", "2") == 0
    assert calls == ["D", "D", "D", "G"] * 2
    assert all(len(xs) == 3 and not torch.equal(xs[0][0], xs[1][0]) for xs in batches)   # (x, y) pairs


def test_vaegan_d_sees_real_reconstructions_and_decoded_noise(tmp_path, monkeypatch):
    shapes, real = [], train.losses.d_loss
    monkeypatch.setattr(train.losses, "d_loss", lambda r, f: shapes.append((r.shape[0], f.shape[0])) or real(r, f))
    assert run_train(tmp_path / "vg", "vaegan", "--max-steps", "2") == 0
    assert shapes == [(8, 16)] * 2  # B real images against B reconstructions + B decoded noise


def test_flags_of_another_family_are_refused(capsys):
    assert train.main(["--model", "vaegan", "--n-critic", "5"]) == 2
    assert train.main(["--model", "dcgan", "--kl-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert "--model vaegan does not use --n-critic" in err and "--model dcgan does not use --kl-weight" in err


def test_a_gan_needs_n_critic_batches(tmp_path, capsys):
    # 128 training images = 4 batches of 32: fewer than one WGAN step (5 critic batches)
    assert train.main(["--model", "wgan", "--image-size", "32", "--n-synthetic", "160", "--batch-size", "32",
                       "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


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

    def spy(run, x, y):
        seen.append((x, y))
        return real_step(run, x, y)

    monkeypatch.setattr(train, "critic_step", spy)
    assert run_train(tmp_path / "c", "sngan", "--conditional", "--max-steps", "2") == 0
    train_y = data.run_labels(json.loads((tmp_path / "c" / "config.json").read_text()))[0]
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
    # epoch means are linear: mean(loss) = w·mean(adv) + mean(recon) + β·mean(kl), β = 0.01 (seed 003)
    assert loss == pytest.approx(w * adv + recon + 0.01 * kl, rel=1e-4)
