"""Tensor and expert parallelism as the model sees it: which part of each tensor a rank holds
and the collectives the model runs (torch.distributed: gloo on CPUs, NCCL on GPUs).

`info` holds rank/world info (`ParallelInfo`) and the model's collectives, `sharding` and
`experts` say which part of each tensor a rank holds, `united` builds uncalibrated united
experts on a split model. The package sits below the models and above the kernels; the
processes themselves are started and fed by the engine (brownout.engine.parallel_group).
"""
