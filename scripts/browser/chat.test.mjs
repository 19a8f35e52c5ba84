// The chat page end to end in Debian's Chromium (playwright-core): two people chat
// both ways, see each other typing and in the member list, ride out a server restart and
// a network outage without losing or repeating a message, and markup stays text; and
// pages that cannot open a WebSocket (none in the browser, or upgrades refused on the
// way) chat over HTTP streaming beside one that can, through a restart; and over HTTPS
// the page and its WebSockets go over HTTP/2.
//
// Needs SWITCHBOARD_BIN (scripts/browser.sh builds it). Screenshots go to
// reports/browser/ (BROWSER_REPORTS elsewhere).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.SWITCHBOARD_BIN ?? path.join(ROOT, 'target/release/switchboard');
const REPORTS = process.env.BROWSER_REPORTS ?? path.join(ROOT, 'reports/browser');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

/** Starts `switchboard serve`; resolves with the process and its address once it listens. */
async function startServer(listen, dataDir, args = []) {
  const child = spawn(BIN, ['serve', '--listen', listen, '--data-dir', dataDir, '--drain-timeout', '2', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  const lines = readline.createInterface({ input: child.stderr });
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('serve did not start in 15 s')), 15000);
    lines.on('line', (line) => {
      const found = /listening on https?:\/\/(\S+)/.exec(line);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
    child.on('exit', (code) => reject(new Error(`serve exited with ${code}`)));
  });
  const exited = once(child, 'exit');
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await exited;
    }
  };
  cleanups.push(stop);
  return { address, stop };
}

/**
 * A TCP server on a free loopback port whose connections `onClient(client, track)`
 * handles (`track` keeps a socket to be destroyed at cleanup); resolves with it.
 */
async function listenRelay(onClient) {
  const sockets = new Set();
  const track = (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    return socket;
  };
  const server = net.createServer((client) => onClient(track(client), track));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  cleanups.push(() => new Promise((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(resolve);
  }));
  return { server, sockets };
}

/** Joins two sockets both ways; either one closing or failing ends both. */
function pipeBoth(client, upstream) {
  const end = () => {
    client.destroy();
    upstream.destroy();
  };
  for (const s of [client, upstream]) {
    s.on('error', end);
    s.on('close', end);
  }
  client.pipe(upstream);
  upstream.pipe(client);
}

/** A TCP relay in front of the server that can cut every connection and refuse new ones. */
async function startRelay(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  let blocked = false;
  const { server, sockets } = await listenRelay((client, track) => {
    if (blocked) {
      client.resetAndDestroy();
      return;
    }
    pipeBoth(client, track(net.connect(port, host)));
  });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    block() {
      blocked = true;
      for (const s of sockets) s.resetAndDestroy();
    },
    unblock() {
      blocked = false;
    },
  };
}

