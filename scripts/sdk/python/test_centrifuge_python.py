"""Centrifugo's Python SDK (centrifuge-python, unchanged) against Switchboard's
centrifuge door, each test with JSON and with Protobuf (`use_protobuf=True`)."""

import asyncio
import uuid

import pytest
from centrifuge import ClientState, ReplyError, SubscriptionState

from harness import (
    EVENT_TIMEOUT,
    Recorder,
    RecordingSubscriptionEvents,
    Sdk,
    decode,
    encode,
    sub_token,
    token,
)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def test_connect_with_jwt(sdk):
    client, rec, ctx = await sdk.connected("alice")
    assert ctx.client, f"connected without a client id: {ctx}"
    assert ctx.version, ctx
    # The server took the user from the token: presence says so.
    channel = unique("lobby")
    sub, _, _ = await sdk.subscribed(client, channel)
    presence = await asyncio.wait_for(sub.presence(), EVENT_TIMEOUT)
    assert [c.user for c in presence.clients.values()] == ["alice"], presence
    stats = await asyncio.wait_for(sub.presence_stats(), EVENT_TIMEOUT)
    assert (stats.num_clients, stats.num_users) == (1, 1), stats


async def test_presence_is_per_connection(sdk):
    # Presence is keyed by client id; each entry has the token's `info` as conn_info.
    channel = unique("lobby")
    expected = {}
    subs = []
    for user, device in (("alice", "laptop"), ("alice", "phone"), ("bob", "desk")):
        client, _, ctx = await sdk.connected(user, info={"device": device})
        sub, _, _ = await sdk.subscribed(client, channel)
        subs.append(sub)
        expected[ctx.client] = (ctx.client, user, {"device": device})
    presence = await asyncio.wait_for(subs[0].presence(), EVENT_TIMEOUT)
    got = {k: (v.client, v.user, decode(v.conn_info)) for k, v in presence.clients.items()}
    assert got == expected, presence
    stats = await asyncio.wait_for(subs[0].presence_stats(), EVENT_TIMEOUT)
    assert (stats.num_clients, stats.num_users) == (3, 2), stats


async def test_connect_with_a_bad_token_is_refused(sdk):
    # Signed with another secret: disconnected for good with 3500 (invalid token).
    client, rec = sdk.client("mallory", tok=token("mallory", secret="not-the-secret-but-as-long-as-one"))
    await asyncio.wait_for(client.connect(), EVENT_TIMEOUT)
    ctx = await rec.next("disconnected")
    assert ctx.code == 3500, ctx
    assert client.state == ClientState.DISCONNECTED
    assert not rec.seen["connected"]


async def test_subscribe_and_publish(sdk, protobuf):
    channel = unique("chat:")
    alice, _, _ = await sdk.connected("alice")
    bob, _, _ = await sdk.connected("bob")
    a_sub, a_rec, a_ctx = await sdk.subscribed(alice, channel)
    b_sub, b_rec, _ = await sdk.subscribed(bob, channel)
    assert a_ctx.channel == channel
    assert a_sub.state == SubscriptionState.SUBSCRIBED

    await asyncio.wait_for(a_sub.publish(encode({"text": "hello"}, protobuf)), EVENT_TIMEOUT)
    await asyncio.wait_for(b_sub.publish(encode({"text": "hi alice"}, protobuf)), EVENT_TIMEOUT)

    for rec in (a_rec, b_rec):
        first, second = await rec.take("publication", 2)
        assert (first.pub.offset, decode(first.pub.data)) == (1, {"text": "hello"}), first
        assert (second.pub.offset, decode(second.pub.data)) == (2, {"text": "hi alice"}), second
        assert first.pub.info is not None and first.pub.info.user == "alice", first
        assert second.pub.info is not None and second.pub.info.user == "bob", second
        await rec.none("publication", 0.5)

    # The client's history has both, in order.
    history = await asyncio.wait_for(a_sub.history(limit=10), EVENT_TIMEOUT)
    assert [(p.offset, decode(p.data)) for p in history.publications] == [
        (1, {"text": "hello"}), (2, {"text": "hi alice"}),
    ], history
    assert history.offset == 2 and history.epoch, history


