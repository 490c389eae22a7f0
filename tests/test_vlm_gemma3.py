"""Gemma 3's text decoder (``gemma3_text``: sliding-window and global layers): its decoder preset and the
checks of a decoder folder (the parametrized tests of test_vlm_forward.py run the family under prefix and
causal attention); Gemma 3's image attention (``attention="image_bidirectional"``) against transformers'
Gemma3ForConditionalGeneration driven by token_type_ids: masks, logits, a training batch's loss and
gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from connectors import FormatError, VisionLanguageModel, inputs
from connectors.decoder import load_decoder
from connectors.decoder_presets import decoder_config
from connectors.inputs import decoder_masks, ignored_labels, image_block_ids, positions
from tests.helpers import vlm_reference as R
from vision_tower import CheckpointError


def test_tiny_gemma3_preset_has_sliding_and_global_layers():
    config = decoder_config("tiny_gemma3", R.tokenizer())
    assert config.model_type == "gemma3_text" and config.layer_types == [
        "sliding_attention",
        "full_attention",
    ]
    deeper = decoder_config("tiny_gemma3", R.tokenizer(), num_hidden_layers=4)
    assert deeper.layer_types == ["sliding_attention", "full_attention"] * 2


def test_a_gemma3_decoder_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path):
    folder = R.decoder_folder("gemma3_text", tmp_path / "dec")
    file = folder / "model.safetensors"
    name = "model.layers.1.self_attn.q_norm.weight"  # Gemma 3's query norm, (head_dim,)
    sd = load_file(file)
    sd[name] = sd[name][:8].contiguous()
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name}: the decoder \(Gemma3ForCausalLM\) expects \(16,\)"):
        load_decoder(folder)


# ---------------------------------------------------------------- Gemma 3's image attention


def _hf_gemma3(vlm):
    """transformers' ``Gemma3ForConditionalGeneration`` whose language model and head are ``vlm``'s decoder
    (copied weights); its vision tower is never run: both models are fed the same merged embeddings."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    decoder = vlm.decoder
    cfg = Gemma3Config(
        text_config=decoder.config.to_dict(),
        vision_config=R.hf_tower_config(),
        mm_tokens_per_image=vlm.num_image_tokens,
        image_token_index=vlm.image_token_id,
    )
    cfg.text_config._attn_implementation = decoder.config._attn_implementation
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    hf.model.language_model.load_state_dict(decoder.model.state_dict())
    hf.lm_head.weight = decoder.lm_head.weight
    return hf


def _two_images_apart(vlm):
    """Row 0: bos, text, image, text, image, text; row 1 (left-padded): bos, text, image, text. Images are
    separated by text, as Gemma 3's processor writes <start_of_image> / <end_of_image> around each, so
    transformers' token_type_ids give one block per image too."""
    img, n = [vlm.image_token_id], vlm.num_image_tokens
    rows = [[1, 5] + img * n + [6] + img * n + [7, 8, 9], [1, 5, 6] + img * n + [10, 11, 12, 13]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _vlm(decoders, attention="image_bidirectional"):
    vlm = VisionLanguageModel(R.tower(), "mlp2x_gelu", decoders["gemma3_text"], attention=attention)
    R.randomize_(vlm.connector, seed=3, scale=0.3)
    return vlm.eval()


def test_image_attention_gives_transformers_gemma3_masks_and_logits(decoders, monkeypatch):
    """Masks (global and sliding-window layers) and logits equal Gemma3ForConditionalGeneration's with
    token_type_ids 1 on the image tokens; image blocks of 16 tokens are longer than the 8-token window."""
    vlm = _vlm(decoders)
    assert vlm.decoder.config.sliding_window < vlm.num_image_tokens
    hf = _hf_gemma3(vlm)
    ids, mask = _two_images_apart(vlm)
    px = R.pixels(3)
    types = (ids == vlm.image_token_id).long()  # transformers' token type 1: image
    pos = positions(mask, ids.shape[1])
    with torch.no_grad():
        image_tokens, sizes = vlm.image_tokens(vlm.image_embeddings(px))
        embeds = vlm.embed(ids, image_tokens, sizes)
        theirs = hf.create_masks_for_generate(hf.config, embeds, mask, None, pos, token_type_ids=types)
        blocks = image_block_ids(ids, vlm.image_token_id, [vlm.num_image_tokens] * 3)
        for block_ids in (True, False):  # transformers' block_sequence_ids, or the older or_mask_function
            monkeypatch.setattr(inputs, "BLOCK_IDS", block_ids)
            ours = decoder_masks(vlm.decoder, embeds, mask, None, pos, None, blocks)
            assert ours.keys() == theirs.keys() == {"full_attention", "sliding_attention"}
            for kind in ours:
                assert torch.equal(ours[kind], theirs[kind]), (kind, block_ids)
        logits = vlm(ids, px, mask).logits
        ref = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, token_type_ids=types).logits
        causal = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    real = mask.bool()
    assert (logits - causal)[real].abs().max() > 1e-2  # the bidirectional blocks change the logits


