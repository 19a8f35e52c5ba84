// Shared helpers of the SDK tests (centrifuge.test.mjs, browser.test.mjs): Switchboard
// servers and a Redis on free ports, stopped when the test ends; a TOML config writer;
// HS256 tokens made with node:crypto; the server API; a client of the project's own room
// protocol; a TCP relay that can cut every connection; polling and event waits.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = process.env.SWITCHBOARD_BIN ?? path.join(ROOT, 'target/debug/switchboard');
export const SECRET = 'sdk-test-secret-0123456789abcdef';
export const API_KEY = 'sdk-test-api-key';

/** The config every test server gets unless it passes its own. */
export const DEFAULT_CONFIG = {
  namespaces: {
    news: { client_publish: false },
    secret: { subscribe_token: true },
    ticker: { recover: 'latest', history_size: 10 },
  },
};

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Cleanups of one test, run in reverse order when it ends (passed or failed):
 * `const defer = cleanup(t); defer(() => thing.close());`.
 */
export function cleanup(t) {
  const stack = [];
  t.after(async () => {
    const errors = [];
    while (stack.length) {
      try {
        await stack.pop()();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length) throw errors[0];
  });
  return (fn) => {
    stack.push(fn);
    return fn;
  };
}

/** A TCP port that was free a moment ago (bound to port 0, read back, closed). */
export async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export function tempDir(prefix, defer) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  if (defer) defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function tomlValue(value) {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (Array.isArray(value)) return `[${value.map(tomlValue).join(', ')}]`;
  throw new Error(`no TOML for ${JSON.stringify(value)}`);
}

const isTable = (value) => value !== null && typeof value === 'object' && !Array.isArray(value);
/** A non-empty array of objects: an array of tables (`[[apps]]`). */
const isTableArray = (value) => Array.isArray(value) && value.length > 0 && value.every(isTable);
const isScalar = (value) => !isTable(value) && !isTableArray(value);

/**
 * TOML text for a plain object: scalars and arrays as keys, nested objects as tables,
 * arrays of objects as arrays of tables (`apps: [{id: '1'}]` is `[[apps]]` / `id = "1"`).
 */
export function toToml(object, prefix = [], header = '[') {
  const lines = [];
  for (const [key, value] of Object.entries(object)) {
    if (isScalar(value)) lines.push(`${key} = ${tomlValue(value)}`);
  }
  let text = '';
  const close = header === '[' ? ']' : ']]';
  if (prefix.length && (header === '[[' || lines.length || Object.values(object).every(isScalar))) {
    text += `${header}${prefix.join('.')}${close}\n`;
  }
  if (lines.length) text += `${lines.join('\n')}\n`;
  for (const [key, value] of Object.entries(object)) {
    if (isTable(value)) text += `${text ? '\n' : ''}${toToml(value, [...prefix, key])}`;
    if (isTableArray(value)) {
      for (const item of value) text += `${text ? '\n' : ''}${toToml(item, [...prefix, key], '[[')}`;
    }
  }
  return text;
}

/** Writes `config` as CFG.toml into `dir`; returns its path. */
export function writeConfig(dir, config) {
  const file = path.join(dir, 'config.toml');
  fs.writeFileSync(file, toToml(config));
  return file;
}

const base64url = (buffer) => Buffer.from(buffer).toString('base64url');

/** An HS256 JWT of `claims`. */
export function signJwt(claims, secret = SECRET) {
  const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = base64url(JSON.stringify(claims));
  const signature = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest();
  return `${head}.${body}.${base64url(signature)}`;
}

/** A connection token for `sub` (valid for an hour) with optional `info` and `channels`. */
export function connectionToken(sub, extra = {}, secret = SECRET) {
  return signJwt({ sub, exp: Math.floor(Date.now() / 1000) + 3600, ...extra }, secret);
}

/** A subscription token for `sub` in `channel`. */
export function subscriptionToken(sub, channel, secret = SECRET) {
  return signJwt({ sub, channel, exp: Math.floor(Date.now() / 1000) + 3600 }, secret);
}

/**
 * Starts `switchboard serve` and resolves once it prints `listening on http://ADDR`.
 * store: 'memory' (default), { dataDir }, or { redis: URL }. `port` 0 picks a free one.
 * The result: { port, address, url, wsUrl, stop(), log() }; `stop` sends SIGTERM and
 * waits for the exit (also registered with `defer`).
 */
export async function startServer({
  defer, port = 0, store = 'memory', config = DEFAULT_CONFIG, jwtSecret = SECRET,
  apiKey = API_KEY, args = [], name = 'server',
}) {
  if (!fs.existsSync(BIN)) throw new Error(`no server binary at ${BIN} (set SWITCHBOARD_BIN)`);
  const work = tempDir('switchboard-sdk-', defer);
  const argv = ['serve', '--listen', `127.0.0.1:${port}`, '--drain-timeout', '2'];
  if (store === 'memory') argv.push('--memory');
  else if (store.dataDir) argv.push('--data-dir', store.dataDir);
  else if (store.redis) argv.push('--redis', store.redis);
  if (config) argv.push('--config', writeConfig(work, config));
  if (jwtSecret) argv.push('--jwt-secret', jwtSecret);
  if (apiKey) argv.push('--api-key', apiKey);
  argv.push(...args);
  const child = spawn(BIN, argv, {
    cwd: work,
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  const lines = [];
  const reader = readline.createInterface({ input: child.stderr });
  const exited = once(child, 'exit');
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} did not start in 30 s:\n${lines.join('\n')}`)), 30000);
    reader.on('line', (line) => {
      lines.push(line);
      if (lines.length > 400) lines.shift();
      const found = /listening on http:\/\/(\S+)/.exec(line);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited with ${code ?? signal}:\n${lines.join('\n')}`));
    });
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20000);
      await exited;
      clearTimeout(timer);
    }
  };
  if (defer) defer(stop);
  const actualPort = Number(address.slice(address.lastIndexOf(':') + 1));
  return {
    port: actualPort,
    address,
    url: `http://${address}`,
    wsUrl: `ws://${address}/connection/websocket`,
    child,
    stop,
    exited,
    log: () => lines.join('\n'),
  };
}