/** Polls `check` until it returns a truthy value (up to 20 s); fails naming `what`. */
async function eventually(what, check) {
  const deadline = Date.now() + 20000;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`never: ${what} (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const status = (page) => page.locator('#status').getAttribute('data-state');
const members = async (page) => (await page.locator('#members .name').allTextContents()).sort();
/** Stored messages shown (not those still being sent): [{id, from, text}]. */
const shown = (page) => page.locator('#messages .message:not(.pending)').evaluateAll((items) =>
  items.map((li) => ({
    id: Number(li.dataset.id),
    from: li.querySelector('.from').textContent,
    text: li.querySelector('.text').textContent,
  })));
const hasMessage = async (page, from, text) =>
  (await shown(page)).some((m) => m.from === from && m.text === text);

function assertOnceInOrder(messages, who) {
  const ids = messages.map((m) => m.id);
  assert.ok(ids.every((id, i) => i === 0 || id > ids[i - 1]), `${who}: ids in order: ${ids}`);
  const texts = messages.map((m) => m.text);
  assert.equal(new Set(texts).size, texts.length, `${who}: no message twice: ${texts}`);
}

test('two people chat in the browser through a restart and an outage', async () => {
  assert.ok(fs.existsSync(BIN), `no server binary at ${BIN}`);
  assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  fs.mkdirSync(REPORTS, { recursive: true });
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-browser-'));
  cleanups.push(() => fs.rmSync(dataDir, { recursive: true, force: true }));

  let server = await startServer('127.0.0.1:0', dataDir);
  const address = server.address;
  const relay = await startRelay(address);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  cleanups.push(() => browser.close());
  const errors = [];
  const open = async (options) => {
    const page = await (await browser.newContext(options)).newPage();
    page.on('pageerror', (error) => errors.push(error));
    return page;
  };
  // Alice on a desktop, Bob on a phone.
  const alice = await open({ viewport: { width: 1280, height: 800 } });
  const bob = await open({
    viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
  });

  // Alice joins through the form, Bob straight from the link.
  await alice.goto(`${relay.url}/`);
  await alice.screenshot({ path: path.join(REPORTS, 'join-desktop.png') });
  await alice.getByLabel('Name').fill('alice');
  await alice.getByLabel('Room').fill('e2e');
  await alice.getByRole('button', { name: 'Join' }).click();
  await bob.goto(`${relay.url}/?room=e2e&name=bob`);
  for (const page of [alice, bob]) {
    await eventually('connected', async () => (await status(page)) === 'connected');
    await eventually('both members listed', async () => (await members(page)).join() === 'alice,bob');
  }

  // Typing shows for the other; Enter sends.
  const aliceInput = alice.getByLabel('Message');
  await aliceInput.pressSequentially('hello bob');
  await eventually('alice typing, on bob\'s page', async () =>
    (await bob.locator('#typing').textContent()) === 'alice is typing…');
  assert.equal(await alice.locator('#typing').textContent(), '', 'nobody is typing for alice');
  await aliceInput.press('Enter');
  await eventually('alice\'s message at bob', () => hasMessage(bob, 'alice', 'hello bob'));
  await eventually('the typing line cleared', async () => (await bob.locator('#typing').textContent()) === '');

  // And the Send button, the other way.
  await bob.getByLabel('Message').fill('hi alice');
  await bob.getByRole('button', { name: 'Send' }).click();
  await eventually('bob\'s message at alice', () => hasMessage(alice, 'bob', 'hi alice'));
  const time = await alice.locator('#messages .message:not(.pending) .time').first().textContent();
  assert.match(time, /\d{1,2}[:.]\d{2}/, 'messages show their time');

  // The server restarts (same data dir, same port). Bob writes while it is down.
  await server.stop();
  for (const page of [alice, bob]) {
    await eventually('reconnecting', async () => (await status(page)) === 'reconnecting');
  }
  await bob.getByLabel('Message').fill('written while the server was down');
  await bob.getByLabel('Message').press('Enter');
  await eventually('bob\'s message waiting', async () =>
    (await bob.locator('#messages .message.pending').count()) === 1);
  server = await startServer(address, dataDir);
  for (const page of [alice, bob]) {
    await eventually('reconnected after the restart', async () => (await status(page)) === 'connected');
  }
  await eventually('the waiting message delivered', () =>
    hasMessage(alice, 'bob', 'written while the server was down'));
  await eventually('and acknowledged', async () =>
    (await bob.locator('#messages .message.pending').count()) === 0);

  // A network outage: both pages lose the server while others go on talking.
  relay.block();
  for (const page of [alice, bob]) {
    await eventually('offline', async () => (await status(page)) === 'reconnecting');
  }
  // More than the 50 recent messages a join without `since` gets: only resuming after
  // the last id seen brings all of them.
  const missed = Array.from({ length: 60 }, (_, i) => `missed ${i + 1}`);
  for (const text of missed) {
    const answer = await fetch(`http://${address}/api/rooms/e2e/messages`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ from: 'carol', text }),
    });
    assert.equal(answer.status, 201);
  }
  relay.unblock();
  for (const page of [alice, bob]) {
    await eventually('back after the outage', async () => (await status(page)) === 'connected');
    await eventually('the missed messages filled in', () => hasMessage(page, 'carol', 'missed 60'));
    const messages = await shown(page);
    assertOnceInOrder(messages, page === alice ? 'alice' : 'bob');
    assert.deepEqual(messages.filter((m) => m.from === 'carol').map((m) => m.text), missed);
    assert.equal(messages.filter((m) => m.text === 'written while the server was down').length, 1);
  }

  // Markup is shown as text, never run or rendered.
  const markup = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script><b>bold</b>';
  await aliceInput.fill(markup);
  await aliceInput.press('Enter');
  await eventually('the markup message at bob', () => hasMessage(bob, 'alice', markup));
  await bob.waitForTimeout(300);
  assert.equal(await bob.evaluate(() => window.pwned), undefined, 'no script ran');
  assert.equal(await bob.locator('#messages img, #messages script, #messages b').count(), 0);

  // The browser and the server agreed on permessage-deflate.
  for (const page of [alice, bob]) {
    const extensions = await page.evaluate(() => document.body.dataset.extensions);
    assert.match(extensions, /permessage-deflate/);
  }

  await aliceInput.pressSequentially('typing for the screenshot');
  await eventually('alice typing again', async () =>
    (await bob.locator('#typing').textContent()) === 'alice is typing…');
  await alice.screenshot({ path: path.join(REPORTS, 'chat-desktop.png') });
  await bob.screenshot({ path: path.join(REPORTS, 'chat-phone.png') });
  assert.deepEqual(errors, [], 'no script errors on the pages');
});