def test_two_adjacent_images_are_two_blocks_and_cached_generation_equals_full_forwards(decoders):
    vlm = _vlm(decoders)
    n, img = vlm.num_image_tokens, vlm.image_token_id
    ids = torch.tensor([[1, 5] + [img] * 2 * n + [6, 7]])
    px = R.pixels(2)
    other = px.clone()
    other[1] = R.pixels(1, seed=9)[0]
    with torch.no_grad():
        base, changed = vlm(ids, px).logits, vlm(ids, other).logits
        vlm.attention = "causal"
        causal = vlm(ids, px).logits
        vlm.attention = "image_bidirectional"
    first, second = slice(2, 2 + n), slice(2 + n, 2 + 2 * n)
    assert_close(changed[:, : second.start], base[:, : second.start], atol=0, rtol=0)  # 1st never sees 2nd
    assert (base[:, first] - causal[:, first]).abs().max() > 1e-2  # ... but its own later tokens

    steps, seq, out = 5, ids, []
    for _ in range(steps):  # greedy by full forwards, no cache
        with torch.no_grad():
            token = vlm(seq, px).logits[:, -1].argmax(-1)
        out.append(token)
        seq = torch.cat([seq, token[:, None]], dim=1)
    cached = vlm.generate(px, input_ids=ids, max_new_tokens=steps, eos_token_id=[])
    assert torch.equal(cached, torch.stack(out, dim=1))


def test_a_training_batch_gives_transformers_gemma3_loss_and_gradients(decoders):
    """A batch of the training data builder (LLaVA's layout: bos, image, prompt) through training's loss
    (targets_only): loss and connector gradients equal transformers' Gemma 3 with token_type_ids."""
    from tests.helpers.vlm_data import png
    from training.data.vlm import builder_for
    from training.demo.shapes import make_sample
    from training.tasks.vlm import model_inputs

    vlm = _vlm(decoders)
    hf = _hf_gemma3(vlm)
    b = builder_for(vlm, max_length=64, caption_prompt="caption en")

    def raw(key, i, **members):
        sample = {
            "__key__": key,
            "__url__": "mem.tar",
            "png": png(make_sample("train", i, image_size=32).image),
        }
        return {**sample, **{k: v.encode() for k, v in members.items()}}

    batch = b.collate(
        [
            b.build(raw("a", 0, txt="a photo of the cat")),
            b.build(raw("b", 1, json='{"prompt": "what", "answer": "dog"}')),
        ]
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == vlm.tokenizer.bos_token_id and ids[0, 1] == vlm.image_token_id  # causal layout
    loss = vlm(**model_inputs(batch), targets_only=True).loss
    loss.backward()
    ours = {k: p.grad.clone() for k, p in vlm.connector.named_parameters()}
    vlm.zero_grad(set_to_none=True)

    image_tokens, sizes = vlm.image_tokens(vlm.image_embeddings(batch["pixel_values"]))
    embeds = vlm.embed(ids, image_tokens, sizes)
    kept = ignored_labels(batch["labels"], ids, vlm.image_token_id, batch["token_type_ids"], mask)
    types = (ids == vlm.image_token_id).long()
    ref = hf(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions(mask, ids.shape[1]),
        token_type_ids=types,
        labels=kept,
    ).loss
    ref.backward()
    assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, p in vlm.connector.named_parameters():
        assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_image_attention_is_saved_natively_and_llava_and_flash_attention_refuse_it(decoders, tmp_path):
    vlm = _vlm(decoders)
    ids = torch.tensor([[1, 5] + [vlm.image_token_id] * vlm.num_image_tokens + [6]])
    vlm.save_pretrained(tmp_path / "native")
    assert VisionLanguageModel.from_pretrained(tmp_path / "native").attention == "image_bidirectional"
    vlm.decoder.config._attn_implementation = "flash_attention_2"  # this model only: its own decoder
    with pytest.raises(ValueError, match="image_bidirectional attention needs an explicit mask"):
        vlm(ids, R.pixels(1))
    with pytest.raises(FormatError, match="this VLM uses image_bidirectional attention"):
        vlm.save_pretrained(tmp_path / "x", format="llava")


def test_image_blocks_are_runs_of_one_images_placeholders():
    """Pan and scan's crops of one image sit in their own <start_of_image> blocks, separated by text: each run
    is a block (transformers' Gemma 3 groups runs of image tokens), and adjacent images stay apart."""
    from connectors.inputs import image_block_ids

    I = 9  # noqa: E741  (the placeholder id)
    ids = torch.tensor([[1, I, I, 2, I, I, 3, I], [I, I, I, 4, 5, 6, 7, 8]])
    blocks = image_block_ids(ids, I, [4, 1, 2, 1])  # row 0: an image of two crops, then one; row 1: 2 + 1
    assert blocks[0].tolist() == [-1, 0, 0, -1, 1, 1, -1, 2]
    assert blocks[1].tolist() == [3, 3, 4, -1, -1, -1, -1, -1]
