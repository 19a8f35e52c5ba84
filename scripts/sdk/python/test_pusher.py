"""Pusher's Python server library (PyPI `pusher`, unchanged) against Switchboard's Pusher
Channels door: the HTTP API (trigger, trigger_batch, socket_id exclusion, channels_info,
channel_info, users_info, send_to_user) and the signatures it makes (channel and user
authorisations, signed requests: a wrong secret is refused with 401). What the server
delivers is watched by a small WebSocket client (`websockets`) speaking the Pusher
protocol, as pusher-js does on the wire."""

import asyncio
import json
import uuid

import pusher
import pytest
import websockets
from pusher.errors import PusherBadAuth
from pusher.http import GET, Request

from harness import CONFIG, EVENT_TIMEOUT

APP_ID, KEY, SECRET = "42", "test-key", "test-secret"
APP_CONFIG = CONFIG + f"""
[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
"""
USERS = {"1": {"name": "Ann"}, "2": {"name": "Bob"}, "3": {"name": "Cid"}}
SETTLE = 0.7  # seconds "nothing more arrives" is watched for


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def server(server_factory):
    # Public channels of the first app are rooms, open only on a server without tokens.
    return server_factory("memory", config=APP_CONFIG, tokens=False)


def library(server, secret: str = SECRET) -> pusher.Pusher:
    host, port = server.address.rsplit(":", 1)
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=secret, host=host, port=int(port), ssl=False)


@pytest.fixture
def api(server):
    return library(server)


async def call(fn, *args, **kwargs):
    """The library's calls block (requests): run them off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def parsed(data):
    """An event's data as the server sends it: a string of JSON (else the string)."""
    assert isinstance(data, str), f"the server sends data as a string: {data!r}"
    try:
        return json.loads(data)
    except ValueError:
        return data


class Observer:
    """A Pusher protocol client over `websockets`: `frames` holds every message received
    (data left as sent); `next(pred)` waits for the first not yet taken that matches."""

    def __init__(self, server, name: str):
        self.server = server
        self.name = name
        self.frames: list[dict] = []
        self.taken: set[int] = set()
        self.changed = asyncio.Condition()
        self.socket_id = None

    async def connect(self) -> "Observer":
        url = f"ws://{self.server.address}/app/{KEY}?protocol=7&client=python-observer&version=1.0"
        self.ws = await websockets.connect(url, open_timeout=EVENT_TIMEOUT)
        first = json.loads(await asyncio.wait_for(self.ws.recv(), EVENT_TIMEOUT))
        assert first["event"] == "pusher:connection_established", first
        data = json.loads(first["data"]) if isinstance(first["data"], str) else first["data"]
        self.socket_id = data["socket_id"]
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                frame = json.loads(text)
                if frame.get("event") == "pusher:ping":
                    await self.send("pusher:pong", {})
                async with self.changed:
                    self.frames.append(frame)
                    self.changed.notify_all()
        except websockets.ConnectionClosed:
            pass

    async def send(self, event: str, data, channel=None) -> None:
        frame = {"event": event, "data": data}
        if channel is not None:
            frame["channel"] = channel
        await self.ws.send(json.dumps(frame))

    async def next(self, pred, timeout: float = EVENT_TIMEOUT) -> dict:
        def look():
            for i, frame in enumerate(self.frames):
                if i not in self.taken and pred(frame):
                    self.taken.add(i)
                    return frame
            return None

        async def wait():
            async with self.changed:
                while (found := look()) is None:
                    await self.changed.wait()
                return found

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name}: no matching frame in {timeout} s; frames {self.frames}") from None

    async def event(self, channel: str, event: str, timeout: float = EVENT_TIMEOUT) -> dict:
        return await self.next(lambda f: f.get("channel") == channel and f.get("event") == event, timeout)

    def events(self, channel: str, event: str) -> list:
        return [parsed(f.get("data")) for f in self.frames
                if f.get("channel") == channel and f.get("event") == event]

    async def subscribe(self, channel: str, auth=None, channel_data=None) -> dict:
        data = {"channel": channel}
        if auth is not None:
            data["auth"] = auth
        if channel_data is not None:
            data["channel_data"] = channel_data
        await self.send("pusher:subscribe", data)
        return await self.event(channel, "pusher_internal:subscription_succeeded")

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.reader, 10)


@pytest.fixture
async def observers(server):
    """observe(name) -> a connected Observer; all closed after the test."""
    made = []

    async def observe(name: str = "observer") -> Observer:
        observer = await Observer(server, name).connect()
        made.append(observer)
        return observer

    yield observe
    for observer in made:
        try:
            await observer.close()
        except Exception:
            pass


