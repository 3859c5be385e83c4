"""`brownout serve`: one server process, or with `--replicas N` N engines as Ray Serve
replicas behind one OpenAI-compatible ingress (brownout.replicas.deployment).

Every `brownout serve` flag applies to each replica (each runs its own engine and SLO
controller). Without `--replicas` nothing here imports Ray. With it, Ray starts locally
(or joins `--ray-address` / RAY_ADDRESS) and Serve's HTTP proxy listens on --host/--port.
`app_builder` turns the same flags, as a dict, into the Serve application, for
`serve run brownout.replicas.cli:app_builder replicas=2 ...` or a Serve config file on a
cluster (docs/replicas.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Mapping, Optional

from brownout.api import launch

logger = logging.getLogger(__name__)

flag_of = launch.flag_of  # a config field -> the serve flag that sets it (for brownout.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    launch.add_arguments(parser)
    g = parser.add_argument_group("replicas (Ray Serve)")
    g.add_argument("--replicas", type=int, default=None,
                   help="run this many engines as Ray Serve replicas behind one ingress, each "
                        "with its own SLO controller (default: one engine, no Ray)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many replicas on brownout: replicas "
                        "dimmed, refusing, or predicting first tokens later than --slo-ttft "
                        "(default: no autoscaling)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs per replica; its engine runs this many torch threads unless "
                        "--cpu-threads says otherwise (default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs per replica (default 0)")
    g.add_argument("--router", choices=("slo", "pow2"), default="slo",
                   help="replica choice: lowest predicted TTFT, ties to the highest tau (slo), "
                        "or Ray's power-of-two choices (pow2) (default slo)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance)")


def settings_of(args) -> Any:
    from brownout.replicas.deployment import ReplicaSettings
    return ReplicaSettings(num_replicas=args.replicas, max_replicas=args.max_replicas,
                           num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, router=args.router)


def _prepare(args):
    """(engine config, server config, worker options, replica settings) from parsed flags;
    raises ValidationError or ValueError naming the bad flag."""
    from brownout.engine.worker import DEFAULT_ENGINE_FACTORY, WorkerOptions

    if args.cpu_threads is None:  # each replica's engine follows its Ray CPUs
        args.cpu_threads = max(1, int(args.replica_cpus))
    engine_config, server_config = launch.build_configs(args)
    options = WorkerOptions(engine_factory=args.engine_factory or DEFAULT_ENGINE_FACTORY,
                            max_prompt_tokens=server_config.max_prompt_tokens,
                            default_model_factory=None if args.model else launch.DEFAULT_MODEL_FACTORY,
                            log_level=logging.getLogger().getEffectiveLevel())
    return engine_config, server_config, options, settings_of(args)


def run(args) -> int:
    if args.replicas is None:
        return launch.run(args)
    try:  # an optional extra: say how to get it rather than fail on an import
        import ray  # noqa: F401
    except ImportError:
        print("brownout serve: error: --replicas: needs Ray Serve, which is not installed: "
              "pip install 'brownout-serve[replicas]'", file=sys.stderr)
        return 2
    from brownout.types import ValidationError
    try:
        engine_config, server_config, options, settings = _prepare(args)
    except ValidationError as exc:
        print(f"brownout serve: error: {flag_of(exc.field)}: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ReplicaSettings: "field: message"
        field, _, message = str(exc).partition(": ")
        print(f"brownout serve: error: --{field.replace('_', '-')}: {message}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from brownout.replicas.deployment import deploy

    ray.init(address=args.ray_address, ignore_reinit_error=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(engine_config, server_config, options, settings)
        logger.info("serving %d replica(s) on http://%s:%d (metrics: /metrics, per replica: "
                    "/metrics/replicas)", settings.num_replicas, server_config.host, server_config.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def argv_of(flags: Mapping[str, Any]) -> list[str]:
    """`brownout serve` argv from a dict of flags ({"slo_policy": "aimd", "enforce_eager": True})."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def parse_flags(flags: Mapping[str, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="brownout serve")
    add_arguments(parser)
    return parser.parse_args(argv_of(flags))


def app_builder(flags: Optional[Mapping[str, Any]] = None):
    """Serve application builder: the replica deployment for `flags` (the `brownout serve`
    flags by their dest names; `replicas` defaults to 1)."""
    from brownout.replicas.deployment import replica_deployment

    args = parse_flags(flags or {})
    args.replicas = args.replicas or 1
    engine_config, server_config, options, settings = _prepare(args)
    return replica_deployment(engine_config, server_config, options, settings)


def metrics_app_builder(flags: Optional[Mapping[str, Any]] = None):
    """Serve application builder: the metrics hub (route prefix /metrics)."""
    from brownout.replicas.deployment import hub_deployment

    return hub_deployment()
