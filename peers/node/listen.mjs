// The command line both Node peers share: `--listen HOST:PORT` (port 0: any free port),
// and the line `compare` waits for once the server accepts connections.

export function listenAddress(argv = process.argv.slice(2)) {
  let listen = '127.0.0.1:9100';
  for (let i = 0; i < argv.length; i += 2) {
    if (argv[i] !== '--listen' || argv[i + 1] === undefined) {
      console.error('usage: node SERVER.mjs [--listen HOST:PORT]');
      process.exit(2);
    }
    listen = argv[i + 1];
  }
  const at = listen.lastIndexOf(':');
  const host = listen.slice(0, at).replace(/^\[(.*)\]$/, '$1');
  const port = Number(listen.slice(at + 1));
  if (at < 0 || !Number.isInteger(port)) {
    console.error(`not a HOST:PORT: ${listen}`);
    process.exit(2);
  }
  return { host, port };
}

export function sayListening(address) {
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  console.error(`listening on ${host}:${address.port}`);
}