/** A relay that refuses every WebSocket upgrade (403) and passes plain HTTP on. */
async function startUpgradeRefusingRelay(target) {
  const port = Number(target.slice(target.lastIndexOf(':') + 1));
  const { server } = await listenRelay((client, track) => {
    client.on('error', () => client.destroy());
    client.once('data', (first) => {
      if (/^upgrade:\s*websocket/im.test(first.toString('latin1'))) {
        client.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
        return;
      }
      const upstream = track(net.connect(port, '127.0.0.1'));
      upstream.write(first);
      pipeBoth(client, upstream);
    });
  });
  return `http://127.0.0.1:${server.address().port}`;
}

test('without WebSocket the page chats over HTTP streaming through a restart', async () => {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-browser-'));
  cleanups.push(() => fs.rmSync(dataDir, { recursive: true, force: true }));
  let server = await startServer('127.0.0.1:0', dataDir);
  const address = server.address;
  const refusing = await startUpgradeRefusingRelay(address);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  cleanups.push(() => browser.close());
  const errors = [];
  const open = async (init) => {
    const page = await (await browser.newContext()).newPage();
    page.on('pageerror', (error) => errors.push(error));
    if (init) await page.addInitScript(init);
    return page;
  };
  // Erin's browser has no WebSocket; Frank's upgrades are refused on the way; Gus has
  // WebSocket and uses it.
  const erin = await open(() => {
    delete window.WebSocket;
  });
  const frank = await open();
  const gus = await open();
  await erin.goto(`http://${address}/?room=fallback&name=erin`);
  await frank.goto(`${refusing}/?room=fallback&name=frank`);
  await gus.goto(`http://${address}/?room=fallback&name=gus`);
  const transport = (page) => page.evaluate(() => document.body.dataset.transport);
  const pages = { erin, frank, gus };
  for (const page of Object.values(pages)) {
    await eventually('connected', async () => (await status(page)) === 'connected');
    await eventually('all three listed', async () => (await members(page)).join() === 'erin,frank,gus');
  }
  assert.equal(await transport(erin), 'events');
  assert.equal(await transport(frank), 'events');
  assert.equal(await transport(gus), 'websocket');
  assert.match(await erin.locator('#status').textContent(), /HTTP streaming/);

  // Both ways, and typing over HTTP.
  await erin.getByLabel('Message').pressSequentially('from erin');
  await eventually('erin typing, on gus\'s page', async () =>
    (await gus.locator('#typing').textContent()) === 'erin is typing…');
  await erin.getByLabel('Message').press('Enter');
  await gus.getByLabel('Message').fill('from gus');
  await gus.getByLabel('Message').press('Enter');
  await frank.getByLabel('Message').fill('from frank');
  await frank.getByLabel('Message').press('Enter');
  for (const page of Object.values(pages)) {
    for (const [from, text] of [['erin', 'from erin'], ['gus', 'from gus'], ['frank', 'from frank']]) {
      await eventually(`${text} shown`, () => hasMessage(page, from, text));
    }
  }

  // The server restarts; Erin writes while it is down, Gus's message comes while the
  // HTTP pages are still reconnecting.
  await server.stop();
  for (const page of [erin, frank]) {
    await eventually('reconnecting', async () => (await status(page)) === 'reconnecting');
  }
  await erin.getByLabel('Message').fill('erin while down');
  await erin.getByLabel('Message').press('Enter');
  server = await startServer(address, dataDir);
  for (const page of Object.values(pages)) {
    await eventually('back after the restart', async () => (await status(page)) === 'connected');
  }
  await gus.getByLabel('Message').fill('gus after the restart');
  await gus.getByLabel('Message').press('Enter');
  for (const [name, page] of Object.entries(pages)) {
    await eventually('erin\'s waiting message', () => hasMessage(page, 'erin', 'erin while down'));
    await eventually('gus\'s later message', () => hasMessage(page, 'gus', 'gus after the restart'));
    const messages = await shown(page);
    assertOnceInOrder(messages, name);
    assert.deepEqual(messages.map((m) => m.text).sort(),
      ['erin while down', 'from erin', 'from frank', 'from gus', 'gus after the restart'],
      `${name}: ${JSON.stringify(messages)}`);
  }
  await eventually('erin\'s message acknowledged', async () =>
    (await erin.locator('#messages .message.pending').count()) === 0);
  assert.equal(await transport(erin), 'events');
  assert.equal(await transport(gus), 'websocket');
  await frank.screenshot({ path: path.join(REPORTS, 'chat-over-http-streaming.png') });
  assert.deepEqual(errors, [], 'no script errors on the pages');
});

