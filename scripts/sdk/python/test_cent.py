"""Centrifugo's server-API client (cent, unchanged) drives every server API method of
Switchboard; a centrifuge-python client (JSON) is the connected user where one is needed."""

import asyncio
import uuid

import pytest
import requests
from cent import (
    AsyncClient,
    BroadcastRequest,
    CentApiResponseError,
    CentError,
    CentUnauthorizedError,
    ChannelsRequest,
    Client,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centrifuge import ClientState, SubscriptionState

from harness import API_KEY, EVENT_TIMEOUT


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def api(server):
    with Client(server.api_url, API_KEY, timeout=10) as client:
        yield client


@pytest.fixture
async def aapi(server):
    client = AsyncClient(server.api_url, API_KEY, timeout=10)
    yield client
    await client.close()


def history(api, channel, **kwargs):
    return api.history(HistoryRequest(channel=channel, **kwargs))


def test_publish_and_history(api):
    channel = unique("hist")
    results = [api.publish(PublishRequest(channel=channel, data={"n": n})) for n in range(1, 6)]
    assert [r.offset for r in results] == [1, 2, 3, 4, 5], results
    epoch = results[0].epoch
    assert epoch and all(r.epoch == epoch for r in results), results

    def seen(result):
        assert result.epoch == epoch, result
        return [(p.offset, p.data["n"]) for p in result.publications]

    every = history(api, channel, limit=100)
    assert seen(every) == [(n, n) for n in range(1, 6)]
    assert every.offset == 5
    assert seen(history(api, channel, limit=2)) == [(1, 1), (2, 2)]
    assert seen(history(api, channel, limit=2, reverse=True)) == [(5, 5), (4, 4)]
    since = StreamPosition(offset=2, epoch=epoch)
    assert seen(history(api, channel, limit=100, since=since)) == [(3, 3), (4, 4), (5, 5)]
    assert seen(history(api, channel, limit=1, since=since)) == [(3, 3)]
    # Reversed from a position: the ones before it, newest first.
    since4 = StreamPosition(offset=4, epoch=epoch)
    assert seen(history(api, channel, limit=100, since=since4, reverse=True)) == [
        (3, 3), (2, 2), (1, 1),
    ]
    # No limit: only the stream's position.
    top = history(api, channel)
    assert top.publications == [] and (top.offset, top.epoch) == (5, epoch), top


def test_publish_with_idempotency_key_stores_once(api):
    channel = unique("idem")
    first = api.publish(PublishRequest(channel=channel, data={"v": 1}, idempotency_key="k-1"))
    again = api.publish(PublishRequest(channel=channel, data={"v": 1}, idempotency_key="k-1"))
    assert (again.offset, again.epoch) == (first.offset, first.epoch), (first, again)
    stored = history(api, channel, limit=100)
    assert [(p.offset, p.data) for p in stored.publications] == [(first.offset, {"v": 1})]
    # Another key is another publication.
    other = api.publish(PublishRequest(channel=channel, data={"v": 2}, idempotency_key="k-2"))
    assert other.offset == first.offset + 1, other
    assert len(history(api, channel, limit=100).publications) == 2


def test_broadcast_to_several_channels(api):
    channels = [unique("bc-a"), unique("bc-b"), unique("bc-c")]
    api.publish(PublishRequest(channel=channels[1], data={"earlier": True}))
    result = api.broadcast(BroadcastRequest(channels=channels, data={"all": "of you"}))
    assert len(result.responses) == 3, result
    assert all(r.error is None for r in result.responses), result
    assert [r.result.offset for r in result.responses] == [1, 2, 1], result
    for channel in channels:
        pubs = history(api, channel, limit=100).publications
        assert pubs[-1].data == {"all": "of you"}, (channel, pubs)


async def test_server_side_subscribe_and_unsubscribe(json_sdk, aapi):
    channel = unique("pushed")
    client, rec, connected = await json_sdk.connected("carol")
    await aapi.subscribe(SubscribeRequest(user="carol", channel=channel))
    subscribed = await rec.next("subscribed")
    assert subscribed.channel == channel, subscribed

    await aapi.publish(PublishRequest(channel=channel, data={"hello": "carol"}))
    got = await rec.next("publication")
    assert got.channel == channel and got.pub.data == {"hello": "carol"}, got
    # (Presence keyed by client id is checked in test_presence_and_presence_stats.)
    presence = await aapi.presence(PresenceRequest(channel=channel))
    assert [c.user for c in presence.presence.values()] == ["carol"], presence

    await aapi.unsubscribe(UnsubscribeRequest(user="carol", channel=channel))
    gone = await rec.next("unsubscribed")
    assert gone.channel == channel, gone
    await aapi.publish(PublishRequest(channel=channel, data={"too": "late"}))
    await rec.none("publication")
    assert (await aapi.presence(PresenceRequest(channel=channel))).presence == {}


async def test_unsubscribe_a_client_side_subscription(json_sdk, aapi):
    channel = unique("kicked")
    client, _, _ = await json_sdk.connected("dave")
    sub, rec, _ = await json_sdk.subscribed(client, channel)
    await aapi.unsubscribe(UnsubscribeRequest(user="dave", channel=channel))
    gone = await rec.next("unsubscribed")
    assert sub.state == SubscriptionState.UNSUBSCRIBED, (sub.state, gone)
    await aapi.publish(PublishRequest(channel=channel, data={"after": "unsubscribe"}))
    await rec.none("publication")
    stats = await aapi.presence_stats(PresenceStatsRequest(channel=channel))
    assert (stats.num_clients, stats.num_users) == (0, 0), stats
    assert client.state == ClientState.CONNECTED


async def test_disconnect(json_sdk, aapi):
    client, rec, _ = await json_sdk.connected("erin")
    bystander, brec, _ = await json_sdk.connected("frank")
    await aapi.disconnect(DisconnectRequest(user="erin"))

    async def first_teardown():
        done, pending = await asyncio.wait(
            [asyncio.create_task(rec.next(k, EVENT_TIMEOUT + 5))
             for k in ("disconnected", "connecting")],
            timeout=EVENT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED,
        )
        for task in pending:
            task.cancel()
        assert done, f"erin was not disconnected: {dict(rec.seen)}"
        return done.pop().result()

    ctx = await first_teardown()
    # A code the server sent (the SDK's own codes are below 3000).
    assert ctx.code >= 3000, f"not a server disconnect: {ctx}"
    assert bystander.state == ClientState.CONNECTED
    # (connect() itself reported connecting with code 0.)
    assert not brec.seen["disconnected"], brec.seen
    assert [c.code for c in brec.seen["connecting"]] == [0], brec.seen


async def test_presence_and_presence_stats(json_sdk, aapi):
    channel = unique("room")
    ids = {}
    for user, name in (("gina", "g1"), ("gina", "g2"), ("hank", "h1")):
        client, _, ctx = await json_sdk.connected(user, info={"device": name})
        await json_sdk.subscribed(client, channel)
        ids[ctx.client] = (user, {"device": name})

    presence = (await aapi.presence(PresenceRequest(channel=channel))).presence
    assert {k: (v.user, v.conn_info) for k, v in presence.items()} == ids, presence
    assert all(v.client == k for k, v in presence.items()), presence
    stats = await aapi.presence_stats(PresenceStatsRequest(channel=channel))
    assert (stats.num_clients, stats.num_users) == (3, 2), stats

    empty = await aapi.presence_stats(PresenceStatsRequest(channel=unique("nobody")))
    assert (empty.num_clients, empty.num_users) == (0, 0), empty


def test_history_remove(api):
    channel = unique("forget")
    for n in range(3):
        api.publish(PublishRequest(channel=channel, data={"n": n}))
    assert len(history(api, channel, limit=100).publications) == 3
    api.history_remove(HistoryRemoveRequest(channel=channel))
    assert history(api, channel, limit=100).publications == []
    # The channel goes on afterwards.
    api.publish(PublishRequest(channel=channel, data={"n": "new"}))
    assert [p.data for p in history(api, channel, limit=100).publications] == [{"n": "new"}]


async def test_channels(json_sdk, aapi):
    one, two, elsewhere, unwatched = (unique("lobby:"), unique("lobby:"), unique("hall:"),
                                      unique("lobby:"))
    client, _, _ = await json_sdk.connected("ivan")
    other, _, _ = await json_sdk.connected("judy")
    await json_sdk.subscribed(client, one)
    await json_sdk.subscribed(other, one)
    await json_sdk.subscribed(client, two)
    await json_sdk.subscribed(client, elsewhere)
    await aapi.publish(PublishRequest(channel=unwatched, data={"nobody": "here"}))

    every = (await aapi.channels(ChannelsRequest())).channels
    assert {one, two, elsewhere} <= set(every), every
    assert unwatched not in every, every
    assert every[one].num_clients == 2 and every[two].num_clients == 1, every

    lobby = (await aapi.channels(ChannelsRequest(pattern="lobby:*"))).channels
    assert set(lobby) == {one, two}, lobby


async def test_info(json_sdk, aapi):
    client, _, _ = await json_sdk.connected("kate")
    await json_sdk.subscribed(client, unique("info"))
    nodes = (await aapi.info(InfoRequest())).nodes
    assert len(nodes) == 1, nodes
    node = nodes[0]
    assert node.uid and node.name, node
    assert node.num_clients == 1 and node.num_users == 1, node
    assert node.num_channels >= 1 and node.num_subs >= 1, node


def test_api_key_is_required(server, api):
    channel = unique("guarded")
    with Client(server.api_url, "wrong-key", timeout=10) as bad:
        with pytest.raises(CentError) as refused:
            bad.publish(PublishRequest(channel=channel, data={"x": 1}))
    # Centrifugo answers 401 (CentUnauthorizedError); an error answer would do too.
    assert isinstance(refused.value, (CentUnauthorizedError, CentApiResponseError)), refused
    assert history(api, channel, limit=100).publications == []
    # `Authorization: apikey KEY` is accepted too.
    resp = requests.post(
        f"{server.api_url}/publish", json={"channel": channel, "data": {"x": 2}},
        headers={"Authorization": f"apikey {API_KEY}"}, timeout=10,
    )
    assert resp.status_code == 200 and resp.json()["result"]["offset"] == 1, resp.text
