"""CUDA only (marked ``gpu``, skipped without it): bf16 tower parity with transformers on the GPU, the
compiled tower there, and a 1-GPU ZeRO-2 pretraining run of a few steps on nccl in auto precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vision_tower import VisionTower
from vision_tower.hardware import choose_precision

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pair(seed: int):
    from tests.helpers.hf_reference import hf_vision

    ref = hf_vision(seed=seed, num_hidden_layers=3, hidden_size=96, intermediate_size=192, image_size=64)
    ours = VisionTower.from_state_dict(ref.state_dict(), ref.config.to_dict())
    return ref.eval(), ours.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)


def test_bf16_tower_matches_transformers_on_cuda():
    ref, ours = _pair(61)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = ref(x).last_hidden_state  # (4, 64, 96), on CPU in fp32
        ref.to("cuda", torch.bfloat16)
        ours.to("cuda", torch.bfloat16)
        xb = x.to("cuda", torch.bfloat16)
        r, o = ref(xb), ours(xb)
        compiled = torch.compile(ours, fullgraph=True)(xb)
    assert o.patch_features.dtype == torch.bfloat16
    assert_close(o.patch_features.float(), r.last_hidden_state.float(), atol=3e-2, rtol=3e-2)
    assert_close(o.pooled.float(), r.pooler_output.float(), atol=3e-2, rtol=3e-2)
    for feats in (o.patch_features, r.last_hidden_state, compiled.patch_features):
        assert _cos(feats.cpu(), fp32).min() >= 0.999


def test_auto_picks_bf16_on_ampere_and_newer():
    choice = choose_precision("auto", "cuda")
    major, _ = torch.cuda.get_device_capability()
    assert choice.is_bf16 == (major >= 8) and "CUDA device" in choice.reason


@pytest.mark.distributed
def test_one_gpu_zero2_pretrain_steps_on_nccl():
    from tests.helpers.distributed import run_ranks
    from tests.helpers.precision_workers import precision_steps_worker

    (run,) = run_ranks(precision_steps_worker, 1, [["run.precision=auto"]], 4, backend=None, timeout=300)[0]
    assert run["device"].startswith("cuda")
    major, _ = torch.cuda.get_device_capability()
    assert (
        run["precision"] == ("bf16-autocast" if major >= 8 else "fp32")
        and "CUDA device" in run["precision_reason"]
    )
    assert run["params"] == ["torch.float32"] and run["seen"]["loss"] == "torch.float32"
    assert all(torch.isfinite(torch.tensor(run["losses"]))) and run["losses"][-1] < run["losses"][0]
