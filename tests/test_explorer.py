"""The latent-PCA explorer (facegen.py pca --serve): its pictures agree with the latent geometry
computed by hand, its server survives careless and hostile clients, and its page, driven in
headless Chromium, shows what the server serves. One tiny vae-lrelu and one tiny dcgan run are
trained once for the session (32x32, CPU, two steps)."""
import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import data
import facegen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "32", "--n-synthetic", "64", "--batch-size", "8", "--max-steps", "2", "--quiet",
        "--device", "cpu"]
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via HTTP_PROXY


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer-runs")
    for model in ("vae-lrelu", "dcgan"):
        p = subprocess.run([sys.executable, "train.py", "--model", model, *TINY, "--out", str(root / model)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
    return root


def make_explorer(run, **kw):
    """An Explorer built as cmd_pca builds it -> (explorer, nets, test images or None)."""
    nets, cfg = facegen.load_run(str(run))
    train_images, test_images = data.run_data(cfg)[:2] if "vae" in nets else (None, None)
    pca = facegen.fit_pca(nets, train_images)
    about = facegen.explorer_about(str(run), cfg, None if train_images is None else len(train_images), len(pca[0]))
    return facegen.Explorer(nets, pca, about, test_images, **kw), nets, test_images


@contextmanager
def serving(explorer):
    """The explorer's server on a free port, in a thread -> (server, base URL)."""
    server = facegen.make_server(explorer, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def vae(runs):
    explorer, nets, test_images = make_explorer(runs / "vae-lrelu", k=4)
    with serving(explorer) as (server, url):
        yield explorer, nets, test_images, server, url


def get(url, timeout=30, **headers):
    """(status, headers, body) of a GET, errors included."""
    try:
        with HTTP.open(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(port, request, timeout=10):
    """Send raw bytes, read until the server closes -> the reply's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def pixels(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


def as_pixels(x):
    """float [-1, 1] (B, 3, h, w) -> uint8 (h, B*w, 3): one row, as the explorer draws it."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return torch.cat(list(x), 2).permute(1, 2, 0).numpy()


def page_info(html):
    """The JSON the server wrote into the page (str or bytes)."""
    html = html.decode() if isinstance(html, bytes) else html
    return json.loads(html.split("const I = ", 1)[1].split(";  //", 1)[0])


# -----------------------------------------------------------------------------
# The pictures: every one recomputed by hand from the PCA basis

def test_face_strip_and_start_thumbnail_follow_the_components_from_a_test_face(vae):
    explorer, nets, test_images, _, url = vae
    mean, V, sigma = explorer.pca
    mu3 = facegen.encode_dataset(nets["vae"], test_images[3:4])[0]
    z = mu3 + 1.5 * sigma[0] * V[0] - 1.0 * sigma[1] * V[1]                 # z_f + Σ c_j σ_j v_j
    status, headers, body = get(f"{url}/face.png?f=3&c=1.5,-1")
    assert status == 200 and headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(body)).size == (32, 32)
    np.testing.assert_array_equal(pixels(body), as_pixels(facegen.decode(nets, z[None])))

    _, _, strip = get(f"{url}/strip.png?j=1&f=3&c=1.5,-1")                   # c_2 at each tick
    ticks = torch.linspace(-3, 3, 7)
    zs = mu3 + 1.5 * sigma[0] * V[0] + ticks[:, None] * sigma[1] * V[1]
    np.testing.assert_array_equal(pixels(strip), as_pixels(facegen.decode(nets, zs)))

    _, _, thumb = get(f"{url}/start.png?f=3")                                 # the test image itself
    np.testing.assert_array_equal(pixels(thumb), test_images[3].permute(1, 2, 0).numpy())
    _, _, mean_face = get(f"{url}/face.png?f=mean&c=")
    np.testing.assert_array_equal(pixels(mean_face), as_pixels(facegen.decode(nets, mean[None])))


def test_a_query_without_f_opens_on_a_face_not_the_mean_code(vae, runs):
    """Autoencoders: the start test face's code (0 unless given); GANs: z ~ N(0, I) seeded by it. The mean code
    decodes to a blob (a GAN's z = 0 to black) and stays one of the start choices."""
    explorer, nets, test_images, _, url = vae
    mu0 = facegen.encode_dataset(nets["vae"], test_images[:1])
    assert page_info(get(f"{url}/?c=1")[2])["f"] == "0"
    np.testing.assert_array_equal(pixels(get(f"{url}/face.png")[2]), as_pixels(facegen.decode(nets, mu0)))
    np.testing.assert_array_equal(pixels(get(f"{url}/face.png?f=mean")[2]),
                                  as_pixels(facegen.decode(nets, explorer.pca[0][None])))
    gan, g_nets, _ = make_explorer(runs / "dcgan", k=2, start=5)
    z5 = torch.randn(1, 100, generator=torch.Generator().manual_seed(5))
    assert page_info(gan.page(""))["f"] == "5"
    np.testing.assert_array_equal(pixels(gan.face_png("")), as_pixels(facegen.decode(g_nets, z5)))


def test_page_explains_the_run_and_carries_the_permalinks_state(vae, runs):
    explorer, _, test_images, _, url = vae
    status, headers, body = get(f"{url}/?f=3&c=1.5,-1")
    html = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    info = page_info(html)
    facts = dict(info["facts"])
    assert facts["run"] == str(runs / "vae-lrelu") and facts["model"] == "vae-lrelu"
    assert facts["epoch"] == "1 (step 2)" and facts["latent size"] == "128" and facts["checkpoint"] == "last.pt"
    assert info["f"] == "3" and info["c"] == [1.5, -1.0, 0.0, 0.0] and info["n_faces"] == len(test_images)
    sigma = explorer.pca[2]
    np.testing.assert_allclose(info["shares"], (sigma[:4] ** 2 / (sigma ** 2).sum()).numpy(), rtol=1e-6)
    assert info["range"] == 3 and info["ticks"] == [-3, -2, -1, 0, 1, 2, 3]
    assert "training images" in info["help"] and "permalink" in info["help"]


def test_slider_range_follows_range(runs):
    explorer, _, _ = make_explorer(runs / "vae-lrelu", k=2, span=5.0)
    info = page_info(explorer.page("c=4.5"))
    assert info["range"] == 5 and info["ticks"][0] == -5 and info["ticks"][-1] == 5 and info["c"] == [4.5, 0]
    with pytest.raises(ValueError):
        explorer.state("c=5.5")


def test_page_cannot_be_broken_out_of_by_a_run_folder_name(runs):
    explorer, _, _ = make_explorer(runs / "vae-lrelu", k=2)
    explorer.info["facts"][0][1] = "/tmp/</script><script>alert(1)</script>"
    html = explorer.page("").decode()
    assert "<script>alert(1)" not in html and html.count("</script>") == 1
    assert page_info(html)["facts"][0][1] == "/tmp/</script><script>alert(1)</script>"


def test_gan_runs_explore_the_pca_of_sampled_z(runs):
    explorer, nets, _ = make_explorer(runs / "dcgan", k=4)
    mean, V, sigma = explorer.pca
    assert len(mean) == 100 and ((sigma > 0.8) & (sigma < 1.2)).all()      # N(0, I): isotropic
    info = page_info(explorer.page("f=7"))
    assert info["noise"] and "no encoder" in info["help"] and info["f"] == "7"
    z7 = torch.randn(100, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(pixels(explorer.face_png("f=7&c=0,2")),
                                  as_pixels(facegen.decode(nets, (z7 + 2 * sigma[1] * V[1])[None])))
    np.testing.assert_array_equal(pixels(explorer.start_png("f=7")), as_pixels(facegen.decode(nets, z7[None])))


def test_gan_pca_from_the_shell_says_why_its_components_are_random(runs):
    p = subprocess.run([sys.executable, "facegen.py", "pca", str(runs / "dcgan"), "--components", "3",
                        "--out", str(runs / "dcgan-pca.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "no encoder" in p.stdout and "isotropic" in p.stdout and (runs / "dcgan-pca.png").is_file()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_port_outside_0_65535_is_refused_before_loading_the_run(runs, port, capsys):
    with pytest.raises(SystemExit) as e:
        facegen.main(["pca", str(runs / "vae-lrelu"), "--serve", "--port", port])
    assert e.value.code == 2 and "argument --port: must be in 0..65535" in capsys.readouterr().err


def test_serve_from_the_shell_on_port_0_then_ctrl_c(runs):
    # SIGINT made deliverable in the child: a non-interactive shell starts a background job (pytest &) with
    # SIGINT ignored, and a child inherits that.
    p = subprocess.Popen([sys.executable, "facegen.py", "pca", str(runs / "vae-lrelu"), "--serve", "--port", "0",
                          "--out", str(runs / "serve-pca.png")], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out, deadline = b"", time.monotonic() + 300
        while b"(Ctrl-C" not in out:
            assert p.poll() is None and time.monotonic() < deadline, (out, p.stderr.read())
            if select.select([p.stdout], [], [], 1)[0]:
                out += os.read(p.stdout.fileno(), 65536)
        url = re.search(rb"explorer at (http://127\.0\.0\.1:\d+/) ", out).group(1).decode()
        status, _, body = get(url)
        assert status == 200 and dict(page_info(body.decode())["facts"])["model"] == "vae-lrelu"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0 and b"Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()


# -----------------------------------------------------------------------------
# The server against careless and hostile clients

def test_loopback_only_and_foreign_hosts_refused(vae):
    explorer, _, _, server, url = vae
    assert server.server_address[0] == "127.0.0.1"
    assert get(url + "/", Host="evil.example:80")[0] == 403                  # DNS rebinding


@pytest.mark.parametrize("query", [
    "c=nan", "c=inf", "c=-inf", "c=1e999", "c=3.01", "c=1,2,3,4,5", "c=1,,2", "c=1_0", "c=%D9%A3",  # Arabic 3
    "c=%EF%BC%91", "c=+1", "c=1%00", "c=%ff", "c=0x1", "c=1;2", "c==1", "c", "f=-1", "f=1.5", "f=99999",
    "f=%00", "f=mean%0d%0aX-Evil:%201", "x=1", "c=1&c=2", "f=&c=0", "&&", "c=1&", "%zz=1", "c=" + "9" * 5000])
def test_odd_bytes_and_bad_numbers_in_the_query_are_400(vae, query):
    url = vae[4]
    for path in ("/face.png?", "/?", "/strip.png?j=0&"):
        status, headers, _ = get(url + path + query)
        assert status == 400, (path, query)
        assert "Evil" not in str(headers)


@pytest.mark.parametrize("query", ["j=4", "j=-1", "j=", "j=0&j=1", "c=0"])
def test_strip_needs_one_valid_component_index(vae, query):
    assert get(f"{vae[4]}/strip.png?{query}")[0] == 400


@pytest.mark.parametrize("path", ["/nothing", "/face.png/", "/FACE.PNG", "/../etc/passwd", "/index.html", "//x"])
def test_unknown_paths_are_404(vae, path):
    assert get(vae[4] + path)[0] == 404


def test_raw_odd_requests_get_an_error_not_a_crash(vae, capfd):
    port = vae[3].server_address[1]
    cases = {b"GET /face.png?c=\xff\x00\x1b[31m HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n": b" 400 ",
             b"GET http://[x/face.png HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n": b" 400 ",       # urlsplit's ValueError
             b"GET /face.png?c=1 2 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n": b" 400 ",
             b"POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc": b" 501 ",
             b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n": b" 400 ",   # TLS hello
             b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n" + b"X: y\r\n" * 200 + b"\r\n": b" 431 "}
    for request, status in cases.items():
        assert status in raw(port, request).split(b"\r\n", 1)[0], request[:40]
    assert get(vae[4] + "/face.png?c=1")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_an_idle_half_request_blocks_nobody_and_times_out(vae, monkeypatch):
    port, url = vae[3].server_address[1], vae[4]
    monkeypatch.setattr(facegen.ExplorerHandler, "timeout", 1.0)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    for s in idle:
        s.sendall(b"GET /face.png?c=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n")       # no blank line: half a request
    try:
        t0 = time.monotonic()
        assert get(url + "/face.png?c=1", timeout=5)[0] == 200              # answered while those wait
        assert time.monotonic() - t0 < 5
        for s in idle:                                                      # then each is closed by the server
            assert s.recv(65536) == b"" and time.monotonic() - t0 < 8
    finally:
        for s in idle:
            s.close()


def test_clients_that_hang_up_are_silent(vae, capfd):
    port, url = vae[3].server_address[1], vae[4]
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3:
            s.sendall(f"GET /strip.png?j=0&c={i / 10} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        if i % 3 == 2:
            s.recv(10)                                                      # read a little of the reply
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends a RST
        s.close()
    time.sleep(1.0)                                                         # let the server trip over them
    assert get(url + "/face.png?c=2")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


def test_concurrent_clients_get_consistent_faces(vae):
    url = vae[4]
    want = {c: get(f"{url}/face.png?f=1&c={c}")[2] for c in ("0", "1", "-2")}
    results = []

    def client(c):
        results.append((c, get(f"{url}/face.png?f=1&c={c}")[2]))

    threads = [threading.Thread(target=client, args=(c,)) for c in list(want) * 6]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 18 and all(body == want[c] for c, body in results)


# -----------------------------------------------------------------------------
# The page in a real browser: headless Chromium over the DevTools protocol (stdlib only)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio"]


class Chromium:
    """Headless Chromium on --remote-debugging-pipe: JSON messages ending in NUL, commands on the
    browser's fd 3, replies and events on its fd 4."""

    def __init__(self, profile):
        high = lambda fd: (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10), os.close(fd))[0]  # clear of fds 3, 4
        to_browser, self.w = map(high, os.pipe())
        self.r, from_browser = map(high, os.pipe())
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', CHROMIUM,
                                      *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buf, self.n, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def read(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise EOFError("chromium exited")
            self.buf += chunk
        message, self.buf = self.buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, wait=60, **params):
        self.n += 1
        message = {"id": self.n, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + wait
        while (reply := self.read(deadline)).get("id") != self.n:
            self.events.append(reply)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def js(self, expression, wait=60):
        """Evaluate in the page (promises awaited) -> the value."""
        r = self.call("Runtime.evaluate", wait=wait, expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def open(self, url, width, height, mobile=False):
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self.read(deadline))

    def until(self, condition, wait=60):
        """Wait until the JS expression `condition` is truthy."""
        return self.js(f"""new Promise((done, fail) => {{ const t0 = Date.now(), t = setInterval(() => {{
            if ({condition}) {{ clearInterval(t); done(true); }}
            else if (Date.now() - t0 > {wait * 1000}) {{ clearInterval(t); fail(new Error("timed out")); }}
          }}, 20); }})""",
                       wait=wait + 10)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try:
            self.call("Browser.close", wait=10)
        except (AssertionError, OSError, EOFError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        os.close(self.r)
        os.close(self.w)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM:
        pytest.skip("headless Chromium not found: install Debian's chromium (.ci/run does) to test the page")
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


SHOWN = "document.getElementById('face').dataset.shown"
CANVAS = """(() => { const img = document.getElementById('face'), cv = document.createElement('canvas');
  [cv.width, cv.height] = [img.naturalWidth, img.naturalHeight];
  cv.getContext('2d').drawImage(img, 0, 0); return cv.toDataURL('image/png').split(',')[1]; })()"""


def test_permalink_in_chromium_shows_the_run_the_values_and_the_servers_face(vae, browser, tmp_path, capfd):
    explorer, _, _, server, url = vae
    browser.open(f"{url}/?f=3&c=1.5,-1", 1280, 900)
    face = "face.png?f=3&c=1.5,-1,0,0"
    browser.until(f"{SHOWN} === '{face}'")
    text = browser.js("document.body.innerText")
    assert "vae-lrelu" in text and "latent size 128" in text and "epoch 1 (step 2)" in text
    assert browser.js("[...document.querySelectorAll('output')].map(o => o.value)") == \
        ["+1.50σ", "−1.00σ", "±0.00σ", "±0.00σ"]
    assert browser.js("[...document.querySelectorAll('input[type=range]')].map(r => [r.min, r.max, r.value])") == \
        [["-3", "3", "1.5"], ["-3", "3", "-1"], ["-3", "3", "0"], ["-3", "3", "0"]]
    ticks = browser.js("document.querySelectorAll('.ticks')[0].innerText").split()
    assert ticks == ["-3", "-2", "-1", "0", "+1", "+2", "+3"]
    # the face the browser decoded is the server's face for the permalink's values, pixel for pixel
    shown = pixels(base64.b64decode(browser.js(CANVAS)))
    np.testing.assert_array_equal(shown, pixels(explorer.face_png("f=3&c=1.5,-1")))
    assert browser.js("document.getElementById('save').getAttribute('href')") == face
    assert browser.js("document.getElementById('save').download").endswith(".png")
    assert browser.js("document.getElementById('face').clientWidth") >= 450      # the window is used
    browser.screenshot(tmp_path / "explorer-1280.png")
    assert "Traceback" not in capfd.readouterr().err


def test_narrow_window_gets_a_one_column_layout(vae, browser, tmp_path):
    browser.open(f"{vae[4]}/?f=2&c=0,1", 400, 800, mobile=True)
    browser.until(f"{SHOWN} === 'face.png?f=2&c=0,1,0,0'")
    assert browser.js("window.innerWidth") == 400                             # the viewport tag works
    assert browser.js("document.documentElement.scrollWidth") <= 400           # nothing sticks out
    box = browser.js("(r => [r.left, r.right, r.top])(document.getElementById('face').getBoundingClientRect())")
    assert 0 <= box[0] and box[1] <= 400 and box[1] - box[0] >= 200
    browser.screenshot(tmp_path / "explorer-400.png")


def test_dragging_keeps_one_face_request_in_flight_and_ends_on_the_last_value(vae, browser, monkeypatch, capfd):
    explorer, _, _, server, url = vae
    browser.open(f"{url}/?f=1", 1280, 900)
    browser.until(f"{SHOWN} === 'face.png?f=1&c=0,0,0,0'")
    calls, lock, in_flight = [], threading.Lock(), [0, 0]                   # (now, most at once)
    face_png = explorer.face_png

    def slow_face_png(query):                                               # a slow model: 100 ms a face
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            calls.append(query)
        time.sleep(0.1)
        try:
            return face_png(query)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(explorer, "face_png", slow_face_png)
    browser.js("""new Promise(done => { const r = document.querySelector('input[aria-label=PC1]'); let i = 0;
        const t = setInterval(() => { r.value = -3 + 0.15 * ++i; r.dispatchEvent(new Event('input'));
          if (i === 40) { clearInterval(t); r.dispatchEvent(new Event('change')); done(); } }, 10); })""")
    browser.until(f"{SHOWN} === 'face.png?f=1&c=3,0,0,0'")
    assert in_flight[1] == 1 and 2 <= len(calls) <= 10, calls                 # not 40, never two at once
    assert calls[-1] == "f=1&c=3,0,0,0"
    assert browser.js("location.search") == "?f=1&c=3,0,0,0"                  # the permalink follows
    browser.until("[...document.querySelectorAll('.strip')].every(s => (s.dataset.shown || '').includes('c=3,'))")
    assert "Traceback" not in capfd.readouterr().err


def test_clicks_pick_a_start_face_jump_to_a_tick_and_reset(vae, browser):
    url = vae[4]
    browser.open(f"{url}/?f=0&c=1,1", 1280, 900)
    browser.until(f"{SHOWN} === 'face.png?f=0&c=1,1,0,0'")
    browser.js("document.querySelectorAll('img.thumb')[5].click()")           # mean, then test images 0, 1, ...
    browser.until(f"{SHOWN} === 'face.png?f=4&c=0,0,0,0'")
    assert "held-out test image #4" in browser.js("document.getElementById('from').textContent")
    browser.js("""(s => s.dispatchEvent(new MouseEvent('click', {clientX: s.getBoundingClientRect().right - 2,
                   clientY: s.getBoundingClientRect().top + 2})))(document.querySelectorAll('.strip')[1])""")
    browser.until(f"{SHOWN} === 'face.png?f=4&c=0,3,0,0'")                    # the last tick: +3σ
    browser.js("document.querySelectorAll('.row button')[1].click()")         # PC2's reset
    browser.until(f"{SHOWN} === 'face.png?f=4&c=0,0,0,0'")
