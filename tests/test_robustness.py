"""Never lose a run: atomic checkpoints, exact restart after SIGKILL, frequent
checkpoints, NaN/Inf stops, weights-only loading, clear refusals, bad data.

Every fault here is injected for real: a save that fails half-written, a real SIGKILL to a real
training process, NaN in a loss and in a gradient, a checkpoint whose pickle would run code, bad
flags, unwritable folders and broken image files. Tiny data (32x32, 50 synthetic faces: 40 train,
batch 8, 5 steps an epoch), CPU."""
import errno
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import facegen
import losses
import models
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--n-synthetic", "50", "--batch-size", "8", "--quiet"]  # 5 steps an epoch


class Killed(BaseException):
    """Stands for SIGKILL inside this process: nothing in train.py catches it."""


@pytest.fixture(scope="module", autouse=True)
def _tiny_and_single_threaded():
    """Draw the tiny synthetic set once (parallel subprocesses then only read the session cache);
    one torch thread in here, as in the subprocesses: tiny nets gain nothing from more, and two
    threads on a busy 2-core machine thrash."""
    data.load_images(None, (32, 32), n_synthetic=50, seed=0, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(out, *extra):
    return train.main([*TINY, "--out", str(out), *map(str, extra)])


def nets(path):
    return torch.load(path, map_location="cpu", weights_only=True)["nets"]


def assert_same_weights(a, b):
    a, b = nets(a), nets(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-")]


def cli(*args):
    """A real train.py process: one thread (fast and deterministic), the session's image cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def the_error(err):
    """The one 'error: ' line of a process's stderr, wherever it is: a warning printed at import
    (a torch or numpy build's) may come first without making the refusal any less clear."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -----------------------------------------------------------------------------
# 1. Atomic checkpoints (models.save_checkpoint's own faults: tests/test_models.py)

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_written(obj, f, *args, **kwargs):  # torch.save that dies with the disk full, mid-file
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    f.flush()
    _enospc()


def test_a_failed_save_during_training_exits_cleanly(tmp_path, monkeypatch, capsys):
    """The disk fills up at the second checkpoint: exit 1, one line, the first checkpoint intact."""
    out, real, calls = tmp_path / "run", torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 2:
            _half_written(obj, f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr("torch.save", save)
    assert run_train(out, "--model", "vae", "--epochs", "1", "--checkpoint-every", "2") == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert calls == [2, 4] and "Traceback" not in err
    assert err.startswith(f"error: could not write {str(out / 'last.pt')!r} (No space left on device)")
    assert f"--resume {out}" in err
    assert models.load_checkpoint(str(out))["step"] == 2 and temp_files(out) == []


# -----------------------------------------------------------------------------
# 2-3. Exact restart after a kill: real SIGKILL to a real process (and in-process kills at the
# moments a random kill rarely hits)

# A real kill at a random moment, on the model with the most state to restore (two nets and
# optimizers, n_critic batches a step, the penalty's eps) and a checkpoint every step, so that
# kills land in the middle of checkpoint writes too. The Wuga VAE's kills at chosen moments
# (mid-epoch, epoch end, between last.pt and best.pt) are the in-process tests below.
KILL_RUNS = {
    "wgan-gp": ["--model", "wgan-gp", "--epochs", "3", "--n-critic", "2", "--checkpoint-every", "1"],  # 6 steps
}


def new_checkpoint(path, p, timeout=60):
    """Wait until process p writes `path` anew (a kill before any checkpoint has nothing to resume)."""
    before = path.stat().st_mtime_ns if path.exists() else None
    deadline = time.time() + timeout
    while (path.stat().st_mtime_ns if path.exists() else None) == before and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("model", sorted(KILL_RUNS))
def test_sigkill_at_a_random_moment_then_resume_is_bitwise_exact(tmp_path, model):
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    print(f"kill-moment seed {seed}")  # shown on failure: rerun with random.Random(seed)
    args = [*TINY, *KILL_RUNS[model]]
    straight, victim = tmp_path / "straight", tmp_path / "killed"
    reference = cli(*args, "--out", straight)  # runs alongside the victim (2 cores)
    p, kills, delays, at = cli(*args, "--out", victim), 0, [], []
    try:
        # 1st kill right after the first checkpoint (so even a fast machine cannot finish first),
        # 2nd at a random moment after the resumed run's first save
        for limit in (0.05, 2.0):
            new_checkpoint(victim / "last.pt", p)
            delays.append(round(rng.uniform(0, limit), 3))
            time.sleep(delays[-1])
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            at.append(models.load_checkpoint(str(victim))["step"])  # whatever the moment: a loadable last.pt
            p = cli("--resume", victim)
        rc, _, err = finish(p)
        assert rc == 0, err
        rc, _, err = finish(reference)
        assert rc == 0, err
    finally:
        for q in (p, reference):
            if q.poll() is None:
                q.kill()
                q.wait()
    print(f"killed {kills}x after {delays} s; last.pt then at steps {at}")
    assert kills >= 1, (delays, "the run finished before the first kill")
    assert_same_weights(straight / "last.pt", victim / "last.pt")
    assert temp_files(victim) == []


@pytest.fixture(scope="module")
def straight_vae(tmp_path_factory):
    """The uninterrupted in-process reference for the in-process kills below."""
    out = tmp_path_factory.mktemp("straight") / "vae"
    assert run_train(out, "--model", "vae", "--epochs", "2") == 0
    return out


def kill_at(monkeypatch, when):
    """Raise Killed at the first save_checkpoint(state, path) for which when(state, name) holds,
    and record every save as (name, step, pos, epoch)."""
    real, saves = models.save_checkpoint, []

    def save(state, path):
        name = os.path.basename(path)
        if when(state, name):
            raise Killed
        saves.append((name, state["step"], state["pos"], state["epoch"]))
        real(state, path)

    monkeypatch.setattr(models, "save_checkpoint", save)
    return saves


def test_checkpoint_every_n_steps_and_a_kill_before_the_epoch_end(tmp_path, monkeypatch, straight_vae):
    """--checkpoint-every 5 saves at step 5 = the epoch's last batch (pos == len(batches)); a
    kill before the end-of-epoch checkpoint resumes into an exhausted epoch: it must only close
    the epoch (metrics row, pictures, checkpoint) and go on bitwise exact."""
    out = tmp_path / "vae"
    saves = kill_at(monkeypatch, lambda st, name: st["epoch"] == 1)  # the end-of-epoch-1 save
    with pytest.raises(Killed):
        run_train(out, "--model", "vae", "--epochs", "2", "--checkpoint-every", "5")
    monkeypatch.undo()
    assert saves == [("last.pt", 5, 5, 0)]
    assert run_train(out, "--resume", out) == 0
    assert_same_weights(straight_vae / "last.pt", out / "last.pt")
    assert_same_weights(straight_vae / "best.pt", out / "best.pt")
    st = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (st["step"], st["epoch"], st["pos"]) == (10, 2, 0)


def test_kill_right_after_the_first_mid_epoch_checkpoint(tmp_path, monkeypatch, straight_vae):
    out = tmp_path / "vae"
    kill_at(monkeypatch, lambda st, name: st["step"] == 4)  # dies as it would save step 4
    with pytest.raises(Killed):
        run_train(out, "--model", "vae", "--epochs", "2", "--checkpoint-every", "2")
    monkeypatch.undo()
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    (out / ".tmp-k1ll3d.pt").write_bytes(b"PK\x03\x04 half a checkpoint")  # what a SIGKILL mid-save leaves
    assert run_train(out, "--resume", out) == 0
    assert_same_weights(straight_vae / "last.pt", out / "last.pt")
    assert temp_files(out) == []  # swept when the run started again


def test_kill_between_the_metrics_row_and_the_checkpoint_writes_no_duplicate_row(tmp_path, monkeypatch):
    out = tmp_path / "vae"
    kill_at(monkeypatch, lambda st, name: st["epoch"] == 1)
    with pytest.raises(Killed):
        run_train(out, "--model", "vae", "--epochs", "2", "--checkpoint-every", "5")
    monkeypatch.undo()
    assert run_train(out, "--resume", out) == 0
    rows = models.read_csv(str(out / "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_kill_between_last_and_best_keeps_best_exact(tmp_path, monkeypatch, straight_vae):
    """Killed as it writes epoch 1's best.pt (epoch 1 always improves on no loss at all, so this
    does not depend on how training goes): best.pt and last.pt both still hold step 3's state
    or none; the resume redoes the epoch's end and both end exact."""
    out = tmp_path / "vae"
    kill_at(monkeypatch, lambda st, name: name == "best.pt" and st["epoch"] == 1)
    with pytest.raises(Killed):  # mid-epoch saves at steps 3, 6, 9: none at an epoch's end
        run_train(out, "--model", "vae", "--epochs", "2", "--checkpoint-every", "3")
    monkeypatch.undo()
    assert not (out / "best.pt").exists() and torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 3
    assert run_train(out, "--resume", out) == 0
    assert_same_weights(straight_vae / "best.pt", out / "best.pt")
    assert_same_weights(straight_vae / "last.pt", out / "last.pt")


def test_kill_after_the_last_steps_checkpoint_still_closes_the_run(tmp_path, monkeypatch, straight_vae):
    """--checkpoint-every 5 saves step 10 = the last step of the run; killed before the final
    end-of-epoch save, the resume must still write epoch 2's row, pictures, best.pt and last.pt."""
    out = tmp_path / "vae"
    saves = kill_at(monkeypatch, lambda st, name: st["epoch"] == 2)
    with pytest.raises(Killed):
        run_train(out, "--model", "vae", "--epochs", "2", "--checkpoint-every", "5")
    monkeypatch.undo()
    assert saves[-1] == ("last.pt", 10, 5, 1)
    assert run_train(out, "--resume", out) == 0
    st = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (st["step"], st["epoch"], st["pos"]) == (10, 2, 0)
    assert [r["epoch"] for r in models.read_csv(str(out / "metrics.csv"))] == ["1", "2"]
    assert (out / "samples" / "epoch_002.png").is_file()
    assert_same_weights(straight_vae / "best.pt", out / "best.pt")


def test_ctrl_c_inside_a_step_saves_a_state_that_resumes_exactly(tmp_path, monkeypatch):
    """A real SIGINT delivered while the G loss of step 2 is computed (its critic updates done)."""
    args = ["--model", "wgan-gp", "--n-critic", "2", "--epochs", "2"]  # 2 steps an epoch
    assert run_train(tmp_path / "straight", *args) == 0
    real, calls = losses.critic_gen_loss, []

    def g_loss(d_fake):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(d_fake)

    monkeypatch.setitem(losses.GAN_LOSSES, "wasserstein", (losses.critic_loss, g_loss))
    out = tmp_path / "interrupted"
    assert run_train(out, *args) == 130
    monkeypatch.undo()
    assert run_train(out, "--resume", out) == 0
    assert_same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def signals_inside_step(monkeypatch, step, n_signals, sig=signal.SIGTERM):
    """Deliver n_signals real `sig` to this process while the loss of training step `step` is
    computed (ae: its loss is losses.mse_recon; test losses run under no_grad and are skipped)."""
    real, calls = losses.mse_recon, []

    def mse(x, x_hat):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == step:
                for _ in range(n_signals):
                    os.kill(os.getpid(), sig)
        return real(x, x_hat)

    monkeypatch.setattr(losses, "mse_recon", mse)


AE = ["--model", "ae", "--no-flip", "--jitter", "0", "--epochs", "1"]  # 5 steps an epoch


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """README: SIGTERM finishes the step in flight and saves last.pt; --resume continues exactly."""
    assert run_train(tmp_path / "straight", *AE, "--max-steps", "4") == 0
    out = tmp_path / "term"
    signals_inside_step(monkeypatch, 2, 1)
    assert run_train(out, *AE, "--max-steps", "4") == 130
    monkeypatch.undo()
    assert "interrupted at step 2" in capsys.readouterr().out
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 2   # the step in flight completed
    assert run_train(out, "--resume", out) == 0
    assert_same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    """README: "a second one stops at once": the step in flight is abandoned, nothing is saved
    (here no checkpoint existed yet: the first end-of-epoch save would come at step 5)."""
    out = tmp_path / "twice"
    signals_inside_step(monkeypatch, 2, 2)
    assert run_train(out, *AE) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "interrupted; nothing was saved" in err and "Traceback" not in err
    assert not (out / "last.pt").exists() and temp_files(out) == []


# -----------------------------------------------------------------------------
# 4. NaN/Inf: stop with the exact step and term, never save it; --grad-clip

class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def nan_kl_at(monkeypatch, step, how):
    real, calls = losses.kl_divergence, []

    def kl(mu, logvar):
        value = real(mu, logvar)
        if torch.is_grad_enabled():  # training steps only (test losses run under no_grad)
            calls.append(1)
            if len(calls) == step:
                return value * float("nan") if how == "loss" else _NanGradient.apply(value)
        return value

    monkeypatch.setattr(losses, "kl_divergence", kl)


@pytest.mark.parametrize("how,flags,message", [
    ("loss", ["--checkpoint-every", "2"], "NaN/Inf in loss, kl, grad_norm_vae at step 3"),
    ("loss", ["--log-every", "100"], "NaN/Inf in loss, kl, grad_norm_vae at step 3"),
    ("gradient", ["--checkpoint-every", "2"], "NaN/Inf in grad_norm_vae at step 3"),
])
def test_nan_stops_training_naming_the_step_and_term(tmp_path, monkeypatch, capsys, how, flags, message):
    """NaN in the KL at step 3; the check runs at step 4 (checkpoint) or 5 (epoch end), yet
    names step 3 and exactly the logged terms that were non-finite then (the KL, the loss it
    joins and the gradient norm it poisons, not the reconstruction); last.pt is still the last
    good one, byte for byte."""
    out = tmp_path / "vae"
    nan_kl_at(monkeypatch, 3, how)
    real_save, saved = models.save_checkpoint, {}

    def save(state, path):
        real_save(state, path)
        saved[path] = (state["step"], hashlib.sha256(Path(path).read_bytes()).hexdigest())

    monkeypatch.setattr(models, "save_checkpoint", save)
    assert run_train(out, "--model", "vae", "--epochs", "2", *flags) == 3
    err = capsys.readouterr().err
    assert message in err and "(epoch 1)" in err and "Traceback" not in err and err.count("\n") == 1
    if "--checkpoint-every" in flags:
        step, digest = saved[str(out / "last.pt")]
        assert step == 2 and hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == digest
        assert "last.pt holds the last good checkpoint" in err
        assert all(torch.isfinite(v).all() for v in nets(out / "last.pt").values())
    else:
        assert not (out / "last.pt").exists() and "no checkpoint was written yet" in err
    assert not (out / "metrics.csv").exists()  # no row of NaNs either


def test_weights_made_non_finite_by_the_last_update_are_never_saved(tmp_path):
    """--lr 1e39: the first (and last) update's loss and gradient norm are finite, its Adam step
    (~lr) overflows float32 weights to Inf. The run must still stop with exit 3 and save nothing."""
    out = tmp_path / "ae"
    rc = run_train(out, "--model", "ae", "--max-steps", "1", "--lr", "1e39")
    saved = (out / "last.pt").exists() and not all(torch.isfinite(v).all() for v in nets(out / "last.pt").values()
                                                    if v.is_floating_point())
    assert rc == 3 and not saved and not (out / "metrics.csv").exists()


def test_huge_lr_diverges_and_the_cli_says_where(tmp_path):
    """--lr 1e30 at the command line: exit 3, one line naming a step and the loss terms."""
    rc, out, err = finish(cli(*TINY, "--model", "wgan-gp", "--n-critic", "2", "--lr", "1e30",
                              "--max-steps", "3", "--out", tmp_path / "run"))
    assert rc == 3, err
    line = the_error(err)
    assert line.startswith("error: NaN/Inf in ") and " at step " in line and "loss_d" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_grad_clip_bounds_the_global_norm(tmp_path, monkeypatch):
    """--grad-clip 1e-3 (the Wuga report's exploding gradients): every update's step sees a global
    gradient norm <= 1e-3 (read by a pre-step hook registered after train.py's own), while the
    logged grad_norm_vae is the norm before clipping, far larger."""
    seen, real = [], train.train

    def spy(run):
        for opt in run.opts.values():
            opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(float(torch.nn.utils.get_total_norm(
                [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]))))
        return real(run)

    monkeypatch.setattr(train, "train", spy)
    out = tmp_path / "vae"
    assert run_train(out, "--model", "vae", "--max-steps", "3", "--grad-clip", "1e-3") == 0
    monkeypatch.undo()
    assert len(seen) == 3 and max(seen) <= 1e-3 * (1 + 1e-4), seen
    row = models.read_csv(str(out / "metrics.csv"))[0]
    assert float(row["grad_norm_vae"]) > 1.0   # logged before clipping
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["config"]["grad_clip"] == 1e-3


# -----------------------------------------------------------------------------
# 5. Safe loading: weights_only everywhere, pickled code refused and never run

class Payload:
    """Unpickling this calls `func(*args)`: the classic malicious-checkpoint payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_checkpoint(path, marker, kind="open"):
    payload = Payload(open, str(marker), "w") if kind == "open" else Payload(os.system, f"touch {marker}")
    torch.save({"nets": {}, "config": {"model": "vae"}, "step": 0, "x": payload}, path)


@pytest.mark.parametrize("kind", ["open", "system"])
def test_pickled_code_is_refused_and_never_run(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    evil_checkpoint(run / "last.pt", marker, kind)
    for target in (run, run / "last.pt"):  # a run folder or the file
        assert train.main(["--resume", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: refusing to load") and "pickled code" in err, err
        assert "nothing in it was run" in err and "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists()


def test_facegen_refuses_pickled_code(tmp_path, capsys):
    facegen = pytest.importorskip("facegen")
    if not hasattr(facegen, "main"):
        pytest.skip("facegen.py has no main() yet")
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "last.pt", marker)
    assert facegen.main(["sample", str(tmp_path / "last.pt")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not marker.exists()


def test_pickled_code_is_refused_at_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "evil.pt", marker, "system")
    rc, _, err = finish(cli("--resume", tmp_path / "evil.pt"))
    assert rc == 2, err
    line = the_error(err)
    assert line.startswith("error: refusing to load") and "posix.system" in line and not marker.exists()


def test_every_torch_load_is_weights_only():
    for f in ROOT.glob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f.name}:{i}: {line.strip()}"


def test_pyproject_requires_a_torch_with_safe_weights_only():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text and "CVE-2025-32434" in text


# -----------------------------------------------------------------------------
# 6. Clear refusals: exit 2, one line, no traceback

def refusal(argv, capsys):
    try:
        rc = train.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("flag,value", [
    ("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "nan"), ("--batch-size", "0"), ("--batch-size", "-8"),
    ("--batch-size", "eight"), ("--epochs", "0"), ("--epochs", "-1"), ("--latent-dim", "0"),
    ("--latent-dim", "-3"), ("--max-steps", "0"), ("--checkpoint-every", "0"), ("--grad-clip", "0"),
    ("--grad-clip", "-1"), ("--obs-std", "0"), ("--n-critic", "0"), ("--kl-weight", "-1"),
    ("--lr", "inf"),
    ("--grad-clip", "inf"),
])
def test_invalid_numbers_are_refused(tmp_path, capsys, flag, value):
    # tiny and one step, so a value wrongly accepted fails fast instead of training for hours
    rc, err = refusal([*TINY, "--model", "vae", "--max-steps", "1", flag, value, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and f"argument {flag}" in err, err
    assert not (tmp_path / "o").exists()


def test_argparse_refusal_at_the_command_line():
    rc, _, err = finish(cli("--model", "vae", "--lr", "0"))
    assert rc == 2 and "argument --lr: must be a finite number > 0" in err and "Traceback" not in err


def _truncated(path):
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 3])


@pytest.fixture
def run_folder(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "--model", "vae", "--max-steps", "1") == 0
    return out


def test_refusals_exit_2_with_one_line(tmp_path, capsys, run_folder):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i, 2 * i, 3 * i)).save(few / f"{i}.png")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run_folder / "last.pt").read_bytes())
    _truncated(damaged)
    foreign = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    o = tmp_path / "o"
    cases = [  # argv, what the one line must say
        (["--model", "vae", "--image-size", "40", "--out", o], "--model vae supports image sizes 64x64, 32x32"),
        (["--model", "vae", "--image-size", "0", "--out", o], "image size"),
        (["--model", "vae", "--image-size", "big", "--out", o], "image size"),
        (["--model", "vae", "--out", a_file / "run"], "cannot write the run folder"),
        (["--model", "vae", "--out", a_file], "cannot write the run folder"),
        (["--model", "vae", "--data", tmp_path / "missing", "--out", o], "missing"),
        (["--model", "vae", "--data", empty, "--out", o], "no images"),
        (["--model", "vae", "--data", junk, "--out", o], "could be read"),
        (["--model", "vae", "--data", few, "--out", o], "only 2 training images"),
        (["--image-size", "32"], "--model is required"),
        (["--resume", tmp_path / "missing"], "no checkpoint at"),
        (["--resume", empty], "not a run folder"),
        (["--resume", damaged], "damaged, truncated or not a PyTorch checkpoint"),
        (["--resume", foreign], "not a facegen checkpoint"),
        (["--resume", run_folder, "--lr", "0.5", "--latent-dim", "7"], "latent_dim 7 (the run has 64); lr 0.5 (the run has 0.0001)"),
        (["--resume", run_folder, "--image-size", "64"], "image_size [64, 64] (the run has [32, 32])"),
        ([*TINY, "--model", "vae", "--out", run_folder], "already holds a run (last.pt): continue it with --resume"),
    ]
    for argv, says in cases:
        before = (run_folder / "last.pt").read_bytes()
        rc, err = refusal(argv, capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert says in err, (argv, err)
        assert (run_folder / "last.pt").read_bytes() == before  # a refusal never touches a run


# -----------------------------------------------------------------------------
# 7. Bad data at the command line

def test_bad_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):  # good ones, odd sizes, jpg and png, one level down too
        img = Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))
        img.save(folder / ("sub" if i % 2 else "") / f"good{i}.{'jpg' if i % 3 else 'png'}")
    rgb = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (48, 48), dtype=np.uint16)).save(folder / "sixteen_bit.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    assert Image.open(folder / "sixteen_bit.png").mode.startswith("I")
    rgb.save(folder / "truncated.jpg", quality=95)
    _truncated(folder / "truncated.jpg")
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (folder / "text.png").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not listed: not an image name")
    rc, out, err = finish(cli(*TINY, "--model", "dcgan", "--data", folder, "--max-steps", "2",
                              "--out", tmp_path / "run"))
    assert rc == 0 and "Traceback" not in err, err
    assert "loaded 17 images (4 skipped)" in out, out
    assert "skipped 4 of 21 image files" in err
    assert "corrupt.jpg" in err  # the first few are named
    assert torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["step"] == 2


# -----------------------------------------------------------------------------
# 9. An environment that fails part-way, and first runs that must not dead-end

def test_a_disk_that_fills_inside_torch_save_is_one_line_and_leaves_no_temp_file(tmp_path):
    """A real file-size limit: torch's zip writer turns the OSError into a RuntimeError mid-write."""
    def limit():  # 1 MiB: the pictures and logs fit, a checkpoint does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    out = tmp_path / "full"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--model", "dcgan", "--max-steps", "1",
                        "--out", str(out)], cwd=ROOT, env=env, preexec_fn=limit, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert the_error(p.stderr).startswith(f"error: could not write {str(out / 'last.pt')!r} (File too large)")
    assert temp_files(out) == [] and not (out / "last.pt").exists()


def test_a_second_ctrl_c_while_the_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch, capsys):
    out, real = tmp_path / "twice", models.save_checkpoint

    def save(state, path):
        os.kill(os.getpid(), signal.SIGINT)  # the second signal arrives in the middle of the write
        return real(state, path)
    signals_inside_step(monkeypatch, 2, 1, signal.SIGINT)
    monkeypatch.setattr(models, "save_checkpoint", save)
    assert run_train(out, *AE) == 130
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert "interrupted at step 2" in captured.out and "Traceback" not in captured.err
    assert models.load_checkpoint(str(out))["step"] == 2 and temp_files(out) == []


def test_runs_without_out_take_the_next_free_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("dcgan", "dcgan-2"):
        assert train.main([*TINY, "--model", "dcgan", "--max-steps", "1"]) == 0
        assert (tmp_path / "runs" / name / "last.pt").is_file()
    assert "runs/dcgan holds a run; this one trains into runs/dcgan-2" in capsys.readouterr().out
    assert run_train(tmp_path / "runs" / "dcgan", "--model", "dcgan") == 2  # an explicit --out stays exact


def test_relative_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "faces").mkdir()
    for i in range(20):
        Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(tmp_path / "faces" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert run_train("run", "--model", "dcgan", "--data", "faces", "--max-steps", "1") == 0
    assert models.load_checkpoint(str(tmp_path / "run"))["config"]["data"] == str(tmp_path / "faces")
    monkeypatch.chdir(ROOT)  # a resume from another folder finds the data
    assert train.main(["--resume", str(tmp_path / "run"), "--max-steps", "2", "--quiet"]) == 0


def test_gans_may_hold_out_nothing_and_autoencoders_may_not(tmp_path, capsys):
    assert run_train(tmp_path / "gan", "--model", "sngan", "--test-fraction", "0", "--conditional", "--max-steps", "1") == 0
    assert facegen.main(["control", str(tmp_path / "gan"), "--n", "4", "--epochs", "1"]) == 2    # it holds no test faces
    assert "control needs held-out test images" in the_error(capsys.readouterr().err)
    assert run_train(tmp_path / "ae", "--model", "ae", "--test-fraction", "0") == 2
    assert "needs held-out images (its test loss, best.pt, the reconstructions): --test-fraction 0.0 of 50" \
           in the_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["--out", "a\nb"], ["--batch-size", "100000"], ["--latent-dim", "10000000"],
                                  ["--n-synthetic", "10000000000"], ["--n-critic", "1000"]])
def test_sizes_and_names_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    try:
        rc = train.main([*TINY, "--model", "wgan", *argv])
    except SystemExit as e:  # argparse: usage line + one error line
        rc = e.code
    assert rc == 2 and "error:" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_autoencoders_log_the_mean_squared_error_per_pixel(tmp_path):
    assert run_train(tmp_path / "ae", *AE) == 0
    row = models.read_csv(str(tmp_path / "ae" / "metrics.csv"))[-1]
    assert 0 < float(row["mse_px"]) < 0.25 and 0 < float(row["test_mse_px"]) < 0.25
