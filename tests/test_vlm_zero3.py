"""The VLM under DeepSpeed ZeRO-3 on 2 gloo ranks: built while an HfDeepSpeedConfig is alive (the decoder's
weights partitioned as they load), each rank's loss equal to the single-process one, and a training step
whose loss is taken at the answer tokens only, in chunks recomputed in the backward pass (the tied,
partitioned ``lm_head`` gathered each time), moves the weights as the full-logits step does."""

from __future__ import annotations

import pytest
import torch

from connectors import VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.distributed import run_ranks

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}


def _batch():
    ids, mask, types, labels = R.prompt_batch(R.VOCAB, 4)  # pixel_shuffle: the 4x4 grid becomes 4 tokens
    return ids, mask, types, labels, R.pixels()


def zero3_worker(
    rank: int, world: int, decoder_dir: str, tower_sd: dict, connector_sd: dict, targets_only: bool
) -> list[float]:
    from connectors import target_loss
    from training.runner.engine import init_distributed

    init_distributed()  # gloo, without the shared-memory op build
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841  (transformers reads it while it is alive)
    tower = R.tower()
    tower.load_state_dict(tower_sd)
    vlm = VisionLanguageModel(tower, "pixel_shuffle", decoder_dir, attention="prefix")
    vlm.connector.load_state_dict(connector_sd)  # not partitioned before deepspeed.initialize
    partitioned = all(hasattr(p, "ds_id") for p in vlm.decoder.parameters())
    nd = vlm.no_weight_decay()
    opt = torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=vlm, optimizer=opt, config=DS_CONFIG)
    ids, mask, types, labels, px = _batch()
    rows = slice(rank, rank + 1)
    losses = []
    target_loss.CHUNK_VALUES = R.VOCAB  # one target position per chunk
    for _ in range(2):
        loss = engine(
            ids[rows], px[rows], mask[rows], types[rows], labels[rows], targets_only=targets_only
        ).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    # ZeRO-3 empties the parameters: no_weight_decay must read their real shapes
    names_ok = (
        "tower.pos_embed" in nd
        and "decoder.model.norm.weight" in nd
        and "decoder.model.layers.0.self_attn.q_proj.weight" not in nd
    )
    return [*losses, float(partitioned), float(names_ok)]


@pytest.mark.distributed
def test_zero3_forward_equals_single_process_and_steps(tmp_path):
    folder = R.decoder_folder("gemma", tmp_path / "dec", seed=5)
    tower = R.tower()
    vlm = VisionLanguageModel(tower, "pixel_shuffle", folder, attention="prefix")
    ids, mask, types, labels, px = _batch()
    tower_sd = tower.state_dict()
    connector_sd = {k: v.clone() for k, v in vlm.connector.state_dict().items()}
    with torch.no_grad():
        expected = [vlm(*(t[r : r + 1] for t in (ids, px, mask, types, labels))).loss for r in (0, 1)]
    runs = {}
    for targets_only in (False, True):
        runs[targets_only] = run_ranks(
            zero3_worker,
            2,
            str(folder),
            tower_sd,
            connector_sd,
            targets_only,
            timeout=240,
            backend=None,
        )
    for rank, (first, second, partitioned, names) in enumerate(runs[True]):
        assert partitioned == 1.0 and names == 1.0
        assert abs(first - expected[rank].item()) < 1e-5, (rank, first, expected[rank])
        full_second = runs[False][rank][1]  # after a step on the gradients of the full-logits loss
        assert abs(second - full_second) < 1e-5, (rank, second, full_second)
        assert abs(second - first) > 1e-3  # the step moved the weights
