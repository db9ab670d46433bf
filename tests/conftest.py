"""The suite runs the same on any machine: CPU only (unless FACEGEN_TEST_CUDA=1 asks for the GPU),
loopback HTTP never through a proxy, and a private decoded-image cache.

Set here, at import, before any test module imports torch: CUDA_VISIBLE_DEVICES='' hides every GPU
from this process and from every train.py subprocess (which inherit the environment), so
`--device auto` picks the CPU, cudnn.benchmark stays off, and torchrun tests use gloo, not NCCL with
2 ranks on one GPU. Bitwise-resume and pixel-equality tests hold only on the device they were
designed for; a CUDA test must ask for it explicitly."""
import os

import pytest

# One intra-op thread unless the caller chose (OMP_NUM_THREADS=2 pytest runs the suite with two):
# these nets are tiny, and on a shared 2-core machine two threads per process (and per train.py
# subprocess, which inherits this) thrash -- 100x slower measured under load. No test may depend
# on the count: the suite passes with 1 and with 2.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("FACEGEN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# urllib honours HTTP_PROXY / http_proxy: requests to the explorer on 127.0.0.1 must not leave the host
_loopback = "127.0.0.1,localhost,::1"
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(v for v in (os.environ.get(_var), _loopback) if v)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Decoded-image cache shared by one test session, never the user's ~/.cache/facegen."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FACEGEN_CACHE", str(tmp_path_factory.mktemp("facegen-cache")))
    yield
    mp.undo()

