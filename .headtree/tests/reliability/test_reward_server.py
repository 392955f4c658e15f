"""Reward server faults (issue 11, item 5), on 127.0.0.1 only: a training run whose remote reward is down,
slow, failing or answering the wrong number of scores stops with one clear line (exit code 1) after its
retries, never with silent zero rewards; a request over the server's size limit gets a 413 that the client
reports as such, without retrying; and a bounded load test of the reference server checks that under
concurrency every response carries its own request's scores."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tiltflow.cli import main
from tiltflow.rewards import server as server_module
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.rewards.remote import RemoteReward, RemoteRewardError
from tiltflow.rewards.server import serving
from tiltflow.storage import load
from tiltflow.worlds.gmm import runs


class RowSum:
    """Score of a sample = the sum of its entries plus its prompt (an integer): a score says which sample
    and which prompt it came from."""

    name, differentiable = "row_sum", False

    def __init__(self, sleep_s: float = 0.0):
        self.sleep_s = sleep_s

    def __call__(self, samples, prompts):
        time.sleep(self.sleep_s)
        return RewardOutput(samples.flatten(1).sum(1) + torch.tensor([float(p) for p in prompts]))


@contextmanager
def fixed_answer(status: int, body: Callable[[dict], bytes]) -> Iterator[tuple[str, list[int]]]:
    """A loopback server answering every POST with `status` and body(request); yields (url, hits)."""
    hits: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            hits.append(1)
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = body(request)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with_remote(url: str, monkeypatch, capsys, tiny_yaml, teacher_run, reference, run_dir,
                      **client) -> tuple[int, str, float]:
    """Stage 2 of the tiny problem with its linear reward plus a remote one; returns (exit code, the
    stderr, seconds)."""
    real = runs.build_rewards

    def build_rewards(spec):
        local = real(spec)
        remote = RemoteReward(url, name="remote", encoding="npy-float32", **client)
        return RewardSet([*local.rewards, remote], [*local.weights, 1.0])

    monkeypatch.setattr(runs, "build_rewards", build_rewards)
    start = time.monotonic()
    code = main(["train", "--config", str(tiny_yaml), "stage=rtdmd", f"run_dir={run_dir}", f"teacher_run={teacher_run}",
                 f"init_from={reference['ac_dmd']}", "stage2.num_iters=2"])
    return code, capsys.readouterr().err, time.monotonic() - start


def wrong_length(request: dict) -> bytes:
    return json.dumps({"scores": [0.0] * (len(request["prompts"]) - 1)}).encode()


@pytest.mark.parametrize(("fault", "expected", "attempts"), [
    ("down", "failed after 3 attempts (connection refused)", 3),
    ("slow", "failed after 3 attempts (timed out after 0.2 s)", 3),
    ("5xx", "failed after 3 attempts (HTTP 503: warming up)", 3),
    ("wrong length", "answered 'scores'=a list of 31, expected a list of 32 numbers", 1),
    ("not json", "answered non-JSON", 1),
])
def test_training_stops_on_a_failing_reward_server(fault, expected, attempts, monkeypatch, capsys, tiny_yaml,
                                                   teacher_run, reference, tmp_path):
    """Retries (connection refused, timeouts, 5xx) with backoff 0.05 s * 2**k, then one line, exit 1, no
    checkpoint written: no step ever used a made-up reward. A server that answers the wrong thing fails at
    once (it would answer the same again)."""
    client = {"retries": 2, "backoff_s": 0.05, "timeout_s": 0.2}
    with failing_server(fault) as (url, hits):
        code, err, seconds = train_with_remote(url, monkeypatch, capsys, tiny_yaml, teacher_run, reference,
                                               tmp_path / "run", **client)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: reward server http://127.0.0.1:"), err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    if hits is not None:
        assert len(hits) == attempts
    if attempts > 1:
        assert seconds >= 0.05 + 0.1  # the two backoffs were slept


@contextmanager
def failing_server(fault: str):
    if fault == "down":
        yield f"http://127.0.0.1:{free_port()}", None
    elif fault == "slow":
        with serving(RowSum(sleep_s=1.0)) as srv:
            yield srv.url, None
    elif fault == "5xx":
        with fixed_answer(503, lambda r: b'{"error": "warming up"}') as pair:
            yield pair
    elif fault == "wrong length":
        with fixed_answer(200, wrong_length) as pair:
            yield pair
    else:
        with fixed_answer(200, lambda r: b"<html>502 Bad Gateway</html>") as pair:
            yield pair


def test_training_with_a_working_remote_reward_uses_its_scores(monkeypatch, capsys, tiny_yaml, teacher_run,
                                                                reference, tmp_path):
    """The control case: the same run against the reference server finishes, and the remote reward's
    mean is in the metrics (not zero: the scores are row sums plus prompt indices)."""
    with serving(RowSum()) as srv:
        code, err, _ = train_with_remote(srv.url, monkeypatch, capsys, tiny_yaml, teacher_run, reference,
                                         tmp_path / "run", retries=0, timeout_s=10.0)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_remote" in r and r["reward_remote"] != 0.0 for r in records)
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize("batch", [64, 1024])  # 0.26 MB, and 4.2 MB (which once broke the pipe mid-upload)
def test_request_over_the_size_limit_gets_413_not_retried(batch, monkeypatch):
    posts: list[int] = []
    real_post = server_module._Handler.do_POST

    def counting_post(self):
        posts.append(1)
        return real_post(self)

    monkeypatch.setattr(server_module._Handler, "do_POST", counting_post)
    with serving(RowSum(), max_request_bytes=10_000) as srv:
        remote = RemoteReward(srv.url, retries=3, backoff_s=0.05, timeout_s=10.0, encoding="npy-float32")
        with pytest.raises(RemoteRewardError) as info:
            remote(torch.rand(batch, 3, 16, 16), list(range(batch)))
    message = str(info.value)
    assert "rejected the request (HTTP 413): request of" in message
    assert "exceeds the limit of 10000 bytes (score smaller batches, or raise its --max-request-mb)" in message
    assert posts == [1]


def test_load_concurrent_clients_get_their_own_scores(capsys):
    """8 client threads x 40 requests of 16 samples against the reference server on 127.0.0.1: every
    response holds exactly its own request's scores (RowSum marks each score with its prompt), nothing is
    lost; reports requests/s and p50/p99 latency. Bounded: at most 320 requests and a 60 s deadline (about
    1.3 s on one loaded CPU core, so not marked slow)."""
    clients, per_client, batch = 8, 40, 16
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60.0

    def worker(c: int, url: str) -> None:
        remote = RemoteReward(url, retries=0, timeout_s=10.0, encoding="npy-float32")
        g = torch.Generator().manual_seed(c)
        for i in range(per_client):
            if time.monotonic() > deadline:
                with lock:
                    problems.append(f"client {c}: deadline passed at request {i}")
                return
            samples = torch.rand(batch, 3, 8, 8, generator=g)
            prompts = [c * 100_000 + i * 100 + j for j in range(batch)]  # unique over the whole test
            start = time.perf_counter()
            try:
                got = remote(samples, prompts).scores
            except RemoteRewardError as err:
                with lock:
                    problems.append(f"client {c} request {i}: {err}")
                continue
            elapsed = time.perf_counter() - start
            want = RowSum()(samples, prompts).scores
            with lock:
                latencies.append(elapsed)
                if not torch.equal(got, want):
                    problems.append(f"client {c} request {i}: scores of another request or corrupted")

    with serving(RowSum()) as srv:
        threads = [threading.Thread(target=worker, args=(c, srv.url)) for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(70)
        wall = time.perf_counter() - start
    assert not problems, problems[:5]
    assert len(latencies) == clients * per_client  # none lost
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    with capsys.disabled():
        print(f"\nreward server load: {clients} clients x {per_client} requests x {batch} samples: "
              f"{len(latencies) / wall:.0f} requests/s, p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, "
              f"{wall:.2f} s")
