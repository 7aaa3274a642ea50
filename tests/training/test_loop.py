"""The loop pieces every recipe shares: checkpoints, precision, batches prepared ahead."""

import time
from dataclasses import dataclass

import pytest
import torch

from easel.domain import InvalidParams
from easel.training.loop import Checkpoints, StageLog, prefetched, with_native_precision


@dataclass
class _Precision:
    bf16: bool = True


def test_a_checkpoint_from_an_older_recipe_is_refused_by_name(tmp_path):
    # Run folders started before the attribute probe have no "probe" in their UNet checkpoints.
    checkpoints = Checkpoints(tmp_path, keep=2)
    unet = torch.nn.Linear(2, 2)
    checkpoints.save_stage("unet", 5, {"unet": unet}, 1.0, StageLog())
    with pytest.raises(InvalidParams, match="has no probe: it was written by an older recipe"):
        checkpoints.resume("unet", {"unet": unet, "probe": torch.nn.Linear(2, 2)}, StageLog())
    assert checkpoints.resume("unet", {"unet": unet}, StageLog()) == (5, 1.0)


class _Trap:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_resumes_its_optimizer_and_a_planted_pickle_is_never_run(tmp_path):
    # resume reads with torch.load(weights_only=True): tensors and plain containers only
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    log = StageLog(steps=[1], losses=[0.5])
    checkpoints.save_stage("lora", 1, {"model": model, "optimizer": optimizer}, 2.0, log)
    again = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    assert checkpoints.resume("lora", {"model": model, "optimizer": again}, StageLog()) == (1, 2.0)
    assert again.state_dict()["state"][0]["step"] == 1
    marker = tmp_path / "pickle-ran"
    torch.save(_Trap(marker), tmp_path / "ckpt" / "lora-step9999999.pt")
    with pytest.raises(InvalidParams, match="is not a checkpoint Easel wrote"):
        checkpoints.resume("lora", {"model": model}, StageLog())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("device", "native", "bf16"),
    [("cpu", True, True), ("cpu", False, False), ("cuda", False, True)],
)
def test_bf16_only_where_the_device_computes_it_natively(device, native, bf16, monkeypatch):
    monkeypatch.setattr("easel.training.loop.cpu_has_native_bf16", lambda: native)
    assert with_native_precision(_Precision(), torch.device(device)).bf16 is bf16
    assert not with_native_precision(_Precision(bf16=False), torch.device(device)).bf16


@pytest.mark.parametrize(("device", "made_after_two"), [("cpu", 2), ("cuda", 3)])
def test_batches_are_prepared_ahead_only_on_cuda(device, made_after_two):
    # On the CPU a preparing thread competes with the training step for the cores.
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return made[-1]

    batches = prefetched(make, torch.device(device))
    assert [next(batches), next(batches)] == [0, 1]
    deadline = time.monotonic() + 5
    while len(made) < made_after_two and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread's next batch (cuda) is on its way
    time.sleep(0.05)
    assert len(made) == made_after_two