async def test_publication_info_names_the_publishing_connection(sdk, protobuf):
    # info in a publication is the publisher's ClientInfo: its client id, its user,
    # and its token's `info` as conn_info (live and in history alike).
    channel = unique("signed")
    alice, _, alice_ctx = await sdk.connected("alice", info={"name": "Alice"})
    sub, rec, _ = await sdk.subscribed(alice, channel)
    await asyncio.wait_for(sub.publish(encode({"text": "mine"}, protobuf)), EVENT_TIMEOUT)
    (got,) = await rec.take("publication", 1)
    history = await asyncio.wait_for(sub.history(limit=10), EVENT_TIMEOUT)
    for pub in (got.pub, history.publications[0]):
        assert pub.info is not None, pub
        assert pub.info.user == "alice", pub
        assert pub.info.client == alice_ctx.client, pub
        assert decode(pub.info.conn_info) == {"name": "Alice"}, pub


async def test_recovery_after_going_away(sdk, server):
    channel = unique("feed")
    client, crec, _ = await sdk.connected("alice")
    sub, rec, ctx = await sdk.subscribed(client, channel)
    assert ctx.recoverable, f"the subscription is not recoverable: {ctx}"
    assert not ctx.was_recovering
    server.api("publish", {"channel": channel, "data": {"n": -1}})
    (before,) = await rec.take("publication", 1)
    assert before.pub.offset == 1

    # Away: the SDK keeps the subscription (subscribing) and its position.
    await asyncio.wait_for(client.disconnect(), EVENT_TIMEOUT)
    assert sub.state == SubscriptionState.SUBSCRIBING
    for n in range(20):
        result = await server.api_async("publish", {"channel": channel, "data": {"n": n}})
        assert result.get("offset") == n + 2, result

    # Back: the SDK resubscribes from where it was and gets exactly the 20.
    await asyncio.wait_for(client.connect(), EVENT_TIMEOUT)
    back = await rec.next("subscribed")
    assert back.was_recovering, back
    assert back.recovered, back
    missed = await rec.take("publication", 20)
    assert [m.pub.offset for m in missed] == list(range(2, 22))
    assert [decode(m.pub.data) for m in missed] == [{"n": n} for n in range(20)]
    await rec.none("publication")

    # Live again after the recovery.
    server.api("publish", {"channel": channel, "data": {"n": 20}})
    (live,) = await rec.take("publication", 1)
    assert (live.pub.offset, decode(live.pub.data)) == (22, {"n": 20})


async def _restart_scenario(server_factory, protobuf, storage):
    """Subscribed, 3 received; SIGTERM (the client is told 3001 shutdown); the client
    goes away; the server comes back on the same port; 20 published; the client comes
    back. Returns the first and the returning subscribed events, the recorder and the
    offsets the 20 publishes were given."""
    server = server_factory(storage)
    sdk = Sdk(server, protobuf=protobuf)
    try:
        channel = unique("restart")
        client, crec, _ = await sdk.connected("alice")
        sub, rec, first = await sdk.subscribed(client, channel)
        for n in range(3):
            server.api("publish", {"channel": channel, "data": {"before": n}})
        assert [m.pub.offset for m in await rec.take("publication", 3)] == [1, 2, 3]

        stop_task = asyncio.create_task(asyncio.to_thread(server.stop))
        going = await crec.next("connecting")
        assert going.code == 3001, f"not a shutdown disconnect: {going}"
        assert not crec.seen["disconnected"], "3001 must not stop the client for good"
        await asyncio.wait_for(client.disconnect(), EVENT_TIMEOUT)
        assert sub.state == SubscriptionState.SUBSCRIBING
        code = await asyncio.wait_for(stop_task, 30)
        assert code == 0, f"serve exited with {code} on SIGTERM"

        await asyncio.to_thread(server.start)
        offsets = []
        for n in range(20):
            result = await server.api_async("publish", {"channel": channel, "data": {"n": n}})
            offsets.append(result.get("offset"))
        await asyncio.wait_for(client.connect(), EVENT_TIMEOUT)
        back = await rec.next("subscribed")
        return first, back, rec, offsets
    finally:
        await sdk.close()


