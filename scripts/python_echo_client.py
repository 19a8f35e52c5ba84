"""An outside client for Switchboard's /echo: Python's `websockets` package.

Usage: python_echo_client.py ws://HOST:PORT/echo
Exchanges text and binary messages, once without and once with permessage-deflate,
closes with 1000 and checks the server answered
1000. Prints one line per check; exits non-zero on the first failure.
"""

import sys

from websockets.sync.client import connect


def exchange(url: str, compression: str | None) -> None:
    with connect(url, compression=compression, open_timeout=10, close_timeout=10) as ws:
        label = "deflate" if compression else "plain"
        names = [type(e).__name__ for e in ws.protocol.extensions]
        if compression:
            assert names == ["PerMessageDeflate"], f"extensions negotiated: {names}"
        else:
            assert names == [], f"extensions negotiated: {names}"
        text = "hello from python, ünïcødé ✓"
        ws.send(text)
        got = ws.recv(timeout=10)
        assert isinstance(got, str) and got == text, f"text came back as {got!r}"
        print(f"{label} text ok")

        data = bytes(range(256)) * 300
        ws.send(data)
        got = ws.recv(timeout=10)
        assert isinstance(got, bytes) and got == data, "binary came back changed"
        print(f"{label} binary ok")

        ws.close(code=1000, reason="done")
        sent, received = ws.protocol.close_sent, ws.protocol.close_rcvd
        assert sent is not None and sent.code == 1000, f"sent {sent}"
        assert received is not None and received.code == 1000, f"received {received}"
        print(f"{label} close sent {sent.code} received {received.code}")


if __name__ == "__main__":
    exchange(sys.argv[1], None)
    exchange(sys.argv[1], "deflate")