async def subscribed_presence(api, observer: Observer, channel: str, user: str) -> dict:
    """Subscribes `observer` to a presence channel as `user`, signed by the library."""
    signed = api.authenticate(channel, observer.socket_id, {"user_id": user, "user_info": USERS[user]})
    return await observer.subscribe(channel, signed["auth"], signed["channel_data"])


async def test_trigger_reaches_a_subscriber(api, observers):
    channel = unique("py-pub")
    watcher = await observers()
    await watcher.subscribe(channel)
    assert await call(api.trigger, channel, "ev", {"a": 1}) == {}
    frame = await watcher.event(channel, "ev")
    assert parsed(frame["data"]) == {"a": 1}, frame
    # A string that is not JSON arrives as that string.
    await call(api.trigger, channel, "text", "just words")
    frame = await watcher.event(channel, "text")
    assert frame["data"] == "just words", frame
    await asyncio.sleep(SETTLE)
    assert watcher.events(channel, "ev") == [{"a": 1}], "exactly once"


async def test_trigger_to_several_channels(api, observers):
    a, b, c = unique("py-a"), unique("py-b"), unique("py-c")
    watcher = await observers()
    for channel in (a, b, c):
        await watcher.subscribe(channel)
    await call(api.trigger, [a, b], "multi", {"n": 2})
    for channel in (a, b):
        frame = await watcher.event(channel, "multi")
        assert parsed(frame["data"]) == {"n": 2}, frame
    await asyncio.sleep(SETTLE)
    assert watcher.events(c, "multi") == [], "not to the channel it did not name"
    assert (watcher.events(a, "multi"), watcher.events(b, "multi")) == ([{"n": 2}], [{"n": 2}])


async def test_trigger_batch(api, observers):
    a, b = unique("py-batch-a"), unique("py-batch-b")
    watcher = await observers()
    await watcher.subscribe(a)
    await watcher.subscribe(b)
    await call(api.trigger_batch, [
        {"channel": a, "name": "one", "data": {"i": 1}},
        {"channel": b, "name": "two", "data": {"i": 2}},
        {"channel": a, "name": "three", "data": "plain"},
    ])
    assert parsed((await watcher.event(a, "one"))["data"]) == {"i": 1}
    assert parsed((await watcher.event(b, "two"))["data"]) == {"i": 2}
    assert (await watcher.event(a, "three"))["data"] == "plain"
    await asyncio.sleep(SETTLE)
    names = [f["event"] for f in watcher.frames if f.get("channel") == a and not f["event"].startswith("pusher")]
    assert names == ["one", "three"], f"a's events in order, once each: {watcher.frames}"
    assert watcher.events(b, "one") + watcher.events(b, "three") == []


async def test_socket_id_excludes_one_connection(api, observers):
    channel = unique("py-excl")
    alice, bob = await observers("alice"), await observers("bob")
    await alice.subscribe(channel)
    await bob.subscribe(channel)
    await call(api.trigger, channel, "ev", {"n": 1}, socket_id=alice.socket_id)
    assert parsed((await bob.event(channel, "ev"))["data"]) == {"n": 1}
    # Then one to both: once alice has it, she would have had the first one before.
    await call(api.trigger, channel, "after", {})
    await alice.event(channel, "after")
    await bob.event(channel, "after")
    await asyncio.sleep(SETTLE)
    assert alice.events(channel, "ev") == [], "the excluded socket does not get it"
    assert bob.events(channel, "ev") == [{"n": 1}]


async def test_private_channel_with_the_library_signature(api, server, observers):
    channel = unique("private-py")
    member = await observers("member")
    await member.subscribe(channel, api.authenticate(channel, member.socket_id)["auth"])
    # Signed with a wrong secret: a pusher:error, no subscription; the connection stays.
    forger = await observers("forger")
    forged = library(server, "not-the-secret").authenticate(channel, forger.socket_id)
    await forger.send("pusher:subscribe", {"channel": channel, "auth": forged["auth"]})
    error = await forger.next(lambda f: f.get("event") == "pusher:error")
    await call(api.trigger, channel, "ev", {"s": 1})
    assert parsed((await member.event(channel, "ev"))["data"]) == {"s": 1}
    await asyncio.sleep(SETTLE)
    assert [f for f in forger.frames if f.get("channel") == channel] == [], (
        f"nothing of {channel} for a forged signature (error was {error}): {forger.frames}")
    # A signature for another socket is no better.
    thief = await observers("thief")
    await thief.send("pusher:subscribe", {"channel": channel, "auth": api.authenticate(channel, member.socket_id)["auth"]})
    await thief.next(lambda f: f.get("event") == "pusher:error")
    # The refused connections still work.
    public = unique("py-after")
    await forger.subscribe(public)
    await call(api.trigger, public, "ok", {})
    await forger.event(public, "ok")


