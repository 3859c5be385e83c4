"""Tensor and expert parallelism over several processes (torch.distributed: gloo on CPUs,
NCCL on GPUs). `parallel` holds rank/world info and the model's collectives, `sharding` and
`experts` say which part of each tensor a rank holds, `launch` starts and stops the worker
processes of ranks 1..N-1, and `worker` is their step loop.

Nothing is imported here, so the model code can import `parallel` without pulling in the
engine-side modules.
"""
