// Laravel Echo (npm `laravel-echo`, its browser bundle dist/echo.iife.js) over pusher-js's
// browser bundle (dist/web/pusher.min.js), unchanged, in Debian's Chromium against
// Switchboard's Pusher door. The server serves nothing for this: each test serves the
// page, both bundles and the application's auth endpoint (/broadcasting/auth, signing
// with the `pusher` server library) from a node:http server of its own on 127.0.0.1, and
// each page ("tab") is a browser context of its own.
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard) and /usr/bin/chromium
// (CHROMIUM elsewhere).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import PusherServer from 'pusher';
import { DEFAULT_CONFIG, cleanup, eventually, sleep, startServer, unique } from './lib.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const TIMEOUT = { timeout: 180000 };
const SETTLE_MS = 700;

const APP = { id: '42', key: 'test-key', secret: 'test-secret' };
const CONFIG = { ...DEFAULT_CONFIG, apps: [APP] };
/** The users the auth endpoint knows: their user_info (Echo hands these to here/joining/leaving). */
const USERS = {
  1: { id: '1', name: 'Ann' },
  2: { id: '2', name: 'Bob' },
  3: { id: '3', name: 'Cid' },
};
/** Channels `private-vault-*` are user 1's alone: anyone else gets 403. */
const VAULT = 'private-vault-';

const FILES = {
  '/pusher.min.js': path.join(HERE, 'node_modules/pusher-js/dist/web/pusher.min.js'),
  '/echo.iife.js': path.join(HERE, 'node_modules/laravel-echo/dist/echo.iife.js'),
};
const PAGE = `<!doctype html><meta charset="utf-8"><title>Laravel Echo</title>
<script src="/pusher.min.js"></script><script src="/echo.iife.js"></script><body></body>`;

/**
 * The application: GET / (the page), the two bundles, POST /broadcasting/auth (channel
 * authorisation of the user_id param; presence channels with that user's info).
 */
async function startApp(defer) {
  const signer = new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret, host: '127.0.0.1', useTLS: false });
  const requests = [];
  const server = http.createServer(async (req, res) => {
    let body = '';
    for await (const chunk of req) body += chunk;
    const { pathname } = new URL(req.url, 'http://app');
    const send = (status, type, content) => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(content);
    };
    if (req.method === 'GET' && pathname === '/') return send(200, 'text/html; charset=utf-8', PAGE);
    if (req.method === 'GET' && FILES[pathname]) return send(200, 'text/javascript', fs.readFileSync(FILES[pathname]));
    if (req.method === 'POST' && pathname === '/broadcasting/auth') {
      const form = new URLSearchParams(body);
      const socketId = form.get('socket_id');
      const channel = form.get('channel_name');
      const user = form.get('user_id');
      requests.push({ socketId, channel, user });
      if (!USERS[user] || (channel.startsWith(VAULT) && user !== '1')) {
        return send(403, 'application/json', JSON.stringify({ message: 'This action is unauthorized.' }));
      }
      const presence = channel.startsWith('presence-') ? { user_id: user, user_info: USERS[user] } : undefined;
      return send(200, 'application/json', JSON.stringify(signer.authorizeChannel(socketId, channel, presence)));
    }
    return send(404, 'text/plain', 'not found');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  defer(() => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(resolve);
  }));
  return { url: `http://127.0.0.1:${server.address().port}`, requests };
}

/**
 * Runs in the page (serialized with toString): `window.T` drives one Echo instance and
 * hands back plain values; `log` records what Echo's callbacks were given, in order.
 */
