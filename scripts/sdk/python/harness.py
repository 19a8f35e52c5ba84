"""What the SDK tests share: a `switchboard serve` started on a free port and stopped
with SIGTERM (and restarted on the same port), HS256 tokens, the server API over plain
HTTP, and recorders of the events the SDK's handlers are called with."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import jwt
import requests
from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    SubscriptionEventHandler,
)

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("SWITCHBOARD_BIN") or str(ROOT / "target" / "release" / "switchboard")

SECRET = "sdk-test-secret-0123456789abcdef"
API_KEY = "sdk-test-api-key"

# Generous for a slow 2-core machine running a debug build, but bounded.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
EVENT_TIMEOUT = 15.0

# The namespaces the tests use (the contract's examples).
CONFIG = """\
[namespaces.news]
client_publish = false

[namespaces.secret]
subscribe_token = true

[namespaces.ticker]
recover = "latest"
history_size = 10
"""

LISTENING = re.compile(r"listening on http://(\S+)")


class Server:
    """One `switchboard serve`: `start()` waits for "listening on http://", `stop()`
    sends SIGTERM and waits for the exit; `start()` again reuses the port."""

    def __init__(self, workdir: Path, storage: str = "memory", config: str = CONFIG,
                 tokens: bool = True):
        assert storage in ("memory", "sqlite")
        # Without tokens the rooms are open (the Pusher door's public channels are the
        # first app's rooms, which a server that wants tokens does not open to them).
        self.tokens = tokens
        self.workdir = workdir
        self.storage = storage
        self.config_path = workdir / "switchboard.toml"
        self.config_path.write_text(config)
        self.data_dir = workdir / "data"
        self.address: Optional[str] = None  # host:port once started
        self.proc: Optional[subprocess.Popen] = None
        self.lines: list[str] = []  # stderr of every run so far
        self._lock = threading.Lock()

    # --- addresses ---
    @property
    def http_url(self) -> str:
        return f"http://{self.address}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.address}/connection/websocket"

    @property
    def api_url(self) -> str:
        return f"{self.http_url}/api"

    # --- lifecycle ---
    def start(self) -> "Server":
        assert Path(BIN).is_file(), f"no server binary at {BIN} (set SWITCHBOARD_BIN)"
        assert self.proc is None or self.proc.poll() is not None, "already running"
        listen = self.address or "127.0.0.1:0"  # the same port on a restart
        args = [
            BIN, "serve", "--listen", listen,
            "--config", str(self.config_path),
            "--api-key", API_KEY,
            "--drain-timeout", "2",
        ]
        if self.tokens:
            args += ["--jwt-secret", SECRET]
        if self.storage == "memory":
            args.append("--memory")
        else:
            self.data_dir.mkdir(exist_ok=True)
            args += ["--data-dir", str(self.data_dir)]
        env = {**os.environ, "NO_COLOR": "1"}
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, text=True, errors="replace",
        )
        found: dict[str, str] = {}
        ready = threading.Event()
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                line = line.rstrip("\n")
                with self._lock:
                    self.lines.append(line)
                m = LISTENING.search(line)
                if m and not ready.is_set():
                    found["address"] = m.group(1)
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or "address" not in found:
            self._kill()
            raise AssertionError(
                f"serve did not print 'listening on http://' (exit code {proc.poll()}, "
                f"waited at most {START_TIMEOUT} s); stderr:\n{self.log_tail()}"
            )
        address = found["address"]
        if self.address is not None:
            assert address == self.address, f"restarted on {address}, not {self.address}"
        self.address = address
        return self

    def stop(self) -> Optional[int]:
        """SIGTERM; returns the exit code (None if it was not running)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            raise AssertionError(f"serve did not exit within {STOP_TIMEOUT} s of SIGTERM")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 60) -> str:
        with self._lock:
            return "\n".join(self.lines[-n:])

    # --- the server API over plain HTTP (not through `cent`) ---
    def api(self, method: str, body: dict, key: str = API_KEY) -> dict:
        """POST /api/METHOD with X-API-Key; returns `result`, fails on an error."""
        resp = requests.post(
            f"{self.api_url}/{method}", json=body, headers={"X-API-Key": key}, timeout=10
        )
        assert resp.status_code == 200, f"{method} {body}: HTTP {resp.status_code} {resp.text}"
        answer = resp.json()
        assert "error" not in answer or not answer["error"], f"{method} {body}: {answer}"
        assert "result" in answer, f"{method} {body}: no result in {answer}"
        return answer["result"]

    async def api_async(self, method: str, body: dict) -> dict:
        return await asyncio.to_thread(self.api, method, body)


