// centrifuge-js (npm `centrifuge`, unchanged) in Node over Centrifugo's HTTP transports
// against Switchboard's Centrifugo door: `http_stream` (JSON and Protobuf builds) and
// `sse` (JSON, with npm `eventsource` as the SDK's EventSource), their later commands
// posted to `/emulation`. Each transport runs the subscribe/publish/recover flow of the
// WebSocket tests, and on two nodes over Redis behind a relay that deals connections
// out in turn (no stickiness), where emulation requests that land on the other node
// must still reach the session. Each test starts its own servers on free ports.
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard) and redis-server.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Centrifuge as CentrifugeJson } from 'centrifuge';
import { Centrifuge as CentrifugeProtobuf } from 'centrifuge/build/protobuf';
import { EventSource } from 'eventsource';
import {
  api, cleanup, connectionToken, eventually, freePort, nextEvent, sleep, startRedis, startRelay,
  startServer, unique,
} from './lib.mjs';

const TIMEOUT = { timeout: 180000 };
const SETTLE_MS = 700;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

const TRANSPORTS = [
  { name: 'http_stream json', transport: 'http_stream', Centrifuge: CentrifugeJson, protobuf: false },
  { name: 'http_stream protobuf', transport: 'http_stream', Centrifuge: CentrifugeProtobuf, protobuf: true },
  { name: 'sse json', transport: 'sse', Centrifuge: CentrifugeJson, protobuf: false },
];