function harness() {
  let echo;
  const log = [];
  const push = (entry) => log.push(JSON.parse(JSON.stringify(entry)));
  window.T = {
    async start({ key, wsPort, user }) {
      // eslint-disable-next-line no-undef
      echo = new Echo.default({
        broadcaster: 'pusher',
        key,
        wsHost: '127.0.0.1',
        wsPort,
        forceTLS: false,
        enabledTransports: ['ws'],
        disableStats: true,
        cluster: 'mt1',
        authEndpoint: '/broadcasting/auth',
        auth: { params: { user_id: user } },
      });
      const connection = echo.connector.pusher.connection;
      connection.bind('error', (error) => push({ kind: 'connection-error', error }));
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`not connected in 15 s: ${connection.state}`)), 15000);
        const check = () => {
          if (connection.state === 'connected') {
            clearTimeout(timer);
            resolve();
          }
        };
        connection.bind('state_change', check);
        check();
      });
      return echo.socketId();
    },
    join(room) {
      echo.join(room)
        .here((members) => push({ kind: 'here', room, members }))
        .joining((member) => push({ kind: 'joining', room, member }))
        .leaving((member) => push({ kind: 'leaving', room, member }))
        .listen('.ev', (data) => push({ kind: 'ev', channel: `presence-${room}`, data }))
        .listenForWhisper('typing', (data) => push({ kind: 'whisper', channel: `presence-${room}`, data }))
        .error((error) => push({ kind: 'error', channel: `presence-${room}`, error }));
    },
    private(name) {
      const channel = echo.private(name)
        .listen('.ev', (data) => push({ kind: 'ev', channel: `private-${name}`, data }))
        .listenForWhisper('typing', (data) => push({ kind: 'whisper', channel: `private-${name}`, data }))
        .error((error) => push({ kind: 'error', channel: `private-${name}`, error }));
      channel.subscribed(() => push({ kind: 'subscribed', channel: `private-${name}` }));
    },
    whisper(name, event, data) {
      echo.private(name).whisper(event, data);
    },
    whisperPresence(room, event, data) {
      echo.join(room).whisper(event, data);
    },
    subscribed(channel) {
      return Boolean(echo.connector.pusher.channel(channel)?.subscribed);
    },
    memberCount(room) {
      return echo.connector.pusher.channel(`presence-${room}`)?.members.count;
    },
    state() {
      return echo.connector.pusher.connection.state;
    },
    log() {
      return log;
    },
    disconnect() {
      echo.disconnect();
    },
  };
  return typeof Echo.default;
}

let browser;
before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
});
after(async () => {
  if (browser) await browser.close();
});

const T = (page, method, ...args) => page.evaluate(([m, a]) => window.T[m](...a), [method, args]);

/**
 * A tab of `user`: the app's page in a browser context of its own, Echo connected to
 * `server`. `page.errors` collects script errors; `close()` closes the tab.
 */
async function openTab(defer, app, server, user) {
  const context = await browser.newContext();
  const close = defer(() => context.close());
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(error));
  await page.goto(`${app.url}/`);
  assert.equal(await page.evaluate(`(${harness})()`), 'function', 'the bundles define Echo and Pusher');
  page.user = user;
  page.socketId = await T(page, 'start', { key: APP.key, wsPort: server.port, user });
  page.closeTab = close;
  return page;
}

const entries = async (page, kind, filter = () => true) =>
  (await T(page, 'log')).filter((e) => e.kind === kind && filter(e));

/** Waits for `n` log entries of `kind`, then a little longer to see that no more come. */
async function exactly(page, what, kind, n, filter) {
  await eventually(`${what}: ${n} '${kind}'`, async () => (await entries(page, kind, filter)).length >= n);
  await sleep(SETTLE_MS);
  const got = await entries(page, kind, filter);
  assert.equal(got.length, n, `${what}: exactly ${n} '${kind}', got ${JSON.stringify(got)}`);
  return got;
}

const ids = (members) => members.map((m) => m.id).sort();

