"""Build what runs a model: load (this rank's shard of) it, install its united experts, wrap it
in a warmed-up `ModelRunner`.

The engine calls `build_model_runner` in its own process (rank 0) and every worker of a
tensor-parallel engine calls it too, in the same order, since loading and installing united
experts run collectives. United experts come from a directory written by `brownout unite`,
or, for `average:WAY`, are built at load time (by each rank for its part when the model is
split over ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from brownout.config import EngineConfig
from brownout.parallel.info import ParallelInfo
from brownout.parallel.united import install_average
from brownout.runner.loader import LoadedModel, load_model
from brownout.runner.model_runner import ModelRunner
from brownout.unite.store import load_united
from brownout.unite.uncalibrated import install_uncalibrated, parse_uncalibrated


def build_model_runner(config: EngineConfig,
                       parallel: Optional[ParallelInfo] = None) -> tuple[LoadedModel, ModelRunner]:
    """Load (this rank's shard of) the model, install united experts, build the runner.

    Every rank of a parallel engine runs this, in the same order: it holds collectives."""
    loaded = load_model(config.load, parallel)
    if config.brownout.united_experts:
        install_united(loaded, config.brownout.united_experts)
    runner = ModelRunner(loaded, config.cache, max_batch=config.scheduler.max_num_seqs,
                         max_model_len=config.load.max_model_len,
                         enforce_eager=config.load.enforce_eager,
                         max_step_tokens=config.scheduler.max_num_batched_tokens)
    runner.warm_up(min(config.scheduler.max_num_batched_tokens,
                       config.load.max_model_len or loaded.spec.max_position_embeddings))
    return loaded, runner


def install_united(loaded: LoadedModel, spec: str) -> None:
    """Install the united experts `spec` names (`average:WAY` or a directory) into the model."""
    way = parse_uncalibrated(spec)
    if way is not None and loaded.parallel.active:  # no rank holds every whole expert
        install_average(loaded.model, way)
    elif way is not None:
        install_uncalibrated(loaded.model, way)
    else:
        load_united(loaded, Path(spec))
