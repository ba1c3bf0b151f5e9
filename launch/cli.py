"""``fedsubspace``: the command line. Hydra overrides are plain arguments; the experiment is composed
and validated here, with the same code the ServerApp runs, before any Flower process starts.

    fedsubspace run method=hlora method.client_ranks=[2,4,8,16] dataset=mrpc
    fedsubspace run --num-supernodes 4 partition=iid partition.num_clients=4 train.lr=1e-3
    fedsubspace cluster --num-nodes 2 --tls federation.num_rounds=3
    fedsubspace validate method=fedx            # the config alone: fails in well under a second
    fedsubspace resume runs/20261201-093000-fedit-sst2-minilm           # after a crash or a stop
    fedsubspace resume runs/20261201-093000-fedit-sst2-minilm federation.num_rounds=20   # longer
    fedsubspace sweep cpu_paired --budget-min 150
    fedsubspace report cpu_paired

``group=option`` picks a config group's option (``conf/<group>/<option>.yaml``); ``a.b=value`` sets
any key of the schema (``experiment_schema/`` and the rule's own options in ``strategies/<rule>.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from experiment_schema import CONFIG_GROUPS, ConfigError, ExperimentConfig, available_choices
from finetune.hub import default_hub_mirror
from launch.netns import add_host_options
from launch.supernode import add_heartbeat_option

log = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = PROJECT_DIR / "runs"


@dataclass
class Experiment:
    """What the command line resolved: the Flower run config it will submit, and the config the
    ServerApp will compose from it."""

    run_config: dict[str, str]
    cfg: ExperimentConfig


def split_overrides(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(group selections, Hydra overrides)`` of the positional arguments."""
    selections: dict[str, str] = {}
    overrides: list[str] = []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if not sep:
            raise ConfigError(f"{argument!r} is not an override: write key=value (e.g. method=fedit)")
        if key in CONFIG_GROUPS:
            selections[key] = value
        else:
            overrides.append(argument)
    return selections, overrides


def legacy_run_config(items: list[str]) -> dict[str, str]:
    """``--run-config`` strings as ``flwr run`` reads them (kept for existing scripts)."""
    if not items:
        return {}
    from flwr.common.config import parse_config_args

    return {k: str(v) for k, v in parse_config_args(items).items()}


def resolve(
    arguments: list[str],
    legacy: list[str],
    output_dir: str,
    hub_mirror: str | None,
    resume: Path | None = None,
) -> Experiment:
    """Compose and validate the experiment exactly as the ServerApp will (same function, same
    run config); a resumed one is checked against its newest checkpoint too."""
    import strategies  # noqa: F401  (registers every rule's config schema)
    from server_app.faults import Fault
    from server_app.run_config import FAULT_KEY, RESUME_KEY, experiment_from_run_config

    run_config = legacy_run_config(legacy)
    if resume is not None:
        run_config[RESUME_KEY] = str(resume.expanduser().resolve())
    selections, overrides = split_overrides(arguments)
    run_config.update(selections)
    if overrides:
        earlier = shlex.split(run_config.get("overrides", ""))
        run_config["overrides"] = shlex.join([*earlier, *overrides])
    run_config.setdefault("output-dir", str(Path(output_dir).expanduser().resolve()))
    mirror = default_hub_mirror() if hub_mirror is None else hub_mirror
    if mirror:
        run_config.setdefault("hub-mirror", str(Path(mirror).expanduser().resolve()))
    experiment = Experiment(run_config, experiment_from_run_config(dict(run_config)))
    Fault.parse(run_config.get(FAULT_KEY, ""))  # a bad fault fails here, not in the ServerApp
    if resume is not None:
        check_resumable(resume.expanduser().resolve(), experiment.cfg)
    return experiment


def check_resumable(folder: Path, cfg: ExperimentConfig) -> None:
    """The folder has a checkpoint this config may continue (the ServerApp checks again)."""
    from server_app.checkpoint import CheckpointError, newest_saved_config, refuse_unless_resumable

    try:
        saved_round, saved_config = newest_saved_config(folder)
    except CheckpointError as error:
        raise ConfigError(str(error)) from error
    refuse_unless_resumable(folder, saved_round, saved_config, cfg)
    log.info("resuming %s after round %d of %d", folder, saved_round, cfg.federation.num_rounds)


def as_resumed_run(args: argparse.Namespace) -> argparse.Namespace:
    """``resume FOLDER`` as the ``run`` (or ``cluster``) command it stands for."""
    groups = [o for o in args.overrides if o.partition("=")[0] in CONFIG_GROUPS]
    if groups:
        raise SystemExit(
            f"fedsubspace resume: {groups} would change the experiment; a resume takes key=value "
            "changes of rounds and timeouts only"
        )
    home = PROJECT_DIR / (".flwr-cluster" if args.cluster else ".flwr")
    as_run = {
        "command": "cluster" if args.cluster else "run", "run_config": [], "resume": args.folder,
        "output_dir": str(args.folder.expanduser().resolve().parent), "num_supernodes": None,
        "num_nodes": None, "flwr_home": home, "tls": False, "auth": False, "cold": False,
    }  # fmt: skip
    return argparse.Namespace(**{**vars(args), **as_run})