async def test_recovery_across_a_restart_with_sqlite(server_factory, protobuf):
    first, back, rec, offsets = await _restart_scenario(server_factory, protobuf, "sqlite")
    assert offsets == list(range(4, 24)), f"offsets go on after a restart: {offsets}"
    assert back.stream_position.epoch == first.stream_position.epoch, (first, back)
    assert back.was_recovering and back.recovered, back
    missed = await rec.take("publication", 20)
    assert [m.pub.offset for m in missed] == list(range(4, 24))
    assert [decode(m.pub.data) for m in missed] == [{"n": n} for n in range(20)]
    await rec.none("publication")


async def test_no_recovery_across_a_restart_in_memory(server_factory, protobuf):
    first, back, rec, _ = await _restart_scenario(server_factory, protobuf, "memory")
    # The epoch changed: the SDK tried, the server says it could not.
    assert back.stream_position.epoch != first.stream_position.epoch, (first, back)
    assert back.was_recovering, back
    assert not back.recovered, back


async def test_client_publish_denied_where_not_allowed(sdk, protobuf, server):
    channel = unique("news:")
    client, _, _ = await sdk.connected("alice")
    sub, rec, _ = await sdk.subscribed(client, channel)
    with pytest.raises(ReplyError) as denied:
        await asyncio.wait_for(sub.publish(encode({"text": "no"}, protobuf)), EVENT_TIMEOUT)
    assert denied.value.code == 103, denied.value
    # The server API may publish there.
    server.api("publish", {"channel": channel, "data": {"text": "yes"}})
    (got,) = await rec.take("publication", 1)
    assert (got.pub.offset, decode(got.pub.data)) == (1, {"text": "yes"})
    assert sub.state == SubscriptionState.SUBSCRIBED


async def test_subscription_token(sdk):
    client, _, _ = await sdk.connected("alice")
    # Without a token: 103, unsubscribed for good.
    denied_channel = unique("secret:")
    rec = Recorder("no-token subscription")
    denied = client.new_subscription(denied_channel, events=RecordingSubscriptionEvents(rec))
    await asyncio.wait_for(denied.subscribe(), EVENT_TIMEOUT)
    gone = await rec.next("unsubscribed")
    assert gone.code == 103, gone
    assert denied.state == SubscriptionState.UNSUBSCRIBED

    # A token for another channel: 103 too.
    other = unique("secret:")
    wrong = Recorder("wrong-token subscription")
    wrong_sub = client.new_subscription(
        other, events=RecordingSubscriptionEvents(wrong), token=sub_token("alice", denied_channel)
    )
    await asyncio.wait_for(wrong_sub.subscribe(), EVENT_TIMEOUT)
    assert (await wrong.next("unsubscribed")).code == 103
    assert wrong_sub.state == SubscriptionState.UNSUBSCRIBED

    # With its token: subscribed.
    allowed = unique("secret:")
    sub, _, ctx = await sdk.subscribed(client, allowed, token=sub_token("alice", allowed))
    assert ctx.channel == allowed
    assert sub.state == SubscriptionState.SUBSCRIBED


async def test_server_side_subscriptions_from_the_token(sdk, server):
    channel = unique("personal:")
    client, rec, _ = await sdk.connected("alice", channels=[channel])
    subscribed = await rec.next("subscribed")
    assert subscribed.channel == channel, subscribed
    server.api("publish", {"channel": channel, "data": {"for": "alice"}})
    got = await rec.next("publication")
    assert got.channel == channel
    assert (got.pub.offset, decode(got.pub.data)) == (1, {"for": "alice"})


async def test_join_and_leave(sdk):
    channel = unique("party")
    alice, _, _ = await sdk.connected("alice")
    bob, _, bob_ctx = await sdk.connected("bob", info={"hat": "red"})
    _, rec, _ = await sdk.subscribed(alice, channel, join_leave=True)
    bob_sub, _, _ = await sdk.subscribed(bob, channel)
    joined = await rec.next("join")
    assert (joined.info.user, joined.info.client) == ("bob", bob_ctx.client), joined
    assert decode(joined.info.conn_info) == {"hat": "red"}, joined
    await asyncio.wait_for(bob_sub.unsubscribe(), EVENT_TIMEOUT)
    left = await rec.next("leave")
    # A leave names the user: its connection is gone (docs/PROTOCOL.md).
    assert left.info.user == "bob", left


