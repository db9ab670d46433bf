"""Side by side on one CPU: pytorch/examples' DCGAN loop against `python train.py --model dcgan`.

    python docs/bench_vs_examples.py                    # 10 steps, 3 repeats, default flags
    python docs/bench_vs_examples.py --steps 20 --repeats 5 --fast=--amp      # fast path: + bf16

Each measurement is a whole process (python start, imports, data, N optimizer steps, and what the
loop writes at the end), timed from outside with time.perf_counter. The runs alternate
peer, facegen default, facegen fast path, peer, ... so a burst of load from elsewhere on the machine
hits all of them alike; the ratio uses each one's best run, and the spread (worst/best) is printed.
Each run's CPU seconds (user + system, from getrusage) are printed too: on a machine loaded by
other work the wall time swings 2x from run to run while the CPU seconds hold within ~20 %.

The peer (`--peer`, this file run by itself) is a faithful re-implementation of the training loop
and the networks of pytorch/examples dcgan/main.py (ngf = ndf = 64, nz = 100, 64 x 64, batch 128,
bias-free convs, Sigmoid at the end of D with nn.BCELoss, Adam lr 2e-4 betas (0.5, 0.999), the
fake batch reused for the G step, .item() reads every step as its log line does, a G forward on
the 64 fixed noise vectors at step 0, the two state_dicts saved at the end). What it leaves out
favours the peer: its data are random tensors already in memory (no DataLoader, no decoding, no
torchvision), and it writes no image files. facegen trains on its synthetic faces with everything
its loop does (data on the device, NaN watch, metrics.csv, loss.png, sample grid, last.pt).
Both G steps score the critic step's fake batch (facegen's dcgan default, as in report 004);
--fast=--no-reuse-fakes times facegen drawing fresh z for its G step instead.

facegen's `--arch classic` (the dcgan default) has the same layer shapes: checked before timing,
conv by conv (facegen's convs also carry a bias; the examples' have bias=False).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NZ, NGF, NDF, NC, BATCH = 100, 64, 64, 3, 128


def peer_nets():
    """pytorch/examples dcgan/main.py's Generator and Discriminator (64 x 64)."""
    import torch.nn as nn

    def weights_init(m):  # the examples' custom init
        name = m.__class__.__name__
        if name.find("Conv") != -1:
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif name.find("BatchNorm") != -1:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    G = nn.Sequential(
        nn.ConvTranspose2d(NZ, NGF * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(NGF * 8), nn.ReLU(True),      # (ngf*8) x 4 x 4
        nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 4), nn.ReLU(True),  # (ngf*4) x 8 x 8
        nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 2), nn.ReLU(True),  # (ngf*2) x 16 x 16
        nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF), nn.ReLU(True),          # (ngf) x 32 x 32
        nn.ConvTranspose2d(NGF, NC, 4, 2, 1, bias=False), nn.Tanh())                                        # (nc) x 64 x 64
    D = nn.Sequential(
        nn.Conv2d(NC, NDF, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),                           # (ndf) x 32 x 32
        nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 2), nn.LeakyReLU(0.2, inplace=True),      # (ndf*2) x 16 x 16
        nn.Conv2d(NDF * 2, NDF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 4), nn.LeakyReLU(0.2, inplace=True),  # (ndf*4) x 8 x 8
        nn.Conv2d(NDF * 4, NDF * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 8), nn.LeakyReLU(0.2, inplace=True),  # (ndf*8) x 4 x 4
        nn.Conv2d(NDF * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())                                           # 1 x 1 x 1
    G.apply(weights_init)
    D.apply(weights_init)
    return G, D


def peer(steps, out):
    """The examples' training loop, step for step, on random tensors."""
    import torch
    import torch.nn as nn
    import torch.optim as optim
    torch.manual_seed(999)
    netG, netD = peer_nets()
    criterion = nn.BCELoss()
    fixed_noise = torch.randn(64, NZ, 1, 1)
    real_label, fake_label = 1, 0
    optimizerD = optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    images = torch.rand(4 * BATCH, NC, 64, 64) * 2 - 1  # stands in for the DataLoader
    for i in range(steps):
        real_cpu = images[(i % 4) * BATCH:(i % 4 + 1) * BATCH]
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype)
        output = netD(real_cpu).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(batch_size, NZ, 1, 1)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach()).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G network: maximize log(D(G(z))), on the same fake batch
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        line = f"[{i}/{steps}] Loss_D: {errD.item():.4f} Loss_G: {errG.item():.4f} D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}"
        if i % 100 == 0:
            with torch.no_grad():
                netG(fixed_noise).detach()  # the examples save this grid with vutils.save_image
    print(line)
    torch.save(netG.state_dict(), os.path.join(out, "netG.pth"))
    torch.save(netD.state_dict(), os.path.join(out, "netD.pth"))


