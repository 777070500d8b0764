"""Single controller: the driver calls worker-group methods as if local; dispatch splits data over DP ranks."""
from verl.single_controller.base import Dispatch, LocalWorkerGroup, WorkerGroup, register

__all__ = ["Dispatch", "register", "WorkerGroup", "LocalWorkerGroup"]