test('over HTTPS the page loads over HTTP/2 and its WebSockets are HTTP/2 streams', async () => {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-browser-h2-'));
  cleanups.push(() => fs.rmSync(dataDir, { recursive: true, force: true }));
  const cert = path.join(dataDir, 'cert.pem');
  const key = path.join(dataDir, 'key.pem');
  const made = spawn('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', key, '-out', cert], { stdio: 'ignore' });
  const [code] = await once(made, 'exit');
  assert.equal(code, 0, 'openssl made a certificate');
  const server = await startServer('127.0.0.1:0', dataDir, ['--tls-cert', cert, '--tls-key', key]);
  const origin = `https://${server.address}`;
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  cleanups.push(() => browser.close());
  const errors = [];
  const open = async () => {
    // The certificate is the test's own: Chromium is told to take it.
    const page = await (await browser.newContext({ ignoreHTTPSErrors: true })).newPage();
    page.on('pageerror', (error) => errors.push(error));
    return page;
  };
  const [ann, ben] = [await open(), await open()];
  const transport = (page) => page.evaluate(() => document.body.dataset.transport);
  await ann.goto(`${origin}/?room=h2&name=ann`);
  await ben.goto(`${origin}/?room=h2&name=ben`);
  for (const page of [ann, ben]) {
    await eventually('connected over wss', async () => (await status(page)) === 'connected');
    assert.equal(await transport(page), 'websocket');
    const http = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    assert.equal(http, 'h2', 'the page came over HTTP/2');
  }
  await ann.getByLabel('Message').fill('hello over h2');
  await ann.getByLabel('Message').press('Enter');
  await eventually('ben sees it', () => hasMessage(ben, 'ann', 'hello over h2'));
  // Eight event streams in one page: over HTTP/1.1 the seventh would wait for one of
  // six connections; over HTTP/2 they are streams of the one connection.
  // All stay open until every one has its welcome.
  const welcomed = await ann.evaluate(async () => {
    const sources = [];
    const all = await Promise.all(Array.from({ length: 8 }, (_, i) =>
      new Promise((resolve, reject) => {
        const source = new EventSource(`/room/h2-tab-${i}?name=ann`);
        sources.push(source);
        const timer = setTimeout(() => reject(new Error(`stream ${i}: no welcome in 10 s`)), 10000);
        source.onmessage = (event) => {
          if (JSON.parse(event.data).type === 'welcome') {
            clearTimeout(timer);
            resolve(i);
          }
        };
      })));
    for (const source of sources) source.close();
    return all;
  });
  assert.deepEqual(welcomed, [0, 1, 2, 3, 4, 5, 6, 7], 'eight event streams at once');
  const metrics = await ann.evaluate(async () => (await fetch('/metrics')).text());
  const count = (series) => Number((metrics.split('\n').find((l) => l.startsWith(series)) ?? ' 0').split(' ').pop());
  assert.equal(count('switchboard_websocket_connections_total{http="2"}'), 2,
    `both pages' WebSockets over HTTP/2:\n${metrics.split('\n').filter((l) => l.includes('connections_total')).join('\n')}`);
  assert.equal(count('switchboard_websocket_connections_total{http="1.1"}'), 0, 'none over HTTP/1.1');
  assert.ok(count('switchboard_http_connections_total{version="2"}') >= 2, 'the pages over HTTP/2');
  assert.deepEqual(errors, [], 'no script errors on the pages');
});