def check_shapes():
    """The examples' conv weights and facegen's classic DCGAN's, layer by layer."""
    import torch.nn as nn
    sys.path.insert(0, ROOT)
    import models
    ours = models.build_model("dcgan", image_size=64, arch="classic")
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
    for name, theirs in zip("GD", peer_nets()):
        a, b = ([(type(m).__name__, tuple(m.weight.shape)) for m in net.modules() if isinstance(m, kinds)]
                for net in (theirs, ours[name]))
        assert a == b, f"{name}: examples {a} != facegen {b}"
        print(f"{name}: same {len(a)} conv/BatchNorm layers and weight shapes, {a[0][1]} ... {a[-1][1]}")


def cpu_line():
    """The CPU model and what it offers for these convs (AVX-512 / native bf16 or AVX2 only)."""
    import torch
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    caps = torch.cpu.get_capabilities()
    bf16 = any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16"))
    return f"{name}, {os.cpu_count()} cores visible, ATen {torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if bf16 else 'no'}"


def timed(cmd, cwd):
    """(wall seconds, CPU seconds: user + system of the whole process and its children)."""
    t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt, c2 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dt, (c2.ru_utime - c.ru_utime) + (c2.ru_stime - c.ru_stime)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per process")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    p.add_argument("--fast", default="--amp",
                   help="flags facegen's fast path adds to its defaults, as --fast=--amp ('' to skip that run)")
    p.add_argument("--peer", metavar="OUT", help=argparse.SUPPRESS)  # run the peer loop in this process
    a = p.parse_args()
    if a.peer:
        return peer(a.steps, a.peer)
    check_shapes()
    print(cpu_line(), flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_vs_examples_")
    n_images = a.steps * BATCH * 5 // 4 + 8  # one epoch of exactly --steps batches after the 80/20 split
    ours = [sys.executable, "train.py", "--model", "dcgan", "--max-steps", str(a.steps), "--epochs", "1",
            "--n-synthetic", str(n_images), "--quiet"]
    runs = {"peer (pytorch/examples)": lambda r: [sys.executable, os.path.abspath(__file__), "--peer", tmp, "--steps", str(a.steps)],
            "facegen default": lambda r: ours + ["--out", os.path.join(tmp, f"default{r}")]}
    if a.fast:
        runs[f"facegen {a.fast}"] = lambda r: ours + ["--out", os.path.join(tmp, f"fast{r}")] + a.fast.split()
    subprocess.run(runs["facegen default"]("warm")[:-2] + ["--out", os.path.join(tmp, "warm"), "--max-steps", "1"],
                   cwd=ROOT, capture_output=True)  # decodes the synthetic faces into the cache once
    times = {k: [] for k in runs}
    for r in range(a.repeats):
        for k, cmd in runs.items():
            times[k].append(timed(cmd(r), ROOT))
            print(f"round {r + 1}  {k:40s} {times[k][-1][0]:7.1f} s wall {times[k][-1][1]:7.1f} s CPU", flush=True)
    print(f"\n{a.steps} steps of batch {BATCH}, whole process, best of {a.repeats} (worst/best spread); "
          f"on a loaded machine the CPU seconds are the steadier measure:")
    for i, what in ((0, "wall"), (1, "CPU")):
        peer_best = min(t[i] for t in times["peer (pytorch/examples)"])
        for k, ts in times.items():
            ts = [t[i] for t in ts]
            print(f"{what:4s} {k:40s} best {min(ts):7.1f} s  spread {max(ts) / min(ts):4.2f}  "
                  f"speed vs peer {peer_best / min(ts):4.2f}x")


if __name__ == "__main__":
    sys.exit(main())
