"""Speed switches (issue 12): --amp without native bf16 trains in fp32 and says so; the defaults
are settled at run start and recorded, and a resume keeps them; --benchmark drops a hopeless
switch after one round. No timed assertions: speed is shown by docs/bench_vs_examples.py and
--benchmark's printed ratios, never by a test."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "dcgan", "--image-size", "32", "--n-synthetic", "160", "--batch-size", "8", "--quiet"]


def cfg_of(*argv):
    return train.resolve(train.parse_args(["--model", "dcgan", *argv]))


def test_amp_without_native_bf16_falls_back_to_fp32_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    cfg = train.resolve_speed(cfg_of("--amp"), torch.device("cpu"))
    err = capsys.readouterr().err
    assert cfg["amp"] is False
    assert len(err.strip().splitlines()) == 1 and "no native bf16" in err and "fp32" in err
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.resolve_speed(cfg_of("--amp"), torch.device("cpu"))["amp"] is True
    assert capsys.readouterr().err == ""
    assert train.resolve_speed(cfg_of(), torch.device("cpu"))["amp"] is False  # never on by default


def test_amp_fallback_run_is_the_fp32_run(tmp_path, monkeypatch, capsys):
    """With no native bf16, `--amp` trains exactly the fp32 model and records amp: false."""
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    for name, extra in (("amp", ["--amp"]), ("fp32", [])):
        assert train.main(TINY + ["--max-steps", "2", "--epochs", "1", "--out", str(tmp_path / name), *extra]) == 0
    assert "--amp ignored" in capsys.readouterr().err
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["amp"] is False
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True)["nets"] for n in ("amp", "fp32"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA simulation")
def test_detection_sees_an_avx2_only_cpu():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU an AVX2-only one for
    PyTorch; the bf16 check must see it (it asks oneDNN, which honours the cap)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = "import torch, train; print(train.native_bf16(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_defaults_are_settled_at_start_and_a_resume_keeps_the_recorded_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "CPU_DEFAULTS", dict(channels_last=True, fused_adam=True))
    cfg = train.resolve_speed(cfg_of(), cpu)
    assert (cfg["channels_last"], cfg["fused_adam"]) == (True, True)
    assert train.resolve_speed(cfg_of("--no-channels-last", "--no-fused-adam"), cpu)["channels_last"] is False
    # a run recorded before these defaults: NCHW and fused_adam null (= foreach Adam on CPU) stay so
    old = dict(cfg_of(), channels_last=False, fused_adam=None, resume="runs/old")
    cfg = train.resolve_speed(old, cpu)
    assert (cfg["channels_last"], cfg["fused_adam"]) == (False, None)
    # RMSProp has no fused flag to settle
    assert train.resolve_speed(train.resolve(train.parse_args(["--model", "wgan"])), cpu)["fused_adam"] is None


def test_config_json_records_the_resolved_switches(tmp_path):
    assert train.main(TINY + ["--max-steps", "1", "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert isinstance(cfg["channels_last"], bool) and isinstance(cfg["fused_adam"], bool)
    assert cfg["channels_last"] == bool(train.CPU_DEFAULTS["channels_last"])


class FakeTimed:
    def __init__(self, rate):
        self.r, self.calls = rate, 0

    def rate(self, steps):
        self.calls += 1
        return self.r


def test_a_hopeless_configuration_is_dropped_after_round_one():
    timed = [FakeTimed(100.0), FakeTimed(49.0), FakeTimed(51.0), FakeTimed(130.0)]
    best, dropped = train.best_rates(timed, steps=1, rounds=3)
    assert dropped == {1} and best == [100.0, 49.0, 51.0, 130.0]
    assert [t.calls for t in timed] == [3, 1, 3, 3]


def test_benchmark_smoke_reports_skipped_amp_and_a_dropped_switch(monkeypatch, capsys):
    """--benchmark on a tiny DCGAN: amp skipped without native bf16, a (fake) slow switch
    reported as hopeless, a fast path and the run defaults printed."""
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    monkeypatch.setattr(train, "SWITCHES", [("slow switch", dict(channels_last=True)),
                                            ("bf16 autocast (--amp)", dict(amp=True))])
    real = train.Timed.rate
    monkeypatch.setattr(train.Timed, "rate", lambda self, steps: real(self, steps) / (100 if self.cfg["channels_last"] else 1))
    assert train.main(TINY + ["--benchmark", "--bench-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "resident + slow switch" in out and "hopeless" in out
    assert "bf16 autocast (--amp): skipped, no native bf16" in out
    assert "fast path: resident data + nothing else" in out and "defaults of a run here" in out
