"""Speed switches: --amp without native bf16 trains in fp32 and says so in one line; the unset
switches are settled at run start (models.settle_speed) and recorded in config.json, and a resume
keeps what the run recorded. No timed assertions: speed is shown by docs/bench_vs_examples.py,
never by a test."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "dcgan", "--image-size", "32", "--n-synthetic", "40", "--batch-size", "8", "--quiet"]
CPU = torch.device("cpu")


def cfg_of(*argv, model="dcgan"):
    return train.resolve(train.parse_args(["--model", model, *argv]))


def bf16(monkeypatch, native):
    """Make this CPU look as if it has (or lacks) native bf16, as oneDNN and ATen report it."""
    caps = dict(torch.cpu.get_capabilities(), avx512_bf16=native, amx_bf16=native, bf16=native)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def test_amp_without_native_bf16_falls_back_to_fp32_in_one_line(monkeypatch, capsys):
    bf16(monkeypatch, False)
    cfg = cfg_of("--amp")
    models.settle_speed(cfg, CPU)
    err = capsys.readouterr().err
    assert cfg["amp"] is False
    assert len(err.strip().splitlines()) == 1 and "no native bf16" in err and "fp32" in err
    cfg = cfg_of("--amp")
    models.settle_speed(cfg, CPU, say=False)                   # other ranks: the same choice, silently
    assert cfg["amp"] is False and capsys.readouterr().err == ""
    bf16(monkeypatch, True)
    cfg = cfg_of("--amp")
    models.settle_speed(cfg, CPU)
    assert cfg["amp"] is True and capsys.readouterr().err == ""
    cfg = cfg_of()
    models.settle_speed(cfg, CPU)
    assert cfg["amp"] is False                                # never on by default


def test_amp_fallback_run_is_the_fp32_run(tmp_path, monkeypatch, capsys):
    """With no native bf16, `--amp` trains exactly the fp32 model and records amp: false."""
    bf16(monkeypatch, False)
    for name, extra in (("amp", ["--amp"]), ("fp32", [])):
        assert train.main(TINY + ["--max-steps", "2", "--epochs", "1", "--out", str(tmp_path / name), *extra]) == 0
    assert capsys.readouterr().err.count("--amp ignored") == 1
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["amp"] is False
    a, b = (torch.load(tmp_path / n / "last.pt", map_location="cpu", weights_only=True)["nets"] for n in ("amp", "fp32"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA simulation")
def test_detection_sees_an_avx2_only_cpu():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU an AVX2-only one for
    PyTorch; the bf16 check must see it (it asks oneDNN, which honours the cap)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = ("import torch, models; cfg = dict(amp=True, channels_last=None, fused_adam=None, optimizer='adam'); "
            "models.settle_speed(cfg, torch.device('cpu'), say=False); print(cfg['amp'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unset_switches_are_settled_for_the_device():
    cfg = cfg_of()
    assert (cfg["channels_last"], cfg["fused_adam"]) == (None, None)      # unset until the device is known
    models.settle_speed(cfg, CPU)
    assert (cfg["channels_last"], cfg["fused_adam"]) == (True, True)      # NHWC on CPU, fused Adam
    cfg = cfg_of("--no-channels-last", "--no-fused-adam")
    models.settle_speed(cfg, CPU)
    assert (cfg["channels_last"], cfg["fused_adam"]) == (False, False)    # a flag given wins
    cfg = cfg_of(model="wgan")
    models.settle_speed(cfg, CPU)
    assert cfg["fused_adam"] is False                                     # RMSProp: no fused Adam


def test_config_json_records_the_switches_and_a_resume_keeps_them(tmp_path):
    out = tmp_path / "r"
    assert train.main(TINY + ["--max-steps", "1", "--no-channels-last", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["channels_last"], cfg["fused_adam"], cfg["amp"], cfg["compile"]) == (False, True, False, False)
    assert train.main(["--resume", str(out), "--max-steps", "2", "--quiet"]) == 0   # no switch given
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["channels_last"], cfg["fused_adam"]) == (False, True)    # the run's, not this device's default
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