async def test_latest_publication_for_a_new_subscriber(sdk, server):
    # recover = "latest": a new subscriber is sent the latest publication only.
    channel = unique("ticker:")
    for n in range(3):
        server.api("publish", {"channel": channel, "data": {"price": n}})
    client, _, _ = await sdk.connected("alice")
    _, rec, ctx = await sdk.subscribed(client, channel)
    (latest,) = await rec.take("publication", 1)
    assert (latest.pub.offset, decode(latest.pub.data)) == (3, {"price": 2}), latest
    await rec.none("publication")


async def test_expired_token_is_replaced_through_get_token(sdk):
    # An expired token: the server answers 109, the SDK asks get_token and connects.
    calls = []

    async def get_token():
        calls.append(1)
        return token("alice")

    client, rec, ctx = await sdk.connected("alice", tok=token("alice", ttl=-60),
                                           get_token=get_token)
    assert ctx.client and len(calls) == 1, (ctx, calls)
    errors = rec.seen["error"]
    assert any(getattr(e.error, "code", None) == 109 for e in errors), errors


async def test_connection_token_refresh(sdk, server):
    # A token that lives 3 s: the SDK refreshes it (refresh command) and stays connected.
    calls = []

    async def get_token():
        calls.append(1)
        return token("alice", ttl=3)

    client, rec, _ = await sdk.connected("alice", tok=token("alice", ttl=3),
                                         get_token=get_token)
    channel = unique("fresh")
    sub, srec, _ = await sdk.subscribed(client, channel)
    deadline = asyncio.get_running_loop().time() + 20
    while len(calls) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert len(calls) >= 2, f"refreshed {len(calls)} times in 20 s; events: {dict(rec.seen)}"
    await asyncio.sleep(2)  # past the first token's expiry
    assert client.state == ClientState.CONNECTED, dict(rec.seen)
    assert [c.code for c in rec.seen["connecting"]] == [0], dict(rec.seen)
    assert not rec.seen["disconnected"] and not rec.seen["error"], dict(rec.seen)
    server.api("publish", {"channel": channel, "data": {"still": "here"}})
    (got,) = await srec.take("publication", 1)
    assert decode(got.pub.data) == {"still": "here"}


async def test_room_protocol_publications_reach_the_sdk(sdk, server):
    # The project's own room protocol and the centrifuge door share channels and ids.
    import json

    import websockets

    channel = unique("shared")
    client, _, _ = await sdk.connected("alice")
    _, rec, _ = await sdk.subscribed(client, channel)
    url = f"ws://{server.address}/room/{channel}?token={token('bob')}"
    async with websockets.connect(url, proxy=None) as room:
        await room.send(json.dumps({"type": "message", "text": "from the room"}))
        (got,) = await rec.take("publication", 1)
        assert (got.pub.offset, decode(got.pub.data)) == (1, {"text": "from the room"}), got
        assert got.pub.info is not None and got.pub.info.user == "bob", got
        # And the other way: the SDK's publication reaches the room with the next id.
        await asyncio.wait_for(client.publish(channel, encode({"text": "from the sdk"},
                                                              sdk.protobuf)), EVENT_TIMEOUT)
        deadline = asyncio.get_running_loop().time() + EVENT_TIMEOUT
        seen = []
        while asyncio.get_running_loop().time() < deadline:
            event = json.loads(await asyncio.wait_for(room.recv(), EVENT_TIMEOUT))
            seen.append(event)
            if event.get("type") == "message" and event.get("id") == 2:
                break
        mine = [e for e in seen if e.get("type") == "message" and e.get("id") == 2]
        assert mine and mine[0].get("from") == "alice", seen
        assert mine[0].get("text") == "from the sdk" or mine[0].get("data") == {
            "text": "from the sdk"}, seen
