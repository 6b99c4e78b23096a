"""The trainer on accelerate, in one process: accumulation, clipping, precision, shared state."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from harness.models import LoadedModel
from harness.train import train_lora
from harness.train.inputs import Shard
from tests.train.conftest import tiny_train_config


@pytest.fixture
def photos(tmp_path: Path) -> list[tuple[Path, str]]:
    """Three distinct 64 px instance images with captions."""
    out = []
    for i in range(3):
        arr = np.zeros((64, 64, 3), dtype=np.uint8)
        arr[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
        arr[16 + 4 * i : 48, 16:48] = (40 * i, 200, 90)
        path = tmp_path / f"inst-{i}.png"
        Image.fromarray(arr).save(path)
        out.append((path, "a photo of sks dog"))
    return out


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_accumulation_and_clipping_go_through_accelerate(
    sd15: LoadedModel,
    photos: list[tuple[Path, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step is one optimizer step after gradient_accumulation_steps micro-batches, each
    backpropagated by accelerate, clipped once by accelerate to max_grad_norm."""
    backward: list[tuple[float, bool]] = []  # (micro-batch loss, accelerate's sync flag)
    clipped: list[tuple[float, float, float, bool]] = []  # (max_norm, norm, norm after, sync)
    real_backward, real_clip = Accelerator.backward, Accelerator.clip_grad_norm_

    def spy_backward(self: Accelerator, loss: torch.Tensor, **kwargs: Any) -> Any:
        backward.append((loss.item(), self.sync_gradients))
        return real_backward(self, loss, **kwargs)

    def spy_clip(self: Accelerator, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        params = list(parameters)
        norm = real_clip(self, params, max_norm, norm_type)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        clipped.append((max_norm, float(norm), float(after), self.sync_gradients))
        return norm

    monkeypatch.setattr(Accelerator, "backward", spy_backward)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy_clip)
    cfg = tiny_train_config(
        max_steps=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler="linear",
        max_grad_norm=1e-3,
    )
    result = train_lora(cfg, sd15, photos, tmp_path / "run", progress=False)
    assert result.status == "completed" and result.steps_done == 4
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # two micro-batches per step; accelerate closes the accumulation on the second
    assert [sync for _, sync in backward] == [False, True] * 4
    for record, k in zip(log, range(0, 8, 2), strict=True):
        assert record["loss"] == pytest.approx(statistics.mean(x for x, _ in backward[k : k + 2]))
    # clipped once per step, at the sync point, to max_grad_norm (the log has the raw norm)
    assert len(clipped) == 4
    for (max_norm, norm, after, sync), record in zip(clipped, log, strict=True):
        assert max_norm == 1e-3 and sync and norm == pytest.approx(record["grad_norm"])
        assert norm > 10 * max_norm and after <= max_norm * (1 + 1e-4)
    # one optimizer step and one LR-schedule step per step (linear decay over max_steps)
    assert [r["lr_unet"] for r in log] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    optimizer = load_file(str(result.checkpoints[-1].path / "state" / "optimizer.safetensors"))
    steps = {float(v) for k, v in optimizer.items() if k.endswith(".step")}
    assert steps == {4.0}
    assert result.info["num_processes"] == 1 and result.info["distributed_type"] == "NO"


def test_mixed_precision_is_still_fp32_on_cpu(
    sd15: LoadedModel,
    photos: list[tuple[Path, str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="harness.train"):
        result = train_lora(
            tiny_train_config(mixed_precision="bf16"),
            sd15,
            photos,
            tmp_path / "run",
            progress=False,
        )
    assert result.status == "completed"
    assert result.info["autocast"] == "fp32" and result.info["mixed_precision"] == "no"
    assert AcceleratorState().mixed_precision == "no"
    assert any("mixed_precision=bf16 ignored on cpu" in r.getMessage() for r in caplog.records)


def test_a_later_call_may_differ_from_the_accelerate_state_already_in_the_process(
    sd15: LoadedModel, photos: list[tuple[Path, str]], tmp_path: Path
) -> None:
    """A sweep worker trains many runs in one process; accelerate's process-wide state from
    an earlier one (here: bf16, which accelerate allows on CPU) must not refuse the next."""
    AcceleratorState._reset_state()  # as a fresh worker process would start
    Accelerator(cpu=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="no")  # what train_lora has to get around
    assert AcceleratorState().mixed_precision == "bf16"
    first = train_lora(tiny_train_config(), sd15, photos, tmp_path / "a", progress=False)
    second = train_lora(tiny_train_config(), sd15, photos, tmp_path / "b", progress=False)
    assert first.status == second.status == "completed"
    assert AcceleratorState().mixed_precision == "no"
    a = load_file(str(first.checkpoints[-1].path / "state" / "lora.safetensors"))
    b = load_file(str(second.checkpoints[-1].path / "state" / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the second call trains exactly the same


def test_processes_share_out_one_sample_stream() -> None:
    """Two processes with batch 2 read together what one process with batch 4 reads."""
    alone = [Shard(4).start(m) for m in range(3)]
    assert alone == [0, 4, 8]
    pairs = [(Shard(2, 2, 0).start(m), Shard(2, 2, 1).start(m)) for m in range(3)]
    assert pairs == [(0, 2), (4, 6), (8, 10)]