async def test_presence_members_and_the_read_api(api, observers):
    channel = unique("presence-py")
    ann1, ann2, bob = await observers("ann1"), await observers("ann2"), await observers("bob")
    first = await subscribed_presence(api, ann1, channel, "1")
    presence = parsed(first["data"])["presence"]
    assert presence["count"] == 1 and presence["hash"] == {"1": USERS["1"]}, presence
    await subscribed_presence(api, ann2, channel, "1")  # a second connection of user 1
    last = await subscribed_presence(api, bob, channel, "2")
    presence = parsed(last["data"])["presence"]
    assert presence["count"] == 2, presence
    assert presence["hash"] == {"1": USERS["1"], "2": USERS["2"]}, presence
    assert sorted(presence["ids"]) == ["1", "2"], presence
    added = await ann1.event(channel, "pusher_internal:member_added")
    assert parsed(added["data"]) == {"user_id": "2", "user_info": USERS["2"]}, added
    await asyncio.sleep(SETTLE)
    assert len(ann1.events(channel, "pusher_internal:member_added")) == 1, "user 1's second connection is no new member"

    public = unique("py-public")
    await bob.subscribe(public)
    # channels_info: the presence channels and their user counts.
    info = await call(api.channels_info, "presence-", ["user_count"])
    assert info == {"channels": {channel: {"user_count": 2}}}, info
    every = await call(api.channels_info)
    assert sorted(every["channels"]) == sorted([channel, public]), every
    # channel_info: users and connections.
    one = await call(api.channel_info, channel, ["user_count", "subscription_count"])
    assert one == {"occupied": True, "user_count": 2, "subscription_count": 3}, one
    assert await call(api.channel_info, public, ["subscription_count"]) == {"occupied": True, "subscription_count": 1}
    assert await call(api.channel_info, unique("py-empty")) == {"occupied": False}
    # users_info: each user once.
    users = await call(api.users_info, channel)
    assert sorted(u["id"] for u in users["users"]) == ["1", "2"], users

    # Bob leaves: member_removed, and the counts follow.
    await bob.close()
    removed = await ann1.event(channel, "pusher_internal:member_removed")
    assert parsed(removed["data"])["user_id"] == "2", removed
    one = await call(api.channel_info, channel, ["user_count", "subscription_count"])
    assert one == {"occupied": True, "user_count": 1, "subscription_count": 2}, one
    assert await call(api.users_info, channel) == {"users": [{"id": "1"}]}


async def test_send_to_a_signed_in_user(api, observers):
    user = await observers("cid")
    other = await observers("bob")
    for observer, uid in ((user, "3"), (other, "2")):
        signed = api.authenticate_user(observer.socket_id, {"id": uid, "user_info": USERS[uid]})
        await observer.send("pusher:signin", signed)
        await observer.next(lambda f: f.get("event") == "pusher:signin_success")
        await observer.subscribe(f"#server-to-user-{uid}")
    await call(api.send_to_user, "3", "hello", {"to": "you"})
    frame = await user.event("#server-to-user-3", "hello")
    assert parsed(frame["data"]) == {"to": "you"}, frame
    await asyncio.sleep(SETTLE)
    assert [f for f in other.frames if f.get("event") == "hello"] == [], "only that user"


async def test_a_wrong_secret_is_refused_with_401(server, observers):
    channel = unique("py-forged")
    watcher = await observers()
    await watcher.subscribe(channel)
    forger = library(server, "not-the-secret")
    with pytest.raises(PusherBadAuth):
        await call(forger.trigger, channel, "ev", {"forged": True})
    with pytest.raises(PusherBadAuth):
        await call(forger.channels_info)
    with pytest.raises(PusherBadAuth):
        await call(forger.channel_info, channel)
    await asyncio.sleep(SETTLE)
    assert watcher.events(channel, "ev") == [], "a forged trigger delivers nothing"


async def test_a_get_signed_with_body_md5_is_accepted(api, server):
    # The library signs body_md5 (of the empty body) on GET too; the server takes it.
    request = Request(api._pusher_client, GET, f"/apps/{APP_ID}/channels", {})
    assert request.query_params["body_md5"] == "d41d8cd98f00b204e9800998ecf8427e", request.query_params
    answer = await call(api._pusher_client.http.send_request, request)
    assert answer == {"channels": {}}, answer
