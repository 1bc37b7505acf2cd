"""Every `report_to` integration receives the scalar metrics and the logged sample, with the real packages offline.

TensorBoard (event files), Weights & Biases (offline mode), Trackio (its local SQLite store) and MLflow (a local file
store) are each run for two steps on a tiny pipeline and then read back with their own readers.
"""

import glob
import json
import os
import tempfile
import time

import pytest

from .test_trainer import make_trainer


# Trackio reads its folder once, when imported (the trainer's callback imports it): point it at a scratch folder.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="trackio-"))

TRACKER_SETTINGS = dict(max_steps=2, logging_steps=1, log_samples=True)


def train(tracker, tiny_pipeline_path, tmp_path, pipeline="tiny-flux", **overrides):
    trainer = make_trainer(
        tiny_pipeline_path(pipeline), tmp_path, report_to=tracker, **{**TRACKER_SETTINGS, **overrides}
    )
    trainer.train()
    trainer.accelerator.end_training()  # the trackers flush and close their runs
    return trainer


def test_tensorboard(tiny_pipeline_path, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logging_dir))
    train("tensorboard", tiny_pipeline_path, tmp_path)
    events = EventAccumulator(str(logging_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("train/reward")] == [1, 2]
    assert "train/rewards/brightness/mean" in tags["scalars"]
    assert [e.step for e in events.Images("samples")] == [1, 2]
    assert events.Images("samples")[0].encoded_image_string[:4] == b"\x89PNG"


def finish_wandb_run() -> str:
    """Finish the run the trainer started; returns its folder. wandb is reset, so a later run reads WANDB_DIR anew."""
    import wandb

    run_dir = os.path.dirname(wandb.run.dir)  # .../offline-run-*/files
    wandb.finish()
    wandb.teardown()
    return run_dir


def read_wandb_records(path: str) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of chunked records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""  # 7-byte file header: magic, 0xBEE1, version
    while position + 7 <= len(data):
        block_left = 32768 - position % 32768
        if block_left < 7:  # padding at the end of a block
            position += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow  # wandb's service process takes a while to finish an offline run
def test_wandb_offline(tiny_pipeline_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train("wandb", tiny_pipeline_path, tmp_path)
    run_dir = finish_wandb_run()
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    for _ in range(300):  # wandb's service process writes the file: wait for the run's exit record
        records = read_wandb_records(run_file)
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.1)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    assert [row["train/global_step"] for row in history if "train/reward" in row] == [1, 2]
    samples = [row for row in history if "samples/_type" in row]  # nested keys: one item per leaf
    assert [row["train/global_step"] for row in samples] == [1, 2]
    assert all(row["samples/_type"] == "image-file" for row in samples)
    assert len(glob.glob(os.path.join(run_dir, "files", "media", "images", "samples_*.png"))) == 2


def test_trackio_local(tiny_pipeline_path, tmp_path):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    project = f"dancegrpo-test-{os.getpid()}-{tmp_path.name}"
    train(
        "trackio",
        tiny_pipeline_path,
        tmp_path,
        project=project,
        run_name="run",
        trackio_space_id=None,
        trackio_static_space_id=False,
    )
    logs = SQLiteStorage.get_logs(project, "run")
    rewards = [row for row in logs if "train/reward" in row]
    assert len(rewards) == 2
    samples = [row["samples"] for row in logs if "samples" in row]
    assert len(samples) == 2 and all(sample["_type"] == "trackio.image" for sample in samples)


def mlflow_store(tmp_path, monkeypatch, experiment: str) -> str:
    """A local MLflow store in tmp_path, and its experiment (artifacts there too, not in ./mlruns)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    return uri


@pytest.mark.slow  # MLflow sets up its SQLite store (migrations) first
def test_mlflow_local(tiny_pipeline_path, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path, monkeypatch, "dancegrpo-test")
    train("mlflow", tiny_pipeline_path, tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dancegrpo-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward")] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step-000001.png", "samples/step-000002.png"]


@pytest.mark.slow
def test_a_video_sample_reaches_every_tracker(tiny_pipeline_path, tmp_path, monkeypatch):
    for package in ("tensorboard", "wandb", "trackio", "mlflow"):
        pytest.importorskip(package)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = mlflow_store(tmp_path, monkeypatch, "dancegrpo-video")
    project = f"dancegrpo-video-{os.getpid()}-{tmp_path.name}"
    train(
        ["tensorboard", "wandb", "trackio", "mlflow"],
        tiny_pipeline_path,
        tmp_path,
        pipeline="tiny-wan",
        num_frames=5,
        max_steps=1,
        project=project,
        run_name="run",
        trackio_space_id=None,
        trackio_static_space_id=False,
    )
    run_dir = finish_wandb_run()
    gif = (tmp_path / "out" / "_samples" / "step-000001.gif").read_bytes()
    assert gif[:6] == b"GIF89a"

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Images("samples")[0].encoded_image_string == gif  # animated in TensorBoard

    assert glob.glob(os.path.join(run_dir, "files", "media", "videos", "samples_*.gif"))

    samples = [row["samples"] for row in SQLiteStorage.get_logs(project, "run") if "samples" in row]
    assert [sample["_type"] for sample in samples] == ["trackio.video"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dancegrpo-video").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-000001.gif"]
