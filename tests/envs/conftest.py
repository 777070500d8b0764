import pytest

from tests.envs.world_stack import start_world_stack


@pytest.fixture(scope="session")
def world_stack(tmp_path_factory):
    stack, server = start_world_stack(str(tmp_path_factory.mktemp("world_stack")))
    yield stack
    server.stop()
