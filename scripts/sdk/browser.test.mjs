// Centrifugo's official JavaScript SDK in Debian's Chromium (playwright-core) against
// Switchboard's centrifuge door: the browser bundles as published on npm, JSON
// (dist/centrifuge.js) and Protobuf (dist/centrifuge.protobuf.js), each loaded into a
// page of its own whose WebSocket goes to 127.0.0.1:PORT (the server, or a relay in front
// of it that can cut the connection).
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard) and /usr/bin/chromium
// (CHROMIUM elsewhere).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import {
  api, cleanup, connectionToken, eventually, sleep, startRelay, startServer, tempDir, unique,
} from './lib.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const TIMEOUT = { timeout: 180000 };
const SETTLE_MS = 700;

const BUNDLES = [
  { name: 'json', file: path.join(HERE, 'node_modules/centrifuge/dist/centrifuge.js'), protobuf: false },
  { name: 'protobuf', file: path.join(HERE, 'node_modules/centrifuge/dist/centrifuge.protobuf.js'), protobuf: true },
];

/**
 * Runs in the page (serialized with toString): `window.T` drives the SDK's global
 * `Centrifuge` and hands back plain values (data decoded, offsets as numbers).
 */
function harness() {
  let protobuf = false;
  const te = new TextEncoder();
  const td = new TextDecoder();
  const enc = (value) => (protobuf ? te.encode(JSON.stringify(value)) : value);
  const dec = (data) => {
    if (!protobuf) return data;
    if (data === undefined || data === null || data.length === 0) return undefined;
    return JSON.parse(td.decode(data));
  };
  const num = (offset) => {
    if (offset === undefined || offset === null) return 0;
    if (typeof offset === 'object' && typeof offset.low === 'number') {
      return (offset.high >>> 0) * 4294967296 + (offset.low >>> 0);
    }
    return Number(offset);
  };
  const clients = {};
  const subs = {};
  const sub = (name, channel) => {
    const s = subs[`${name} ${channel}`];
    if (!s) throw new Error(`no subscription of ${name} to ${channel}`);
    return s;
  };
  const plainError = (e) => ({ code: e?.code, message: e?.message ?? String(e) });
  /** A publication's, join's or leave's info: user, client id, conn_info decoded. */
  const plainInfo = (info) => (info ? { user: info.user, client: info.client, connInfo: dec(info.connInfo) } : null);
  const subscribedCtx = (ctx) => ({
    channel: ctx.channel,
    wasRecovering: ctx.wasRecovering,
    recovered: ctx.recovered,
    recoverable: ctx.recoverable,
    epoch: ctx.streamPosition ? ctx.streamPosition.epoch : null,
    offset: ctx.streamPosition ? num(ctx.streamPosition.offset) : null,
  });
  window.T = {
    init(isProtobuf) {
      protobuf = isProtobuf;
      return typeof Centrifuge;
    },
    /** `url`: a WebSocket URL, or a list of transports to try in turn. */
    async connect(name, url, token) {
      // eslint-disable-next-line no-undef
      const client = new Centrifuge(url, { token, timeout: 10000, minReconnectDelay: 100, maxReconnectDelay: 1000 });
      client.log = [];
      for (const event of ['connecting', 'connected', 'disconnected', 'error']) {
        client.on(event, (ctx) => client.log.push({
          event, code: ctx.code, reason: ctx.reason, client: ctx.client, error: ctx.error && plainError(ctx.error),
        }));
      }
      // Client-level events: server-side subscriptions and their publications.
      client.serverSubEvents = [];
      client.pubs = [];
      client.on('subscribed', (ctx) => client.serverSubEvents.push({ event: 'subscribed', ...subscribedCtx(ctx) }));
      client.on('unsubscribed', (ctx) => client.serverSubEvents.push({ event: 'unsubscribed', channel: ctx.channel }));
      client.on('publication', (ctx) => client.pubs.push({
        channel: ctx.channel, offset: num(ctx.offset), data: dec(ctx.data), info: plainInfo(ctx.info),
      }));
      clients[name] = client;
      const connected = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${name}: not connected in 15 s`)), 15000);
        client.on('connected', (ctx) => {
          clearTimeout(timer);
          resolve(ctx);
        });
        client.on('disconnected', (ctx) => {
          clearTimeout(timer);
          reject(new Error(`${name}: disconnected ${ctx.code} ${ctx.reason}`));
        });
      });
      client.connect();
      const ctx = await connected;
      return { client: ctx.client, transport: ctx.transport };
    },
    /** Connects and waits for the client to be disconnected for good: its code. */
    async refused(url, token) {
      // eslint-disable-next-line no-undef
      const client = new Centrifuge(url, { token, timeout: 10000, minReconnectDelay: 100, maxReconnectDelay: 1000 });
      client.on('error', () => {});
      const result = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('neither refused nor connected in 15 s')), 15000);
        client.on('connected', () => {
          clearTimeout(timer);
          resolve({ connected: true });
        });
        client.on('disconnected', (ctx) => {
          clearTimeout(timer);
          resolve({ code: ctx.code, reason: ctx.reason, state: client.state });
        });
      });
      client.connect();
      const answer = await result;
      client.disconnect();
      return answer;
    },
    async subscribe(name, channel, options = {}) {
      const s = clients[name].newSubscription(channel, options);
      s.pubs = [];
      s.subscribedEvents = [];
      s.errors = [];
      s.joins = [];
      s.leaves = [];
      s.on('publication', (ctx) => s.pubs.push({
        channel: ctx.channel,
        offset: num(ctx.offset),
        data: dec(ctx.data),
        user: ctx.info ? ctx.info.user : null,
        info: plainInfo(ctx.info),
      }));
      s.on('subscribed', (ctx) => {
        const { channel: _, ...rest } = subscribedCtx(ctx);
        s.subscribedEvents.push(rest);
      });
      s.on('error', (ctx) => s.errors.push(plainError(ctx.error)));
      s.on('join', (ctx) => s.joins.push({ channel: ctx.channel, ...plainInfo(ctx.info) }));
      s.on('leave', (ctx) => s.leaves.push({ channel: ctx.channel, ...plainInfo(ctx.info) }));
      subs[`${name} ${channel}`] = s;
      s.subscribe();
      await s.ready(15000);
      return s.subscribedEvents[0];
    },
    /** Subscribes an existing (unsubscribed) subscription again. */
    async resubscribe(name, channel) {
      const s = sub(name, channel);
      s.subscribe();
      await s.ready(15000);
      return s.subscribedEvents.at(-1);
    },
    unsubscribe(name, channel) {
      sub(name, channel).unsubscribe();
    },
    async publish(name, channel, value) {
      try {
        await sub(name, channel).publish(enc(value));
        return { ok: true };
      } catch (e) {
        return { ok: false, ...plainError(e) };
      }
    },
    async clientPublish(name, channel, value) {
      try {
        await clients[name].publish(channel, enc(value));
        return { ok: true };
      } catch (e) {
        return { ok: false, ...plainError(e) };
      }
    },
    pubs: (name, channel) => sub(name, channel).pubs,
    joins: (name, channel) => sub(name, channel).joins,
    leaves: (name, channel) => sub(name, channel).leaves,
    clientPubs: (name) => clients[name].pubs,
    serverSubEvents: (name) => clients[name].serverSubEvents,
    subscribedEvents: (name, channel) => sub(name, channel).subscribedEvents,
    states: (name, channel) => ({ client: clients[name].state, sub: channel ? sub(name, channel).state : null }),
    log: (name) => clients[name].log,
    async presence(name, channel) {
      const { clients: present } = await sub(name, channel).presence();
      return Object.entries(present).map(([id, c]) => ({ id, client: c.client, user: c.user, connInfo: dec(c.connInfo) }));
    },
    presenceStats: (name, channel) => sub(name, channel).presenceStats(),
    async history(name, channel, options) {
      const result = await sub(name, channel).history(options);
      return {
        offset: num(result.offset),
        epoch: result.epoch,
        publications: result.publications.map((p) => ({
          offset: num(p.offset),
          data: dec(p.data),
          ...(p.info ? { info: plainInfo(p.info) } : {}),
        })),
      };
    },
    disconnect(name) {
      clients[name].disconnect();
    },
  };
}

let browser;
before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
});
after(async () => {
  if (browser) await browser.close();
});

/**
 * A page of `origin` (a real answer of the server there: Chromium's local network access
 * checks block a page that did not come from 127.0.0.1 from opening a WebSocket to it),
 * emptied, with `bundle` and the harness loaded. `page.errors` collects script errors.
 */
async function openPage(defer, bundle, origin) {
  const context = await browser.newContext();
  defer(() => context.close());
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(error));
  await page.goto(`${origin}/sdk-test.html`); // a 404 of the server: only its origin counts
  await page.setContent('<!doctype html><meta charset="utf-8"><title>centrifuge-js</title><body></body>');
  await page.addScriptTag({ path: bundle.file });
  await page.addScriptTag({ content: `(${harness})();` });
  assert.equal(await page.evaluate((pb) => window.T.init(pb), bundle.protobuf), 'function', 'the bundle defines Centrifuge');
  return page;
}

const T = (page, method, ...args) => page.evaluate(([m, a]) => window.T[m](...a), [method, args]);

/** Waits for `n` publications of `fetch()`, then a little longer to see that no more come. */
async function exactlyOf(what, fetch, n) {
  await eventually(`${what}: ${n} publications`, async () => (await fetch()).length >= n, 30000);
  await sleep(SETTLE_MS);
  const pubs = await fetch();
  assert.equal(pubs.length, n, `${what}: exactly ${n}, got offsets ${pubs.map((p) => p.offset)}`);
  return pubs;
}

/** Exactly `n` publications in the subscription of `name` to `channel`. */
const exactly = (page, what, name, channel, n) => exactlyOf(what, () => T(page, 'pubs', name, channel), n);

/** Exactly `n` client-level publications (server-side subscriptions) of `name`. */
const exactlyClient = (page, what, name, n) => exactlyOf(what, () => T(page, 'clientPubs', name), n);

/**
 * Stops `server` (SIGTERM) under the page's client `name`, which goes through `relay`:
 * waits for the SDK's `connecting` event of the shutdown disconnect (3001: reconnect),
 * then blocks the relay so the client stays away until it is unblocked (the restarted
 * server has what it must recover), and waits for the server's exit.
 */
async function shutdownUnder(page, name, server, relay) {
  const connectings = async () => (await T(page, 'log', name)).filter((e) => e.event === 'connecting');
  const seen = (await connectings()).length;
  const stopping = server.stop();
  const ctx = await eventually('the page saw the shutdown disconnect', async () => (await connectings())[seen], 15000);
  relay.block();
  assert.equal(ctx.code, 3001, `shutdown disconnect: ${JSON.stringify(ctx)}`);
  await stopping;
}

/** Publishes `{n, tag}` for n = 1..count through the server API; the results. */
async function publishMany(server, channel, tag, count) {
  const results = [];
  for (let n = 1; n <= count; n++) results.push(await api(server, 'publish', { channel, data: { n, tag } }));
  return results;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/**
 * Waits until alice's page subscribed to `channel` again, recovering: its `subscribed`
 * event says so, and after the 3 publications it had come exactly the 20 missed ones
 * (`{n, tag: 'missed'}`, offsets 4-23). Returns that `subscribed` event.
 */
async function recoveredAfterThree(page, channel) {
  await eventually('subscribed again', async () => (await T(page, 'subscribedEvents', 'alice', channel)).length >= 2, 30000);
  const back = (await T(page, 'subscribedEvents', 'alice', channel))[1];
  assert.equal(back.wasRecovering, true, JSON.stringify(back));
  assert.equal(back.recovered, true, JSON.stringify(back));
  const pubs = await exactly(page, 'recovered', 'alice', channel, 23);
  assert.deepEqual(pubs.slice(3).map((p) => p.offset), range(4, 23));
  assert.deepEqual(pubs.slice(3).map((p) => p.data), range(1, 20).map((n) => ({ n, tag: 'missed' })));
  assert.equal((await T(page, 'states', 'alice', channel)).client, 'connected');
  assert.deepEqual(page.errors, []);
  return back;
}

for (const bundle of BUNDLES) {
  describe(`centrifuge-js ${bundle.name} bundle in Chromium`, () => {
    test(`B1 ${bundle.name}: connect with a JWT; a bad token is refused with 3500`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const alice = await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      assert.ok(typeof alice.client === 'string' && alice.client.length > 0, 'a client id');
      assert.equal(alice.transport, 'websocket');
      assert.equal((await T(page, 'states', 'alice')).client, 'connected');
      const refused = await T(page, 'refused', server.wsUrl, connectionToken('mallory', {}, 'not-the-secret'));
      assert.equal(refused.code, 3500, `invalid token: ${JSON.stringify(refused)}`);
      assert.equal(refused.state, 'disconnected');
      assert.deepEqual(page.errors, []);
    });

    test(`B2 ${bundle.name}: three channels, client and API publishes`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      const channels = [unique('b-three-a'), unique('b-three-b'), unique('b-three-c')];
      for (const channel of channels) await T(page, 'subscribe', 'alice', channel);
      const expected = Object.fromEntries(channels.map((c) => [c, []]));
      for (let round = 1; round <= 2; round++) {
        for (const channel of channels) {
          const fromClient = { from: 'client', channel, round };
          assert.deepEqual(await T(page, 'publish', 'alice', channel, fromClient), { ok: true });
          expected[channel].push({ data: fromClient, user: 'alice' });
          const fromApi = { from: 'api', channel, round };
          const result = await api(server, 'publish', { channel, data: fromApi });
          expected[channel].push({ data: fromApi, user: null, offset: Number(result.offset) });
        }
      }
      for (const channel of channels) {
        const pubs = await exactly(page, channel, 'alice', channel, 4);
        assert.deepEqual(pubs.map((p) => p.data), expected[channel].map((e) => e.data), `${channel}: its own, in order`);
        assert.deepEqual(pubs.map((p) => p.offset), [1, 2, 3, 4]);
        assert.deepEqual(pubs.map((p) => p.user), expected[channel].map((e) => e.user), 'publishers');
        for (const [i, e] of expected[channel].entries()) {
          if (e.offset !== undefined) assert.equal(pubs[i].offset, e.offset);
        }
      }
      assert.deepEqual(page.errors, []);
    });

    test(`B2b ${bundle.name}: a client publication's info: user, client id and conn_info, live and in history`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('b-pubinfo');
      const alice = await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice', { info: { name: 'Alice' } }));
      const bob = await T(page, 'connect', 'bob', server.wsUrl, connectionToken('bob', { info: { name: 'Bob' } }));
      assert.notEqual(alice.client, bob.client);
      await T(page, 'subscribe', 'bob', channel);
      await T(page, 'subscribe', 'alice', channel);
      assert.deepEqual(await T(page, 'publish', 'alice', channel, { text: 'hi' }), { ok: true });
      const [live] = await exactly(page, 'bob watching', 'bob', channel, 1);
      assert.deepEqual(live.data, { text: 'hi' });
      const [own] = await exactly(page, 'alice, her own', 'alice', channel, 1);
      const history = await T(page, 'history', 'alice', channel, { limit: 10 });
      assert.equal(history.publications.length, 1, JSON.stringify(history));
      assert.deepEqual(history.publications[0].data, { text: 'hi' });
      for (const [where, info] of [['live', live.info], ['own', own.info], ['history', history.publications[0].info]]) {
        assert.ok(info, `${where}: an info`);
        assert.equal(info.user, 'alice', `${where}: ${JSON.stringify(info)}`);
        assert.equal(info.client, alice.client, `${where}: the publisher's client id: ${JSON.stringify(info)}`);
        assert.deepEqual(info.connInfo, { name: 'Alice' }, `${where}: conn_info from the token: ${JSON.stringify(info)}`);
      }
      assert.deepEqual(page.errors, []);
    });

    /** alice twice (two connections), bob once, all in one channel, in one page. */
    async function threeInPresence(t) {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('b-presence');
      const ids = {};
      for (const [name, user] of [['alice1', 'alice'], ['alice2', 'alice'], ['bob', 'bob']]) {
        ids[name] = (await T(page, 'connect', name, server.wsUrl, connectionToken(user, { info: { name: user } }))).client;
        await T(page, 'subscribe', name, channel);
      }
      return { page, channel, ids };
    }

    test(`B3 ${bundle.name}: presence and presence_stats list the connected users`, TIMEOUT, async (t) => {
      const { page, channel } = await threeInPresence(t);
      const users = (presence) => [...new Set(presence.map((p) => p.user))].sort();
      assert.deepEqual(users(await T(page, 'presence', 'alice1', channel)), ['alice', 'bob']);
      assert.equal((await T(page, 'presenceStats', 'alice1', channel)).numUsers, 2);
      await T(page, 'disconnect', 'bob');
      await eventually('bob left the presence', async () =>
        (await T(page, 'presenceStats', 'alice1', channel)).numUsers === 1);
      assert.deepEqual(users(await T(page, 'presence', 'alice1', channel)), ['alice']);
      assert.deepEqual(page.errors, []);
    });

    test(`B3b ${bundle.name}: presence is per connection: client ids, conn_info, num_clients`, TIMEOUT, async (t) => {
      const { page, channel, ids } = await threeInPresence(t);
      const presence = await T(page, 'presence', 'alice1', channel);
      assert.deepEqual(presence.map((p) => p.id).sort(), Object.values(ids).sort(),
        `keyed by client id, one entry per connection: ${JSON.stringify(presence)}`);
      for (const p of presence) {
        assert.equal(p.client, p.id);
        assert.deepEqual(p.connInfo, { name: p.user }, 'conn_info from the token');
      }
      assert.deepEqual(presence.map((p) => p.user).sort(), ['alice', 'alice', 'bob']);
      assert.deepEqual(await T(page, 'presenceStats', 'alice1', channel), { numClients: 3, numUsers: 2 });
      assert.deepEqual(page.errors, []);
    });

    test(`B4 ${bundle.name}: history with limit, since and reverse`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const channel = unique('b-history');
      let epoch;
      for (let n = 1; n <= 10; n++) epoch = (await api(server, 'publish', { channel, data: { n } })).epoch;
      const page = await openPage(defer, bundle, server.url);
      await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      await T(page, 'subscribe', 'alice', channel);
      const offsets = (h) => h.publications.map((p) => p.offset);
      const position = await T(page, 'history', 'alice', channel, {});
      assert.deepEqual(position, { offset: 10, epoch, publications: [] });
      const first = await T(page, 'history', 'alice', channel, { limit: 3 });
      assert.deepEqual(first.publications, [1, 2, 3].map((n) => ({ offset: n, data: { n } })));
      assert.deepEqual(offsets(await T(page, 'history', 'alice', channel, { limit: 3, reverse: true })), [10, 9, 8]);
      assert.deepEqual(offsets(await T(page, 'history', 'alice', channel, { limit: 3, since: { offset: 4, epoch } })), [5, 6, 7]);
      assert.deepEqual(offsets(await T(page, 'history', 'alice', channel, { limit: 3, since: { offset: 8, epoch }, reverse: true })), [7, 6, 5]);
      assert.deepEqual(offsets(await T(page, 'history', 'alice', channel, { limit: 100 })), range(1, 10));
      assert.deepEqual(page.errors, []);
    });

    // A join names the connection (client id, the token's info as conn_info); a leave,
    // whose connection is gone, names the user (docs/PROTOCOL.md).
    test(`B5 ${bundle.name}: join and leave pushes (joinLeave: true)`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('b-joinleave');
      await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      await T(page, 'subscribe', 'alice', channel, { joinLeave: true });
      await T(page, 'connect', 'carol', server.wsUrl, connectionToken('carol'));
      await T(page, 'subscribe', 'carol', channel);
      const bobId = (await T(page, 'connect', 'bob', server.wsUrl, connectionToken('bob', { info: { name: 'Bob' } }))).client;
      assert.ok(typeof bobId === 'string' && bobId.length > 0, 'a client id for bob');
      const ofBob = async (kind) => (await T(page, kind, 'alice', channel)).filter((e) => e.user === 'bob');
      const waitFor = (kind, n) => eventually(`${n} ${kind} of bob`, async () => {
        const events = await ofBob(kind);
        return events.length >= n && events;
      });

      await T(page, 'subscribe', 'bob', channel);
      let joins = await waitFor('joins', 1);
      assert.equal(joins[0].channel, channel);
      assert.equal(joins[0].client, bobId, `join: the client id: ${JSON.stringify(joins[0])}`);
      assert.deepEqual(joins[0].connInfo, { name: 'Bob' }, `join: conn_info from the token: ${JSON.stringify(joins[0])}`);

      await T(page, 'unsubscribe', 'bob', channel);
      let leaves = await waitFor('leaves', 1);
      assert.equal(leaves[0].channel, channel);
      assert.equal(leaves[0].user, 'bob', `leave: the user: ${JSON.stringify(leaves[0])}`);

      await T(page, 'resubscribe', 'bob', channel);
      joins = await waitFor('joins', 2);
      assert.equal(joins[1].client, bobId, `second join: ${JSON.stringify(joins[1])}`);
      await T(page, 'disconnect', 'bob');
      leaves = await waitFor('leaves', 2); // a disconnect is a leave too
      assert.equal(leaves[1].user, 'bob');

      await sleep(SETTLE_MS);
      assert.equal((await ofBob('joins')).length, 2, 'two joins of bob');
      assert.equal((await ofBob('leaves')).length, 2, 'two leaves of bob');
      assert.deepEqual([...await T(page, 'joins', 'carol', channel), ...await T(page, 'leaves', 'carol', channel)], [],
        'a subscription without joinLeave gets no join/leave pushes');
      assert.deepEqual(page.errors, []);
    });

    test(`B6 ${bundle.name}: client publish where client_publish = false: error 103`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('news:b');
      await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      await T(page, 'subscribe', 'alice', channel);
      const refused = await T(page, 'publish', 'alice', channel, { text: 'not allowed' });
      assert.equal(refused.ok, false);
      assert.equal(refused.code, 103, JSON.stringify(refused));
      const alsoRefused = await T(page, 'clientPublish', 'alice', unique('news:other'), { text: 'nor here' });
      assert.equal(alsoRefused.code, 103, JSON.stringify(alsoRefused));
      assert.deepEqual(await T(page, 'states', 'alice', channel), { client: 'connected', sub: 'subscribed' });
      const result = await api(server, 'publish', { channel, data: { text: 'newsroom' } });
      assert.equal(Number(result.offset), 1, 'the refused publication was not stored');
      const pubs = await exactly(page, channel, 'alice', channel, 1);
      assert.deepEqual(pubs[0].data, { text: 'newsroom' });
      assert.deepEqual(page.errors, []);
    });

    test(`B7 ${bundle.name}: a server-side subscription from the token's channels claim`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('b-personal');
      const { client: clientId } = await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice', { channels: [channel] }));
      const subscribed = await eventually('subscribed to the channel of the token', async () =>
        (await T(page, 'serverSubEvents', 'alice')).find((e) => e.event === 'subscribed' && e.channel === channel));
      assert.equal(subscribed.wasRecovering, false, JSON.stringify(subscribed));
      for (let n = 1; n <= 3; n++) await api(server, 'publish', { channel, data: { n } });
      const pubs = await exactlyClient(page, 'client-level publications', 'alice', 3);
      assert.deepEqual(pubs, [1, 2, 3].map((n) => ({ channel, offset: n, data: { n }, info: null })));
      // The server has the connection in the channel.
      const presence = await api(server, 'presence', { channel });
      assert.deepEqual(Object.values(presence.presence).map((c) => [c.client, c.user]), [[clientId, 'alice']]);
      assert.deepEqual((await T(page, 'serverSubEvents', 'alice')).map((e) => [e.event, e.channel]), [['subscribed', channel]]);
      assert.deepEqual(page.errors, []);
    });

    test(`B7b ${bundle.name}: server API subscribe and unsubscribe reach the page's client`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const page = await openPage(defer, bundle, server.url);
      const channel = unique('b-pushed');
      await T(page, 'connect', 'alice', server.wsUrl, connectionToken('alice'));
      const serverSubEvents = () => T(page, 'serverSubEvents', 'alice');
      await api(server, 'subscribe', { user: 'alice', channel });
      await eventually('the subscribe push', async () =>
        (await serverSubEvents()).some((e) => e.event === 'subscribed' && e.channel === channel));
      await api(server, 'publish', { channel, data: { hello: 'alice' } });
      const pubs = await exactlyClient(page, 'client-level publication', 'alice', 1);
      assert.deepEqual(pubs[0], { channel, offset: 1, data: { hello: 'alice' }, info: null });
      await api(server, 'unsubscribe', { user: 'alice', channel });
      await eventually('the unsubscribe push', async () =>
        (await serverSubEvents()).some((e) => e.event === 'unsubscribed' && e.channel === channel));
      await api(server, 'publish', { channel, data: { hello: 'nobody' } });
      await sleep(SETTLE_MS);
      assert.equal((await T(page, 'clientPubs', 'alice')).length, 1, 'nothing after the unsubscribe');
      assert.deepEqual((await serverSubEvents()).map((e) => [e.event, e.channel]),
        [['subscribed', channel], ['unsubscribed', channel]]);
      assert.equal((await T(page, 'states', 'alice')).client, 'connected');
      assert.deepEqual(page.errors, []);
    });

    test(`B8 ${bundle.name}: recovery after a dropped transport`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const server = await startServer({ defer });
      const relay = await startRelay(server.port, defer);
      const page = await openPage(defer, bundle, relay.url);
      const channel = unique('b-recover');
      await T(page, 'connect', 'alice', relay.wsUrl, connectionToken('alice'));
      const first = await T(page, 'subscribe', 'alice', channel);
      assert.equal(first.wasRecovering, false);
      assert.equal(first.recoverable, true, 'the channel is recoverable');
      for (let n = 1; n <= 3; n++) await api(server, 'publish', { channel, data: { n, tag: 'live' } });
      await exactly(page, 'live', 'alice', channel, 3);

      relay.block();
      await eventually('the page lost the connection', async () => {
        const states = await T(page, 'states', 'alice', channel);
        return states.client === 'connecting' && states.sub === 'subscribing';
      });
      const connecting = (await T(page, 'log', 'alice')).filter((e) => e.event === 'connecting').at(-1);
      assert.equal(connecting.code, 1, `transport closed: ${JSON.stringify(connecting)}`);
      for (let n = 1; n <= 20; n++) await api(server, 'publish', { channel, data: { n, tag: 'missed' } });
      relay.unblock();

      await recoveredAfterThree(page, channel);
    });

    test(`B9 ${bundle.name}: recovery across a restart of a SQLite (--data-dir) server`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      const dataDir = tempDir('switchboard-sdk-data-', defer);
      let server = await startServer({ defer, store: { dataDir } });
      const { port } = server;
      const relay = await startRelay(port, defer);
      const page = await openPage(defer, bundle, relay.url);
      const channel = unique('b-durable');
      await T(page, 'connect', 'alice', relay.wsUrl, connectionToken('alice'));
      const first = await T(page, 'subscribe', 'alice', channel);
      assert.equal(first.recoverable, true, 'the channel is recoverable');
      const { epoch } = await T(page, 'history', 'alice', channel, {});
      assert.ok(epoch, 'the channel has an epoch');
      await publishMany(server, channel, 'live', 3);
      await exactly(page, 'live', 'alice', channel, 3);

      await shutdownUnder(page, 'alice', server, relay);
      assert.deepEqual(await T(page, 'states', 'alice', channel), { client: 'connecting', sub: 'subscribing' });
      server = await startServer({ defer, port, store: { dataDir } });
      const published = await publishMany(server, channel, 'missed', 20);
      assert.deepEqual(published.map((r) => Number(r.offset)), range(4, 23), 'ids go on after the restart');
      assert.ok(published.every((r) => r.epoch === epoch), 'SQLite keeps the epoch');
      relay.unblock();

      const back = await recoveredAfterThree(page, channel);
      assert.equal(back.epoch, epoch, JSON.stringify(back));
    });

    for (const fallback of bundle.protobuf ? ['http_stream'] : ['http_stream', 'sse']) {
      test(`B9b ${bundle.name}: without WebSocket the page falls back to ${fallback}, chats both ways and recovers across a restart`, TIMEOUT, async (t) => {
        const defer = cleanup(t);
        const dataDir = tempDir('switchboard-sdk-data-', defer);
        let server = await startServer({ defer, store: { dataDir } });
        const { port } = server;
        const relay = await startRelay(port, defer);
        const transports = [
          { transport: 'websocket', endpoint: relay.wsUrl },
          { transport: fallback, endpoint: `${relay.url}/connection/${fallback}` },
        ];
        // With WebSocket there, the same list opens a WebSocket.
        const withWs = await openPage(defer, bundle, relay.url);
        const bob = await T(withWs, 'connect', 'bob', transports, connectionToken('bob'));
        assert.equal(bob.transport, 'websocket');
        const page = await openPage(defer, bundle, relay.url);
        await page.evaluate(() => { delete window.WebSocket; window.WebSocket = undefined; });
        const alice = await T(page, 'connect', 'alice', transports, connectionToken('alice'));
        assert.equal(alice.transport, fallback, 'no WebSocket in the page: the fallback');
        const channel = unique(`b-${fallback}`);
        const first = await T(page, 'subscribe', 'alice', channel);
        assert.equal(first.recoverable, true);
        await T(withWs, 'subscribe', 'bob', channel);
        // Alice's publication goes out through /emulation, bob's over his WebSocket.
        await T(page, 'publish', 'alice', channel, { n: 1, tag: 'live' });
        await T(withWs, 'publish', 'bob', channel, { n: 2, tag: 'live' });
        await publishMany(server, channel, 'api', 1);
        const live = await exactly(page, 'live', 'alice', channel, 3);
        assert.deepEqual(live.map((p) => p.offset), [1, 2, 3]);
        assert.deepEqual(live.map((p) => p.info?.user ?? null), ['alice', 'bob', null]);
        await exactly(withWs, 'live at bob', 'bob', channel, 3);

        await shutdownUnder(page, 'alice', server, relay);
        server = await startServer({ defer, port, store: { dataDir } });
        await publishMany(server, channel, 'missed', 20);
        relay.unblock();
        await eventually('subscribed again', async () => (await T(page, 'subscribedEvents', 'alice', channel)).length >= 2, 30000);
        const back = (await T(page, 'subscribedEvents', 'alice', channel))[1];
        assert.equal(back.recovered, true, JSON.stringify(back));
        const pubs = await exactly(page, 'recovered', 'alice', channel, 23);
        assert.deepEqual(pubs.map((p) => p.offset), range(1, 23), 'nothing lost, nothing twice');
        assert.deepEqual(pubs.slice(3).map((p) => p.data), range(1, 20).map((n) => ({ n, tag: 'missed' })));
        const log = await T(page, 'log', 'alice');
        assert.ok(log.filter((e) => e.event === 'connected').length >= 2, 'connected again');
        // And both ways after it: bob reconnected on his own.
        await T(page, 'publish', 'alice', channel, { n: 3, tag: 'after' });
        const atBob = await exactly(withWs, 'after, at bob', 'bob', channel, 24);
        assert.deepEqual(atBob.at(-1).data, { n: 3, tag: 'after' });
        assert.deepEqual(page.errors, []);
      });
    }

    test(`B10 ${bundle.name}: after a restart of a --memory server: recovered false`, TIMEOUT, async (t) => {
      const defer = cleanup(t);
      let server = await startServer({ defer });
      const { port } = server;
      const relay = await startRelay(port, defer);
      const page = await openPage(defer, bundle, relay.url);
      const channel = unique('b-volatile');
      await T(page, 'connect', 'alice', relay.wsUrl, connectionToken('alice'));
      await T(page, 'subscribe', 'alice', channel);
      await publishMany(server, channel, 'live', 3);
      await exactly(page, 'live', 'alice', channel, 3);
      const oldEpoch = (await T(page, 'history', 'alice', channel, {})).epoch;
      assert.ok(oldEpoch);

      await shutdownUnder(page, 'alice', server, relay);
      server = await startServer({ defer, port });
      const published = await publishMany(server, channel, 'new', 5);
      const newEpoch = published[0].epoch;
      assert.notEqual(newEpoch, oldEpoch, 'a new epoch after a restart in memory');
      relay.unblock();

      await eventually('subscribed again', async () => (await T(page, 'subscribedEvents', 'alice', channel)).length >= 2, 30000);
      const back = (await T(page, 'subscribedEvents', 'alice', channel))[1];
      assert.equal(back.wasRecovering, true, JSON.stringify(back));
      assert.equal(back.recovered, false, `the history it had is gone: ${JSON.stringify(back)}`);
      assert.equal(back.epoch, newEpoch, `positioned in the new stream: ${JSON.stringify(back)}`);
      // The subscription goes on in the new stream.
      const count = (await T(page, 'pubs', 'alice', channel)).length;
      await api(server, 'publish', { channel, data: { n: 6, tag: 'new' } });
      const pubs = await exactly(page, 'live in the new epoch', 'alice', channel, count + 1);
      assert.deepEqual(pubs.at(-1), { channel, offset: 6, data: { n: 6, tag: 'new' }, user: null, info: null });
      assert.equal((await T(page, 'history', 'alice', channel, {})).epoch, newEpoch);
      assert.equal((await T(page, 'states', 'alice', channel)).client, 'connected');
      assert.deepEqual(page.errors, []);
    });
  });
}
