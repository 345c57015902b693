"""Non-finite losses: the update is skipped and counted; K in a row stop training with a clear error."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.train import NonFiniteLossError, train


def test_diverging_run_stops_after_max_nonfinite_steps(tmp_path):
    data = write_toy_dataset(str(tmp_path / "ds"), n=16)
    # lr 1e30: Adam moves every weight by ~1e30 in the first step, so the next forwards overflow
    config = tiny_config(
        data, str(tmp_path / "run"), total_steps=50, max_nonfinite=3, optim={"lr": 1e30}, data={"global_batch_size": 8}
    )
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps with a non-finite loss") as err:
        train(config)
    assert "max_nonfinite=3" in str(err.value)
    assert int(str(err.value).split(":")[0].removeprefix("step ")) <= 5  # stopped at once, not after 50 steps
