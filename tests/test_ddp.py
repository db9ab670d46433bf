"""Data-parallel training through torchrun: 2 CPU processes (gloo), each on its half of every
global batch, against 1 process on the whole batch. train.py averages the gradients itself: one
all-reduce per update, in the optimizer's pre-step hook (train.add_update_hooks).

What is compared, and why it holds on any x86-64 CPU (AVX2 or AVX-512, any thread count):
- gradients of the FIRST step, not weights after several Adam steps. Adam's g / sqrt(v) turns
  rounding noise in near-zero gradients (the conv biases in front of InstanceNorm, which it
  cancels) into full lr-size steps of either sign, so weights after Adam steps agree only as well
  as the CPU's summation order allows (the old test failed on AVX2 by 1e-3). A gradient is a
  well-conditioned quantity: 2 ranks differ from 1 process only in how float32 sums are split.
- the loss trajectory over a few steps (losses are smooth in the weights: the lr-size flips of
  the cancelled biases do not change the loss at all, InstanceNorm removes them).
- data parallelism's invariant, bitwise: every rank ends with the same parameters.

All the 2-process trainings run in ONE torchrun launch (a worker script below runs train.main
once per argv), shared by the whole module: process start-up dominates these tiny runs."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import losses
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one model per step function and loss: the autoencoders share vae_step (vae-in, also compared
# with 1 process below), the Wuga VAE's and dcgan's BatchNorm run per rank on gloo
ALL = ["vae", "vae-in", "dcgan", "wgan", "wgan-gp", "vaegan", "sngan"]
SIZE = {"vae-in": "32x24"}
FAMILY_ARGS = {"wgan": ["--n-critic", "1", "--reuse-fakes"], "wgan-gp": ["--n-critic", "2"],  # wgan: G scores the kept fakes
               "sngan": ["--ema", "0.9"]}  # sngan: + G_ema


def tiny(model, out, *extra):
    """2 steps of `model` at its smallest size, global batch 8 (4 per rank), no augmentation noise
    in the comparison runs (--flip is part of vae-in's seed defaults and stays: every rank draws
    the same global flips and keeps its rows, so 1 and 2 processes flip the same images)."""
    return ["--model", model, "--image-size", SIZE.get(model, "32"), "--n-synthetic", "40",
            "--batch-size", "8", "--max-steps", "2", "--quiet", "--device", "cpu",
            *FAMILY_ARGS.get(model, []), "--out", str(out), *map(str, extra)]


# The BN-free model the 1-vs-2-process comparisons use: vae-in (InstanceNorm is per sample).
# lr 1e-3 (its seed value) so 4 Adam steps move the weights well beyond rounding.
VAE_IN = ["--model", "vae-in", "--image-size", "32x24", "--n-synthetic", "60", "--batch-size", "8",
          "--quiet", "--device", "cpu", "--lr", "1e-3"]

# Runs train.main(argv) for each argv (one JSON list per line of a file) in this process, spying
# through public names only: train.update (each update's loss and, for the first updates, every
# parameter gradient: update zeroes them before backward and the pre-step hook averages them over
# the ranks in place, so after it they are the gradients the step used), train.train (to reach the
# Run: its optimizers name the net of an update), and every file write under the run folder
# (os.replace, open for writing): only rank 0 may write there.
WORKER = textwrap.dedent(r"""
    import builtins, json, os, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import train
    rank = int(os.environ.get("RANK", 0))
    jobs = [json.loads(line) for line in open(sys.argv[2])]
    rec, runs = {}, []
    real_update, real_train, real_open, real_replace = train.update, train.train, builtins.open, os.replace

    def update(opt, loss):
        run = runs[-1]
        name = next(k for k, o in run.opts.items() if o is opt)
        real_update(opt, loss)
        rec["losses"].append((name, float(loss.detach())))
        if len(rec["grads"]) < 4:
            rec["grads"].append((name, {k: p.grad.detach().clone() for k, p in run.nets[name].named_parameters()
                                        if p.grad is not None}))

    def spy_train(run):
        runs.append(run)
        return real_train(run)

    def written(path):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(rec["out"] + os.sep):
            rec["writes"].append(os.path.relpath(path, rec["out"]))

    def spy_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            written(file)
        return real_open(file, mode, *a, **k)

    def spy_replace(src, dst, *a, **k):
        written(dst)
        return real_replace(src, dst, *a, **k)

    def eps_of(real, fake, x_hat):  # x_hat = eps * real + (1 - eps) * fake, per sample, least squares
        r, f, x = (t.detach().flatten(1).double() for t in (real, fake, x_hat))
        return ((x - f) * (r - f)).sum(1) / ((r - f) ** 2).sum(1)

    import losses
    real_gp = losses.gradient_penalty

    def gradient_penalty(critic, real, fake, *a, **k):
        seen = []
        out = real_gp(lambda x: seen.append(x) or critic(x), real, fake, *a, **k)
        rec["eps"].append(eps_of(real, fake, seen[0]))
        return out

    losses.gradient_penalty = gradient_penalty
    train.update, train.train, builtins.open, os.replace = update, spy_train, spy_open, spy_replace
    # one process group for every job: train.main destroys it on exit, and a second
    # init_process_group on torchrun's store would wait forever for keys the first one used
    destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, lambda *a: None
    for i, (dump, argv) in enumerate(jobs):
        rec.update(losses=[], grads=[], writes=[], eps=[], out=os.path.abspath(argv[argv.index("--out" if "--out" in argv else "--resume") + 1]))
        runs.clear()
        rc = train.main(argv)
        run = runs[0] if runs else None
        state = {"rc": rc, "losses": rec["losses"], "grads": rec["grads"], "writes": rec["writes"], "eps": rec["eps"],
                 "params": {k: v.detach().clone() for k, v in run.nets.named_parameters()} if run else {},
                 "buffers": {k: v.clone() for k, v in run.nets.named_buffers()} if run else {},
                 "opt": {k: o.state_dict() for k, o in run.opts.items()} if run else {}}
        torch.save(state, f"{dump}.rank{rank}.pt")
        if torch.distributed.is_initialized():  # rank 0 has written the run folder (a resume reads it)
            torch.distributed.barrier()
    destroy()
