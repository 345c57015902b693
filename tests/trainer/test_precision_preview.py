"""The bf16 policy with activation checkpointing trains; preview grids are decoded by a real VAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint import FileSystemReader

from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "ds"), n=16)


def test_bf16_policy_with_activation_checkpointing(tmp_path, data):
    config = tiny_config(
        data,
        str(tmp_path / "run"),
        total_steps=4,
        data={"global_batch_size": 8},
        parallel={"precision": "bf16", "activation_checkpointing": True},
        log={"every": 1},
    )
    result = train(config)
    assert result.step == 4 and result.nonfinite_steps == 0 and math.isfinite(result.last_loss)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    # fp32 master weights and optimizer state: the checkpoint's tensors as DCP recorded them (the
    # export is cast to float32 whatever the training dtype, so it cannot show this)
    folder = result.checkpoint
    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    model = {k: m.properties.dtype for k, m in metadata.items() if k.startswith("model.")}
    optim = {k: m.properties.dtype for k, m in metadata.items() if k.startswith("optim.state.")}
    assert len(model) > 10 and set(model.values()) == {torch.float32}
    assert any(k.endswith("exp_avg") for k in optim) and set(optim.values()) == {torch.float32}


def test_preview_grid_is_decoded_by_the_vae(tmp_path, data, tiny_vae_dir):
    config = tiny_config(
        data,
        str(tmp_path / "run"),
        total_steps=2,
        export=False,
        data={"global_batch_size": 8},
        log={
            "sample_every": 2,
            "sample_classes": "0,1",
            "sample_per_class": 2,
            "sample_steps": 4,
            "vae": str(tiny_vae_dir),
        },
    )
    train(config)
    grid = Image.open(Path(config.run_dir) / "samples" / "step-000000002.png")
    assert grid.size == (80 + 2 * 64, 2 * 64)  # label margin + 2 decoded 64 px images per row, 2 rows
