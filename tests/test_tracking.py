"""Experiment trackers beside metrics.jsonl, read back with each library's own reader: TensorBoard's
EventAccumulator, MLflow's MlflowClient, and W&B's offline run file decoded with W&B's own record
protobuf. A real run through the driver logs to all three; every step's numbers must be metrics.jsonl's.
"""

import json
import math
import struct

import pytest
from PIL import Image
from test_loop import FAST as LOOP_FAST

import deploy.cli
from services.config import load_run_config
from services.tracking import REQUIREMENTS, check_backends, scalars

FAST = [
    *LOOP_FAST,
    "rollout.num_workers=1",
    "learner.total_steps=3",
    "eval.num_samples=2",
    "eval.grid_samples=2",
]


def _same(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=0)


def wandb_records(path):
    """The records of a W&B transaction log (run-<id>.wandb): its LevelDB-log framing (a 7-byte file
    header; 32 KiB blocks of chunks, each a 7-byte header: CRC-32, length, type full/first/middle/last),
    every record parsed with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_a_backend_whose_library_is_missing_is_refused_before_the_run_starts(tmp_path, monkeypatch, capsys):
    cfg = load_run_config(None, ["logging.backends=[tensorboard, mlflow]"])
    assert cfg.logging.backends == ["jsonl", "tensorboard", "mlflow"]  # jsonl is always on
    check_backends(cfg.logging)  # installed here (the test extra)
    # as if the mlflow extra were not installed
    monkeypatch.setitem(REQUIREMENTS, "mlflow", ("rcgrpo_not_installed", "mlflow"))
    with pytest.raises(ValueError, match=r"logging.backends: mlflow needs .*pip install 'rcgrpo\[mlflow\]'"):
        check_backends(cfg.logging)
    args = ["train", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "logging.backends=[mlflow]"]
    assert deploy.cli.main(args) == 2
    assert "rcgrpo train: error: logging.backends: mlflow needs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything started
    with pytest.raises(ValueError, match="logging.backends.0: Input should be 'jsonl'"):
        load_run_config(None, ["logging.backends=[neptune]"])


def test_scalars_are_the_numbers_of_a_metrics_row_with_nested_keys_joined():
    row = {
        "step": 3,
        "time": 1.7e9,
        "loss": 0.5,
        "groups": 2,
        "ok": True,
        "note": "x",
        "group_signal": [1, 2],
    }
    row |= {
        "term_spread": {"acd": 0.01, "region_adherence": float("nan")},
        "streams": {"tasks": {"length": 4}},
    }
    values = scalars(row)
    assert list(values) == [
        "loss",
        "groups",
        "term_spread/acd",
        "term_spread/region_adherence",
        "streams/tasks/length",
    ]
    assert values["groups"] == 2.0 and math.isnan(values["term_spread/region_adherence"])


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_wandb_and_mlflow_what_metrics_jsonl_holds(
    tmp_path, embedded_redis, monkeypatch
):
    from deploy.driver import run

    for variable in (
        "RCGRPO_REWARD_URL",
        "RAY_ADDRESS",
        "REDIS_URL",
        "WANDB_API_KEY",
        "WANDB_MODE",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(variable, raising=False)
    cfg = load_run_config(
        None,
        [
            "name=tracked",
            f"runs_dir={tmp_path}",
            f"redis_url={embedded_redis.url}",
            "logging.backends=[tensorboard, wandb, mlflow]",
            *FAST,
        ],
    )
    run(cfg)
    check_trackers(tmp_path, cfg)


def check_trackers(tmp_path, cfg):
    """What the run `cfg` logged under tmp_path, read back from each tracker and compared with metrics.jsonl."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "tracked"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    expected = {row["step"]: scalars(row) for row in rows}
    keys = set(expected[1])
    assert {"reward_mean", "loss", "clip_fraction", "term_spread/region_adherence"} <= keys
    assert not keys & {"step", "time"}
    evaluation = scalars(summary["eval"], "eval/")
    assert "eval/change/region_adherence" in evaluation

    # TensorBoard: every scalar at every step (float32 in the event file), the images, the config
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == keys | set(evaluation)
    for key in keys:
        logged = {event.step: event.value for event in events.Scalars(key)}
        assert logged.keys() == expected.keys(), key
        assert all(_same(logged[s], expected[s][key], rel=1e-6) for s in expected), key
    loss = events.Scalars("loss")  # at each row's step and wall time
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.wall_time for e in loss] == pytest.approx([row["time"] for row in rows], abs=1e-3)
    for key, value in evaluation.items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (3, pytest.approx(value, rel=1e-6, nan_ok=True))
        ]
    with Image.open(run_dir / "before_after.png") as grid:
        [shown] = events.Images("evaluation/before_after")
        assert (shown.step, shown.width, shown.height) == (3, grid.width, grid.height)
    assert [e.step for e in events.Images("training/reward_curves")] == [3]
    hparams = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    logged_params = plugin_data_pb2.HParamsPluginData.FromString(hparams).session_start_info.hparams
    assert logged_params["learner.total_steps"].number_value == 3
    assert logged_params["logging.backends"].string_value == '["jsonl", "tensorboard", "wandb", "mlflow"]'
    assert logged_params["editor"].string_value == str(cfg.editor)

    # MLflow: the run in the runs directory's SQLite store, metrics, params, config and images
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("rcgrpo").experiment_id])
    assert mlflow_run.info.run_name == "tracked" and mlflow_run.info.status == "FINISHED"
    run_id = mlflow_run.info.run_id
    assert set(mlflow_run.data.metrics) == keys | set(evaluation)
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history.keys() == expected.keys() and all(
            _same(history[s], expected[s][key]) for s in expected
        ), key
    assert [m.timestamp for m in client.get_metric_history(run_id, "loss")] == [
        int(r["time"] * 1000) for r in rows
    ]
    assert mlflow_run.data.params["method.group_size"] == "4" and mlflow_run.data.params["name"] == "tracked"
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "evaluation")
    }
    assert {"config.yaml", "evaluation/before_after.png"} <= artifacts
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "mlflow-download"))
    assert load_run_config(local) == cfg

    # W&B: an offline run under the run directory; its history is metrics.jsonl's, its config the run's
    [log] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    [wandb_run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (wandb_run.display_name, wandb_run.project) == ("tracked", "rcgrpo")
    config = {item.key: json.loads(item.value_json) for item in wandb_run.config.update}
    assert config["learner"]["total_steps"] == 3 and config["logging"]["backends"][1:] == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.setdefault(items["_step"], {}).update(items)
    assert sorted(history) == [1, 2, 3]
    for step, values in expected.items():
        assert all(_same(history[step][key], value) for key, value in values.items()), step
    assert all(_same(history[3][key], value) for key, value in evaluation.items())
    # an image is a record of its file in the run's media (its fields as nested keys)
    assert history[3]["evaluation/before_after/_type"] == "image-file"
    shown = log.parent / "files" / history[3]["evaluation/before_after/path"]
    with Image.open(shown) as image, Image.open(run_dir / "before_after.png") as grid:
        assert image.size == grid.size
