"""Careless and hostile hands on train.py: run folders are never overwritten or mixed, bad
arguments and tampered files give one line and exit 2, held-out numbers stay held out."""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "32", "--n-synthetic", "64", "--batch-size", "8", "--quiet", "--device", "cpu"]


def tiny(out, *extra, model="dcgan"):
    return train.main(["--model", model, *TINY, "--out", str(out), "--max-steps", "1", *extra])


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:") or "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert tiny(out) == 0
    return out


# --- run folders -------------------------------------------------------------------------

def test_resuming_a_copy_writes_into_the_copy(run_a, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run_a, copy)
    before = digest(run_a / "last.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative --resume from another directory
    assert train.main(["--resume", os.path.relpath(copy), "--max-steps", "2", "--quiet"]) == 0
    assert digest(run_a / "last.pt") == before  # the original is untouched
    assert torch.load(copy / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    assert os.listdir(elsewhere) == []  # nothing created where we stood


def test_resume_into_another_run_is_refused(run_a, tmp_path, capsys):
    other = tmp_path / "other"
    assert tiny(other, model="vae-in") == 0
    before = {f: digest(other / f) for f in ("last.pt", "config.json", "metrics.csv")}
    assert train.main(["--resume", str(run_a), "--out", str(other), "--max-steps", "2"]) == 2
    assert "already holds a run" in one_error(capsys)
    assert {f: digest(other / f) for f in before} == before


def test_resume_into_a_new_folder_continues_there(run_a, tmp_path):
    before = digest(run_a / "last.pt")
    assert train.main(["--resume", str(run_a), "--out", str(tmp_path / "b"), "--max-steps", "2", "--quiet"]) == 0
    assert digest(run_a / "last.pt") == before
    assert torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    rows = models.read_csv(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows] == ["2"]  # the resumed epoch's row, completed once


def test_a_run_that_died_before_its_first_checkpoint_is_no_dead_end(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a run that died before its first checkpoint
    assert train.main(["--resume", str(out)]) == 2
    assert "stopped before its first checkpoint; start it again" in one_error(capsys)
    assert tiny(out) == 0  # the same command again starts it over, and says so
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert (out / "last.pt").is_file() and json.loads((out / "config.json").read_text())["model"] == "dcgan"
    assert tiny(out) == 2 and "already holds a run (last.pt)" in one_error(capsys)


def hold_lock(folder):
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_writer_is_refused_and_the_first_keeps_its_temp_files(run_a, tmp_path, capsys):
    out = tmp_path / "busy"
    shutil.copytree(run_a, out)
    tmp = out / ".tmp-inflight.pt"
    tmp.write_bytes(b"a checkpoint being written by the running process")
    fd = hold_lock(out)  # as a running train.py holds it
    try:
        assert train.main(["--resume", str(out), "--max-steps", "3"]) == 2
        assert "in use" in one_error(capsys)
        assert tiny(tmp_path / "busy") == 2  # a fresh run into it too
        assert "in use" in one_error(capsys)
        assert tmp.exists()  # the running process's temp checkpoint is not swept
    finally:
        os.close(fd)
    assert train.main(["--resume", str(out), "--max-steps", "2", "--quiet"]) == 0
    assert not tmp.exists()  # swept once nobody holds the folder


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "k"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train; train.claim_folder(sys.argv[1], fresh=False); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(data.UsageError, match="in use"):
            train.claim_folder(str(out), fresh=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    os.close(train.claim_folder(str(out), fresh=True))  # the kernel dropped the dead process's lock


def test_a_stray_file_in_samples_does_not_end_a_run(run_a, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(run_a, out)
    (out / "samples" / "notes.txt").write_text("mine")
    (out / "samples" / "epoch_x.png").write_bytes(b"not a png")
    assert train.main(["--resume", str(out), "--max-steps", "2", "--quiet"]) == 0
    assert (out / "progress.gif").exists()


# --- bad arguments: one line, exit 2, nothing written -------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--model", "dcgan", "--betas", "2", "0.9"], "--betas"),
    (["--model", "dcgan", "--betas", "0.5", "nan"], "--betas"),
    (["--model", "dcgan", "--seed", str(2 ** 70)], "--seed"),
    (["--model", "dcgan", "--seed", "-1"], "--seed"),
    (["--model", "wgan", "--betas", "0.5", "0.9"], "--betas only applies with --optimizer adam"),
    (["--model", "wgan", "--fused-adam"], "--fused-adam only applies with --optimizer adam"),
    (["--model", "vae-lrelu", "--obs-std", "0.1"], "--obs-std only applies with --recon gnll"),
    (["--model", "ae", "--kl-weight", "1"], "--kl-weight only applies"),
    (["--model", "sngan", "--balance-labels"], "--balance-labels only applies with --conditional"),
    (["--model", "vae", "--image-size", "32", "--n-synthetic", "20", "--batch-size", "1"], "BatchNorm"),
    (["--model", "vae-in", "--image-size", "32x24", "--n-synthetic", "1", "--batch-size", "1"], "needs held-out images"),
])
def test_bad_arguments_one_line_exit_2_and_no_run_left(argv, says, tmp_path, capsys):
    """Refused before the run folder is claimed: no folder; refused once the data is seen (the
    folder is claimed first): at most an empty run folder, which a fresh run may take."""
    out = tmp_path / "never"
    try:
        rc = train.main(argv + ["--out", str(out), "--max-steps", "1", "--quiet"])
    except SystemExit as e:  # argparse: exit 2 with its usage line and one "error:" line
        rc = e.code
    assert rc == 2
    assert says in one_error(capsys)
    if out.exists():
        assert says in ("BatchNorm", "needs held-out images")
        assert sorted(p.name for p in out.rglob("*")) == [".lock"]
        os.close(train.claim_folder(str(out), fresh=True))  # not "already holds a run"


# --- files that are not what they claim ---------------------------------------------------

def test_non_checkpoint_files_say_what_they_are(tmp_path, capsys):
    png = tmp_path / "face.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x07" + os.urandom(256))
    assert train.main(["--resume", str(png)]) == 2
    assert "is not a PyTorch checkpoint: it is a PNG image" in one_error(capsys)
    assert train.main(["--resume", str(noise)]) == 2
    line = one_error(capsys)
    assert "is not a PyTorch checkpoint" in line and "pickled code" not in line


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(run_a, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run_a, old)
    state = torch.load(old / "last.pt", map_location="cpu", weights_only=True)
    assert state.pop("format") == models.FORMAT
    torch.save(state, old / "last.pt")
    before = digest(old / "last.pt")
    assert train.main(["--resume", str(old), "--max-steps", "2", "--quiet"]) == 2
    assert "was written by an older version of facegen; train it again with this one" in one_error(capsys)
    assert digest(old / "last.pt") == before


def test_tampered_checkpoints_and_metrics_give_one_line(run_a, tmp_path, capsys):
    state = torch.load(run_a / "last.pt", map_location="cpu", weights_only=True)
    shapes = tmp_path / "shapes"
    shutil.copytree(run_a, shapes)
    bad = dict(state, nets={k: v[..., :1] if v.dim() else v for k, v in state["nets"].items()})
    torch.save(bad, shapes / "last.pt")
    missing = tmp_path / "missing"
    shutil.copytree(run_a, missing)
    torch.save({k: v for k, v in state.items() if k != "optimizers"}, missing / "last.pt")
    for folder, says in ((shapes, "does not fit"), (missing, "does not fit")):
        assert train.main(["--resume", str(folder), "--max-steps", "2", "--quiet"]) == 2, folder
        assert says in one_error(capsys)


@pytest.mark.parametrize("metrics, steps", [(None, b"epoch,step,loss_d\n1,1,0.5\n1,"),      # cut short by a full disk
                                            (b"epoch,step\n\xff\xfe,oops\n", None),       # not even text
                                            (b"epoch,step,loss_d\n1,1,0.5\n1,", b"")])
def test_damaged_logs_are_skipped_never_a_reason_to_stop(run_a, tmp_path, capsys, metrics, steps):
    out = tmp_path / "logs"
    shutil.copytree(run_a, out)
    for name, text in (("metrics.csv", metrics), ("steps.csv", steps)):
        if text is not None:
            (out / name).write_bytes(text)
    with pytest.warns(UserWarning, match="damaged line|could not read"):
        assert train.main(["--resume", str(out), "--max-steps", "2", "--quiet"]) == 0
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    assert (out / "loss.png").is_file() and models.read_csv(out / "metrics.csv")[-1]["step"] == "2"


# --- held-out numbers stay held out -------------------------------------------------------

def test_the_run_records_its_data_and_warns_when_it_changed(tmp_path, capsys):
    import data
    folder = tmp_path / "faces"
    folder.mkdir()
    faces = data.synthetic_faces(40, (32, 32), seed=5)
    from PIL import Image
    for i, im in enumerate(faces):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert train.main(["--model", "dcgan", "--data", str(folder), *TINY, "--out", str(out), "--max-steps", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data_fingerprint"] == data.load_images(str(folder), (32, 32), cfg["n_synthetic"], cfg["seed"], full=True)[3]
    data.run_data(cfg)
    assert "changed since" not in capsys.readouterr().err
    shutil.copy(folder / "0.png", folder / "added.png")
    data.run_data(cfg)  # what facegen.py evaluate and a --resume read
    assert "changed since this run trained on it" in capsys.readouterr().err


# --- facegen.py: --out and frames ---------------------------------------------------------

def test_facegen_out_that_cannot_be_the_file_is_one_line_exit_2(run_a, tmp_path, capsys):
    import facegen
    (tmp_path / "afile").write_text("x")
    for out, says in ((tmp_path, "is a folder"), (tmp_path / "afile" / "x.png", "is not a folder"),
                      (tmp_path / "x.xyz", "writes a .png"), (tmp_path / "no" / "x.png", "is not a folder")):
        assert facegen.main(["sample", str(run_a), "--out", str(out)]) == 2, out
        assert says in one_error(capsys)
    assert facegen.main(["sample", str(run_a), "--out", str(tmp_path / "ok.png")]) == 0


@pytest.mark.parametrize("value", [str(2 ** 70), "-1"])
def test_facegen_seed_out_of_range_is_a_usage_error(run_a, value, capsys):
    import facegen
    with pytest.raises(SystemExit) as e:
        facegen.main(["evaluate", str(run_a), "--seed", value])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_facegen_gif_orders_by_epoch_and_skips_bad_frames(run_a, tmp_path, capsys):
    import facegen
    from PIL import Image
    run = tmp_path / "g"
    shutil.copytree(run_a, run)
    frame = run / "samples" / "epoch_001.png"
    for i, e in enumerate((2, 100, 101, 1000)):  # distinct frames: GIF merges identical neighbours
        with Image.open(frame) as im:
            im.convert("RGB").point(lambda v: (v + 40 * (i + 1)) % 256).save(run / "samples" / f"epoch_{e:03d}.png")
    (run / "samples" / "epoch_050.png").write_bytes(b"corrupt")
    (run / "samples" / "odd\nname.png").write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="epoch_050.png"):
        assert facegen.main(["gif", str(run)]) == 0
    said = capsys.readouterr()
    assert "Traceback" not in said.err and "(5 frames)" in said.out  # the frames kept, not found
    with Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 5  # 1, 2, 100, 101, 1000; the corrupt and oddly named ones skipped
