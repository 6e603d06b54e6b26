"""The run config: one YAML file (configs/*.yaml) that every component of a training run reads.

`rcgrpo train` without --config runs the shipped configs/tiny_shapes.yaml (DEFAULT_RUN_CONFIG): that
file, not the field defaults below, is the default run. The defaults are what any config file leaves
unset. `--set a.b=value` overrides any field; a bad field fails with a message that names it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import UnionType
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

import rcgrpo
from rcgrpo.config import ConfigSection, MethodConfig
from rcgrpo.rewards import DEFAULT_WEIGHTS
from rcgrpo.sampler import states_of_steps
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
from services.keys import DEFAULT_RUN_NAME, RunKeys
from services.schemas import ID_PATTERN, Composition

# The shipped run configs: package data of rcgrpo (rcgrpo/configs links to the checkout's configs/), so an
# installed wheel has them too.
CONFIGS_DIR = Path(rcgrpo.__file__).parent / "configs"
# What `rcgrpo train` runs without --config.
DEFAULT_RUN_CONFIG = CONFIGS_DIR / "tiny_shapes.yaml"


class DataConfig(ConfigSection):
    source: str = "shapes"  # shapes | compbench:PATH | jsonl:PATH
    split: str = "train"
    num_samples: int = Field(512, ge=1)  # ShapesEdit samples generated for training
    seed: int = 0


class RolloutConfig(ConfigSection):
    renamed = {"keep_timesteps": "kept_steps"}

    num_workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)  # 0 on CPU; 1 per worker for FLUX scale
    cpus_per_worker: float = Field(1.0, ge=0)  # Ray logical CPUs each rollout actor reserves
    torch_threads: int = Field(1, ge=1)
    # grid indices j the surrogate may train on: the worker keeps only x_j and x_{j+1} of these (None: all
    # T + 1 grid states). At FLUX scale the states are most of a group's bytes (docs/SCALE.md).
    kept_steps: list[int] | None = None
    reclaim_idle_ms: int = Field(30_000, ge=1)  # a task pending this long (its worker died) is taken over
    max_deliveries: int = Field(3, ge=1)  # a task handed out this often goes to the dead-letter stream
    metrics_port: int = Field(0, ge=0)  # first worker's Prometheus port (worker i: +i, e.g. 9101); 0 = off


class RewardConfig(ConfigSection):
    url: str | None = None  # None: the driver starts a reward server on a loopback port
    # The run's external rewards and their weights w_j, sent with every group to whichever server scores
    # it (r_i = sum_j w_j r_ext,j + lambda_ACD R_ACD; lambda_ACD is method.acd_weight). The background
    # is held by method.background_anchor, so the background terms' default weights are low.
    rewards: dict[str, float] = Field(
        default_factory=lambda: {name: w for name, w in DEFAULT_WEIGHTS.items() if name != "acd"}
    )
    # the rewards that measure following the instruction (the rest preserve or are intrinsic): what the
    # learner's diagnostics compare the advantages with
    instruction_terms: list[str] = Field(default_factory=lambda: ["region_adherence"], min_length=1)
    # the instruction reward's own noise: a group whose candidates' instruction rewards (unweighted sum)
    # have a within-group std below it has no outcome to select on. Counted and reported per task kind
    # always; with method.drop_noise_groups such a group carries no gradient. 0.004 ~ one 8-bit level
    noise_floor: float = Field(0.004, ge=0)
    # weighted_sum: r_i = sum_j w_j r_j. gated (against reward hacking): r_i = E (gate_floor +
    # gate_slope P) + w_ACD R_ACD, E the weighted instruction terms, P the other weighted terms, so
    # background preservation earns nothing for an edit that ignores the instruction
    composition: Literal["weighted_sum", "gated"] = "weighted_sum"
    gate_floor: float = Field(0.1, ge=0)  # a
    gate_slope: float = Field(1.0, ge=0)  # b

    @model_validator(mode="after")
    def _instruction_terms_scored(self):
        missing = [name for name in self.instruction_terms if name not in self.rewards]
        if missing:
            raise ValueError(
                f"instruction_terms {missing} are not among the run's rewards {sorted(self.rewards)}: "
                "the learner measures the instruction's spread on them"
            )
        return self

    @field_validator("rewards")
    @classmethod
    def _no_acd(cls, rewards: dict[str, float]) -> dict[str, float]:
        if "acd" in rewards:
            raise ValueError(
                "the ACD reward's weight is lambda_ACD: set method.acd_weight, not reward.rewards.acd"
            )
        return rewards


class LearnerConfig(ConfigSection):
    renamed = {"weight_store": "lora_store", "weight_dir": "lora_dir"}

    total_steps: int = Field(30, ge=1)
    groups_per_step: int = Field(2, ge=1)  # whole groups per optimiser step
    publish_every: int = Field(1, ge=1)  # publish a policy version every N updates
    max_staleness: int = Field(1, ge=0)  # policy versions a group may lag the learner
    # drop: stale groups are discarded (counted); wait: tasks are only fed for the next update, so
    # every group is sampled with the newest policy (synchronous); stale ones are dropped in both
    staleness_policy: Literal["drop", "wait"] = "drop"
    checkpoint_every: int = Field(10, ge=1)
    # no step for stall_warn_s: the driver prints what is missing (again every stall_warn_s, recovering
    # what it can meanwhile); for stall_abort_s: it stops the run with that message
    stall_warn_s: float = Field(120.0, gt=0)
    stall_abort_s: float = Field(900.0, gt=0)
    max_restarts: int = Field(5, ge=0)  # restarts of each component (learner, a worker, Redis, reward server)
    external: bool = False  # True: the learner runs as its own process (`rcgrpo learner`), not a Ray actor
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    metrics_port: int = Field(0, ge=0)  # the learner's Prometheus port (e.g. 9100); 0 = off
    seed: int = 0
    # (anchor, step) rows per forward/backward of the update; None: all rows of the batch at once.
    # Bounds the learner's activation memory (FLUX scale: a few rows per micro-batch).
    micro_batch_rows: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, more time
    # where policy versions' bytes go: "redis" (the run's Redis), or "directory" (lora_dir, a volume
    # every worker mounts; the records stay in Redis), which fans a version out to many workers faster
    # (BENCHMARKS.md)
    lora_store: Literal["redis", "directory"] = "redis"
    lora_dir: Path | None = None  # None: <run dir>/weights

    def checkpoint_due(self, step: int) -> bool:
        """Whether the learner checkpoints after this step: every checkpoint_every steps, and the last."""
        return step % self.checkpoint_every == 0 or step == self.total_steps

    def check_resumable(self, checkpoint: str, step: int) -> None:
        """A --resume from a checkpoint at `step` must have steps left to train: never a run that
        silently trains nothing."""
        if step >= self.total_steps:
            raise ValueError(
                f"--resume: {checkpoint} is at step {step}, already at learner.total_steps={self.total_steps}; "
                "raise learner.total_steps to train further"
            )


class EvalConfig(ConfigSection):
    num_samples: int = Field(48, ge=0)  # held-out ShapesEdit samples for base vs trained (0: skip)
    split: str = "test"
    seed: int = 1234
    grid_samples: int = Field(6, ge=0)


TRACKING_BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")


class LoggingConfig(ConfigSection):
    # where every step's scalars (those of metrics.jsonl), the evaluation's images and the resolved config
    # go, besides <run dir>/metrics.jsonl which is always written (services/tracking.py, docs/TRACKING.md)
    backends: list[Literal[TRACKING_BACKENDS]] = Field(default_factory=lambda: ["jsonl"])
    project: str = "rcgrpo"  # the W&B project and the MLflow experiment
    wandb_entity: str | None = None  # None: the W&B account's default entity
    # None: MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db (every run of runs_dir in one store)
    mlflow_tracking_uri: str | None = None

    @field_validator("backends")
    @classmethod
    def _jsonl_first(cls, backends: list[str]) -> list[str]:
        """jsonl is always on; each backend once."""
        return list(dict.fromkeys(["jsonl", *backends]))


class ModelCardConfig(ConfigSection):
    # the Hub id the card of lora/ names as base_model (e.g. black-forest-labs/FLUX.1-Kontext-dev);
    # None: the editor's path
    base_model: str | None = None
    license: str = "apache-2.0"  # "other" with license_name for a license the Hub does not list
    license_name: str | None = None


class RunConfig(ConfigSection):
    renamed = {"payload_store": "blob_store", "payload_dir": "blob_dir"}

    name: str = Field(DEFAULT_RUN_NAME, max_length=64, pattern=ID_PATTERN)  # in every Redis key of the run
    editor: Path = SHIPPED_EDITOR_DIR
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    # GiB of each GPU the rollout workers and the learner get (nvidia-smi's total / 1024): the driver
    # refuses a run whose estimated peak (`rcgrpo plan`) exceeds it; None: no check (CPU runs)
    gpu_memory_gb: float | None = Field(None, gt=0)
    runs_dir: Path = Path("runs")
    redis_url: str | None = None  # None: REDIS_URL, else a private embedded redis-server
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    # where rollout groups' payloads go (training tensors, image bundles; the messages that refer to them
    # always travel through Redis): "redis" (keys with a TTL), or "directory" (blob_dir, a volume every
    # rollout worker, the reward server and the learner mount): at Kontext size a group's tens of MB then
    # stay out of Redis' memory, its append-only file and its one thread (BENCHMARKS.md)
    blob_store: Literal["redis", "directory"] = "redis"
    blob_dir: Path | None = None  # None: <run dir>/payloads (the directory name runs already have)
    metrics_host: str = "127.0.0.1"  # where workers and the learner serve /metrics (0.0.0.0 in containers)
    # the driver's Prometheus port (its recoveries, e.g. 9099); 0 = off
    driver_metrics_port: int = Field(0, ge=0)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    model_card: ModelCardConfig = Field(default_factory=ModelCardConfig)

    @model_validator(mode="after")
    def _kept_states_train(self):
        """kept_steps must lie on the grid and give the surrogate K trainable steps per anchor."""
        kept = self.rollout.kept_steps
        if kept is not None:
            steps, k = self.method.num_steps, self.method.steps_per_anchor
            bad = [j for j in kept if not 0 <= j < steps]
            if bad:
                raise ValueError(
                    f"rollout.kept_steps {bad} are outside the {steps}-step grid (0..{steps - 1})"
                )
            if len(self.trained_steps) < k:
                raise ValueError(
                    f"rollout.kept_steps {kept} gives {len(self.trained_steps)} trainable steps among "
                    f"method.trained_steps {self.method.trained_steps}, but "
                    f"method.steps_per_anchor={k} samples that many per anchor"
                )
        return self

    @property
    def trained_steps(self) -> list[int]:
        """Grid indices j whose step j -> j+1 the learner trains on: method.trained_steps, within
        rollout.kept_steps when that is set."""
        kept = self.rollout.kept_steps
        return [j for j in self.method.trained_steps if kept is None or j in kept]

    @property
    def kept_states(self) -> list[int]:
        """Grid states a rollout worker keeps for the learner: x_j and x_{j+1} of every trained step."""
        return states_of_steps(self.method.num_steps, self.trained_steps)

    @property
    def rewards(self) -> dict[str, float]:
        """Every reward of the run with its weight: reward.rewards, and R_ACD weighted by method.acd_weight."""
        return {**self.reward.rewards, "acd": self.method.acd_weight}

    @property
    def composition(self) -> Composition:
        """How every scorer composes the run's sub-scores into r_i."""
        r = self.reward
        return Composition(
            kind=r.composition,
            instruction_terms=r.instruction_terms,
            ungated_terms=["acd"],
            floor=r.gate_floor,
            slope=r.gate_slope,
        )

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def blob_path(self) -> Path:
        """The directory of the run's payloads when blob_store is "directory"."""
        return self.blob_dir or self.run_dir / "payloads"

    @property
    def keys(self) -> RunKeys:
        """The run's Redis keys and streams."""
        return RunKeys(self.name)

    def resolved_redis_url(self) -> str | None:
        return self.redis_url or os.environ.get("REDIS_URL")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(values: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def shipped_config(path: str | Path) -> Path:
    """`path`, or, where no such file exists and it names a bare file or one under configs/, the shipped
    config of that name: `--config configs/tiny_shapes.yaml` works from any directory of an installed package."""
    path = Path(path)
    if path.is_file() or path.parent not in (Path("."), Path("configs")):
        return path
    shipped = CONFIGS_DIR / path.name
    return shipped if shipped.is_file() else path


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (None: the defaults) and apply `key.sub=value` overrides."""
    values: dict = {}
    if path is not None:
        path = shipped_config(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"run config {str(path)!r} must be a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        _set_dotted(values, dotted.strip(), raw)
    try:
        return RunConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"invalid run config: {problems}") from None


def add_run_arguments(parser, redis_url: bool = True, default_config: Path | None = None) -> None:
    """The flags every run-config command shares: --config, --set and (for components) --redis-url."""
    default = default_config if default_config is not None and default_config.is_file() else None
    parser.add_argument(
        "--config", default=default, help=f"run config YAML (default: {default or 'the RunConfig defaults'})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. learner.total_steps=50",
    )
    if redis_url:
        parser.add_argument(
            "--redis-url", help="the run's Redis (default: the config's redis_url, else REDIS_URL)"
        )


def component_config(args, component: str) -> tuple[RunConfig, str]:
    """The run config and Redis URL of a standalone component (it finds the run through Redis)."""
    cfg = load_run_config(args.config, args.overrides)
    redis_url = args.redis_url or cfg.resolved_redis_url()
    if redis_url is None:
        raise ValueError(
            f"--redis-url: a standalone {component} needs the run's Redis (set it, redis_url or REDIS_URL)"
        )
    return cfg, redis_url


def add_section_arguments(
    parser: argparse.ArgumentParser, section: type[BaseModel], names: list[str]
) -> None:
    """A flag per named field of a config section (flow_steps: --flow-steps), whose type, choices, default
    and help are the field's: the CLI cannot drift from the config."""
    for name in names:
        info = section.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind = info.annotation
        default = info.get_default(call_default_factory=True)
        shown = f"default: {default}"
        help = f"{info.description} ({shown})" if info.description else shown
        if get_origin(kind) is UnionType:  # `str | None`: the flag takes a str; absent, the default None
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=name, action=action, default=default, help=help)
        elif get_origin(kind) is Literal:
            choices = get_args(kind)
            parser.add_argument(flag, dest=name, choices=choices, default=default, help=help)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=default, help=help)


def section_from_arguments(section: type[BaseModel], args: argparse.Namespace, names: list[str]):
    """The section with the named fields taken from parsed flags; a bad value names its flag."""
    try:
        return section(**{name: getattr(args, name) for name in names})
    except ValidationError as error:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in error.errors()
        )
        raise ValueError(f"invalid {section.__name__}: {problems}") from None
