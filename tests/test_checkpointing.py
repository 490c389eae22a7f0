"""Activation checkpointing gives the same gradients as the plain forward."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from vision_tower import SiglipModel


def _grads(model: SiglipModel, pixels, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixels, ids).logits_per_image.sigmoid().sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_checkpointing_matches_plain_backward(monkeypatch):
    import vision_tower.layers as layers

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = SiglipModel.from_preset("tiny").train()
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(0, 1024, (3, 16))
    plain = _grads(model, pixels, ids)
    assert not calls
    model.vision.set_gradient_checkpointing(True)
    model.text.set_gradient_checkpointing(True)
    ckpt = _grads(model, pixels, ids)
    assert len(calls) == 4  # two blocks in each tower went through the checkpointed path
    for name, g in plain.items():
        assert_close(ckpt[name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
