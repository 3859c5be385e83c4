"""Start, feed and stop the processes of a tensor-parallel engine.

Rank 0 is the process that builds the `LLMEngine`: it runs the scheduler, joins the model's
collectives and samples. Ranks 1..N-1 are worker processes started here as
`python -m brownout.engine.parallel_worker` (a plain subprocess, not multiprocessing: the HTTP
server's engine process is a daemonic multiprocessing child, and those may not have
children). Rendezvous is a TCP store on 127.0.0.1 at a free port (the workers read
MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE). Backend: NCCL on GPUs (rank r uses GPU r),
gloo on CPUs; control messages always travel over a separate gloo group.

Each step rank 0 broadcasts ("step", SchedulerOutput, tau) with `broadcast_object_list`
(the processes are our own, in one trusted group), then runs the same forward; "stop" ends
the workers. `close()` (also registered with atexit) stops them; a worker whose parent
disappears exits on its own (see parallel_worker.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from brownout.config import EngineConfig
from brownout.models.registry import spec_of
from brownout.parallel.info import ParallelInfo, check_split
from brownout.runner.loader import load_hf_config, resolve_device

log = logging.getLogger(__name__)

# NVLink multicast stays off in every process we start on a GPU machine: a program using it
# can put a shared host's GPUs out of service
SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
# workers import torch and load their shard of the model before they join: minutes for a
# large checkpoint on a cold disk
STARTUP_TIMEOUT_S = 600.0
# an idle server sends no step for a long time; the workers wait on this group meanwhile
CONTROL_TIMEOUT = timedelta(days=365)
# store key a worker of rank r sets once it is up, before it joins the process group
READY_KEY = "brownout/ready/{}"
# how often rank 0 looks for the workers' ready keys (and for workers that died) at start-up
READY_POLL_S = 0.05
# leaving the process group is given up after this long: shutdown must not hang on it
LEAVE_TIMEOUT_S = 20.0
# workers get this long to stop after "stop" before they are killed
STOP_TIMEOUT_S = 30.0
# the least time a worker is waited for, even past the stop deadline
MIN_WAIT_S = 0.1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def broadcast_message(message: Any, group) -> Any:
    """Rank 0's `message` on every rank (the argument is ignored on the others)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def leave_group(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Leave the process group, given up after `timeout_s`. With NCCL the communicators are
    aborted, not destroyed: destroying them after CUDA-graph capture of collectives can hang,
    and abort never waits on the other ranks."""
    done = threading.Event()
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)

    def run():
        try:
            if dist.get_backend() == "nccl" and abort is not None:
                abort()
            else:
                dist.destroy_process_group()
        except Exception as exc:
            log.warning("leaving the process group failed: %s", exc)
        finally:
            done.set()

    threading.Thread(target=run, name="leave-group", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("leaving the process group did not finish in %.0f s; going on", timeout_s)


class WorkerGroup:
    """Rank 0's handle on ranks 1..N-1: starts them, sends them each step, stops them."""

    def __init__(self, config: EngineConfig):
        load = config.load
        self.world_size = ws = load.tensor_parallel_size
        # a model that cannot be split this way fails here, before any process starts
        check_split(spec_of(load_hf_config(load)), ParallelInfo(0, ws, load.enable_expert_parallel))
        device = resolve_device(load.device)
        backend = backend_for(device)
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size: this process already belongs to a process "
                               "group; close the other parallel engine first")
        if device.type == "cuda":
            if torch.cuda.device_count() < ws:
                raise ValueError(f"tensor_parallel_size: {ws} needs {ws} GPUs, "
                                 f"{torch.cuda.device_count()} visible")
            torch.cuda.set_device(0)
        os.environ.update(SAFE_GPU_ENV)
        self._closed = False
        self.store = dist.TCPStore("127.0.0.1", 0, ws, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
        self.procs = [self._spawn(rank, backend) for rank in range(1, ws)]
        try:
            self._wait_ready()
            kwargs = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
            dist.init_process_group(backend, store=self.store, rank=0, world_size=ws, **kwargs)
            cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
            broadcast_message((config, logging.getLogger().getEffectiveLevel()), cpu_group)
        except BaseException:
            self._kill()
            raise
        self.parallel = ParallelInfo(rank=0, world_size=ws, expert_parallel=load.enable_expert_parallel,
                                     cpu_group=cpu_group)
        atexit.register(self.close)
        log.info("tensor parallel over %d %s processes (%s), expert parallel %s", ws, device.type,
                 backend, "on" if self.parallel.ep else "off")

    def _spawn(self, rank: int, backend: str) -> subprocess.Popen:
        env = dict(os.environ, **SAFE_GPU_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port),
                   RANK=str(rank), WORLD_SIZE=str(self.world_size), BROWNOUT_DIST_BACKEND=backend,
                   BROWNOUT_PARENT_PID=str(os.getpid()))
        return subprocess.Popen([sys.executable, "-m", "brownout.engine.parallel_worker"], env=env)

    def _wait_ready(self) -> None:
        keys = [READY_KEY.format(r) for r in range(1, self.world_size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start in {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(READY_POLL_S)

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"tensor-parallel worker of rank {rank} exited with code {code}")

    def broadcast(self, message: Any) -> None:
        self.check_alive()
        broadcast_message(message, self.parallel.cpu_group)

    def wrap(self, runner) -> "ParallelRunner":
        return ParallelRunner(runner, self)

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.broadcast(("stop",))
        except Exception as exc:  # a dead worker: the others are killed below
            log.warning("could not stop tensor-parallel workers cleanly: %s", exc)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(MIN_WAIT_S, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel worker %d did not stop; killing it", proc.pid)
        self._kill()
        leave_group()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class ParallelRunner:
    """Rank 0's runner: sends each step to the workers, then runs it here and samples.

    Every other attribute is the wrapped `ModelRunner`'s."""

    def __init__(self, runner, workers: WorkerGroup):
        self.runner = runner
        self.workers = workers

    def execute(self, sched, rungs=1.0):
        return self.collect(self.launch(sched, rungs))

    def launch(self, sched, rungs=1.0, prev=None):  # as `ModelRunner.launch`
        if sched.prev_rows is not None:  # the other ranks have no sampled tokens to read
            raise ValueError("a tensor-parallel engine does not plan steps ahead")
        self.workers.broadcast(("step", sched, rungs))
        return self.runner.launch(sched, rungs)

    def collect(self, pending):
        return self.runner.collect(pending)

    def close(self) -> None:
        self.workers.close()

    def __getattr__(self, name: str):
        return getattr(self.runner, name)
