"""DistributedDataParallel through torchrun: 2 CPU processes (gloo), each on its half of every
global batch, end with the weights of 1 process on the whole batch (within float tolerance).
vae-in has no BatchNorm (InstanceNorm is per sample; SyncBatchNorm has no CPU kernel), and
train.py gives each rank its slice of one global noise draw, so the two runs compute the same."""
import os
import subprocess
import sys

import torch

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--model", "vae-in", "--image-size", "32x24", "--n-synthetic", "96", "--batch-size", "8",
        "--max-steps", "4", "--lr", "1e-3", "--quiet", "--flip"]


def run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + ARGS + ["--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def test_two_gloo_processes_match_one(tmp_path):
    one = run([sys.executable, "train.py"], tmp_path / "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py"], tmp_path / "two")
    assert one["step"] == two["step"] == 4
    # Conv biases in front of InstanceNorm are cancelled by it: their gradient is 0 up to rounding,
    # which Adam's g / sqrt(v) amplifies. Compare every weight directly, biases through the outputs.
    weights = [k for k, v in one["nets"].items() if v.is_floating_point() and not k.endswith("bias")]
    assert len(weights) > 15
    for k in weights:
        torch.testing.assert_close(two["nets"][k], one["nets"][k], rtol=1e-4, atol=1e-5, msg=k)
    nets = {}
    for name, state in (("one", one), ("two", two)):
        nets[name] = models.build_model("vae-in", image_size=(32, 24))
        nets[name].load_state_dict(state["nets"])
        nets[name].eval()
    torch.manual_seed(0)
    x, z = torch.rand(4, 3, 32, 24) * 2 - 1, torch.randn(4, 64)
    with torch.no_grad():
        for f in (lambda n: n["vae"].decode(z), lambda n: n["vae"].encode(x)[0]):
            torch.testing.assert_close(f(nets["two"]), f(nets["one"]), rtol=1e-4, atol=1e-4)
    # and training moved the weights, so agreement is not trivial
    fresh = models.build_model("vae-in", image_size=(32, 24)).state_dict()
    assert not torch.allclose(fresh["vae.head.weight"], one["nets"]["vae.head.weight"])
