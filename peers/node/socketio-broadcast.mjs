// A Socket.IO 4 room broadcast server, as in Socket.IO's chat example: every client
// joins the room `bench` when it connects, and each `message` event a client emits goes
// to everyone in the room, the sender included. Default settings otherwise (WebSocket
// and HTTP long-polling transports, 25 s pings).
import { createServer } from 'node:http';

import { Server } from 'socket.io';

import { listenAddress, sayListening } from './listen.mjs';

const { host, port } = listenAddress();
const httpServer = createServer();
const io = new Server(httpServer);

io.on('connection', (socket) => {
  socket.join('bench');

  socket.on('message', (payload) => {
    io.to('bench').emit('message', payload);
  });
});

httpServer.listen(port, host, () => sayListening(httpServer.address()));
