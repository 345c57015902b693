"""`parallel.compile` (torch.compile per block, trainer.parallelize) on CPU: a few training steps
compiled equal the same steps in eager mode within float tolerance, for the released block and
the modern one, so that the GPU path is not first run by a user. Time per step of both:
tests/benchmarks/bench_train.py --compile (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.export import read_export
from trainer.train import train

MODERN = {"mlp": "swiglu", "norm": "rmsnorm", "rope": True, "qk_norm": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "ds"), n=32)


def run(data: str, run_dir, compile: bool, model: dict) -> tuple[list[float], dict]:
    config = tiny_config(
        data,
        str(run_dir),
        total_steps=3,
        data={"global_batch_size": 8},
        parallel={"compile": compile},
        log={"every": 1},
        optim={"ema_decay": 0.5},  # the EMA moves visibly in 3 steps
        model=model,
    )
    result = train(config)
    assert result.step == 3
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    _, state, _ = read_export(str(run_dir / "ema.safetensors"))
    return [r["loss"] for r in records if "loss" in r], state


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor compiles on CPU: minutes on a busy 2-core machine
@pytest.mark.parametrize("model", [{}, MODERN], ids=["released", "modern"])
def test_compiled_steps_equal_eager_steps(tmp_path, data, model):
    eager_losses, eager = run(data, tmp_path / "eager", False, model)
    compiled_losses, compiled = run(data, tmp_path / "compiled", True, model)
    assert len(eager_losses) == 3
    # fp32 everywhere; inductor may fuse and reorder reductions: agree to float rounding, not bits
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    # the comparison can fail: the steps moved the weights well beyond the tolerance
    moved = max((eager[k] - v).abs().max().item() for k, v in read_initial(model).items() if k in eager)
    assert moved > 1e-3


def read_initial(model: dict) -> dict:
    from trainer.config import preset
    from trainer.model import SiT

    config = preset("tiny-cpu")
    for key, value in model.items():
        setattr(config.model, key, value)
    torch.manual_seed(0)  # the trainer's seed
    return SiT(config.model.sit_config()).state_dict()
