// Pusher's official libraries, unchanged, against Switchboard's Pusher Channels door:
// pusher-js (its Node build, with its own bundled WebSocket client) as the subscriber,
// and the `pusher` server library for the HTTP API and for signing the channel and user
// authorisations in a small auth endpoint this file serves itself (node:http).
// Each test starts its own server on a free port (app 42, key test-key) and stops it.
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard). PUSHER_LOG=1 turns on pusher-js's log.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { once } from 'node:events';
import http from 'node:http';
import WebSocket from 'ws';
import { Centrifuge } from 'centrifuge';
import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import {
  DEFAULT_CONFIG, RoomClient, cleanup, eventually, sleep, startServer, unique,
} from './lib.mjs';

const TIMEOUT = { timeout: 180000 };
/** How long "nothing more arrives" is watched after the expected events came. */
const SETTLE_MS = 700;

const APP = { id: '42', key: 'test-key', secret: 'test-secret' };
const CONFIG = { ...DEFAULT_CONFIG, apps: [APP] };
/** The users the auth endpoint knows: id → user_info. */
const USERS = {
  1: { name: 'Ann' },
  2: { name: 'Bob' },
  3: { name: 'Cid' },
};

const settle = () => sleep(SETTLE_MS);
if (process.env.PUSHER_LOG) Pusher.logToConsole = true;

/**
 * A server for these tests: without tokens, since the first app's public channels are
 * the rooms, which a server that wants tokens does not open to them.
 */
function startPusherServer(defer, options = {}) {
  return startServer({ defer, config: CONFIG, jwtSecret: null, ...options });
}

/** The `pusher` server library pointed at `server` (or signing with another secret). */
function serverLib(server, secret = APP.secret) {
  return new PusherServer({
    appId: APP.id, key: APP.key, secret, host: '127.0.0.1', port: String(server.port), useTLS: false,
  });
}

/**
 * The application's auth endpoint, signing with the `pusher` library:
 *   POST /pusher/auth        channel authorisation (presence: user_id and user_info of ?user_id)
 *   POST /pusher/auth-wrong  the same, signed with a wrong secret
 *   POST /pusher/auth-deny   403
 *   POST /pusher/user-auth   user authentication for pusher.signin()
 * `requests` records each one (path, socket_id, channel_name, user_id).
 */
async function startAuth(defer) {
  const signer = new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret, host: '127.0.0.1', useTLS: false });
  const forger = new PusherServer({ appId: APP.id, key: APP.key, secret: 'not-the-secret', host: '127.0.0.1', useTLS: false });
  const requests = [];
  const server = http.createServer(async (req, res) => {
    let body = '';
    for await (const chunk of req) body += chunk;
    const form = new URLSearchParams(body);
    const { pathname } = new URL(req.url, 'http://auth');
    const socketId = form.get('socket_id');
    const channel = form.get('channel_name');
    const user = form.get('user_id');
    requests.push({ path: pathname, socketId, channel, user });
    const reply = (status, value) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(value));
    };
    try {
      const presence = channel?.startsWith('presence-') ? { user_id: user, user_info: USERS[user] } : undefined;
      switch (pathname) {
        case '/pusher/auth':
          return reply(200, signer.authorizeChannel(socketId, channel, presence));
        case '/pusher/auth-wrong':
          return reply(200, forger.authorizeChannel(socketId, channel, presence));
        case '/pusher/auth-deny':
          return reply(403, { error: 'not yours' });
        case '/pusher/user-auth':
          return reply(200, signer.authenticateUser(socketId, { id: user, user_info: USERS[user] }));
        default:
          return reply(404, { error: 'no such endpoint' });
      }
    } catch (error) {
      return reply(500, { error: String(error) });
    }
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
 * A pusher-js client of `user` (its auth requests say user_id=USER), recording every
 * Pusher message it receives (`frames`: {event, channel, data, user_id}), its connection
 * errors and its states; disconnected when the test ends.
 */
