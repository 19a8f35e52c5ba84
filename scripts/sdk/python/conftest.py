"""Fixtures: servers started on free ports (stopped after the test), centrifuge-python
clients (disconnected after it), and the JSON / Protobuf parametrization."""

import pytest

from harness import Sdk, Server


@pytest.fixture
def server_factory(tmp_path):
    """start(storage="memory"|"sqlite") -> a running Server; all are stopped after."""
    servers = []

    def start(storage="memory", **kwargs):
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = Server(workdir, storage=storage, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        try:
            server.stop()
        finally:
            server._kill()
            # Shown by pytest only when the test failed.
            print(f"--- stderr of switchboard ({server.storage}) ---\n{server.log_tail()}")


@pytest.fixture
def server(server_factory):
    return server_factory("memory")


@pytest.fixture(params=[False, True], ids=["json", "protobuf"])
def protobuf(request):
    return request.param


@pytest.fixture
async def sdk(server, protobuf):
    sdk = Sdk(server, protobuf=protobuf)
    yield sdk
    await sdk.close()


@pytest.fixture
async def json_sdk(server):
    sdk = Sdk(server, protobuf=False)
    yield sdk
    await sdk.close()