def token(sub: str, ttl: int = 3600, secret: str = SECRET, **claims: Any) -> str:
    """A connection token (HS256): `sub`, `exp`, and any more claims (info, channels)."""
    payload = {"sub": sub, "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def sub_token(sub: str, channel: str, ttl: int = 3600, secret: str = SECRET) -> str:
    """A subscription token (HS256): `sub`, `channel`, `exp`."""
    return jwt.encode(
        {"sub": sub, "channel": channel, "exp": int(time.time()) + ttl}, secret, algorithm="HS256"
    )


def encode(data: Any, protobuf: bool) -> Any:
    """Client-side payloads: JSON values with JSON, bytes (of JSON) with Protobuf."""
    return json.dumps(data).encode() if protobuf else data


def decode(data: Any) -> Any:
    """Publication data / conn_info as the SDK hands it: bytes with Protobuf."""
    if isinstance(data, (bytes, bytearray)):
        return json.loads(data)
    return data


class Recorder:
    """Events by kind, in arrival order; `next` waits (bounded) for the next one."""

    def __init__(self, name: str):
        self.name = name
        self.seen: dict[str, list] = defaultdict(list)
        self._queues: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)

    def push(self, kind: str, ctx: Any) -> None:
        self.seen[kind].append(ctx)
        self._queues[kind].put_nowait(ctx)

    async def next(self, kind: str, timeout: float = EVENT_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self._queues[kind].get(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"{self.name}: no {kind} event within {timeout} s; seen: {dict(self.seen)}"
            ) from None

    async def take(self, kind: str, n: int, timeout: float = EVENT_TIMEOUT) -> list:
        deadline = asyncio.get_running_loop().time() + timeout
        out = []
        for _ in range(n):
            left = deadline - asyncio.get_running_loop().time()
            try:
                out.append(await asyncio.wait_for(self._queues[kind].get(), max(left, 0.01)))
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"{self.name}: {len(out)} of {n} {kind} events within {timeout} s: {out}"
                ) from None
        return out

    async def none(self, kind: str, seconds: float = 1.5) -> None:
        """Asserts that no (further) `kind` event arrives within `seconds`."""
        try:
            ctx = await asyncio.wait_for(self._queues[kind].get(), seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"{self.name}: unexpected {kind} event: {ctx}")

    def pending(self, kind: str) -> int:
        return self._queues[kind].qsize()


_KINDS = ("connecting", "connected", "disconnected", "error", "subscribed", "subscribing",
          "unsubscribed", "publication", "join", "leave")


def _handler_class(base: type) -> type:
    def make(kind: str):
        async def handler(self, ctx):
            self.rec.push(kind, ctx)
        return handler

    attrs = {f"on_{kind}": make(kind) for kind in _KINDS if hasattr(base, f"on_{kind}")}

    def __init__(self, rec: Recorder):
        self.rec = rec

    attrs["__init__"] = __init__
    return type(f"Recording{base.__name__}", (base,), attrs)


RecordingClientEvents = _handler_class(ClientEventHandler)
RecordingSubscriptionEvents = _handler_class(SubscriptionEventHandler)


class Sdk:
    """Makes centrifuge-python clients for one test and disconnects them after it."""

    def __init__(self, server: Server, protobuf: bool = False):
        self.server = server
        self.protobuf = protobuf
        self.clients: list[Client] = []

    def client(
        self, user: str, tok: Optional[str] = None, get_token: Any = None, **claims: Any
    ) -> tuple[Client, Recorder]:
        rec = Recorder(f"client {user}")
        client = Client(
            self.server.ws_url,
            events=RecordingClientEvents(rec),
            get_token=get_token,
            token=tok if tok is not None else token(user, **claims),
            use_protobuf=self.protobuf,
            timeout=10.0,
            proxy=None,
            min_reconnect_delay=0.1,
            max_reconnect_delay=1.0,
        )
        self.clients.append(client)
        return client, rec

    async def connected(
        self, user: str, tok: Optional[str] = None, get_token: Any = None, **claims: Any
    ) -> tuple[Client, Recorder, Any]:
        """A connected client and its `connected` event's context."""
        client, rec = self.client(user, tok=tok, get_token=get_token, **claims)
        await asyncio.wait_for(client.connect(), EVENT_TIMEOUT)
        # connect() itself reports connecting (code 0): not one a test waits for.
        first = await rec.next("connecting")
        assert first.code == 0, first
        ctx = await rec.next("connected")
        assert client.state == ClientState.CONNECTED
        return client, rec, ctx

    async def subscribed(self, client: Client, channel: str, **options: Any):
        """A subscription (recoverable unless told) that has subscribed; returns it, its
        recorder and its `subscribed` event's context."""
        rec = Recorder(f"subscription {channel}")
        options.setdefault("recoverable", True)
        sub = client.new_subscription(channel, events=RecordingSubscriptionEvents(rec), **options)
        await asyncio.wait_for(sub.subscribe(), EVENT_TIMEOUT)
        ctx = await rec.next("subscribed")
        return sub, rec, ctx

    async def close(self) -> None:
        for client in self.clients:
            try:
                await asyncio.wait_for(client.disconnect(), 10)
            except Exception:
                pass
