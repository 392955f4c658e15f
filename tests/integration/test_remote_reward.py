"""Remote reward protocol on loopback only (127.0.0.1, ephemeral ports): round trip, metadata, a timeout,
a server that is down, malformed answers, bad requests. Every server stops at the end of its test and
every client loop is bounded (few retries, millisecond backoff).
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.rewards.preprocess import Prompt
from tiltflow.rewards.remote import RemoteReward, RemoteRewardError, decode_images, encode_images
from tiltflow.rewards.server import main, serving


class MeanBrightness:
    """Score = mean pixel value; records the prompts it saw."""

    name, differentiable = "brightness", True

    def __init__(self, sleep_s: float = 0.0):
        self.sleep_s, self.seen = sleep_s, []

    def __call__(self, samples, prompts):
        time.sleep(self.sleep_s)
        self.seen.append(list(prompts))
        return RewardOutput(scores=samples.mean(dim=(1, 2, 3)), extras={"max": samples.amax(dim=(1, 2, 3))})


class Failing:
    name, differentiable = "failing", False

    def __call__(self, samples, prompts):
        raise RuntimeError("detector crashed")


def client(url: str, **kwargs) -> RemoteReward:
    return RemoteReward(url, **{"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, **kwargs})


@pytest.mark.parametrize("encoding", ["npy-uint8", "npy-float16"])
def test_encoding_round_trip(encoding):
    x = torch.rand(2, 3, 5, 7)
    y = decode_images(encode_images(x, encoding))
    step = 0.5 / 255 if encoding == "npy-uint8" else 2**-11  # uint8 rounding; float16 has 11 bits
    assert y.shape == x.shape and (y - x).abs().max() <= step + 1e-7
    with pytest.raises(ValueError, match="base64"):
        decode_images({"encoding": encoding, "data": "not base64!"})


def test_decoding_is_thread_safe_when_collections_switch_threads():
    """np.load parses the .npy header with ast.literal_eval, whose AST conversion on CPython 3.11 is not safe
    across threads: a garbage collection that yields the GIL mid-parse made a concurrent decode fail with "AST
    constructor recursion depth mismatch" (seen once in CI, as a 400 from the reward server). A gc callback that
    yields on every collection, a tiny gc threshold and a 1 us switch interval make that switch happen every
    time: without the lock in decode_images, 6-7 of the 8 threads failed in each of 3 runs here."""
    payload = encode_images(torch.rand(16, 3, 8, 8), "npy-float32")
    errors: list[str] = []

    def yield_gil(phase, info):
        if phase == "start":
            time.sleep(0)

    def worker():
        for _ in range(300):
            try:
                decode_images(payload)
            except Exception as err:  # noqa: BLE001 - collected and reported below
                errors.append(repr(err))
                return

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.callbacks.append(yield_gil)
    gc.set_threshold(5)
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        gc.callbacks.remove(yield_gil)
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_server_fault_while_reading_is_a_500_that_the_client_retries(monkeypatch):
    """An interpreter fault while decoding is the server's, not the request's: a 500 (retried), never a 400."""
    import tiltflow.rewards.server as server_module

    calls = {"n": 0}

    def decode_faulting_once(payload):
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=51, after=48)")
        return decode_images(payload)

    monkeypatch.setattr(server_module, "decode_images", decode_faulting_once)
    images = torch.rand(2, 3, 4, 4)
    with serving(MeanBrightness()) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 500: the server failed while reading the request: System"):
            client(server.url, retries=0)(images, ["a", "b"])
        calls["n"] = 0
        out = client(server.url, retries=1)(images, ["a", "b"])
    assert calls["n"] == 2 and out.scores.shape == (2,)


def test_round_trip_with_metadata_and_info():
    local = MeanBrightness()
    images = torch.rand(3, 3, 16, 12)
    prompts = [
        "plain",
        Prompt("a photo of two cats", {"tag": "counting", "include": [{"class": "cat", "count": 2}]}),
        {"prompt": "as a mapping", "tag": "colors"},
    ]
    with serving(local) as server:
        remote = client(server.url, name="bright")
        out = remote(images, prompts)
        info = remote.info()
    expected = decode_images(encode_images(images)).mean(dim=(1, 2, 3))  # what the server saw (uint8)
    torch.testing.assert_close(out.scores, expected)
    assert out.extras["max"] == pytest.approx(decode_images(encode_images(images)).amax(dim=(1, 2, 3)).tolist())
    seen = local.seen[0]
    assert seen[0] == "plain" and seen[1] == "a photo of two cats"
    assert seen[1].metadata == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    assert seen[2].metadata == {"tag": "colors"}
    assert info == {"protocol": "tiltflow-reward/1", "name": "brightness", "differentiable": True}
    assert not remote.differentiable and remote.name == "bright"


def test_remote_reward_in_a_reward_set():
    with serving(MeanBrightness()) as server:
        reward_set = RewardSet([client(server.url)], weights=[2.0])
        images = torch.full((2, 3, 8, 8), 0.5)
        out = reward_set(images, ["a", "b"])
    torch.testing.assert_close(out.total, torch.full((2,), 2 * 128 / 255))
    assert out.differentiable_total is None


def test_timeout_is_reported():
    with serving(MeanBrightness(sleep_s=0.5)) as server:
        remote = client(server.url, timeout_s=0.1, retries=1)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"failed after 2 attempts \(timed out after 0.1 s\)"):
            remote(torch.rand(1, 3, 4, 4), ["x"])
        assert time.monotonic() - start < 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_connection_refused_with_backoff():
    remote = client(f"http://127.0.0.1:{free_port()}", retries=3, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="failed after 4 attempts \\(connection refused\\)"):
        remote(torch.rand(1, 3, 4, 4), ["x"])
    assert 0.05 + 0.1 + 0.2 <= time.monotonic() - start < 3.0  # slept 0.05 * (1 + 2 + 4)


@contextmanager
def raw_server(status: int, body: bytes):
    """A loopback HTTP server that answers every request with a fixed status and body."""

    class Handler(BaseHTTPRequestHandler):
        hits = 0

        def do_POST(self):  # noqa: N802
            Handler.hits += 1
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"<html>oops</html>", "non-JSON"),
        (b'{"scores": [1.0, 2.0, 3.0]}', "'scores'=a list of 3, expected a list of 2"),
        (b'{"result": 1}', "'scores'=None"),
        (b'{"scores": [1.0, NaN]}', "non-finite or non-numeric scores at \\[1\\]"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_response_fails_at_once(body, match):
    with raw_server(200, body) as (url, handler):
        with pytest.raises(RemoteRewardError, match=match):
            client(url)(torch.rand(2, 3, 4, 4), ["a", "b"])
        assert handler.hits == 1  # not retried


def test_not_http_at_all_fails_at_once():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)

    def answer_garbage_once():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data, expected = b"", None
            while expected is None or len(data) < expected:  # read the whole request: closing sends no RST
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                head, sep, _ = data.partition(b"\r\n\r\n")
                if sep and expected is None:
                    lines = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                    expected = len(head) + len(sep) + int(lines[0].split(b":")[1])
            conn.sendall(b"SSH-2.0-not-http\r\n\r\n")

    thread = threading.Thread(target=answer_garbage_once, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RemoteRewardError, match="malformed HTTP response"):
            client(url)(torch.rand(1, 3, 4, 4), ["a"])
    finally:
        thread.join(timeout=5)
        listener.close()


def test_server_errors_are_retried_then_reported():
    with raw_server(503, b'{"error": "warming up"}') as (url, handler):
        with pytest.raises(RemoteRewardError, match="HTTP 503: warming up"):
            client(url, retries=2)(torch.rand(1, 3, 4, 4), ["a"])
        assert handler.hits == 3


def test_reward_failure_becomes_http_500_with_message():
    with serving(Failing()) as server:
        with pytest.raises(RemoteRewardError, match="reward 'failing' failed: RuntimeError: detector crashed"):
            client(server.url, retries=0)(torch.rand(1, 3, 4, 4), ["a"])


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"{not json", "body is not JSON"),
        (json.dumps({"images": {"encoding": "png", "data": ""}, "prompts": []}).encode(), "'images' must be"),
        (json.dumps({"protocol": "other/9", "images": {}, "prompts": []}).encode(), "protocol 'other/9'"),
    ],
)
def test_bad_requests_get_400_with_reason(payload, match):
    with serving(MeanBrightness()) as server:
        request = urllib.request.Request(server.url + "/score", data=payload, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400 and match in json.loads(err.value.read())["error"]


def test_prompt_count_mismatch_is_a_400():
    with serving(MeanBrightness()) as server:
        body = {"images": encode_images(torch.rand(2, 3, 4, 4)), "prompts": ["only one"]}
        request = urllib.request.Request(server.url + "/score", data=json.dumps(body).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400 and "list of 2 entries" in json.loads(err.value.read())["error"]


def test_server_main_help_and_bad_reward(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "127.0.0.1" in capsys.readouterr().out
    assert main(["--reward", "no_such_reward", "--port", "0"]) == 2
    assert "known rewards" in capsys.readouterr().err
