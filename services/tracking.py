"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow, each through its
own library, chosen by the run config's logging.backends (docs/TRACKING.md).

Every backend receives the same things: the resolved run config as hyperparameters when the run
starts, the numbers of every metrics.jsonl row at its step (nested keys joined by "/"), and at the
evaluation its numbers ("eval/...") and the before/after grid and reward curves as images. A backend's
library is imported only when it is chosen; a missing one is refused before the run starts, naming
the extra that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from services.config import LoggingConfig, RunConfig

# backend -> (the module it needs, the pip extra that installs it)
REQUIREMENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# the images of the evaluation, as each tracker names them -> the file in the run directory
EVALUATION_IMAGES = {
    "evaluation/before_after": "before_after.png",
    "training/reward_curves": "reward_curves.png",
}
# not scalars of a step: the step is the axis and every tracker records the wall time itself
NOT_LOGGED = ("step", "time")
MLFLOW_BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch call


def check_backends(logging_cfg: LoggingConfig) -> None:
    """Refuse backends whose library is not installed, naming the extra that installs it."""
    for backend in logging_cfg.backends:
        if backend in REQUIREMENTS and importlib.util.find_spec(REQUIREMENTS[backend][0]) is None:
            module, extra = REQUIREMENTS[backend]
            raise ValueError(
                f"logging.backends: {backend} needs the {module} package, which is not installed: "
                f"pip install 'rcgrpo[{extra}]' (or drop {backend} from logging.backends)"
            )


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.jsonl row, nested keys joined by "/"; lists and strings are not scalars."""
    out = {}
    for key, value in row.items():
        if not prefix and key in NOT_LOGGED:
            continue
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def hyperparameters(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved run config flattened to "section.field" keys; lists and None as their JSON."""

    def flatten(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and value:
                out |= flatten(value, f"{prefix}{key}.")
            else:
                plain = isinstance(value, str | int | float | bool)
                out[f"{prefix}{key}"] = value if plain else json.dumps(value)
        return out

    return flatten(cfg.model_dump(mode="json"), "")


class _TensorBoard:
    """Event files in <run dir>/tensorboard: `tensorboard --logdir runs` overlays every run."""

    def __init__(self, cfg: RunConfig, params: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(cfg.run_dir / "tensorboard"))
        # the HPARAMS tab; SummaryWriter.add_hparams would write them into a run directory of their own
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in cfg.to_yaml().splitlines()))

    def log(self, step: int, values: dict[str, float], walltime: float) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, walltime=walltime)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in <run dir>/wandb; offline (`wandb sync` uploads it later) unless WANDB_API_KEY is set
    or WANDB_MODE says otherwise."""

    def __init__(self, cfg: RunConfig, params: dict):
        import wandb

        online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
        self.run = wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.wandb_entity,
            name=cfg.name,
            dir=cfg.run_dir,
            config=cfg.model_dump(mode="json"),
            mode=None if online else "offline",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, step: int, values: dict[str, float], walltime: float) -> None:
        self.run.log(values, step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    """An MLflow run in experiment logging.project: at logging.mlflow_tracking_uri, else
    MLFLOW_TRACKING_URI, else a SQLite store of every run in runs_dir (mlflow.db, artifacts beside it)."""

    def __init__(self, cfg: RunConfig, params: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if uri is None:
            runs_dir = cfg.runs_dir.resolve()
            runs_dir.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{runs_dir / 'mlflow.db'}", (runs_dir / "mlflow-artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.logging.project)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.logging.project, artifact_location=artifacts)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.name).info.run_id
        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MLFLOW_BATCH])
        self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")

    def log(self, step: int, values: dict[str, float], walltime: float) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(walltime * 1000), step) for key, value in values.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MLFLOW_BATCH])

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        for name, path in images.items():
            self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(name).parent))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Tracker:
    """The run's chosen trackers (metrics.jsonl itself is the driver's MetricsLog); none: does nothing."""

    def __init__(self, cfg: RunConfig):
        check_backends(cfg.logging)
        self.cfg, self.backends, self.closed = cfg, [], False
        params = hyperparameters(cfg)
        try:
            for name in cfg.logging.backends:
                if name in BACKENDS:
                    self.backends.append(BACKENDS[name](cfg, params))
        except BaseException:
            self.close(failed=True)
            raise

    def log_step(self, row: dict) -> None:
        """A metrics.jsonl row, at its step and wall time."""
        values = scalars(row)
        for backend in self.backends:
            backend.log(row["step"], values, row.get("time", time.time()))

    def log_evaluation(self, step: int, evaluation: dict | None) -> None:
        """The held-out evaluation's numbers (summary.json's "eval") and the run's images, at `step`."""
        values = scalars(evaluation or {}, "eval/")
        images = {
            name: self.cfg.run_dir / file
            for name, file in EVALUATION_IMAGES.items()
            if (self.cfg.run_dir / file).exists()
        }
        for backend in self.backends:
            if values:
                backend.log(step, values, time.time())
            backend.log_images(step, images)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for backend in self.backends:
            backend.close(failed)

    @contextmanager
    def closed_on_error(self):
        """Close (marking the run failed) if the block raises; else leave the trackers open."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(failed=kind is not None)
