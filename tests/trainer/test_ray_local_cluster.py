"""`ray.address: null` starts the job's own local cluster even when another job's cluster runs on the machine.

A bare `ray.init(num_cpus=...)` joins a cluster that `ray start` (or another job) registered in
/tmp/ray/ray_current_cluster and then fails with "When connecting to an existing cluster, num_cpus and num_gpus must
not be provided": two trainers (or a trainer and a test) on one machine could not both run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBE = """
import ray
from verl.trainer.main_ppo import _init_ray
from verl.utils.hydra_to_dataclass import RayConfig
class Run: ray = RayConfig(address=None, num_cpus=1)
_init_ray(Run())
print("GCS", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_local_cluster_starts_beside_another_cluster(tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = 6300 + os.getpid() % 500
    # another job's cluster, in the foreground (--block) so that stopping it stops only its own processes
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false"], env=env, stdout=open(tmp_path / "head.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                               cwd=Path(__file__).resolve().parents[2])
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
        gcs = [line.split()[1] for line in probe.stdout.splitlines() if line.startswith("GCS ")]
        assert gcs and not gcs[0].endswith(f":{port}"), gcs  # its own cluster, not the running one
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)