/** A `redis-server` on a free port without persistence: { port, url, stop }. */
export async function startRedis(defer) {
  const port = await freePort();
  const work = tempDir('switchboard-sdk-redis-', defer);
  const child = spawn('redis-server', [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', work,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = once(child, 'exit');
  const lines = [];
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`redis-server did not start:\n${lines.join('\n')}`)), 15000);
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      lines.push(line);
      if (/Ready to accept connections/.test(line)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`redis-server exited with ${code}:\n${lines.join('\n')}`));
    });
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await exited;
    }
  };
  if (defer) defer(stop);
  return { port, url: `redis://127.0.0.1:${port}`, stop };
}

/**
 * A TCP relay on a free port in front of 127.0.0.1:`targetPort`: `block()` cuts every
 * connection (RST) and refuses new ones until `unblock()`. `target` may be changed.
 */
export async function startRelay(targetPort, defer) {
  const sockets = new Set();
  let blocked = false;
  let next = 0;
  const relay = {
    // One port, or several taken in turn, one per connection (no stickiness).
    target: targetPort,
    block() {
      blocked = true;
      for (const s of sockets) s.resetAndDestroy();
      sockets.clear();
    },
    unblock() {
      blocked = false;
    },
  };
  const server = net.createServer((client) => {
    if (blocked) {
      client.resetAndDestroy();
      return;
    }
    const targets = [].concat(relay.target);
    const upstream = net.connect(targets[next++ % targets.length], '127.0.0.1');
    const end = () => {
      for (const s of [client, upstream]) {
        sockets.delete(s);
        s.destroy();
      }
    };
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', end);
      s.on('close', end);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  const close = () => new Promise((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(resolve);
  });
  if (defer) defer(close);
  return Object.assign(relay, {
    port,
    url: `http://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${port}/connection/websocket`,
    close,
  });
}

/** POST /api/METHOD: the whole answer ({result} or {error}) and the HTTP status. */
export async function apiRaw(server, method, body, apiKey = API_KEY) {
  const response = await fetch(`${server.url ?? server}/api/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': apiKey },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(15000),
  });
  const text = await response.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    throw new Error(`api ${method}: HTTP ${response.status}, not JSON: ${text}`);
  }
  return { status: response.status, body: json };
}

/** POST /api/METHOD; the `result`, or throws naming the error. */
export async function api(server, method, body) {
  const { status, body: answer } = await apiRaw(server, method, body);
  if (answer.error) throw new Error(`api ${method} ${JSON.stringify(body)}: ${JSON.stringify(answer.error)}`);
  if (status !== 200 || !answer.result) throw new Error(`api ${method}: HTTP ${status} ${JSON.stringify(answer)}`);
  return answer.result;
}

/** Polls `check` until it returns a truthy value; fails naming `what` (a string, or a function giving one then). */
export async function eventually(what, check, timeout = 20000) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`never: ${typeof what === 'function' ? what() : what} (last: ${last?.stack ?? JSON.stringify(last)})`);
    await sleep(100);
  }
}

/** The next `event` of `emitter` (on/off API) for which `filter` holds. */
export function nextEvent(emitter, event, filter = () => true, timeout = 20000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`no '${event}' event in ${timeout} ms`));
    }, timeout);
    const listener = (ctx) => {
      if (!filter(ctx)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolve(ctx);
    };
    emitter.on(event, listener);
  });
}

/**
 * A client of the room protocol: ws://HOST/room/CHANNEL?token=JWT (or ?name=).
 * `events` holds every JSON event received; `next(filter)` waits for the first not yet
 * taken that matches.
 */
export class RoomClient {
  static async open(server, channel, { token, name, since, epoch } = {}) {
    const query = new URLSearchParams();
    if (token) query.set('token', token);
    if (name) query.set('name', name);
    if (since !== undefined) query.set('since', String(since));
    if (epoch !== undefined) query.set('epoch', epoch);
    const url = `ws://${server.address}/room/${encodeURIComponent(channel)}?${query}`;
    const room = new RoomClient(new WebSocket(url));
    await new Promise((resolve, reject) => {
      room.ws.once('open', resolve);
      room.ws.once('error', reject);
      room.ws.once('unexpected-response', (_, response) =>
        reject(new Error(`room ${channel}: HTTP ${response.statusCode}`)));
    });
    room.welcome = await room.next((e) => e.type === 'welcome');
    return room;
  }

  constructor(ws) {
    this.ws = ws;
    this.events = [];
    this.taken = new Set();
    this.waiters = [];
    ws.on('message', (data, isBinary) => {
      if (isBinary) return;
      const event = JSON.parse(data.toString());
      this.events.push(event);
      for (const waiter of [...this.waiters]) waiter();
    });
  }

  send(event) {
    this.ws.send(JSON.stringify(event));
  }

  say(text, extra = {}) {
    this.send({ type: 'message', text, ...extra });
  }

  messages() {
    return this.events.filter((e) => e.type === 'message');
  }

  next(filter = () => true, timeout = 20000) {
    return new Promise((resolve, reject) => {
      const look = () => {
        for (let i = 0; i < this.events.length; i++) {
          if (!this.taken.has(i) && filter(this.events[i])) {
            this.taken.add(i);
            done();
            resolve(this.events[i]);
            return true;
          }
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`room: no matching event in ${timeout} ms; got ${JSON.stringify(this.events)}`));
      }, timeout);
      const done = () => {
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== look);
      };
      if (!look()) this.waiters.push(look);
    });
  }

  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return;
    const closed = once(this.ws, 'close');
    this.ws.close();
    await Promise.race([closed, sleep(5000)]);
  }
}

/** A channel name unique to this run: `prefix-<random>`. */
export const unique = (prefix) => `${prefix}-${crypto.randomBytes(4).toString('hex')}`;
