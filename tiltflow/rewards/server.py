"""Reference reward server: serves any local Reward over the "tiltflow-reward/1" protocol (see remote.py).

Run `tiltflow-reward-server --reward clip_score --reward-kwargs '{"model": "/models/clip"}'` in the
environment that has the scorer's dependencies; point RemoteReward at it. Binds 127.0.0.1 by default.
Requests are scored one at a time (a lock around the reward), so a GPU model is never used concurrently.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from tiltflow.rewards.base import Reward
from tiltflow.rewards.preprocess import Prompt
from tiltflow.rewards.remote import PROTOCOL, decode_images

log = logging.getLogger(__name__)


class RewardHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the reward, a lock around it and the request size limit."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, *, max_request_bytes: int = 256 * 2**20):
        self.reward = reward
        self.reward_lock = threading.Lock()
        self.max_request_bytes = max_request_bytes
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path in ("/info", "/health"):
            reward = self.server.reward
            info = {"protocol": PROTOCOL, "name": reward.name,
                    "differentiable": bool(getattr(reward, "differentiable", False))}
            self._send(200, info)
        else:
            self._send(404, {"error": f"unknown path {self.path!r}; use GET /info or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /score"})
            return
        try:
            images, prompts = self._read_request()
        except _BadRequest as err:
            self._send(err.status, {"error": str(err)})
            self.close_connection = True
            if err.status == 413:
                # Read the refused body to its end before closing: a socket closed with unread data resets
                # the connection, and the client would see a broken pipe (and retry) instead of this 413.
                self._discard(int(self.headers["Content-Length"]))
            return
        except Exception as err:  # noqa: BLE001 - a fault of this server while reading: a 500, which clients retry
            log.exception("reading a request failed")
            self._send(500, {"error": f"the server failed while reading the request: {type(err).__name__}: {err}"})
            self.close_connection = True
            return
        try:
            with self.server.reward_lock, torch.no_grad():
                output = self.server.reward(images, prompts)
            scores = [float(s) for s in output.scores.detach().float().cpu().tolist()]
        except Exception as err:  # noqa: BLE001 - any scorer failure becomes a 500 with its message
            log.exception("reward %s failed", self.server.reward.name)
            self._send(500, {"error": f"reward {self.server.reward.name!r} failed: {type(err).__name__}: {err}"})
            return
        if len(scores) != len(prompts) or not all(math.isfinite(s) for s in scores):
            self._send(500, {"error": f"reward returned {len(scores)} scores (non-finite ones included) for "
                                      f"{len(prompts)} prompts"})
            return
        self._send(200, {"scores": scores, "extras": _jsonable(output.extras)})

    def _read_request(self) -> tuple[torch.Tensor, list[Any]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _BadRequest("a Content-Length header is required", status=411)
        if int(length) > self.server.max_request_bytes:
            raise _BadRequest(
                f"request of {int(length)} bytes exceeds the limit of {self.server.max_request_bytes} bytes",
                status=413,
            )
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as err:
            raise _BadRequest(f"body is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise _BadRequest("body must be a JSON object with 'images' and 'prompts'")
        if body.get("protocol", PROTOCOL) != PROTOCOL:
            raise _BadRequest(f"protocol {body.get('protocol')!r} is not supported; this server speaks {PROTOCOL}")
        try:
            images = decode_images(body.get("images"))
        except ValueError as err:
            raise _BadRequest(str(err)) from err
        return images, _decode_prompts(body.get("prompts"), images.shape[0])

    def _discard(self, length: int, chunk: int = 2**20) -> None:
        try:
            while length > 0:
                got = self.rfile.read(min(chunk, length))
                if not got:
                    return
                length -= len(got)
        except OSError:  # the client gave up: nothing left to protect
            return

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
            log.info("client %s left before the answer (HTTP %d)", self.address_string(), status)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s - %s", self.address_string(), format % args)


def _decode_prompts(prompts: Any, batch_size: int) -> list[Any]:
    if not isinstance(prompts, list) or len(prompts) != batch_size:
        raise _BadRequest(f"'prompts' must be a list of {batch_size} entries (one per image)")
    out: list[Any] = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, int)) and not isinstance(p, bool):
            out.append(p)
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            out.append(Prompt(p["prompt"], {k: v for k, v in p.items() if k != "prompt"}))
        else:
            raise _BadRequest(f"prompt {i} must be a string, an integer or an object with a 'prompt' string")
    return out


def _jsonable(extras: dict[str, Any]) -> dict[str, Any]:
    """Extras that survive JSON: tensors become lists; anything else unserialisable is dropped."""
    out: dict[str, Any] = {}
    for key, value in extras.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().tolist()
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value
    return out


@contextlib.contextmanager
def serving(reward: Reward, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> Iterator[RewardHTTPServer]:
    """Serve `reward` on a background thread for the duration of the block (port 0: an ephemeral port)."""
    server = RewardHTTPServer(reward, host, port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiltflow-reward-server",
        description="Serve a tiltflow reward over HTTP (protocol tiltflow-reward/1; see docs/rewards.md).",
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="reward name from tiltflow.rewards.registry (clip_score, pickscore, aesthetic, hpsv2, "
        "imagereward, remote) or MODULE:FACTORY returning a Reward",
    )
    parser.add_argument("--reward-kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0 picks a free one)")
    parser.add_argument("--max-request-mb", type=float, default=256.0, help="largest accepted request body")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from tiltflow.rewards.registry import build_reward, parse_kwargs

    try:
        reward = build_reward(args.reward, **parse_kwargs(args.reward_kwargs, what="--reward-kwargs"))
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"tiltflow-reward-server: error: {err}", file=sys.stderr)
        return 2
    server = RewardHTTPServer(reward, args.host, args.port, max_request_bytes=int(args.max_request_mb * 2**20))
    log.info("serving reward %r on %s (protocol %s)", reward.name, server.url, PROTOCOL)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