describe('Laravel Echo over pusher-js in Chromium', () => {
  test('E1 presence with Echo.join: two tabs of one user are one member', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startServer({ defer, config: CONFIG });
    const app = await startApp(defer);
    const room = unique('room');
    const here = async (page) => (await exactly(page, `here of user ${page.user}`, 'here', 1))[0].members;

    const tab1 = await openTab(defer, app, server, '1');
    await T(tab1, 'join', room);
    assert.deepEqual(await here(tab1), [USERS[1]]);

    const bob = await openTab(defer, app, server, '2');
    await T(bob, 'join', room);
    assert.deepEqual(ids(await here(bob)), ['1', '2']);
    const [joined] = await exactly(tab1, 'user 1 sees bob join', 'joining', 1);
    assert.deepEqual(joined.member, USERS[2]);

    // User 1's second tab: here lists both users, bob sees nobody new.
    const tab2 = await openTab(defer, app, server, '1');
    await T(tab2, 'join', room);
    assert.deepEqual(ids(await here(tab2)), ['1', '2']);
    await sleep(SETTLE_MS);
    assert.deepEqual(await entries(bob, 'joining'), [], 'a second tab of user 1 is no new member');
    assert.equal(await T(bob, 'memberCount', room), 2);

    // A third user sees user 1 exactly once.
    const cid = await openTab(defer, app, server, '3');
    await T(cid, 'join', room);
    const members = await here(cid);
    assert.deepEqual(ids(members), ['1', '2', '3'], JSON.stringify(members));
    assert.deepEqual(members.filter((m) => m.id === '1'), [USERS[1]], 'user 1 once, with its info');
    await exactly(bob, 'bob sees cid join', 'joining', 1);

    // Closing one of user 1's tabs: no leaving; closing the other: one.
    await tab1.closeTab();
    await sleep(1500);
    assert.deepEqual(await entries(bob, 'leaving'), [], 'user 1 still has a tab');
    assert.deepEqual(await entries(cid, 'leaving'), []);
    assert.equal(await T(cid, 'memberCount', room), 3);
    await tab2.closeTab();
    for (const page of [bob, cid]) {
      const [left] = await exactly(page, `user ${page.user} sees user 1 leave`, 'leaving', 1);
      assert.deepEqual(left.member, USERS[1]);
    }
    assert.equal(await T(cid, 'memberCount', room), 2);
    for (const page of [bob, cid]) assert.deepEqual(page.errors, []);
  });

  test('E2 Echo.private: listen, whisper and listenForWhisper between two users; toOthers; a refused channel', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startServer({ defer, config: CONFIG });
    const app = await startApp(defer);
    const api = new PusherServer({
      appId: APP.id, key: APP.key, secret: APP.secret, host: '127.0.0.1', port: String(server.port), useTLS: false,
    });
    const name = unique('orders');
    const channel = `private-${name}`;
    const ann = await openTab(defer, app, server, '1');
    const bob = await openTab(defer, app, server, '2');
    for (const page of [ann, bob]) {
      await T(page, 'private', name);
      await eventually(`user ${page.user} subscribed`, () => T(page, 'subscribed', channel));
    }
    assert.ok(app.requests.some((r) => r.channel === channel && r.socketId === ann.socketId && r.user === '1'),
      'Echo asked the auth endpoint for the channel');

    // A server event reaches both listeners.
    await api.trigger(channel, 'ev', { order: 7 });
    for (const page of [ann, bob]) {
      const [got] = await exactly(page, `user ${page.user} gets ev`, 'ev', 1);
      assert.deepEqual(got.data, { order: 7 });
    }
    // Broadcast toOthers: the socket Echo names (X-Socket-ID) is left out.
    await api.trigger(channel, 'ev', { order: 8 }, { socket_id: ann.socketId });
    await exactly(bob, 'bob gets the toOthers event', 'ev', 2);
    assert.equal((await entries(ann, 'ev')).length, 1, 'not the socket it was sent for');

    // Whispers: to the other user, not back to the whisperer.
    await T(ann, 'whisper', name, 'typing', { user: 'Ann' });
    const [whisper] = await exactly(bob, 'bob hears ann', 'whisper', 1);
    assert.deepEqual(whisper.data, { user: 'Ann' });
    await T(bob, 'whisper', name, 'typing', { user: 'Bob' });
    const [back] = await exactly(ann, 'ann hears bob', 'whisper', 1);
    assert.deepEqual(back.data, { user: 'Bob' });
    assert.equal((await entries(bob, 'whisper')).length, 1, 'bob does not hear himself');

    // On a presence channel too.
    const room = unique('desk');
    for (const page of [ann, bob]) {
      await T(page, 'join', room);
      await exactly(page, `user ${page.user} in the room`, 'here', 1);
    }
    await T(bob, 'whisperPresence', room, 'typing', { in: 'room' });
    const [inRoom] = await exactly(ann, 'ann hears bob in the room', 'whisper', 1, (e) => e.channel === `presence-${room}`);
    assert.deepEqual(inRoom.data, { in: 'room' });

    // The app refuses bob the vault: Echo's error callback with the 403; ann gets in.
    const vault = unique('vault');
    await T(bob, 'private', vault);
    const [refused] = await exactly(bob, 'bob refused', 'error', 1);
    assert.equal(refused.error.status, 403, JSON.stringify(refused));
    assert.equal(await T(bob, 'subscribed', `private-${vault}`), false);
    await T(ann, 'private', vault);
    await eventually('ann subscribed to the vault', () => T(ann, 'subscribed', `private-${vault}`));
    assert.equal(await T(bob, 'state'), 'connected', 'a refusal leaves the connection');
    for (const page of [ann, bob]) assert.deepEqual(page.errors, []);
  });
});