function newClient(server, auth, { defer, user, authPath = '/pusher/auth', key = APP.key } = {}) {
  const params = user ? { user_id: user } : {};
  const client = new Pusher(key, {
    wsHost: '127.0.0.1',
    wsPort: server.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    cluster: 'mt1',
    channelAuthorization: { endpoint: `${auth.url}${authPath}`, transport: 'ajax', params },
    userAuthentication: { endpoint: `${auth.url}/pusher/user-auth`, transport: 'ajax', params },
  });
  client.user_name = user;
  client.frames = [];
  client.errors = [];
  client.states = [];
  client.connection.bind('message', (message) => client.frames.push(message));
  client.connection.bind('error', (error) => client.errors.push(error));
  client.connection.bind('state_change', ({ current }) => client.states.push(current));
  if (defer) defer(() => client.disconnect());
  return client;
}

async function connected(server, auth, options) {
  const client = newClient(server, auth, options);
  await eventually(() => `pusher-js ${options.user ?? ''} connected (states ${JSON.stringify(client.states)})`,
    () => client.connection.state === 'connected', 15000);
  return client;
}

/** Records every event a channel emits (name and data) in `channel.events`. */
function record(channel) {
  if (!channel.events) {
    channel.events = [];
    channel.bind_global((event, data) => channel.events.push({ event, data }));
  }
  return channel;
}

const named = (channel, event) => channel.events.filter((e) => e.event === event);

/** Subscribes and waits for pusher:subscription_succeeded (fails on subscription_error). */
async function subscribe(client, name) {
  const channel = record(client.subscribe(name));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(
      `${name}: not subscribed in 15 s; frames ${JSON.stringify(client.frames)}`)), 15000);
    channel.bind('pusher:subscription_succeeded', () => {
      clearTimeout(timer);
      resolve();
    });
    channel.bind('pusher:subscription_error', (error) => {
      clearTimeout(timer);
      reject(new Error(`${name}: subscription_error ${JSON.stringify(error)}`));
    });
  });
  return channel;
}

/** Waits for `n` `event`s on `channel`, then a little longer to see that no more come. */
async function exactly(what, channel, event, n) {
  await eventually(() => `${what}: ${n} '${event}' (have ${JSON.stringify(channel.events)})`,
    () => named(channel, event).length >= n);
  await settle();
  const got = named(channel, event);
  assert.equal(got.length, n, `${what}: exactly ${n} '${event}', got ${JSON.stringify(got)}`);
  return got;
}

/** Asserts the answer of the `pusher` library is a 200 with a JSON object. */
async function ok(promise, what) {
  const response = await promise;
  assert.equal(response.status, 200, what);
  const body = await response.json();
  assert.equal(typeof body, 'object', `${what}: a JSON object, got ${JSON.stringify(body)}`);
  return body;
}

/** Which member ids and infos a presence channel's `members` holds (through `each`). */
function memberList(channel) {
  const list = [];
  channel.members.each((member) => list.push({ id: member.id, info: member.info }));
  return list.sort((a, b) => a.id.localeCompare(b.id));
}

const framesOf = (client, channel, event) =>
  client.frames.filter((f) => f.channel === channel && (!event || f.event === event));

const md5 = (text) => crypto.createHash('md5').update(text, 'utf8').digest('hex');

/**
 * A URL of Pusher's HTTP API signed by hand (auth_version 1.0): the string to sign is
 * `METHOD\nPATH\nQUERY`, QUERY being every parameter but auth_signature, keys lowercased
 * and sorted, `key=value` joined with `&`; a body is named by its body_md5.
 */
