// An echo server on Node's `ws`, written as its README's server examples are: every
// text or binary message goes back to its sender as it came. No compression, so the
// engine itself is measured.
import { WebSocketServer } from 'ws';

import { listenAddress, sayListening } from './listen.mjs';

const { host, port } = listenAddress();
const wss = new WebSocketServer({ host, port, perMessageDeflate: false });

wss.on('connection', function connection(ws) {
  ws.on('error', console.error);

  ws.on('message', function message(data, isBinary) {
    ws.send(data, { binary: isBinary });
  });
});

wss.on('listening', () => sayListening(wss.address()));
