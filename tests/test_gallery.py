"""The results gallery: labelled pictures, loss points every --log-every steps (kept exactly across
a resume, never duplicated), and `facegen.py gallery` on a tiny run writing its files and its
Markdown. One tiny vae-lrelu run (32x32, 64 synthetic faces, CPU) serves the module."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import facegen
import train

COMMON = ["--image-size", "32", "--n-synthetic", "64", "--batch-size", "16", "--quiet"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "vae-lrelu"
    assert train.main(["--model", "vae-lrelu", "--max-steps", "2", "--log-every", "1", "--out", str(out), *COMMON]) == 0
    return out


# -----------------------------------------------------------------------------
# Labelled grids

def test_labelled_grid_keeps_the_faces_and_draws_its_labels():
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    grid = data.make_grid(x, nrow=3)                                  # 2 rows of 3: 20 x 32
    img = np.asarray(data.labelled_grid(grid, (8, 8), 2, row_labels=["input", "reconstruction"],
                                        col_labels=["t=0", "", "t=1"], title="a title"))
    h, w = grid.shape[:2]
    assert img.shape[0] > h and img.shape[1] > w                      # bands above and to the left
    assert np.array_equal(img[-h:, -w:], grid)                        # faces unchanged, bottom right
    left, top = img[-h:, :-w], img[:-h]
    assert (left < 128).any() and (top < 128).any()                   # dark text in both bands
    assert (left > 250).mean() > 0.5                                  # on a white band
    rows_only = np.asarray(data.labelled_grid(grid, (8, 8), 2, row_labels=["input", "reconstruction"]))
    assert rows_only.shape[0] == h and rows_only.shape[1] > w                # no band above
    assert np.array_equal(rows_only[:, -w:], grid) and (rows_only[:, :-w] < 128).any()
    big = np.asarray(data.labelled_grid(grid, (8, 8), 2, col_labels=["a", "b", "c"], scale=2))
    assert big.shape[1] == 2 * w and np.array_equal(big[-2 * h::2, ::2], grid)  # nearest-neighbour x2


def test_save_grid_without_labels_is_the_bare_grid(tmp_path):
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    data.save_grid(x, tmp_path / "g.png", nrow=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), data.make_grid(x, nrow=2))


def test_labelled_commands_mark_rows_and_ends(run, tmp_path):
    def band(path, n, nrow):                                          # what lies outside the faces
        a = np.asarray(Image.open(path).convert("RGB"))
        gw, gh = nrow * 34 + 2, -(-n // nrow) * 34 + 2
        return a, a[-gh:, :-gw], a[:-gh]
    assert facegen.main(["reconstruct", str(run), "--n", "4", "--nrow", "4", "--out", str(tmp_path / "r.png")]) == 0
    a, left, top = band(tmp_path / "r.png", 8, 4)
    assert a.shape[:2] == (2 * 34 + 2, left.shape[1] + 4 * 34 + 2) and (left < 128).any() and top.size == 0
    assert facegen.main(["std-sweep", str(run), "--n", "3", "--out", str(tmp_path / "s.png")]) == 0
    a, left, _ = band(tmp_path / "s.png", 24, 3)
    rows = [left[r * 34 + 2:r * 34 + 34] for r in range(8)]           # one label per row: std 0.25 ... 2
    assert all((r < 128).any() for r in rows) and not np.array_equal(rows[0], rows[1])
    assert facegen.main(["interpolate", str(run), "--rows", "2", "--steps", "4", "--out", str(tmp_path / "i.png")]) == 0
    a, _, top = band(tmp_path / "i.png", 12, 6)
    assert (top < 128).any()
    assert facegen.main(["interpolate", str(run), "--rows", "1", "--steps", "3", "--noise", "--out", str(tmp_path / "n.png")]) == 0
    a, _, top = band(tmp_path / "n.png", 3, 3)
    assert (top < 128).any()


def test_pca_traversal_labels_rows_by_variance_and_columns_by_sd(run):
    nets, cfg = facegen.load_run(str(run))
    train_x, _ = facegen.run_images(cfg)
    basis = facegen.fit_pca(nets, train_x)
    x, rows, cols = facegen.pca_traversal(nets, basis, 3, 5, 2.0)
    share = basis[2] ** 2 / (basis[2] ** 2).sum()
    assert x.shape == (15, 3, 32, 32)
    assert rows == [f"PC{j + 1}\n{100 * share[j]:.1f}% var" for j in range(3)]
    assert cols == ["-2\nsd", "-1\nsd", "mean", "+1\nsd", "+2\nsd"]
    torch.testing.assert_close(x[2], x[7])                            # centre column: the mean code


# -----------------------------------------------------------------------------
# The loss curve: points every --log-every steps

def test_loss_points_every_log_every_steps_survive_resume(tmp_path):
    argv = ["--model", "ae", "--epochs", "2", "--log-every", "2", *COMMON]   # 51 train images: 3 steps/epoch
    assert train.main([*argv, "--out", str(tmp_path / "straight")]) == 0
    straight = read_csv(tmp_path / "straight" / "steps.csv")
    assert [int(p["step"]) for p in straight] == [2, 4, 6]
    assert [int(p["epoch"]) for p in straight] == [1, 2, 2]
    # step 2's point: the mean of steps 1-2; step 4's: step 4 alone (step 3 closed epoch 1)
    assert set(straight[0]) == {"epoch", "step", "loss", "recon", "kl"}
    cut = tmp_path / "cut"
    assert train.main([*argv, "--out", str(cut), "--max-steps", "4"]) == 0
    assert [int(p["step"]) for p in read_csv(cut / "steps.csv")] == [2, 4]
    with open(cut / "steps.csv", "a") as f:                            # a point written after the checkpoint
        f.write("2,5,1,1,0\n")
    assert train.main(["--resume", str(cut), "--max-steps", "6", "--quiet"]) == 0
    resumed = read_csv(cut / "steps.csv")
    assert resumed == straight                                        # no duplicates, same values
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["nets"]
    b = torch.load(cut / "last.pt", weights_only=True)["nets"]
    assert all(torch.equal(a[k], b[k]) for k in a)                    # logging left training bitwise alone


def test_loss_plot_labels_units_and_uses_points(tmp_path):
    rows = [{"epoch": e, "step": 10 * e, "recon": 100.0 / e, "test_recon": 90.0 / e, "seconds": 1} for e in (1, 2, 3)]
    points = [{"epoch": 1 + (s - 1) // 10, "step": s, "recon": 200.0 / s} for s in range(2, 31, 2)]
    data.plot_losses(rows, tmp_path / "a.png", points, {"recon": "squared error/image"})
    data.plot_losses(rows, tmp_path / "b.png", [], {"recon": "squared error/image"})
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png").convert("L")) for k in "ab")
    assert a.shape == b.shape and not np.array_equal(a, b)            # the points change the curve
    cfg = train.resolve(train.parse_args(["--model", "vae"]))
    units = train.loss_units(cfg)
    assert units["recon"] == "Gaussian NLL (sigma 0.01), nats/image" and units["loss"] == "-ELBO, nats/image"
    assert "squared error" in train.loss_units(train.resolve(train.parse_args(["--model", "ae"])))["recon"]
    assert all(t.isascii() for t in units.values())                   # pillow's default font


def test_loss_plot_draws_epoch_means_before_the_first_logged_point(tmp_path):
    """A run resumed from one that logged no steps.csv: its early epochs still show (as means)."""
    points = [{"epoch": 4 + (s - 31) // 10, "step": s, "recon": 1.0 + 1 / s} for s in range(32, 61, 2)]
    for scale in (1, 3):
        rows = [{"epoch": e, "step": 10 * e, "recon": scale * 5.0 / e if e <= 3 else 1.0 + 1 / e} for e in range(1, 7)]
        data.plot_losses(rows, tmp_path / f"{scale}.png", points, {"recon": "squared error/image"})
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png").convert("L")) for k in "13")
    assert not np.array_equal(a, b)                                   # epochs 1-3 are drawn


def test_nice_ticks_are_round():
    assert data.nice_ticks(0, 1240, integer=True) == [0, 200, 400, 600, 800, 1000, 1200]
    assert data.nice_ticks(0, 2, integer=True) == [0, 1, 2]
    assert data.nice_ticks(0.13, 0.52) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert data.nice_ticks(3e3, 2e5, log=True) == [5e3, 1e4, 2e4, 5e4, 1e5, 2e5]
    assert data.nice_ticks(3e3, 2e6, log=True) == [1e4, 1e5, 1e6]    # over 3 decades: powers of ten
    assert [data.tick_label(v) for v in (1.5e6, 0.25, 2000, 0, 10000, 12000.0, -20000)] == [
        "1.5e6", "0.25", "2000", "0", "10000", "12000", "-20000"]


# -----------------------------------------------------------------------------
# The gallery command

def test_gallery_writes_pictures_figures_and_markdown(run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n<!-- gallery -->\nold\n<!-- /gallery -->\n\n## Next\n")
    out = tmp_path / "docs"
    argv = ["gallery", str(run), "--out", str(out), "--n", "16", "--readme", str(readme), "--machine", "test box"]
    assert facegen.main(argv) == 0
    for kind in ("samples", "recon", "std_sweep", "pca", "loss"):
        assert Image.open(out / f"vae-lrelu_{kind}.png").format == "PNG"
    assert sum(p.stat().st_size for p in out.glob("*.png")) < 400_000
    facts = json.loads((out / "vae-lrelu.json").read_text())
    assert facts["steps"] == 2 and facts["evaluate"]["n"] == 13 and "likelihood" in facts["evaluate"]
    md = (out / "results.md").read_text()
    assert "(vae-lrelu_samples.png)" in md and "test box" in md and facts["command"] in md
    lo, hi = min(facts["evaluate"]["swd_x1e3"]["ratio_each"]), max(facts["evaluate"]["swd_x1e3"]["ratio_each"])
    assert f"x ({lo:.2f}-{hi:.2f}) |" in md and "mean over 4 draws" in md   # the per-draw spread is shown
    text = readme.read_text()
    assert "old" not in text and "(docs/vae-lrelu_pca.png)" in text and text.endswith("<!-- /gallery -->\n\n## Next\n")
    # the command in the Markdown rebuilds the run's config
    cfg = json.loads((run / "config.json").read_text())
    again = train.resolve(train.parse_args(facts["command"].split()[2:]))
    same = set(cfg) - {"quiet", "data_fingerprint", "channels_last", "fused_adam"}  # speed: chosen per device
    assert {k: json.dumps(again[k]) for k in same} == {k: json.dumps(cfg[k]) for k in same}
    # a second gallery of the same checkpoint reuses its evaluation
    before = (out / "vae-lrelu.json").read_text()
    assert facegen.main(argv) == 0
    assert json.loads((out / "vae-lrelu.json").read_text())["evaluate"] == json.loads(before)["evaluate"]
    # a run moved after training is shown with the folder it now sits in
    moved = tmp_path / "moved" / "vae-lrelu"
    shutil.copytree(run, moved)
    assert facegen.main(["gallery", str(moved), "--out", str(tmp_path / "d2"), "--n", "16"]) == 0
    command = json.loads((tmp_path / "d2" / "vae-lrelu.json").read_text())["command"]
    assert f"--out {moved}" in command and str(run) not in command


def test_goal_reads_the_bits_per_dim_trend():
    """plateaued: the last 3 epochs took under 5 % of the whole fall; a run whose test bits/dim
    rose overall says so, not an infinite share."""
    cfg, report = {"family": "autoencoder"}, {"likelihood": {}}
    assert "plateaued" in facegen.goal(cfg, report, [2.0, 1.5, 1.2, 1.01, 1.005, 1.002, 1.0])
    assert "still falling" in facegen.goal(cfg, report, [2.0, 1.9, 1.6, 1.4])
    said = facegen.goal(cfg, report, [1.0, 0.9, 1.02, 1.03, 1.05])
    assert "rising" in said and "inf" not in said and "+0.05 over the whole run" in said, said


def test_wall_time_counts_an_interrupted_epoch_whole():
    cfg = {"batch_size": 10, "family": "adversarial", "n_critic": 2}      # 20 images a step
    rows = [{"step": "5", "images_per_s": "50", "seconds": "2"},         # 100 images in 2 s
            {"step": "10", "images_per_s": "25", "seconds": "1.6"},      # resumed: 40 of its 100 images timed
            {"step": "12", "images_per_s": "40", "seconds": "1"}]        # a --max-steps tail: 40 images
    secs, at_best = facegen.epoch_seconds(rows, cfg)
    assert secs == pytest.approx([2.0, 4.0, 1.0]) and at_best == pytest.approx(240 / 50)
