"""The VLM training loss is the mean over every answer token of the global batch: a step on 2 gloo ranks,
or with gradient accumulation, whose micro-batches hold different numbers of answer tokens, gives the
loss and gradients of one process on the whole batch (runner's ``train_step``, ZeRO stage 0, fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.vlm_data import texts
from tests.helpers.vlm_workers import one_step_grads_worker
from training.demo.decoders import word_tokenizer

pytestmark = pytest.mark.distributed


def test_two_ranks_and_accumulation_give_the_whole_batch_step(tmp_path):
    word_tokenizer(texts()).save_pretrained(tmp_path / "tokenizer")
    base = [
        "model.tower=preset:tiny",
        "model.decoder=preset:tiny_gemma",
        f"model.tokenizer={tmp_path / 'tokenizer'}",
        "run.deepspeed=configs/deepspeed/zero0.json",
        "run.precision=fp32",
        f"run.out_dir={tmp_path / 'run'}",
        "data.batch_size=2",
        "model.gradient_checkpointing=false",
    ]
    # answers of 9, 1, 2 and 0 words: 10 + 2 loss tokens in the first half, 3 + 1 in the second
    first, second = [(1, 9), (2, 1)], [(3, 2), (4, 0)]
    whole, accumulated = run_ranks(
        one_step_grads_worker,
        1,
        [
            ([*base, "data.batch_size=4"], [[first + second]]),
            ([*base, "optim.grad_accum=2"], [[first, second]]),
        ],
        timeout=240,
        backend=None,
    )[0]
    two_ranks = run_ranks(one_step_grads_worker, 2, [(base, [[first], [second]])], timeout=240, backend=None)
    assert whole["grads"] and all(g.abs().sum() > 0 for g in whole["grads"].values())
    for name, got in (("2 ranks", two_ranks[0][0]), ("accumulation", accumulated)):
        assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5), name
        assert got["grads"].keys() == whole["grads"].keys()
        for key, grad in whole["grads"].items():
            torch.testing.assert_close(got["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
