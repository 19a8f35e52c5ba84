// Switchboard's webhooks checked by the `pusher` server library's own webhook check
// (`pusher.webhook(request).isValid()`, unchanged): a receiver served here takes them,
// answers 500 to the first three requests and 200 after, and must then have every event
// exactly once; the events come from pusher-js clients in a presence channel.
//
// Needs SWITCHBOARD_BIN (default target/debug/switchboard).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import { cleanup, eventually, sleep, startServer } from './lib.mjs';

const APP = { id: '77', key: 'hook-key', secret: 'hook-secret' };

/** A webhook receiver: each request checked with the library, the first `failures` answered 500. */
async function startReceiver(defer, failures) {
  const library = new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret });
  const forged = new PusherServer({ appId: APP.id, key: APP.key, secret: 'another-secret' });
  const requests = [];
  const server = http.createServer((req, res) => {
    let rawBody = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { rawBody += chunk; });
    req.on('end', () => {
      const request = { headers: req.headers, rawBody };
      const webhook = library.webhook(request);
      const status = requests.length < failures ? 500 : 200;
      requests.push({
        status,
        valid: webhook.isValid(),
        validWithAnotherSecret: forged.webhook(request).isValid(),
        events: webhook.isValid() ? webhook.getEvents() : [],
        time: webhook.isValid() ? webhook.getTime() : null,
      });
      res.writeHead(status).end();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  defer(() => new Promise((resolve) => server.close(resolve)));
  const accepted = () => requests.filter((r) => r.status === 200).flatMap((r) => r.events);
  return { url: `http://127.0.0.1:${server.address().port}/hooks`, requests, accepted };
}

function presenceClient(server, userId) {
  const signer = new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret });
  const customHandler = ({ socketId, channelName }, callback) => {
    callback(null, signer.authorizeChannel(socketId, channelName, { user_id: userId, user_info: { n: userId } }));
  };
  return new Pusher(APP.key, {
    wsHost: '127.0.0.1', wsPort: server.port, forceTLS: false, enabledTransports: ['ws'],
    cluster: 'mt1', disableStats: true, channelAuthorization: { customHandler },
  });
}

test('webhooks pass the pusher library\'s own check and each event arrives once after failures', { timeout: 120000 }, async (t) => {
  const defer = cleanup(t);
  const receiver = await startReceiver(defer, 3);
  const server = await startServer({
    defer,
    config: { apps: [{ ...APP, webhook_leave_delay_ms: 200, webhooks: [{ url: receiver.url }] }] },
  });
  const ann = presenceClient(server, '1');
  defer(() => ann.disconnect());
  const channel = ann.subscribe('presence-hooks');
  await new Promise((resolve) => channel.bind('pusher:subscription_succeeded', resolve));
  await eventually('the arrivals', () => receiver.accepted().length >= 2, 30000);
  ann.disconnect();
  await eventually('the leaves', () => receiver.accepted().length >= 4, 30000);
  await sleep(700);
  const events = receiver.accepted().map((e) => [e.name, e.channel, e.user_id ?? null]);
  // The arrivals (one batch, or two sent side by side), then the leaves, each once.
  const sorted = (list) => [...list].sort((a, b) => a[0].localeCompare(b[0]));
  assert.deepEqual(sorted(events.slice(0, 2)), [
    ['channel_occupied', 'presence-hooks', null],
    ['member_added', 'presence-hooks', '1'],
  ]);
  assert.deepEqual(sorted(events.slice(2)), [
    ['channel_vacated', 'presence-hooks', null],
    ['member_removed', 'presence-hooks', '1'],
  ]);
  assert.equal(events.length, 4, 'each event once');
  assert.equal(receiver.requests.filter((r) => r.status === 500).length, 3, 'three failures, then success');
  for (const request of receiver.requests) {
    assert.equal(request.valid, true, 'the library takes the signature');
    assert.equal(request.validWithAnotherSecret, false, 'and would refuse another secret\'s');
    assert.ok(request.time instanceof Date && request.time.getTime() > Date.now() - 600000);
  }
});