const enc = (t, value) => (t.protobuf ? encoder.encode(JSON.stringify(value)) : value);
const dec = (t, data) => (t.protobuf ? JSON.parse(decoder.decode(data)) : data);
const num = (offset) => (typeof offset === 'object' && offset !== null && typeof offset.low === 'number'
  ? (offset.high >>> 0) * 4294967296 + (offset.low >>> 0) : Number(offset ?? 0));
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** A client of `t` over its transport at `base` (http://host:port), before connecting. */
function newClient(t, base, { defer, token, transports, ...options } = {}) {
  const client = new t.Centrifuge(
    transports ?? [{ transport: t.transport, endpoint: `${base}/connection/${t.transport}` }],
    {
      // Absolute: Node has no page to resolve a relative endpoint against.
      emulationEndpoint: `${base}/emulation`,
      fetch: globalThis.fetch,
      readableStream: globalThis.ReadableStream,
      eventsource: EventSource,
      token,
      timeout: 10000,
      minReconnectDelay: 100,
      maxReconnectDelay: 1000,
      ...options,
    },
  );
  client.log = [];
  for (const event of ['connecting', 'connected', 'disconnected', 'error']) {
    client.on(event, (ctx) => client.log.push({ event, ...ctx }));
  }
  if (defer) defer(() => client.disconnect());
  return client;
}

async function connect(t, base, options) {
  const client = newClient(t, base, options);
  const connected = nextEvent(client, 'connected');
  client.connect();
  client.connectedCtx = await connected;
  return client;
}

async function subscribe(t, client, channel) {
  const sub = client.newSubscription(channel);
  sub.pubs = [];
  sub.subscribedEvents = [];
  sub.on('publication', (ctx) => sub.pubs.push({ offset: num(ctx.offset), data: dec(t, ctx.data), user: ctx.info?.user }));
  sub.on('subscribed', (ctx) => sub.subscribedEvents.push(ctx));
  sub.subscribe();
  await sub.ready(15000);
  return sub;
}

async function exactly(what, list, n) {
  await eventually(`${what}: ${n} publications (have ${list.length})`, () => list.length >= n, 30000);
  await sleep(SETTLE_MS);
  assert.equal(list.length, n, `${what}: exactly ${n}, got ${JSON.stringify(list.map((p) => p.offset))}`);
}

async function publishMany(server, channel, tag, count) {
  for (let n = 1; n <= count; n++) await api(server, 'publish', { channel, data: { n, tag } });
}

/** A counter of the server's /metrics, summed over its series that match `labels`. */
async function metric(server, name, labels = '') {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name}{`) || line.startsWith(`${name} `)) {
      if (line.includes(labels)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
    }
  }
  return sum;
}

for (const t of TRANSPORTS) {
  describe(`centrifuge-js over ${t.name} in Node`, () => {
    test(`${t.name}: subscribe, publish both ways, presence, history, recover after a dropped stream`, TIMEOUT, async (tc) => {
      const defer = cleanup(tc);
      const server = await startServer({ defer });
      const relay = await startRelay(server.port, defer);
      const channel = unique(`http-${t.transport}`);
      const alice = await connect(t, relay.url, { defer, token: connectionToken('alice') });
      assert.equal(alice.connectedCtx.transport, t.transport, JSON.stringify(alice.connectedCtx));
      const bob = await connect(t, server.url, { defer, token: connectionToken('bob') });
      const sub = await subscribe(t, alice, channel);
      const bobSub = await subscribe(t, bob, channel);
      assert.equal(sub.subscribedEvents[0].recoverable, true);

      // A client's publication goes out through /emulation; the API's reaches both.
      await bobSub.publish(enc(t, { n: 1, tag: 'live' }));
      await api(server, 'publish', { channel, data: { n: 2, tag: 'live' } });
      await exactly('live', sub.pubs, 2);
      assert.deepEqual(sub.pubs.map((p) => [p.offset, p.data.n, p.user]), [[1, 1, 'bob'], [2, 2, undefined]]);
      await exactly('live at bob', bobSub.pubs, 2);

      const users = Object.values((await sub.presence()).clients).map((c) => c.user).sort();
      assert.deepEqual(users, ['alice', 'bob'], 'presence over emulation');
      const history = await sub.history({ limit: 10 });
      assert.deepEqual(history.publications.map((p) => num(p.offset)), [1, 2]);

      // The stream is cut; 20 publications are missed; the client comes back and
      // recovers exactly them.
      const before = sub.subscribedEvents.length;
      const connecting = nextEvent(alice, 'connecting');
      relay.block();
      const ctx = await connecting;
      assert.equal(ctx.code, 1, `connecting because the transport closed: ${JSON.stringify(ctx)}`);
      for (let n = 1; n <= 20; n++) await api(server, 'publish', { channel, data: { n, tag: 'missed' } });
      relay.unblock();
      await eventually('subscribed again', () => sub.subscribedEvents.length > before, 30000);
      const back = sub.subscribedEvents[before];
      assert.equal(back.wasRecovering, true, JSON.stringify(back));
      assert.equal(back.recovered, true, JSON.stringify(back));
      await exactly('recovered', sub.pubs, 22);
      assert.deepEqual(sub.pubs.slice(2).map((p) => p.offset), range(3, 22));
      assert.deepEqual(sub.pubs.slice(2).map((p) => p.data), range(1, 20).map((n) => ({ n, tag: 'missed' })));
      // And both ways again after it.
      await sub.publish(enc(t, { n: 3, tag: 'after' }));
      await exactly('after, at bob', bobSub.pubs, 23);
      assert.deepEqual(bobSub.pubs.at(-1), { offset: 23, data: { n: 3, tag: 'after' }, user: 'alice' });
    });

    test(`${t.name}: a server shutdown is a 3001 disconnect pushed on the stream`, TIMEOUT, async (tc) => {
      const defer = cleanup(tc);
      const server = await startServer({ defer });
      const client = await connect(t, server.url, { defer, token: connectionToken('alice') });
      const connecting = nextEvent(client, 'connecting');
      const stopping = server.stop();
      const ctx = await connecting;
      assert.equal(ctx.code, 3001, `shutdown: ${JSON.stringify(ctx)}`);
      await stopping;
    });

    test(`${t.name}: two nodes behind a relay without stickiness: emulation requests reach the session from either node`, TIMEOUT, async (tc) => {
      const defer = cleanup(tc);
      const redis = await startRedis(defer);
      const nodeA = await startServer({ defer, store: { redis: redis.url }, name: 'node A' });
      const nodeB = await startServer({ defer, store: { redis: redis.url }, name: 'node B' });
      // Connections are dealt out A, B, A, B...: the stream lands on one node, the
      // emulation requests' connections on both.
      const relay = await startRelay([nodeA.port, nodeB.port], defer);
      const channel = unique('http-cluster');
      const clients = [];
      for (const user of ['alice', 'bob', 'carol']) {
        clients.push(await connect(t, relay.url, { defer, token: connectionToken(user) }));
      }
      const subs = [];
      for (const client of clients) subs.push(await subscribe(t, client, channel));
      for (const [i, sub] of subs.entries()) {
        for (let n = 1; n <= 5; n++) await sub.publish(enc(t, { n, from: i }));
      }
      for (const [i, sub] of subs.entries()) {
        await exactly(`client ${i}`, sub.pubs, 15);
        assert.deepEqual(sub.pubs.map((p) => p.offset), range(1, 15), 'one sequence');
      }
      assert.deepEqual(subs[0].pubs.map((p) => p.data), subs[2].pubs.map((p) => p.data));
      const routed = await metric(nodeA, 'switchboard_centrifuge_emulation_total', 'outcome="routed"')
        + await metric(nodeB, 'switchboard_centrifuge_emulation_total', 'outcome="routed"');
      const delivered = await metric(nodeA, 'switchboard_centrifuge_emulation_total', 'outcome="delivered"')
        + await metric(nodeB, 'switchboard_centrifuge_emulation_total', 'outcome="delivered"');
      tc.diagnostic(`emulation requests: ${routed} routed to the other node, ${delivered} delivered`);
      assert.ok(routed > 0, `some emulation requests crossed to the other node over Redis (routed ${routed})`);
      // Every request a session took: subscribes, publishes, pongs.
      assert.ok(delivered >= 3 + 15, `delivered ${delivered}`);
      const history = await api(nodeA, 'history', { channel, limit: 100 });
      assert.deepEqual(history.publications.map((p) => num(p.offset)), range(1, 15));
    });
  });
}

describe('centrifuge-js falls back from WebSocket', () => {
  for (const t of [TRANSPORTS[0], TRANSPORTS[2]]) {
    test(`to ${t.name} when no WebSocket opens`, TIMEOUT, async (tc) => {
      const defer = cleanup(tc);
      const server = await startServer({ defer });
      const closed = await freePort();
      const WebSocket = (await import('ws')).default;
      const client = await connect(t, server.url, {
        defer,
        token: connectionToken('alice'),
        websocket: WebSocket,
        transports: [
          { transport: 'websocket', endpoint: `ws://127.0.0.1:${closed}/connection/websocket` },
          { transport: t.transport, endpoint: `${server.url}/connection/${t.transport}` },
        ],
      });
      assert.equal(client.connectedCtx.transport, t.transport);
      const channel = unique('fallback');
      const sub = await subscribe(t, client, channel);
      await sub.publish(enc(t, { n: 1 }));
      await exactly('own publication', sub.pubs, 1);
    });
  }
});