def check_sources(cfg: ExperimentConfig) -> None:
    """The data and the model resolve: a local mirror or package has them, or the Hub is reachable."""
    from finetune.hub import hub_mirror, mirrored_dataset_dir, resolve_model_source
    from server_app.tracking import tracker_package

    mirror = hub_mirror(cfg.hub_mirror)
    data = cfg.dataset
    folder = mirrored_dataset_dir(mirror, data.repo_id, data.subset)
    if folder is not None:
        for split in (data.train_split, data.eval_split):
            if not any(folder.glob(f"{split}-*.parquet")):
                have = sorted({p.name.split("-")[0] for p in folder.glob("*.parquet")})
                raise ConfigError(
                    f"dataset {data.repo_id}/{data.subset}: split {split!r} is not in {folder} ({have})"
                )
    elif not hub_reachable():
        raise ConfigError(
            f"dataset {data.repo_id}/{data.subset} is not in the mirror ({mirror or 'none set'}) and the "
            "Hugging Face Hub is unreachable: pass --hub-mirror, set $FEDSUBSPACE_HUB_MIRROR, or fill a "
            "mirror with `make data`"
        )
    for what, source in (("model.source", cfg.model.source), ("model.tokenizer", cfg.model.tokenizer)):
        if not source or source.startswith("config:"):
            continue
        try:
            resolved = resolve_model_source(source, mirror)
        except FileNotFoundError as error:
            raise ConfigError(f"{what}: {error}") from error
        if not Path(resolved).is_dir() and not hub_cached(resolved) and not hub_reachable():
            raise ConfigError(
                f"{what}={source!r} is neither a local folder, a package, in the mirror "
                f"({mirror or 'none set'}) nor in the Hugging Face cache, and the Hub is unreachable"
            )
    package = tracker_package(cfg.logging.tracker)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"logging.tracker={cfg.logging.tracker} needs the {package} package: pip install {package}"
        )
    if cfg.model.gguf_file:
        gguf = Path(resolve_model_source(cfg.model.source, mirror)) / cfg.model.gguf_file
        if not gguf.is_file():
            raise ConfigError(f"model.gguf_file {cfg.model.gguf_file!r} is not in {gguf.parent}")


def hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import httpx

    try:
        return httpx.head("https://huggingface.co", timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def write_run_config(run_config: dict[str, str], folder: Path) -> Path:
    """The run config as a TOML file (``flwr run --run-config <file>.toml``): no shell or TOML
    quoting for anyone to get wrong. JSON string escapes are valid TOML basic strings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run-config.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in sorted(run_config.items())))
    return path


def groups_help() -> str:
    lines = ["config groups (group=option):"]
    lines += [f"  {group:<10} {', '.join(available_choices(group))}" for group in CONFIG_GROUPS]
    lines += [
        "other keys (key=value): seed, name, save_adapter, train.*, federation.*, privacy.*, logging.*,",
        "  and the rule's options method.* (strategies/<rule>.py); `fedsubspace validate` prints them",
    ]
    return "\n".join(lines)


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="group=option and key=value Hydra overrides")
    parser.add_argument(
        "--output-dir", default=str(DEFAULT_OUTPUT), help="where run folders go (default: runs/)"
    )
    parser.add_argument(
        "--hub-mirror",
        default=None,
        help="local Hub mirror (default: $FEDSUBSPACE_HUB_MIRROR or ../shared/data/hub)",
    )
    parser.add_argument(
        "--run-config", action="append", default=[], help=argparse.SUPPRESS
    )  # flwr-style, kept
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="seconds before the run is stopped (default 0: never)"
    )
    parser.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_FOLDER",
        help="continue this run folder from its newest checkpoint (the overrides must not change "
        "the experiment; more rounds are fine)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsubspace",
        description=__doc__,
        epilog=groups_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def experiment_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(
            name, help=help_text, epilog=groups_help(), formatter_class=argparse.RawDescriptionHelpFormatter
        )
        common_options(command)
        return command

    run = experiment_command("run", "simulate the federation on this machine (Ray)")
    run.add_argument("--num-supernodes", type=int, default=None, help="default: partition.num_clients")
    run.add_argument("--cpus-per-client", type=int, default=1)
    run.add_argument("--gpus-per-client", type=float, default=0.0)
    run.add_argument("--flwr-home", type=Path, default=PROJECT_DIR / ".flwr")
    run.add_argument(
        "--ray-address", default="", help="join a running Ray cluster (head:6379) instead of starting one"
    )
    cluster = experiment_command("cluster", "a real SuperLink and SuperNodes on this machine")
    cluster.add_argument("--num-nodes", type=int, default=None, help="default: partition.num_clients")
    cluster.add_argument("--tls", action="store_true", help="TLS with a fresh private CA (openssl)")
    cluster.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    cluster.add_argument("--flwr-home", type=Path, default=PROJECT_DIR / ".flwr-cluster")
    cluster.add_argument(
        "--cold", action="store_true", help="Flower's own SuperExec: a fresh ClientApp process per message"
    )
    add_heartbeat_option(cluster)
    add_host_options(cluster)
    experiment_command("validate", "compose and check the experiment, print it, start nothing")
    resume = commands.add_parser(
        "resume",
        help="continue a run folder from its newest checkpoint, in a simulation (or --cluster)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resume.add_argument("folder", type=Path, help="the run folder (runs/<date-time>-<name>/)")
    resume.add_argument("overrides", nargs="*", help="key=value changes a resume allows (rounds, timeouts)")
    resume.add_argument("--cluster", action="store_true", help="on a local SuperLink + SuperNodes")
    resume.add_argument("--hub-mirror", default=None)
    resume.add_argument("--timeout", type=float, default=0.0)
    resume.add_argument("--cpus-per-client", type=int, default=1)
    resume.add_argument("--gpus-per-client", type=float, default=0.0)
    resume.add_argument("--ray-address", default="")
    sweep = commands.add_parser(
        "sweep", help="a benchmark preset (conf/sweep/<preset>*.yaml), resumable, in chunks (--budget-min)"
    )
    sweep.add_argument(
        "preset", choices=sorted({p.stem for p in (PROJECT_DIR / "conf" / "sweep").glob("*.yaml")})
    )
    sweep.add_argument(
        "sweep_args",
        nargs=argparse.REMAINDER,
        help="--budget-min N, --dry-run, --plan, --grid G; key=a,b keeps those values of a grid parameter",
    )
    report = commands.add_parser("report", help="the report of a preset's results (docs/results/<preset>/)")
    report.add_argument("preset")
    return parser


def federation_size(requested: int | None, cfg: ExperimentConfig, option: str) -> int:
    """The number of nodes to start: each holds one of ``partition.num_clients`` partitions."""
    clients = cfg.partition.num_clients
    if requested is not None and requested != clients:
        raise ConfigError(
            f"{option} {requested} starts {requested} nodes but partition.num_clients={clients}: every node "
            f"holds one partition; pass {option} {clients} or partition.num_clients={requested}"
        )
    return clients


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the launchers' health checks
    if args.command == "sweep":
        return subprocess.call(
            [sys.executable, "-m", "launch.sweep", "--preset", args.preset, *args.sweep_args]
        )
    if args.command == "report":
        from benchmarks.report import main as report_main

        return report_main(["--preset", args.preset.replace("_", "-")])
    if args.command == "resume":
        args = as_resumed_run(args)
    try:
        experiment = resolve(args.overrides, args.run_config, args.output_dir, args.hub_mirror, args.resume)
        check_sources(experiment.cfg)
        nodes = federation_size(
            getattr(args, "num_supernodes", None) or getattr(args, "num_nodes", None),
            experiment.cfg,
            "--num-supernodes" if args.command == "run" else "--num-nodes",
        )
    except ConfigError as error:
        print(f"fedsubspace: configuration error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(experiment.cfg.to_yaml())
        return 0
    return launch(args, experiment, nodes)


def launch(args: argparse.Namespace, experiment: Experiment, nodes: int) -> int:
    """Start the Flower processes and run the experiment; the exit code says whether it completed."""
    from launch.processes import own_children

    own_children()
    run_config = [str(write_run_config(experiment.run_config, Path(args.flwr_home).resolve()))]
    if args.command == "run":
        from launch.simulation import run_simulation

        outcome = run_simulation(
            run_config, num_supernodes=nodes, cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client, flwr_home=args.flwr_home, timeout=args.timeout or math.inf,
            ray_address=args.ray_address,
        )  # fmt: skip
    else:
        from launch.cluster import LocalCluster, enter_cluster

        mirror = experiment.run_config.get("hub-mirror", "")
        cluster = LocalCluster(
            Path(args.flwr_home), nodes, tls=args.tls or args.auth, auth=args.auth, hub_mirror=mirror,
            warm=not getattr(args, "cold", False),
            heartbeat_interval=getattr(args, "heartbeat_interval", 0.0),
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            enter_cluster(stack, cluster, args)
            outcome = cluster.run(run_config, timeout=args.timeout or math.inf)
    print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
