"""The step loop of ranks 1..N-1 of a tensor-parallel engine.

Started by `parallel_group.WorkerGroup` as `python -m brownout.engine.parallel_worker` with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, BROWNOUT_DIST_BACKEND and BROWNOUT_PARENT_PID in its
environment. It joins the process group, receives the engine config from rank 0, builds its
shard of the model and runner exactly as rank 0 does (same collectives, same order), then
runs the forward of every step rank 0 broadcasts, until "stop". It never samples and holds
no scheduler state: each step's SchedulerOutput carries all it needs.

torch and the model code (seconds to import) are imported inside the functions, after `main`
ignores SIGINT and starts watching the parent: a Ctrl-C meant for rank 0, or rank 0 dying,
during that import must neither kill the worker early nor leave it behind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

log = logging.getLogger("brownout.engine.parallel_worker")  # run as __main__: named by hand

# how often the worker checks that rank 0 is still its parent
PARENT_POLL_S = 1.0


def _watch_parent(parent_pid: int) -> None:
    """Exit when rank 0 is gone (killed, crashed): nothing else would wake a worker blocked
    in a collective."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _join(rank: int, world_size: int, backend: str):
    # lazy: torch loads after main's signal and parent-watch set-up (module docstring)
    import torch
    import torch.distributed as dist

    from brownout.engine.parallel_group import CONTROL_TIMEOUT, READY_KEY, STARTUP_TIMEOUT_S

    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    store.set(READY_KEY.format(rank), "1")
    kwargs = {"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def serve(rank: int, world_size: int, backend: str) -> None:
    # lazy: the torch and model chain loads after main's set-up (module docstring)
    from brownout.engine.parallel_group import broadcast_message, leave_group
    from brownout.parallel.info import ParallelInfo
    from brownout.runner.build import build_model_runner

    cpu_group = _join(rank, world_size, backend)
    config, log_level = broadcast_message(None, cpu_group)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    parallel = ParallelInfo(rank=rank, world_size=world_size,
                            expert_parallel=config.load.enable_expert_parallel, cpu_group=cpu_group)
    _, runner = build_model_runner(config, parallel)
    log.debug("rank %d ready", rank)
    while True:
        message = broadcast_message(None, cpu_group)
        if message[0] == "stop":
            break
        _, sched, tau = message
        runner.forward(sched, tau)
    if backend != "nccl":  # with NCCL the process just ends (main): no teardown can hang
        leave_group()


def main() -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _watch_parent(int(os.environ["BROWNOUT_PARENT_PID"]))
    # Ctrl-C reaches the whole process group; rank 0 decides when the workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    backend = os.environ["BROWNOUT_DIST_BACKEND"]
    try:
        serve(rank, world_size, backend)
    except Exception:
        log.error("tensor-parallel worker of rank %d failed:\n%s", rank, traceback.format_exc())
        return 1
    if backend == "nccl":  # skip interpreter teardown: NCCL communicator destructors can hang
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