""")


def failure(p):
    """The ranks' own tracebacks and error lines, not torchrun's summary of them."""
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("[rank") or l.startswith("error")]
    return "\n".join(lines[-60:]) or (p.stdout + p.stderr)[-3000:]


def env():
    """One thread per process (2 ranks on 2 cores), CPU even on a CUDA host, and a fixed ISA
    nowhere: the tests below must hold whatever ATEN_CPU_CAPABILITY the caller sets."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def torchrun(tmp, jobs, nproc=2):
    """Run every (name, argv) of `jobs` in one torchrun launch of `nproc` gloo processes.
    Returns {name: [state of rank 0, rank 1, ...]}."""
    script, listing = tmp / "worker.py", tmp / "jobs.jsonl"
    script.write_text(WORKER)
    listing.write_text("".join(json.dumps([str(tmp / name), argv]) + "\n" for name, argv in jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), ROOT, str(listing)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, failure(p)
    states = {name: [torch.load(tmp / f"{name}.rank{r}.pt", map_location="cpu", weights_only=True) for r in range(nproc)]
              for name, _ in jobs}
    for name, ranks in states.items():
        assert all(s["rc"] == 0 for s in ranks), (name, [s["rc"] for s in ranks])
    return states


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every 2-process training of this module, in one torchrun launch."""
    tmp = tmp_path_factory.mktemp("ddp")
    jobs = [(m, tiny(m, tmp / "runs" / m)) for m in ALL]
    jobs += [("vae-in-4", [*VAE_IN, "--max-steps", "4", "--out", str(tmp / "runs" / "vae-in-4")]),
             ("vae-in-1", [*VAE_IN, "--max-steps", "1", "--out", str(tmp / "runs" / "vae-in-1")]),
             ("split-a", [*VAE_IN, "--max-steps", "2", "--out", str(tmp / "runs" / "split")]),
             ("split-b", ["--resume", str(tmp / "runs" / "split"), "--max-steps", "4", "--quiet", "--device", "cpu"])]
    states = torchrun(tmp, jobs)
    return {"states": states, "runs": tmp / "runs"}


def spy_main(argv, monkeypatch):
    """train.main(argv) in this process (1 process), recording what the worker records."""
    rec, runs = {"losses": [], "grads": []}, []
    real_update, real_train = train.update, train.train

    def update(opt, loss):
        run = runs[-1]
        name = next(k for k, o in run.opts.items() if o is opt)
        real_update(opt, loss)
        rec["losses"].append((name, float(loss.detach())))
        if len(rec["grads"]) < 4:
            rec["grads"].append((name, {k: p.grad.detach().clone() for k, p in run.nets[name].named_parameters()
                                        if p.grad is not None}))

    monkeypatch.setattr(train, "update", update)
    monkeypatch.setattr(train, "train", lambda run: runs.append(run) or real_train(run))
    assert train.main([str(a) for a in argv]) == 0
    monkeypatch.undo()
    return rec


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The 1-process vae-in reference at the same global batch (4 steps)."""
    tmp = tmp_path_factory.mktemp("one")
    mp = pytest.MonkeyPatch()
    rec = spy_main([*VAE_IN, "--max-steps", "4", "--out", tmp / "vae-in-4"], mp)
    spy_main([*VAE_IN, "--max-steps", "1", "--out", tmp / "vae-in-1"], mp)
    return {"rec": rec, "out": tmp / "vae-in-4", "out1": tmp / "vae-in-1"}


def close_to(a, b, scale, tol):
    """max |a - b| <= tol * scale: an absolute bound in units of the whole gradient's size."""
    return float((a - b).abs().max()) <= tol * scale


# -----------------------------------------------------------------------------
# 1. Equivalence with one process (vae-in: no BatchNorm)

def test_first_step_gradient_of_two_processes_equals_one_process(two, one):
    """The hook averages the 2 ranks' gradients of their half-batch mean losses: that is the gradient
    of the global batch mean, which 1 process computes directly. Only the float32 summation
    order differs: each gradient entry is a sum over ~8*32*24 = 6e3 products, whose rounding
    error is ~sqrt(n) * 2^-24 ~ 5e-6 of the magnitudes summed (more where terms cancel). We
    allow 1e-4 of the largest gradient entry of the tensor's net, per entry: 20x that, yet ~1000x
    below what a missing all-reduce or a wrong noise/data slice gives (rank 0's half-batch
    gradient alone differs from the full one by ~30 % of that scale; measured below)."""
    (name1, g1), (name2, g2) = one["rec"]["grads"][0], two["states"]["vae-in-4"][0]["grads"][0]
    assert name1 == name2 == "vae"
    assert g1.keys() == g2.keys() and len(g1) > 30
    scale = max(float(g.abs().max()) for g in g1.values())
    worst = max(float((g2[k] - g1[k]).abs().max()) for k in g1) / scale
    print(f"first-step gradient, 2 processes vs 1: max |diff| = {worst:.2e} of the largest entry")
    for k in g1:
        assert close_to(g2[k], g1[k], scale, 1e-4), (k, worst)
    # every rank applied the same, all-reduced gradient
    r1 = two["states"]["vae-in-4"][1]["grads"][0][1]
    assert all(torch.equal(r1[k], g2[k]) for k in g1)


def test_the_comparison_has_power_a_half_batch_gradient_is_far_off(two, one):
    """The test above would fail without the all-reduce: rank 0's own half-batch gradient is
    not the global one. (Recomputed here from the run's first batch on one process.)"""
    cfg = train.resolve(train.parse_args([*VAE_IN, "--max-steps", "1", "--out", "unused"]))
    run = train.Run(cfg)
    x, _ = next(run.batches.epoch(0))
    vae = run.nets["vae"]
    x_hat, mu, logvar = vae(x[:4], run.noise(8)[:4])
    loss = train.elbo(cfg, x[:4], x_hat, mu, logvar)[0]
    loss.backward()
    g1 = one["rec"]["grads"][0][1]
    scale = max(float(g.abs().max()) for g in g1.values())
    worst = max(float((p.grad - g1[k]).abs().max()) for k, p in vae.named_parameters() if p.grad is not None)
    print(f"rank 0's half-batch gradient vs the global one: max |diff| = {worst / scale:.2f} of the largest entry")
    assert worst / scale > 1e-2  # 100x the tolerance above


def test_loss_trajectory_of_two_processes_equals_one_process(two, one):
    """4 Adam steps at lr 1e-3: the mean of the ranks' half-batch losses equals the 1-process
    loss at every step. Step 1's loss differs only by float32 rounding (~1e-7); step 2's follows
    one Adam update lr * g / (|g| + eps), a sign-like step that rounding can flip only where g is
    ~0, and the loss is first-order insensitive there: 1e-5. From the second update on, Adam
    divides by sqrt(v) of rounding-sized gradients and the runs drift apart as the CPU's
    summation order decides (measured 3e-5 and 2.4e-4 at steps 3, 4 on AVX-512): 2e-3 there, still below a step's own change (~2e-2 to 1e-1)."""
    l1 = [v for _, v in one["rec"]["losses"]]
    r0, r1 = ([v for _, v in s["losses"]] for s in two["states"]["vae-in-4"])
    assert len(l1) == len(r0) == len(r1) == 4
    l2 = [(a + b) / 2 for a, b in zip(r0, r1)]
    rel = [abs(a - b) / abs(b) for a, b in zip(l2, l1)]
    print("loss trajectory, 2 processes vs 1: relative differences", rel)
    assert max(rel[:2]) <= 1e-5 and max(rel[2:]) <= 2e-3, (l1, l2, rel)
    assert abs(l1[-1] - l1[0]) > 0.05 * l1[0]  # the trajectory moved: agreement is not trivial


def test_logged_losses_are_the_global_batchs(two, one):
    """metrics.csv reads the same whether a run used 1 or 2 processes: the logged training losses
    are all-reduced over the ranks, not rank 0's half of the batch (test losses: the whole test
    set on every rank). Same 1e-4 relative tolerance as the loss trajectory."""
    rows1 = list(csv.DictReader(open(one["out1"] / "metrics.csv")))
    rows2 = list(csv.DictReader(open(two["runs"] / "vae-in-1" / "metrics.csv")))
    assert len(rows1) == len(rows2) == 1
    keys = [k for k in rows1[0] if k not in ("epoch", "step", "images_per_s", "seconds")]
    assert {"loss", "recon", "kl", "test_loss"} <= set(keys) and rows1[0].keys() == rows2[0].keys()
    rel = {k: abs(float(rows2[0][k]) - float(rows1[0][k])) / abs(float(rows1[0][k])) for k in keys}
    print("metrics.csv, 2 processes vs 1, relative differences:", rel)
    differ = {k: (rows1[0][k], rows2[0][k]) for k in keys if rel[k] > 1e-4}
    assert not differ, f"metrics.csv of 1 vs 2 processes (1, 2): {differ}"


# -----------------------------------------------------------------------------
# 2. Every family under 2 processes: identical ranks, and rank 0 alone writes

@pytest.mark.parametrize("model", ALL)
def test_every_family_under_two_processes_keeps_the_ranks_identical(two, model):
    """Every rank ends with bitwise the same parameters and optimizer state (the same
    all-reduced gradients, the same updates). BatchNorm running statistics are not compared:
    on CPU there is no SyncBatchNorm, each rank's forward updates them from its own half-batch,
    and the checkpoint keeps rank 0's."""
    r0, r1 = two["states"][model]
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for net, st in r0["opt"].items():
        for i, s in st["state"].items():
            for key, v in s.items():
                assert torch.equal(v, r1["opt"][net]["state"][i][key]), (net, i, key)
    updates = [n for n, _ in r0["losses"]]
    assert len(updates) == len(r1["losses"]) and updates
    # and it trained: the saved checkpoint is rank 0's state after 2 steps
    saved = torch.load(two["runs"] / model / "last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 2
    for k, v in r0["params"].items():
        assert torch.equal(saved["nets"][k], v), k
    ema = "--ema" in FAMILY_ARGS.get(model, [])
    assert ema == any(k.startswith("G_ema.") for k in r0["params"])   # G_ema compared above too
    fresh = models.build_model(model, tuple(train.data.parse_size(SIZE.get(model, "32"))), ema=ema).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in r0["params"].items())


@pytest.mark.parametrize("model", ["vae-in", "dcgan", "vaegan"])
def test_only_rank_0_writes_the_run_folder(two, model):
    r0, r1 = two["states"][model]
    assert r1["writes"] == [], r1["writes"]
    assert "metrics.csv" in r0["writes"] and "last.pt" in r0["writes"]
    rows = list(csv.DictReader(open(two["runs"] / model / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2"]  # one row, not one per rank


def test_vaegan_decoded_noise_gradient_is_all_reduced(two):
    """The VAE-GAN's decoder runs twice a step, on z ~ q(z|x) inside the VAE's forward and on noise
    through vae.decode: its gradient, the sum of both uses, is what the pre-step hook averages.
    Hence identical decoder gradients on both ranks (not merely identical weights)."""
    g0 = [g for n, g in two["states"]["vaegan"][0]["grads"] if n == "vae"]
    g1 = [g for n, g in two["states"]["vaegan"][1]["grads"] if n == "vae"]
    assert g0 and len(g0) == len(g1)
    dec = [k for k in g0[0] if k.startswith("decoder.")]
    assert dec
    for a, b in zip(g0, g1):
        for k in dec:
            assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# 3. --resume under torchrun

def test_resume_under_torchrun_equals_an_uninterrupted_two_process_run(two):
    """2 processes stop after 2 steps (a checkpoint), a second 2-process launch resumes to 4:
    bitwise the uninterrupted 4-step 2-process run (on CPU a gloo all-reduce of 2 ranks is a+b
    on both: deterministic)."""
    a = torch.load(two["runs"] / "vae-in-4" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(two["runs"] / "split" / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["nets"]:
        assert torch.equal(a["nets"][k], b["nets"][k]), k
    for net in a["optimizers"]:
        for i, s in a["optimizers"][net]["state"].items():
            for key, v in s.items():
                assert torch.equal(v, b["optimizers"][net]["state"][i][key]), (net, i, key)
    la = [v for _, v in two["states"]["vae-in-4"][0]["losses"]]
    lb = [v for _, v in two["states"]["split-a"][0]["losses"] + two["states"]["split-b"][0]["losses"]]
    assert la == lb
    ra, rb = (list(csv.DictReader(open(two["runs"] / n / "metrics.csv"))) for n in ("vae-in-4", "split"))
    # The rows agree to float32 rounding, not bitwise: the resumed run adds its steps to the
    # checkpoint's global (all-reduced) sums, the straight run all-reduces its ranks' own sums.
    drop = lambda r: {k: float(v) for k, v in r.items() if k not in ("images_per_s", "seconds")}
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k, v in drop(x).items():
            assert v == pytest.approx(drop(y)[k], rel=1e-6), k


def test_gradient_penalty_eps_is_each_ranks_slice_of_one_draw(two, tmp_path, monkeypatch):
    """Like the noise (Run.noise), the penalty's eps ~ U[0, 1] per sample must be this rank's
    slice of one draw for the global batch, so 2 processes penalise the same x_hat as 1 process.
    A rank drawing torch.rand(its own n) from the shared RNG state gives rank 1 rank 0's values.
    eps is recovered from x_hat = eps x + (1 - eps) x_fake by least squares (exact to ~1e-6)."""
    r0, r1 = two["states"]["wgan-gp"]
    assert r0["eps"] and r1["eps"]
    two_eps = torch.cat([r0["eps"][0], r1["eps"][0]])
    recorded, real_gp = [], losses.gradient_penalty

    def gradient_penalty(critic, real, fake, *a, **k):
        seen = []
        out = real_gp(lambda x: seen.append(x) or critic(x), real, fake, *a, **k)
        r, f, x = (t.detach().flatten(1).double() for t in (real, fake, seen[0]))
        recorded.append(((x - f) * (r - f)).sum(1) / ((r - f) ** 2).sum(1))
        return out

    monkeypatch.setattr(losses, "gradient_penalty", gradient_penalty)
    assert train.main(tiny("wgan-gp", tmp_path / "one")) == 0
    monkeypatch.undo()
    one_eps = recorded[0]
    assert one_eps.shape == two_eps.shape == (8,)
    torch.testing.assert_close(two_eps, one_eps, rtol=0, atol=1e-5)
