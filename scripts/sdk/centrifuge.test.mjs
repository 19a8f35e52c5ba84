// Centrifugo's official JavaScript SDK (npm `centrifuge`, unchanged) in Node against
// Switchboard's centrifuge door: every case runs with the JSON build and again with the
// Protobuf build. Each test starts its own server(s) on free ports and stops them.
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard) and redis-server (case 12).

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Centrifuge as CentrifugeJson } from 'centrifuge';
import { Centrifuge as CentrifugeProtobuf } from 'centrifuge/build/protobuf';
import {
  RoomClient, api, apiRaw, cleanup, connectionToken, eventually, nextEvent, sleep, startRedis,
  startRelay, startServer, tempDir, unique,
} from './lib.mjs';

const TIMEOUT = { timeout: 180000 };
/** How long "nothing more arrives" is watched after the expected publications came. */
const SETTLE_MS = 700;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

const BUILDS = [
  { name: 'json', Centrifuge: CentrifugeJson, protobuf: false },
  { name: 'protobuf', Centrifuge: CentrifugeProtobuf, protobuf: true },
];

/** Publication data and conn_info are JSON in the JSON build, bytes of JSON in Protobuf. */
function codec(build) {
  return {
    enc: (value) => (build.protobuf ? encoder.encode(JSON.stringify(value)) : value),
    dec: (data) => {
      if (!build.protobuf) return data;
      if (data === undefined || data === null || data.length === 0) return undefined;
      return JSON.parse(decoder.decode(data));
    },
  };
}

/** An offset as a number (a Long from Protobuf where the SDK passes one through). */
function num(offset) {
  if (offset === undefined || offset === null) return 0;
  if (typeof offset === 'object' && typeof offset.low === 'number') {
    return (offset.high >>> 0) * 4294967296 + (offset.low >>> 0);
  }
  return Number(offset);
}

const CLIENT_EVENTS = ['connecting', 'connected', 'disconnected', 'subscribed', 'subscribing',
  'unsubscribed', 'publication', 'join', 'leave', 'error'];

/** A Centrifuge client of `build` over `ws`, recording its events; disconnected at the end. */
function newClient(build, url, { defer, token, ...options } = {}) {
  const { dec } = codec(build);
  const client = new build.Centrifuge(url, {
    websocket: WebSocket,
    token,
    timeout: 10000,
    minReconnectDelay: 100,
    maxReconnectDelay: 1000,
    ...options,
  });
  client.log = [];
  client.pubs = [];
  for (const event of CLIENT_EVENTS) {
    client.on(event, (ctx) => client.log.push({ event, ...ctx }));
  }
  client.on('publication', (ctx) =>
    client.pubs.push({ channel: ctx.channel, offset: num(ctx.offset), data: dec(ctx.data), info: ctx.info }));
  if (defer) defer(() => client.disconnect());
  return client;
}

async function connect(build, url, options) {
  const client = newClient(build, url, options);
  const connected = nextEvent(client, 'connected');
  client.connect();
  client.connectedCtx = await connected;
  return client;
}

/** A subscription recording its publications (offset as a number, data decoded) and events. */
async function subscribe(build, client, channel, options = {}, { wait = true } = {}) {
  const { dec } = codec(build);
  const sub = client.newSubscription(channel, options);
  sub.pubs = [];
  sub.subscribedEvents = [];
  sub.errors = [];
  sub.joins = [];
  sub.leaves = [];
  sub.on('publication', (ctx) =>
    sub.pubs.push({ channel: ctx.channel, offset: num(ctx.offset), data: dec(ctx.data), info: ctx.info }));
  sub.on('subscribed', (ctx) => sub.subscribedEvents.push(ctx));
  sub.on('error', (ctx) => sub.errors.push(ctx));
  sub.on('join', (ctx) => sub.joins.push(ctx));
  sub.on('leave', (ctx) => sub.leaves.push(ctx));
  sub.subscribe();
  if (wait) await sub.ready(15000);
  return sub;
}