function signedUrl(server, method, path, params = {}, { body, secret = APP.secret, timestamp } = {}) {
  const query = {
    auth_key: APP.key,
    auth_timestamp: String(timestamp ?? Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    ...params,
  };
  if (body !== undefined) query.body_md5 = md5(body);
  const pairs = Object.entries(query).map(([k, v]) => [k.toLowerCase(), String(v)]);
  pairs.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const text = pairs.map(([k, v]) => `${k}=${v}`).join('&');
  const signature = crypto.createHmac('sha256', secret).update(`${method}\n${path}\n${text}`).digest('hex');
  return `${server.url}${path}?${text}&auth_signature=${signature}`;
}

describe('pusher-js and the pusher server library in Node', () => {
  test('1 connect: socket_id and activity timeout; an unknown app key is refused with 4001', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const a = await connected(server, auth, { defer });
    const b = await connected(server, auth, { defer });
    assert.match(a.connection.socket_id, /^\d+\.\d+$/, 'socket_id like 123.456');
    assert.notEqual(a.connection.socket_id, b.connection.socket_id, 'each connection its own socket_id');
    // pusher-js takes activity_timeout (s) from connection_established: the server says 30.
    assert.equal(a.connection.activityTimeout, 30000, 'activity_timeout 30 s');

    // Pusher's 4001 "application does not exist": pusher-js gives up (no retries).
    const stranger = newClient(server, auth, { defer, key: 'no-such-key' });
    // pusher-js reports a refused handshake as a WebSocketError wrapping the pusher:error.
    await eventually(() => `refused (errors ${JSON.stringify(stranger.errors)}, states ${stranger.states})`,
      () => stranger.errors.some((e) => e.type === 'WebSocketError' && e.error?.type === 'PusherError'
        && e.error.data?.code === 4001));
    await eventually('the unknown key stays disconnected', () => stranger.connection.state === 'disconnected');
    assert.ok(!stranger.states.includes('connected'), `never connected: ${stranger.states}`);
  });

  test('2 public channels: trigger, one trigger to several channels, triggerBatch', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const client = await connected(server, auth, { defer });
    const [a, b, c] = [unique('pub-a'), unique('pub-b'), unique('pub-c')];
    const chA = await subscribe(client, a);
    const chB = await subscribe(client, b);
    const chC = await subscribe(client, c);

    // One event to one channel: the handler bound to its name gets the data, parsed.
    const handled = [];
    chA.bind('ev', (data) => handled.push(data));
    assert.deepEqual(await ok(api.trigger(a, 'ev', { a: 1 }), 'trigger'), {});
    await eventually('ev reached the handler', () => handled.length === 1);
    assert.deepEqual(handled[0], { a: 1 });
    await exactly('one trigger', chA, 'ev', 1);
    assert.equal(named(chB, 'ev').length + named(chC, 'ev').length, 0, 'not in the other channels');

    // One trigger naming two channels: once in each of them, not in the third.
    await ok(api.trigger([b, c], 'multi', { n: 2 }), 'trigger to two channels');
    assert.deepEqual((await exactly('multi on b', chB, 'multi', 1))[0].data, { n: 2 });
    assert.deepEqual((await exactly('multi on c', chC, 'multi', 1))[0].data, { n: 2 });
    assert.equal(named(chA, 'multi').length, 0, 'not in the channel it did not name');

    // A batch: each event in its own channel; string data that is not JSON stays a string.
    await ok(api.triggerBatch([
      { channel: a, name: 'b1', data: { i: 1 } },
      { channel: b, name: 'b2', data: 'plain text' },
      { channel: a, name: 'b3', data: [1, 2, 3] },
    ]), 'triggerBatch');
    assert.deepEqual((await exactly('b1', chA, 'b1', 1))[0].data, { i: 1 });
    assert.deepEqual((await exactly('b3', chA, 'b3', 1))[0].data, [1, 2, 3]);
    assert.equal((await exactly('b2', chB, 'b2', 1))[0].data, 'plain text');
    assert.equal(named(chB, 'b1').length + named(chC, 'b1').length + named(chC, 'b2').length, 0);
    // In the order published.
    assert.deepEqual(chA.events.filter((e) => !e.event.startsWith('pusher')).map((e) => e.event),
      ['ev', 'b1', 'b3']);
  });

  test('3 socket_id excludes one connection from a trigger and from a batch event', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const name = unique('excl');
    const alice = await connected(server, auth, { defer });
    const bob = await connected(server, auth, { defer });
    const chAlice = await subscribe(alice, name);
    const chBob = await subscribe(bob, name);

    await ok(api.trigger(name, 'ev', { from: 'alice' }, { socket_id: alice.connection.socket_id }), 'trigger');
    assert.deepEqual((await exactly('bob gets it', chBob, 'ev', 1))[0].data, { from: 'alice' });
    assert.equal(named(chAlice, 'ev').length, 0, 'the excluded socket does not get it');

    await ok(api.triggerBatch([{ channel: name, name: 'bev', data: { n: 1 }, socket_id: bob.connection.socket_id }]),
      'batch');
    await exactly('alice gets the batch event', chAlice, 'bev', 1);
    assert.equal(named(chBob, 'bev').length, 0, 'the excluded socket does not get the batch event');

    // Without socket_id both get it.
    await ok(api.trigger(name, 'all', {}), 'trigger to all');
    await exactly('alice', chAlice, 'all', 1);
    await exactly('bob', chBob, 'all', 1);
  });

  test('4 private channels: authorised through the endpoint; 403 and a wrong signature are refused', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const name = unique('private-p');
    const client = await connected(server, auth, { defer, user: '1' });
    const ch = await subscribe(client, name);
    assert.ok(ch.subscribed);
    const asked = auth.requests.find((r) => r.channel === name);
    assert.equal(asked?.socketId, client.connection.socket_id, 'the endpoint was asked for this socket');
    await ok(api.trigger(name, 'secret', { s: 1 }), 'trigger');
    assert.deepEqual((await exactly('private event', ch, 'secret', 1))[0].data, { s: 1 });

    // The endpoint answers 403: pusher-js reports subscription_error with the status.
    const denied = await connected(server, auth, { defer, user: '2', authPath: '/pusher/auth-deny' });
    const deniedCh = record(denied.subscribe(name));
    const error = await new Promise((resolve) => deniedCh.bind('pusher:subscription_error', resolve));
    assert.equal(error.status, 403, JSON.stringify(error));
    assert.equal(deniedCh.subscribed, false);

    // Signed with a wrong secret: the server answers pusher:error and never
    // subscription_succeeded; the connection stays.
    const forged = await connected(server, auth, { defer, user: '2', authPath: '/pusher/auth-wrong' });
    const socketId = forged.connection.socket_id;
    const forgedCh = record(forged.subscribe(name));
    await eventually(() => `a pusher:error (frames ${JSON.stringify(forged.frames)})`,
      () => forged.errors.some((e) => e.type === 'PusherError'));
    await ok(api.trigger(name, 'secret', { s: 2 }), 'trigger after the forged subscription');
    await exactly('the authorised one gets it', ch, 'secret', 2);
    assert.equal(forgedCh.subscribed, false, 'not subscribed with a forged signature');
    assert.deepEqual(framesOf(forged, name).filter((f) => !f.event.startsWith('pusher:')), [],
      'no subscription_succeeded, no events of the channel');
    assert.equal(forged.connection.state, 'connected', 'the connection stays');
    assert.equal(forged.connection.socket_id, socketId, 'the same connection');
    // ... and keeps working: a public channel on it subscribes and gets events.
    const pub = unique('after-forgery');
    const pubCh = await subscribe(forged, pub);
    await ok(api.trigger(pub, 'ev', { ok: true }), 'trigger public');
    await exactly('public event after the refusal', pubCh, 'ev', 1);
  });

  test('5 presence: member lists with user_info, member_added and member_removed', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const name = unique('presence-room');
    const ann = await connected(server, auth, { defer, user: '1' });
    const annCh = await subscribe(ann, name);
    assert.equal(annCh.members.count, 1);
    assert.deepEqual(annCh.members.me, { id: '1', info: { name: 'Ann' } });
    assert.deepEqual(memberList(annCh), [{ id: '1', info: { name: 'Ann' } }]);

    const bob = await connected(server, auth, { defer, user: '2' });
    const bobCh = await subscribe(bob, name);
    assert.equal(bobCh.members.count, 2, 'bob sees both');
    assert.deepEqual(bobCh.members.me, { id: '2', info: { name: 'Bob' } });
    assert.deepEqual(memberList(bobCh), [{ id: '1', info: { name: 'Ann' } }, { id: '2', info: { name: 'Bob' } }]);
    assert.deepEqual(bobCh.members.get('1'), { id: '1', info: { name: 'Ann' } });

    const added = await exactly('ann sees bob join', annCh, 'pusher:member_added', 1);
    assert.deepEqual(added[0].data, { id: '2', info: { name: 'Bob' } });
    assert.equal(annCh.members.count, 2);
    assert.equal(named(bobCh, 'pusher:member_added').length, 0, 'no member_added for oneself');

    bob.disconnect();
    const removed = await exactly('ann sees bob leave', annCh, 'pusher:member_removed', 1);
    assert.deepEqual(removed[0].data, { id: '2', info: { name: 'Bob' } });
    assert.equal(annCh.members.count, 1);
    assert.deepEqual(memberList(annCh), [{ id: '1', info: { name: 'Ann' } }]);
  });

  test('6 presence: two connections of one user count once', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const name = unique('presence-tabs');
    const observer = await connected(server, auth, { defer, user: '2' });
    const obsCh = await subscribe(observer, name);

    const tab1 = await connected(server, auth, { defer, user: '1' });
    await subscribe(tab1, name);
    await exactly('user 1 joined', obsCh, 'pusher:member_added', 1);
    assert.equal(obsCh.members.count, 2);

    // A second tab of user 1: it sees two members, the observer no new member.
    const tab2 = await connected(server, auth, { defer, user: '1' });
    const tab2Ch = await subscribe(tab2, name);
    assert.equal(tab2Ch.members.count, 2, `members of the second tab: ${JSON.stringify(memberList(tab2Ch))}`);
    assert.deepEqual(memberList(tab2Ch).map((m) => m.id), ['1', '2']);
    await settle();
    assert.equal(named(obsCh, 'pusher:member_added').length, 1, 'a second connection of user 1 is no new member');
    assert.equal(obsCh.members.count, 2);

    // Closing one of the two tabs: user 1 is still there.
    tab1.disconnect();
    await eventually('tab 1 closed', () => tab1.connection.state === 'disconnected');
    await sleep(1500);
    assert.equal(named(obsCh, 'pusher:member_removed').length, 0, 'user 1 still has a connection');
    assert.equal(obsCh.members.count, 2);

    // Closing the other: one member_removed.
    tab2.disconnect();
    const removed = await exactly('user 1 left', obsCh, 'pusher:member_removed', 1);
    assert.deepEqual(removed[0].data, { id: '1', info: { name: 'Ann' } });
    assert.equal(obsCh.members.count, 1);
  });

  test('7 client events: to the others on private and presence channels, refused on public ones', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const ann = await connected(server, auth, { defer, user: '1' });
    const bob = await connected(server, auth, { defer, user: '2' });

    // Private: the other client gets it, the sender does not.
    const priv = unique('private-chat');
    const annPriv = await subscribe(ann, priv);
    const bobPriv = await subscribe(bob, priv);
    assert.equal(annPriv.trigger('client-x', { hi: 1 }), true, 'pusher-js sent it');
    assert.deepEqual((await exactly('bob gets client-x', bobPriv, 'client-x', 1))[0].data, { hi: 1 });
    assert.equal(named(annPriv, 'client-x').length, 0, 'not echoed to the sender');
    bobPriv.trigger('client-y', 'text back');
    assert.equal((await exactly('ann gets client-y', annPriv, 'client-y', 1))[0].data, 'text back');
    assert.equal(named(bobPriv, 'client-y').length, 0, 'not echoed to the sender');

    // Presence: the same, and the receiver learns who sent it (metadata.user_id).
    const pres = unique('presence-chat');
    const annPres = await subscribe(ann, pres);
    const bobPres = await subscribe(bob, pres);
    const got = [];
    bobPres.bind('client-typing', (data, metadata) => got.push({ data, metadata }));
    annPres.trigger('client-typing', { typing: true });
    await eventually('bob gets client-typing', () => got.length === 1);
    assert.deepEqual(got[0].data, { typing: true });
    assert.equal(got[0].metadata?.user_id, '1', `metadata: ${JSON.stringify(got[0].metadata)}`);
    const frame = framesOf(bob, pres, 'client-typing')[0];
    assert.equal(frame.user_id, '1', `the frame names its sender: ${JSON.stringify(frame)}`);
    await exactly('once', bobPres, 'client-typing', 1);
    assert.equal(named(annPres, 'client-typing').length, 0, 'not echoed to the sender');

    // Public: refused with pusher:error; nobody gets it; the connection stays and works.
    const pub = unique('public-chat');
    const annPub = await subscribe(ann, pub);
    const bobPub = await subscribe(bob, pub);
    const socketId = ann.connection.socket_id;
    const errorsBefore = ann.errors.length;
    annPub.trigger('client-nope', { no: 1 });
    await eventually(() => `a pusher:error for the public client event (errors ${JSON.stringify(ann.errors)})`,
      () => ann.errors.slice(errorsBefore).some((e) => e.type === 'PusherError'));
    await settle();
    assert.equal(named(bobPub, 'client-nope').length, 0, 'a refused client event reaches nobody');
    assert.equal(ann.connection.state, 'connected', 'the connection stays');
    assert.equal(ann.connection.socket_id, socketId, 'the same connection');
    annPriv.trigger('client-still', { ok: true });
    await exactly('client events still work after the refusal', bobPriv, 'client-still', 1);
  });

  test('8 unsubscribe: the server sends the channel no more', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const client = await connected(server, auth, { defer });
    const gone = unique('gone');
    const kept = unique('kept');
    const goneCh = await subscribe(client, gone);
    await ok(api.trigger(gone, 'ev', { n: 1 }), 'trigger');
    await exactly('before unsubscribing', goneCh, 'ev', 1);

    client.unsubscribe(gone);
    // Subscribed after the unsubscribe on the same connection: once this succeeded, the
    // server has read the unsubscribe.
    const keptCh = await subscribe(client, kept);
    await ok(api.trigger([gone, kept], 'ev', { n: 2 }), 'trigger to both');
    await exactly('the kept channel', keptCh, 'ev', 1);
    // pusher-js drops events of channels it left: look at what came over the wire.
    assert.deepEqual(framesOf(client, gone, 'ev').map((f) => f.data), [{ n: 1 }],
      'nothing more of the unsubscribed channel arrives');
  });

  test('9 user sign-in: sendToUser reaches every connection of that user; terminateUserConnections closes them', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const signedIn = async (user) => {
      const client = await connected(server, auth, { defer, user });
      client.signin();
      await eventually(() => `user ${user} signed in (frames ${JSON.stringify(client.frames)})`,
        () => client.frames.some((f) => f.event === 'pusher:signin_success'));
      await eventually(() => `#server-to-user-${user} subscribed (frames ${JSON.stringify(client.frames)})`,
        () => framesOf(client, `#server-to-user-${user}`, 'pusher_internal:subscription_succeeded').length === 1);
      assert.equal(client.user.user_data?.id, user);
      client.got = [];
      client.user.bind('ev', (data) => client.got.push(data));
      return client;
    };
    const cid1 = await signedIn('3');
    const cid2 = await signedIn('3');
    const bob = await signedIn('2');
    const signin = auth.requests.find((r) => r.path === '/pusher/user-auth' && r.socketId === cid1.connection.socket_id);
    assert.ok(signin, 'the user-auth endpoint was asked for this socket');

    await ok(api.sendToUser('3', 'ev', { hello: 'you' }), 'sendToUser');
    for (const c of [cid1, cid2]) {
      await eventually('both connections of user 3 get it', () => c.got.length === 1);
      assert.deepEqual(c.got[0], { hello: 'you' });
    }
    await settle();
    assert.deepEqual(bob.got, [], 'another user does not');
    assert.equal(cid1.got.length + cid2.got.length, 2, 'once each');

    // Terminate: both of user 3's connections are closed with 4009 (pusher-js then does
    // not reconnect), user 2's stays.
    const bobSocket = bob.connection.socket_id;
    await ok(api.terminateUserConnections('3'), 'terminateUserConnections');
    for (const [i, c] of [cid1, cid2].entries()) {
      await eventually(() => `connection ${i + 1} of user 3 closed (states ${JSON.stringify(c.states)}, errors ${JSON.stringify(c.errors)})`,
        () => c.connection.state === 'disconnected');
      assert.ok(c.errors.some((e) => e.type === 'PusherError' && e.data?.code === 4009),
        `told 4009: ${JSON.stringify(c.errors)}`);
    }
    await settle();
    assert.ok([cid1, cid2].every((c) => c.connection.state === 'disconnected'), 'they stay disconnected');
    assert.equal(bob.connection.state, 'connected');
    assert.equal(bob.connection.socket_id, bobSocket, 'user 2 keeps its connection');
    assert.ok(!bob.states.slice(1).some((s) => s !== 'connected'), `user 2 states: ${bob.states}`);
  });

  test('10 HTTP API reads: channels, one channel, presence users', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const pres = unique('presence-info');
    const pub = unique('public-info');
    const ann1 = await connected(server, auth, { defer, user: '1' });
    const ann2 = await connected(server, auth, { defer, user: '1' });
    const bob = await connected(server, auth, { defer, user: '2' });
    for (const c of [ann1, ann2, bob]) await subscribe(c, pres);
    await subscribe(bob, pub);

    const json = async (options) => ok(api.get(options), JSON.stringify(options));
    // Presence channels with their user counts (two users, three connections).
    assert.deepEqual(await json({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }),
      { channels: { [pres]: { user_count: 2 } } });
    // Every occupied channel.
    const all = await json({ path: '/channels' });
    assert.deepEqual(Object.keys(all.channels).sort(), [pres, pub].sort(), JSON.stringify(all));
    // One channel.
    assert.deepEqual(await json({ path: `/channels/${pres}`, params: { info: 'user_count,subscription_count' } }),
      { occupied: true, user_count: 2, subscription_count: 3 });
    assert.deepEqual(await json({ path: `/channels/${pub}`, params: { info: 'subscription_count' } }),
      { occupied: true, subscription_count: 1 });
    assert.deepEqual(await json({ path: `/channels/${unique('nobody')}` }), { occupied: false });
    // The users of a presence channel, once each.
    const users = await json({ path: `/channels/${pres}/users` });
    assert.deepEqual(users.users.map((u) => u.id).sort(), ['1', '2'], JSON.stringify(users));
    assert.ok(users.users.every((u) => Object.keys(u).join() === 'id'), JSON.stringify(users));

    // After bob leaves: one user, two connections; the public channel is gone.
    bob.disconnect();
    await eventually('bob gone from the counts', async () => {
      const info = await json({ path: `/channels/${pres}`, params: { info: 'user_count,subscription_count' } });
      return info.user_count === 1 && info.subscription_count === 2;
    });
    assert.deepEqual(await json({ path: `/channels/${pres}/users` }), { users: [{ id: '1' }] });
    assert.deepEqual(await json({ path: `/channels/${pub}` }), { occupied: false });
  });

  test('11 HTTP API signatures: a wrong secret, an old timestamp and a changed body get 401', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const client = await connected(server, auth, { defer });
    const name = unique('signed');
    const ch = await subscribe(client, name);

    // The library with a wrong secret: 401 for a trigger and for a read; nothing delivered.
    const forger = serverLib(server, 'not-the-secret');
    await assert.rejects(forger.trigger(name, 'ev', { forged: true }), (e) => e.status === 401);
    await assert.rejects(forger.get({ path: '/channels' }), (e) => e.status === 401);

    // Signed by hand: right now it is accepted (the signing here is right) ...
    const path = `/apps/${APP.id}/channels`;
    const fresh = await fetch(signedUrl(server, 'GET', path, { filter_by_prefix: 'sig' }));
    assert.equal(fresh.status, 200, await fresh.text());
    const body = JSON.stringify({ name: 'ev', channels: [name], data: JSON.stringify({ by: 'hand' }) });
    const eventsPath = `/apps/${APP.id}/events`;
    const post = (url, text = body) => fetch(url, { method: 'POST', body: text, headers: { 'content-type': 'application/json' } });
    const posted = await post(signedUrl(server, 'POST', eventsPath, {}, { body }));
    assert.equal(posted.status, 200, await posted.text());
    // ... 11 minutes old it is not, and a body other than the signed one is not.
    const old = Math.floor(Date.now() / 1000) - 660;
    assert.equal((await fetch(signedUrl(server, 'GET', path, {}, { timestamp: old }))).status, 401, 'old GET');
    assert.equal((await post(signedUrl(server, 'POST', eventsPath, {}, { body, timestamp: old }))).status, 401, 'old POST');
    const other = JSON.stringify({ name: 'ev', channels: [name], data: JSON.stringify({ by: 'mallory' }) });
    assert.equal((await post(signedUrl(server, 'POST', eventsPath, {}, { body }), other)).status, 401, 'changed body');
    assert.equal((await fetch(signedUrl(server, 'GET', path, {}, { secret: 'nope' }))).status, 401, 'wrong secret');
    assert.equal((await fetch(`${server.url}${path}`)).status, 401, 'unsigned');

    const got = await exactly('only the signed event', ch, 'ev', 1);
    assert.deepEqual(got[0].data, { by: 'hand' });
  });

  test('12 reconnection after a server restart: pusher-js reconnects and resubscribes', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const client = await connected(server, auth, { defer, user: '1' });
    const pub = unique('restart');
    const priv = unique('private-restart');
    const pubGot = [];
    const privGot = [];
    (await subscribe(client, pub)).bind('ev', (data) => pubGot.push(data));
    (await subscribe(client, priv)).bind('ev', (data) => privGot.push(data));
    const before = client.connection.socket_id;

    await server.stop();
    await eventually('pusher-js noticed', () => client.connection.state !== 'connected');
    const again = await startPusherServer(defer, { port: server.port, name: 'restarted' });
    await eventually(() => `reconnected (states ${JSON.stringify(client.states)})`,
      () => client.connection.state === 'connected' && client.connection.socket_id !== before, 60000);
    for (const name of [pub, priv]) {
      await eventually(() => `${name} subscribed again`,
        () => framesOf(client, name, 'pusher_internal:subscription_succeeded').length === 2);
    }
    const api = serverLib(again);
    await ok(api.trigger([pub, priv], 'ev', { after: 'restart' }), 'trigger after the restart');
    await eventually('both handlers got it', () => pubGot.length === 1 && privGot.length === 1);
    assert.deepEqual(pubGot, [{ after: 'restart' }]);
    assert.deepEqual(privGot, [{ after: 'restart' }]);
  });

  test('13 across doors: a room client, centrifuge-js and pusher-js in one channel', TIMEOUT, async (t) => {
    const defer = cleanup(t);
    const server = await startPusherServer(defer);
    const auth = await startAuth(defer);
    const api = serverLib(server);
    const name = unique('mixed');
    const room = await RoomClient.open(server, name, { name: 'roomie' });
    defer(() => room.close());
    const centrifuge = new Centrifuge(server.wsUrl, {
      websocket: WebSocket, timeout: 10000, minReconnectDelay: 100, maxReconnectDelay: 1000,
    });
    defer(() => centrifuge.disconnect());
    centrifuge.connect();
    const sub = centrifuge.newSubscription(name);
    const pubs = [];
    sub.on('publication', (ctx) => pubs.push(ctx.data));
    sub.subscribe();
    await sub.ready(15000);
    const client = await connected(server, auth, { defer });
    const ch = await subscribe(client, name);

    // Room → pusher-js: event `message`, data {"text": ...}.
    room.say('hello from the room');
    await room.next((e) => e.type === 'message' && e.text === 'hello from the room');
    const [fromRoom] = await exactly('the room message', ch, 'message', 1);
    assert.equal(typeof fromRoom.data, 'object', JSON.stringify(fromRoom));
    assert.equal(fromRoom.data.text, 'hello from the room', JSON.stringify(fromRoom));

    // Pusher → room and centrifuge: the JSON data, the event's name for the room.
    await ok(api.trigger(name, 'ev', { x: 1 }), 'trigger');
    const atRoom = await room.next((e) => e.type === 'message' && e.event === 'ev');
    assert.deepEqual(atRoom.data, { x: 1 }, JSON.stringify(atRoom));
    assert.equal(atRoom.room, name);
    await eventually('centrifuge got the trigger', () => pubs.some((d) => JSON.stringify(d) === '{"x":1}'));
    assert.deepEqual((await exactly('pusher-js gets its own trigger once', ch, 'ev', 1))[0].data, { x: 1 });

    // Centrifuge → pusher-js (and the room).
    await sub.publish({ y: 2 });
    await room.next((e) => e.type === 'message' && JSON.stringify(e.data) === '{"y":2}');
    const [, fromCf] = await exactly('the centrifuge publication', ch, 'message', 2);
    assert.deepEqual(fromCf.data, { y: 2 }, `the publication's data is the event's data: ${JSON.stringify(fromCf)}`);
  });
});
