"""Whole runs on the tiny preset: run folder, atomic checkpoints, exact resume, trackers, final model."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from productvlm.config import load_config
from productvlm.data.folder import read_split
from productvlm.data.synth import synthesize
from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VForCausalLM
from productvlm.training.callbacks import StopAfter
from productvlm.training.run import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRACKER_ENV = [
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "WANDB_SILENT",
    "WANDB_DATA_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
    "TENSORBOARD_LOGGING_DIR",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    synthesize(out, rows=48, seed=5, overwrite=True, progress=False, workers=1)
    return out


@pytest.fixture(autouse=True)
def restore_tracker_env(monkeypatch):
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def config(data_dir, out, *sets):
    base = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "train.batch_size=4",
        "train.log_steps=1",
        "eval.subset=0",
        "tracking.backend=none",
        "train.max_steps=8",
        "train.save_steps=4",
        "model.path=preset:tiny",  # 112 px: the shipped 168 px preset costs twice as much per step
        "train.num_workers=0",
        "train.vision_pretrain.epochs=0",  # stage 1: test_vision_pretrain.py
        "train.method=full",  # every part trained: what these tests check the run does to weights
        "train.balance=0",  # plain shuffled order (balanced sampling: test_train_balance.py)
        "train.max_minutes=null",  # no time budget: a step-for-step repeatable run
    ]
    return load_config(CONFIGS / "tiny-cpu.yaml", [*base, *sets])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize(
    "method_sets",
    [
        ["train.method=full"],  # crosses an epoch boundary (about 38 rows / 4 per step)
        [
            "train.method=lora+projector",
            "train.lora.dropout=0.2",
            "train.lr=1e-2",
            "train.group_by_length=false",
        ],
        [  # augmentation in a DataLoader worker, eval at steps 5 and 10, RUN/final = the best of them
            "train.method=full",
            "data.augment.enabled=true",
            "data.augment.scale=0.1",
            "data.augment.translate=0.1",
            "data.augment.rotate=10",
            "data.augment.hflip=true",
            "data.augment.jpeg_quality=[50,95]",
            "train.num_workers=1",
            "eval.subset=4",
            "eval.steps=5",
            "eval.max_new_tokens=4",
            "eval.select=best",
        ],
    ],
    ids=["full", "lora+projector", "augment+best"],
)
def test_resume_after_interruption_ends_with_the_same_weights(data_dir, tmp_path, method_sets):
    sets = ["train.max_steps=14", "train.save_steps=5", *method_sets]
    straight = train(config(data_dir, tmp_path / "straight", *sets), progress=False)

    cfg = config(data_dir, tmp_path / "resumed", *sets)
    first = train(cfg, callbacks=[StopAfter(10)], progress=False)
    assert first.steps == 10
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step-000005", "step-000010"]  # renamed into place, no staging left
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.resumed_from.name == "step-000010" and resumed.steps == 14

    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    start = weights(tmp_path / "straight" / "base-model")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train

    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == list(range(1, 15))  # lines after the checkpoint were dropped, none duplicated


def test_run_folder_and_final_model(data_dir, tmp_path):
    result = train(config(data_dir, tmp_path / "run", "eval.subset=4", "eval.steps=4"), progress=False)
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text() == load_config(run / "config.yaml").to_yaml()
    model = Phi3VForCausalLM.from_pretrained(result.final_dir)
    assert model.config.model_type == "phi3_v"
    assert model.config.use_cache  # Trainer turns the cache off for training; the final model has it back
    assert {"tokenizer.json", "preprocessor_config.json", "config.json", "calibration.json"} <= {
        p.name for p in result.final_dir.iterdir()
    }
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    data, log = log[0], log[1:]
    assert data["step"] == 0 and data["data/samples"] == len(read_split(data_dir, "train"))
    assert 0.0 < data["data/padding_share"] < 1.0  # random batches of photos of different sizes
    assert {"loss", "learning_rate"} <= set(log[0])
    evals = [e for e in log if "eval_category_accuracy" in e]
    assert [e["step"] for e in evals] == [4, 8]
    assert {"eval_price_mape", "eval_price_mae", "eval_title_token_f1", "eval_parse_rate"} <= set(evals[0])
    with pytest.raises(UserError, match="--resume"):
        train(config(data_dir, tmp_path / "run", "eval.subset=4", "eval.steps=4"), progress=False)


def test_lora_final_has_adapter_and_merged_weights(data_dir, tmp_path):
    result = train(
        config(data_dir, tmp_path / "run", "train.method=lora", "train.max_steps=2"), progress=False
    )
    assert (result.final_dir / "adapter" / "adapter_config.json").is_file()
    assert (result.final_dir / "adapter" / "tokenizer.json").is_file()
    merged = Phi3VForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_frozen_vision_leaves_the_tower_unchanged(data_dir, tmp_path):
    result = train(
        config(data_dir, tmp_path / "run", "train.method=frozen_vision", "train.max_steps=2"), progress=False
    )
    before, after = weights(tmp_path / "run" / "base-model"), weights(result.final_dir)
    tower = [k for k in before if ".img_processor." in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def wandb_records(path: Path):
    """Records of an offline run's .wandb file: wandb's LevelDB-style log of protobuf `Record`s.

    wandb >= 0.19 has no Python reader (its Go core writes the file), so this is the documented
    layout: a 7-byte file header, 32 KiB blocks, each chunk = crc32 (4) + length (2) + type (1).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, buf = header, b""
    while pos + header <= len(data):
        space = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header]) if space >= header else (0, 0, 0)
        if space < header or (length == 0 and kind == 0):
            pos += space  # block trailer / padding
            continue
        buf += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_files_hold_the_metrics(data_dir, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    train(
        config(data_dir, run, "tracking.backend=wandb", "eval.subset=4", "eval.steps=4", "train.max_steps=4"),
        progress=False,
    )
    assert os.environ["WANDB_MODE"] == "offline"
    (store,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config_keys, tables = {}, set(), []
    for record in wandb_records(store):
        kind = record.WhichOneof("record_type")
        if kind == "artifact" and record.artifact.type == "run_table":
            tables.append({e.path: Path(e.local_path) for e in record.artifact.manifest.contents})
        elif kind == "history":
            history.update(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "config":
            config_keys.update(item.key for item in record.config.update)
    assert 0.0 <= history["eval/category_accuracy"] <= 1.0 and history["eval/n"] == 4
    assert {"train/loss", "eval/price_mape", "eval/title_token_f1", "eval/parse_rate"} <= set(history)
    assert "productvlm" in config_keys
    # the eval sample table: a wandb.Table with one row per validation row, images as wandb.Image
    assert history["eval/samples/_type"] == "table-file"
    (files,) = tables  # staged inside RUN/wandb, synced with the run
    assert all(run / "wandb" in p.parents for p in files.values())
    table = json.loads(files["eval/samples.table.json"].read_text())
    assert table["columns"] == ["step", "file_name", "image", "truth", "prediction"]
    assert [(r[0], r[1], r[3], r[4]) for r in table["data"]] == eval_samples(run)
    images = [r[2] for r in table["data"]]
    assert all(i["_type"] == "image-file" and files[i["path"]].is_file() for i in images)


def eval_samples(run: Path) -> list[tuple]:
    """RUN/eval_samples.jsonl as (step, file_name, truth, prediction), checked against the validation rows."""
    lines = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    rows = {r["file_name"]: r for r in read_split(load_config(run / "config.yaml").data.dir, "validation")}
    for s in lines:
        row = rows[s["file_name"]]
        assert (
            s["truth"]
            == f"Product: {row['title']}, Category: {row['category3_code']}, Full Price: {row['full_price']}"
        )
    assert len(lines) == 4 and all(isinstance(s["prediction"], str) for s in lines)
    return [(s["step"], s["file_name"], s["truth"], s["prediction"]) for s in lines]


def test_mlflow_local_store_holds_the_metrics(data_dir, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    train(
        config(
            data_dir, run, "tracking.backend=mlflow", "eval.subset=4", "eval.steps=4", "train.max_steps=4"
        ),
        progress=False,
    )
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("productvlm")
    (found,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(found.info.run_id, "eval_category_accuracy")
    assert [m.step for m in history] == [4] and 0.0 <= history[0].value <= 1.0
    assert len(client.get_metric_history(found.info.run_id, "loss")) == 4
    assert float(found.data.params["data.padding_share"]) > 0
    # the eval sample table: mlflow.log_table with the images stored as artifacts
    table = json.loads(
        Path(client.download_artifacts(found.info.run_id, "eval_samples.json", tmp_path)).read_text()
    )
    columns = table["columns"]
    records = [dict(zip(columns, r)) for r in table["data"]]
    assert [(r["step"], r["file_name"], r["truth"], r["prediction"]) for r in records] == eval_samples(run)
    for r in records:
        assert r["image"]["type"] == "image"
        assert Path(client.download_artifacts(found.info.run_id, r["image"]["filepath"], tmp_path)).is_file()


def test_only_the_newest_checkpoints_are_kept(data_dir, tmp_path):
    train(
        config(data_dir, tmp_path / "run", "train.save_steps=2", "train.save_total_limit=2"), progress=False
    )
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008"]


def test_a_catalog_without_validation_rows_trains_without_eval(data_dir, tmp_path):
    import shutil

    no_val = tmp_path / "catalog"
    shutil.copytree(data_dir, no_val)
    shutil.rmtree(no_val / "validation")
    result = train(config(no_val, tmp_path / "run", "eval.subset=8", "train.max_steps=2"), progress=False)
    assert result.steps == 2 and not any(k.startswith("eval_") for k in result.metrics)


def test_final_is_the_best_evaluated_checkpoint_and_patience_stops(data_dir, tmp_path):
    sets = ["eval.subset=4", "eval.steps=2", "eval.max_new_tokens=4", "eval.select=best", "eval.patience=2"]
    sets += ["train.max_steps=12", "train.save_steps=100", "train.save_total_limit=1"]
    result = train(config(data_dir, tmp_path / "run", *sets), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    chosen = [e for e in log if "selected_step" in e]
    assert len(chosen) == 1 and chosen[0]["selected_by"] == "category_accuracy"
    best = chosen[0]["selected_step"]
    evals = [e for e in log if "eval_category_accuracy" in e]
    assert max(e["eval_category_accuracy"] for e in evals) == chosen[0]["selected_eval_category_accuracy"]
    after = [e for e in evals if e["step"] > best]
    assert len(after) <= 2 and (result.steps == 12 or len(after) == 2)  # stopped by patience, or ran out
    # a checkpoint at every eval step; rotation (limit 1) kept the best beside the newest
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert f"step-{best:06d}" in kept and f"step-{result.steps:06d}" in kept
    a, b = weights(result.final_dir), weights(tmp_path / "run" / "checkpoints" / f"step-{best:06d}")
    assert all(torch.equal(a[k], b[k]) for k in b)