/** Waits for `n` entries in `list`, then a little longer to see that no more come. */
async function exactly(what, list, n) {
  await eventually(`${what}: ${n} publications (have ${list.length})`, () => list.length >= n, 30000);
  await sleep(SETTLE_MS);
  assert.equal(list.length, n, `${what}: exactly ${n}, got ${JSON.stringify(list.map((p) => p.offset))}`);
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Publishes `count` publications `{n, tag}` through the server API; returns their results. */
async function publishMany(server, channel, tag, count, first = 1) {
  const results = [];
  for (let n = first; n < first + count; n++) {
    results.push(await api(server, 'publish', { channel, data: { n, tag } }));
  }
  return results;
}

/**
 * Drops `client`'s transport by cutting the relay it goes through, runs `whileAway`, and
 * lets it back: resolves with the `subscribed` event of `sub` after it came back.
 */
async function awayAndBack(client, sub, relay, whileAway) {
  const before = sub.subscribedEvents.length;
  const connecting = nextEvent(client, 'connecting');
  relay.block();
  const ctx = await connecting;
  assert.equal(ctx.code, 1, `connecting because the transport closed: ${JSON.stringify(ctx)}`);
  await eventually('the subscription is subscribing', () => sub.state === 'subscribing');
  await whileAway();
  relay.unblock();
  await eventually('subscribed again', () => sub.subscribedEvents.length > before, 30000);
  return sub.subscribedEvents[before];
}

function assertRecoveredExactly(what, pubs, expectedOffsets, tag) {
  assert.deepEqual(pubs.map((p) => p.offset), expectedOffsets, `${what}: offsets`);
  assert.deepEqual(pubs.map((p) => p.data),
    expectedOffsets.map((_, i) => ({ n: i + 1, tag })), `${what}: data in order`);
}

/**
 * SIGTERMs `server` under `client`: the client must be told 3001 (shutdown, reconnect
 * advised); the relay then holds it off until the test lets it through. Resolves once
 * the server has exited.
 */
async function shutdownUnder(client, server, relay) {
  const shutdown = nextEvent(client, 'connecting');
  const stopping = server.stop();
  const ctx = await shutdown;
  relay.block();
  assert.equal(ctx.code, 3001, `shutdown disconnect: ${JSON.stringify(ctx)}`);
  await stopping;
}

for (const build of BUILDS) {
  const { enc, dec } = codec(build);

  describe(`centrifuge-js ${build.name} in Node`, () => {
    test(`1 ${build.name}: connect with a JWT; a bad token is refused with 3500`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const alice = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      assert.equal(typeof alice.connectedCtx.client, 'string');
      assert.ok(alice.connectedCtx.client.length > 0, 'a client id');
      assert.equal(alice.connectedCtx.transport, 'websocket');
      assert.equal(alice.state, 'connected');
      const bob = await connect(build, server.wsUrl, { defer, token: connectionToken('bob') });
      assert.notEqual(bob.connectedCtx.client, alice.connectedCtx.client, 'each connection its own id');

      // A token signed with another secret: disconnected for good with 3500.
      const mallory = newClient(build, server.wsUrl, { defer, token: connectionToken('mallory', {}, 'not-the-secret') });
      const disconnected = nextEvent(mallory, 'disconnected');
      mallory.connect();
      const ctx = await disconnected;
      assert.equal(ctx.code, 3500, `invalid token: ${JSON.stringify(ctx)}`);
      assert.equal(mallory.state, 'disconnected');
      assert.ok(!mallory.log.some((e) => e.event === 'connected'), 'never connected');
    });

    test(`2 ${build.name}: three channels on one connection, client and API publishes`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const client = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const channels = [unique('three-a'), unique('three-b'), unique('three-c')];
      const subs = [];
      for (const channel of channels) subs.push(await subscribe(build, client, channel));

      const expected = channels.map(() => []);
      for (let round = 1; round <= 2; round++) {
        for (const [i, channel] of channels.entries()) {
          const fromClient = { from: 'client', channel, round };
          await subs[i].publish(enc(fromClient));
          expected[i].push({ data: fromClient, user: 'alice' });
          const fromApi = { from: 'api', channel, round };
          const result = await api(server, 'publish', { channel, data: fromApi });
          expected[i].push({ data: fromApi, user: undefined, offset: num(result.offset), epoch: result.epoch });
        }
      }
      for (const [i, sub] of subs.entries()) {
        await exactly(channels[i], sub.pubs, expected[i].length);
        assert.deepEqual(sub.pubs.map((p) => p.data), expected[i].map((e) => e.data), `${channels[i]}: its own, in order`);
        assert.deepEqual(sub.pubs.map((p) => p.offset), [1, 2, 3, 4], `${channels[i]}: offsets 1, 2, 3, 4`);
        assert.ok(sub.pubs.every((p) => p.channel === channels[i]));
        for (const [k, e] of expected[i].entries()) {
          if (e.offset !== undefined) assert.equal(sub.pubs[k].offset, e.offset, 'the API result names the offset');
          assert.equal(sub.pubs[k].info?.user, e.user, `publisher of ${JSON.stringify(e.data)}`);
        }
        const epochs = new Set(expected[i].filter((e) => e.epoch).map((e) => e.epoch));
        assert.equal(epochs.size, 1, 'one epoch per channel');
        assert.ok([...epochs][0], 'a non-empty epoch');
      }
      assert.deepEqual(client.pubs, [], 'no client-level publications for client-side subscriptions');
    });

    test(`2b ${build.name}: a client publication's info: the publisher's user, client id and conn_info`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('pubinfo');
      const alice = await connect(build, server.wsUrl, { defer, token: connectionToken('alice', { info: { name: 'Alice' } }) });
      const bob = await connect(build, server.wsUrl, { defer, token: connectionToken('bob') });
      const watching = await subscribe(build, bob, channel);
      const sub = await subscribe(build, alice, channel);
      await sub.publish(enc({ text: 'hi' }));
      await exactly(channel, watching.pubs, 1);
      const { info } = watching.pubs[0];
      const { publications } = await sub.history({ limit: 10 });
      for (const [where, got] of [['live', info], ['history', publications[0].info]]) {
        assert.equal(got?.user, 'alice', `${where}: ${JSON.stringify(got)}`);
        assert.equal(got?.client, alice.connectedCtx.client, `${where}: info.client`);
        assert.deepEqual(dec(got?.connInfo), { name: 'Alice' }, `${where}: info.conn_info from the token`);
      }
    });

    /** alice twice (two connections), bob once, all in `channel`; `sub` is alice's first. */
    async function threeInPresence(t) {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('members');
      const alice1 = await connect(build, server.wsUrl, { defer, token: connectionToken('alice', { info: { name: 'Alice' } }) });
      const alice2 = await connect(build, server.wsUrl, { defer, token: connectionToken('alice', { info: { name: 'Alice' } }) });
      const bob = await connect(build, server.wsUrl, { defer, token: connectionToken('bob', { info: { name: 'Bob' } }) });
      const sub = await subscribe(build, alice1, channel);
      await subscribe(build, alice2, channel);
      await subscribe(build, bob, channel);
      return { server, channel, alice1, alice2, bob, sub };
    }

    test(`3 ${build.name}: presence and presence_stats list the connected users`, TIMEOUT, async (t) => {
      const { server, channel, bob, sub } = await threeInPresence(t);
      const users = (clients) => [...new Set(Object.values(clients).map((c) => c.user))].sort();
      assert.deepEqual(users((await sub.presence()).clients), ['alice', 'bob']);
      assert.equal((await sub.presenceStats()).numUsers, 2);
      assert.deepEqual(users((await api(server, 'presence', { channel })).presence), ['alice', 'bob'], 'the server API agrees');
      assert.equal((await api(server, 'presence_stats', { channel })).num_users, 2);

      bob.disconnect();
      await eventually('bob gone from presence', async () => (await sub.presenceStats()).numUsers === 1);
      assert.deepEqual(users((await sub.presence()).clients), ['alice']);
    });

    test(`3b ${build.name}: presence is per connection: client ids, conn_info, num_clients`, TIMEOUT, async (t) => {
      const { alice1, alice2, bob, sub } = await threeInPresence(t);
      const { clients } = await sub.presence();
      const ids = [alice1, alice2, bob].map((c) => c.connectedCtx.client);
      assert.deepEqual(Object.keys(clients).sort(), [...ids].sort(),
        `presence is keyed by client id, one entry per connection: ${JSON.stringify(clients)}`);
      for (const [client, user, name] of [[alice1, 'alice', 'Alice'], [alice2, 'alice', 'Alice'], [bob, 'bob', 'Bob']]) {
        const entry = clients[client.connectedCtx.client];
        assert.equal(entry.client, client.connectedCtx.client);
        assert.equal(entry.user, user);
        assert.deepEqual(dec(entry.connInfo), { name }, 'conn_info from the token');
      }
      assert.deepEqual(await sub.presenceStats(), { numClients: 3, numUsers: 2 });
      alice2.disconnect();
      await eventually('one connection of alice gone', async () => (await sub.presenceStats()).numClients === 2);
      assert.deepEqual(await sub.presenceStats(), { numClients: 2, numUsers: 2 });
    });

    test(`4 ${build.name}: history with limit, since and reverse`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('history');
      const published = await publishMany(server, channel, 'h', 10);
      const epoch = published[0].epoch;
      assert.deepEqual(published.map((r) => num(r.offset)), range(1, 10), 'API publish results: offsets 1..10');
      const client = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      const offsets = (result) => result.publications.map((p) => num(p.offset));

      const position = await sub.history({});
      assert.deepEqual(position.publications, [], 'no limit: only the stream position');
      assert.equal(num(position.offset), 10);
      assert.equal(position.epoch, epoch);

      const first = await sub.history({ limit: 3 });
      assert.deepEqual(offsets(first), [1, 2, 3], 'limit 3: the oldest three');
      assert.deepEqual(first.publications.map((p) => dec(p.data)), [1, 2, 3].map((n) => ({ n, tag: 'h' })));
      assert.equal(num(first.offset), 10);
      assert.equal(first.epoch, epoch);

      const all = await sub.history({ limit: 100 });
      assert.deepEqual(offsets(all), range(1, 10));

      const latest = await sub.history({ limit: 3, reverse: true });
      assert.deepEqual(offsets(latest), [10, 9, 8], 'reverse: the newest first');
      assert.deepEqual(latest.publications.map((p) => dec(p.data).n), [10, 9, 8]);

      const since = await sub.history({ since: { offset: 4, epoch }, limit: 3 });
      assert.deepEqual(offsets(since), [5, 6, 7], 'since 4: the three after it');
      const sinceAll = await sub.history({ since: { offset: 7, epoch }, limit: 100 });
      assert.deepEqual(offsets(sinceAll), [8, 9, 10]);
      const sinceTop = await sub.history({ since: { offset: 10, epoch }, limit: 100 });
      assert.deepEqual(offsets(sinceTop), [], 'nothing after the top');

      const before = await sub.history({ since: { offset: 8, epoch }, limit: 3, reverse: true });
      assert.deepEqual(offsets(before), [7, 6, 5], 'since 8 reversed: the three before it');

      // The history API of the server agrees.
      const fromApi = await api(server, 'history', { channel, limit: 2, since: { offset: 2, epoch } });
      assert.deepEqual(fromApi.publications.map((p) => num(p.offset)), [3, 4]);
      assert.deepEqual(fromApi.publications.map((p) => p.data), [{ n: 3, tag: 'h' }, { n: 4, tag: 'h' }]);
    });

    test(`5 ${build.name}: join and leave pushes (joinLeave: true)`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('joinleave');
      const alice = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const watching = await subscribe(build, alice, channel, { joinLeave: true });
      const carol = await connect(build, server.wsUrl, { defer, token: connectionToken('carol') });
      const notAsking = await subscribe(build, carol, channel);

      const bob = await connect(build, server.wsUrl, { defer, token: connectionToken('bob', { info: { name: 'Bob' } }) });
      const isBob = (ctx) => ctx.info?.user === 'bob';
      let joined = nextEvent(watching, 'join', isBob);
      const bobSub = await subscribe(build, bob, channel);
      let ctx = await joined;
      assert.equal(ctx.channel, channel);

      let left = nextEvent(watching, 'leave', isBob);
      bobSub.unsubscribe();
      ctx = await left;
      assert.equal(ctx.channel, channel);

      joined = nextEvent(watching, 'join', isBob);
      bobSub.subscribe();
      await joined;
      left = nextEvent(watching, 'leave', isBob);
      bob.disconnect();
      await left; // a disconnect is a leave too

      await sleep(SETTLE_MS);
      assert.equal(watching.joins.filter(isBob).length, 2, 'two joins of bob');
      assert.equal(watching.leaves.filter(isBob).length, 2, 'two leaves of bob');
      assert.deepEqual([...notAsking.joins, ...notAsking.leaves], [],
        'a subscription without joinLeave gets no join/leave pushes');
    });

    // A join names the connection (it is this door's, on this node); a leave, whose
    // connection is gone, names the user (docs/PROTOCOL.md).
    test(`5b ${build.name}: a join names the client id and its conn_info, a leave the user`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('joinleave');
      const alice = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const watching = await subscribe(build, alice, channel, { joinLeave: true });
      const bob = await connect(build, server.wsUrl, { defer, token: connectionToken('bob', { info: { name: 'Bob' } }) });
      const bobId = bob.connectedCtx.client;
      const isBob = (ctx) => ctx.info?.user === 'bob';
      const joined = nextEvent(watching, 'join', isBob);
      await subscribe(build, bob, channel);
      let ctx = await joined;
      assert.equal(ctx.info.client, bobId, `join: the client id: ${JSON.stringify(ctx)}`);
      assert.deepEqual(dec(ctx.info.connInfo), { name: 'Bob' }, 'join: conn_info from the token');
      const left = nextEvent(watching, 'leave', isBob);
      bob.disconnect();
      ctx = await left;
      assert.equal(ctx.info.user, 'bob', `leave: the user: ${JSON.stringify(ctx)}`);
    });

    test(`6 ${build.name}: client publish in a client_publish = false namespace: error 103`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('news:sdk');
      const client = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      await assert.rejects(sub.publish(enc({ text: 'not allowed' })), (error) => {
        assert.equal(error.code, 103, `permission denied: ${JSON.stringify(error)}`);
        return true;
      });
      await assert.rejects(client.publish(unique('news:other'), enc({ text: 'nor here' })), (error) => {
        assert.equal(error.code, 103);
        return true;
      });
      assert.equal(client.state, 'connected', 'the connection stays');
      assert.equal(sub.state, 'subscribed');
      // The server API may publish there; the refused publication was not stored.
      const result = await api(server, 'publish', { channel, data: { text: 'from the newsroom' } });
      assert.equal(num(result.offset), 1);
      await exactly(channel, sub.pubs, 1);
      assert.deepEqual(sub.pubs[0].data, { text: 'from the newsroom' });
      assert.equal(sub.pubs[0].offset, 1);
      // The default namespace allows it.
      const open = await subscribe(build, client, unique('open'));
      await open.publish(enc({ text: 'fine' }));
      await exactly('default namespace', open.pubs, 1);
    });

    test(`7 ${build.name}: a server-side subscription from the token's channels claim`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('personal');
      const client = newClient(build, server.wsUrl, { defer, token: connectionToken('alice', { channels: [channel] }) });
      const subscribed = nextEvent(client, 'subscribed', (ctx) => ctx.channel === channel);
      const connected = nextEvent(client, 'connected');
      client.connect();
      const clientId = (await connected).client;
      const ctx = await subscribed;
      assert.equal(ctx.channel, channel);
      assert.equal(ctx.wasRecovering, false);

      for (let n = 1; n <= 3; n++) await api(server, 'publish', { channel, data: { n } });
      await exactly('client-level publications', client.pubs, 3);
      assert.deepEqual(client.pubs.map((p) => p.channel), [channel, channel, channel]);
      assert.deepEqual(client.pubs.map((p) => p.data), [{ n: 1 }, { n: 2 }, { n: 3 }]);
      assert.deepEqual(client.pubs.map((p) => p.offset), [1, 2, 3]);
      // The server knows it is subscribed.
      const presence = await api(server, 'presence', { channel });
      assert.deepEqual(Object.values(presence.presence).map((c) => c.user), ['alice']);
      assert.ok(clientId);
    });

    test(`7b ${build.name}: server API subscribe and unsubscribe of a connected user`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('pushed');
      const client = await connect(build, server.wsUrl, { defer, token: connectionToken('alice') });
      const subscribed = nextEvent(client, 'subscribed', (ctx) => ctx.channel === channel);
      await api(server, 'subscribe', { user: 'alice', channel });
      await subscribed;
      await api(server, 'publish', { channel, data: { hello: 'alice' } });
      await exactly('client-level publication', client.pubs, 1);
      assert.deepEqual(client.pubs[0], { channel, offset: 1, data: { hello: 'alice' }, info: undefined });
      const unsubscribed = nextEvent(client, 'unsubscribed', (ctx) => ctx.channel === channel);
      await api(server, 'unsubscribe', { user: 'alice', channel });
      await unsubscribed;
      await api(server, 'publish', { channel, data: { hello: 'nobody' } });
      await sleep(SETTLE_MS);
      assert.equal(client.pubs.length, 1, 'nothing after the unsubscribe');
    });

    test(`8 ${build.name}: recovery after a dropped transport`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const relay = await startRelay(server.port, defer);
      const channel = unique('recover');
      const client = await connect(build, relay.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      assert.equal(sub.subscribedEvents[0].wasRecovering, false);
      assert.equal(sub.subscribedEvents[0].recoverable, true, 'the channel is recoverable');
      await publishMany(server, channel, 'live', 3);
      await exactly('live', sub.pubs, 3);
      const seen = sub.pubs.length;

      const ctx = await awayAndBack(client, sub, relay, () => publishMany(server, channel, 'missed', 20));
      assert.equal(ctx.wasRecovering, true, `wasRecovering: ${JSON.stringify(ctx)}`);
      assert.equal(ctx.recovered, true, `recovered: ${JSON.stringify(ctx)}`);
      await exactly('recovered', sub.pubs, seen + 20);
      assertRecoveredExactly('recovered', sub.pubs.slice(seen), range(4, 23), 'missed');
      assert.equal(client.state, 'connected');
      // And live again.
      await api(server, 'publish', { channel, data: { n: 1, tag: 'after' } });
      await exactly('after', sub.pubs, seen + 21);
      assert.equal(sub.pubs.at(-1).offset, 24);
    });

    test(`9 ${build.name}: recovery across a restart of a SQLite (--data-dir) server`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const dataDir = tempDir('switchboard-sdk-data-', defer);
      let server = await startServer({ defer, store: { dataDir } });
      const port = server.port;
      const relay = await startRelay(port, defer);
      const channel = unique('durable');
      const client = await connect(build, relay.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      const { epoch } = await sub.history({});
      assert.ok(epoch, 'the channel has an epoch');
      await publishMany(server, channel, 'live', 3);
      await exactly('live', sub.pubs, 3);

      // SIGTERM: a shutdown disconnect (3001, reconnect advised); the relay then holds the
      // client off until the new server has had the 20 publications.
      const before = sub.subscribedEvents.length;
      await shutdownUnder(client, server, relay);
      server = await startServer({ defer, port, store: { dataDir } });
      const published = await publishMany(server, channel, 'missed', 20);
      assert.deepEqual(published.map((r) => num(r.offset)), range(4, 23), 'ids go on after the restart');
      assert.ok(published.every((r) => r.epoch === epoch), 'SQLite keeps the epoch');
      relay.unblock();
      await eventually('subscribed again', () => sub.subscribedEvents.length > before, 30000);
      const back = sub.subscribedEvents[before];
      assert.equal(back.wasRecovering, true, JSON.stringify(back));
      assert.equal(back.recovered, true, JSON.stringify(back));
      await exactly('recovered', sub.pubs, 23);
      assertRecoveredExactly('recovered', sub.pubs.slice(3), range(4, 23), 'missed');
    });

    test(`10 ${build.name}: after a restart of a --memory server: recovered false`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      let server = await startServer({ defer });
      const port = server.port;
      const relay = await startRelay(port, defer);
      const channel = unique('volatile');
      const client = await connect(build, relay.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      await publishMany(server, channel, 'live', 3);
      await exactly('live', sub.pubs, 3);
      const oldEpoch = (await sub.history({})).epoch;

      const before = sub.subscribedEvents.length;
      await shutdownUnder(client, server, relay);
      server = await startServer({ defer, port });
      const published = await publishMany(server, channel, 'new', 5);
      assert.notEqual(published[0].epoch, oldEpoch, 'a new epoch after a restart in memory');
      relay.unblock();
      await eventually('subscribed again', () => sub.subscribedEvents.length > before, 30000);
      const back = sub.subscribedEvents[before];
      assert.equal(back.wasRecovering, true, JSON.stringify(back));
      assert.equal(back.recovered, false, `the history it had is gone: ${JSON.stringify(back)}`);
      // The subscription goes on in the new stream.
      const count = sub.pubs.length;
      await api(server, 'publish', { channel, data: { n: 6, tag: 'new' } });
      await exactly('live in the new epoch', sub.pubs, count + 1);
      assert.equal(sub.pubs.at(-1).offset, 6);
      assert.equal((await sub.history({})).epoch, published[0].epoch);
    });

    test(`11 ${build.name}: a room-protocol client and a centrifuge client in one channel`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('mixed');
      const room = await RoomClient.open(server, channel, { token: connectionToken('roomie') });
      defer(() => room.close());
      const client = await connect(build, server.wsUrl, { defer, token: connectionToken('cf') });
      const sub = await subscribe(build, client, channel);

      // Room → centrifuge: text arrives as {"text": ...}, id == offset.
      room.say('hello from the room');
      const echoed = await room.next((e) => e.type === 'message' && e.text === 'hello from the room');
      await exactly('from the room', sub.pubs, 1);
      assert.equal(sub.pubs[0].offset, echoed.id, 'room id == centrifuge offset');
      assert.deepEqual(sub.pubs[0].data, { text: 'hello from the room' });
      assert.equal(sub.pubs[0].info?.user, 'roomie');

      // Centrifuge → room: data {"text": "x"} arrives as text "x".
      await sub.publish(enc({ text: 'hello from centrifuge' }));
      const got = await room.next((e) => e.type === 'message' && e.text === 'hello from centrifuge');
      await exactly('own publication', sub.pubs, 2);
      assert.equal(got.id, sub.pubs[1].offset, 'room id == centrifuge offset');
      assert.equal(got.from, 'cf');
      assert.equal(got.room, channel);

      // The server API reaches both with one id.
      const result = await api(server, 'publish', { channel, data: { text: 'from the API' } });
      const fromApi = await room.next((e) => e.type === 'message' && e.text === 'from the API');
      await exactly('API publication', sub.pubs, 3);
      assert.equal(fromApi.id, num(result.offset));
      assert.equal(sub.pubs[2].offset, num(result.offset));
      assert.deepEqual(sub.pubs.map((p) => p.offset), [1, 2, 3]);
      assert.deepEqual(room.messages().map((m) => m.id), [1, 2, 3]);
    });

    test(`12 ${build.name}: two nodes over Redis: away from node A while node B publishes`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const redis = await startRedis(defer);
      const nodeA = await startServer({ defer, store: { redis: redis.url }, name: 'node A' });
      const nodeB = await startServer({ defer, store: { redis: redis.url }, name: 'node B' });
      const relay = await startRelay(nodeA.port, defer);
      const channel = unique('cluster');
      const client = await connect(build, relay.wsUrl, { defer, token: connectionToken('alice') });
      const sub = await subscribe(build, client, channel);
      await publishMany(nodeB, channel, 'live', 2);
      await exactly('live through Redis', sub.pubs, 2);
      assert.deepEqual(sub.pubs.map((p) => p.offset), [1, 2]);

      const ctx = await awayAndBack(client, sub, relay, () => publishMany(nodeB, channel, 'missed', 20));
      assert.equal(ctx.wasRecovering, true, JSON.stringify(ctx));
      assert.equal(ctx.recovered, true, JSON.stringify(ctx));
      await exactly('recovered', sub.pubs, 22);
      assertRecoveredExactly('recovered', sub.pubs.slice(2), range(3, 22), 'missed');
      // Node A's history has them too.
      const history = await api(nodeA, 'history', { channel, limit: 100 });
      assert.deepEqual(history.publications.map((p) => num(p.offset)), range(1, 22));
    });
  });
}
