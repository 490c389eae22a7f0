"""VisionLanguageModel: forward (placeholders, prefix/causal masks, labels), KV-cache generation, training
hooks, on tiny random gemma, gemma2, qwen2, qwen3 and llama decoders saved to disk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from connectors import FormatError, VisionLanguageModel, build_connector, target_loss
from tests.helpers import vlm_reference as R


def _greedy_without_cache(vlm, ids, pixels, token_type_ids, steps):
    """Reference: a full forward over the growing sequence for every new token, no cache."""
    ids, types, out = ids.clone(), token_type_ids.clone(), []
    for _ in range(steps):
        with torch.no_grad():
            logits = vlm(ids, pixels, token_type_ids=types).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        types = torch.cat([types, torch.ones_like(token)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def _suffix_loss(logits, ids, types):
    """Mean cross-entropy of predicting every suffix token from the position before it."""
    terms = [
        F.cross_entropy(logits[b, t - 1], ids[b, t], reduction="sum")
        for b in range(ids.shape[0])
        for t in range(1, ids.shape[1])
        if types[b, t] == 1
    ]
    return torch.stack(terms).sum() / len(terms)


@pytest.mark.parametrize("family", R.FAMILIES)
def test_forward_masks_loss_and_cached_generation(family, decoders):
    vlm = VisionLanguageModel(R.tower(), "mlp2x_gelu", decoders[family])
    assert vlm.tokenizer is not None and vlm.image_token_id == vlm.tokenizer.convert_tokens_to_ids("<image>")
    n = vlm.num_image_tokens
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, n)
    px = R.pixels()
    out = vlm(ids, px, mask, types, labels)
    assert out.logits.shape == (2, ids.shape[1], R.VOCAB + 4)
    assert_close(out.loss, _suffix_loss(out.logits.float(), ids, types), atol=1e-5, rtol=1e-5)

    last_prefix, first_text = n + 3, n + 1  # positions: n image tokens, bos, 3 prompt tokens, suffix
    changed_prefix, changed_suffix = ids.clone(), ids.clone()
    changed_prefix[:, last_prefix] += 20
    changed_suffix[:, -1] += 20
    with torch.no_grad():
        base = vlm(ids, px, mask, types).logits
        after_prefix = vlm(changed_prefix, px, mask, types).logits
        after_suffix = vlm(changed_suffix, px, mask, types).logits
    # prefix attention: a later prompt token reaches earlier prefix positions, a suffix token does not
    assert (after_prefix[:, : first_text + 1] - base[:, : first_text + 1]).abs().max() > 1e-3
    assert_close(after_suffix[:, :-1], base[:, :-1], atol=1e-6, rtol=1e-6)

    vlm.attention = "causal"
    with torch.no_grad():
        causal = vlm(ids, px, mask, types).logits
        causal_changed = vlm(changed_prefix, px, mask, types).logits
    assert_close(causal_changed[:, :last_prefix], causal[:, :last_prefix], atol=1e-6, rtol=1e-6)
    vlm.attention = "prefix"

    prompt, prompt_types = ids[:, : last_prefix + 1], types[:, : last_prefix + 1]
    cached = vlm.generate(px, input_ids=prompt, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(cached, _greedy_without_cache(vlm, prompt, px, prompt_types, 5))


def test_left_padded_prompts_generate_as_they_do_alone(decoders):
    vlm = VisionLanguageModel(R.tower(), "linear", decoders["llama"], attention="causal")
    px = R.pixels()
    prompts = ["caption en", "USER: <image> what is this photo of the cat ASSISTANT:"]
    together = vlm.generate(px, prompts, max_new_tokens=4, eos_token_id=[])
    for i, p in enumerate(prompts):
        assert torch.equal(
            together[i], vlm.generate(px[i : i + 1], [p], max_new_tokens=4, eos_token_id=[])[0]
        )


def test_image_token_count_mismatch_names_both_counts(decoders):
    vlm = VisionLanguageModel(R.tower(), "pixel_shuffle", decoders["qwen2"])
    n = vlm.num_image_tokens
    assert n == 4  # 4x4 grid shuffled by 2
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, n - 1)
    with pytest.raises(
        ValueError,
        match=r"6 image tokens .*per row \[3, 3\].* images give 8: image 0 \(32x32, layout 'fixed'\) gives 4 "
        r"image tokens, its prompt holds 3",
    ):
        vlm(ids, R.pixels(), mask, types)
    with pytest.raises(ValueError, match="hold 0 image tokens .* gives 4 image tokens, its prompt holds 0"):
        vlm(torch.tensor([[1, 5, 6]]), R.pixels(1))


def test_prefix_attention_with_labels_needs_token_type_ids(decoders):
    vlm = VisionLanguageModel(R.tower(), "linear", decoders["gemma"])
    ids, mask, _, labels = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    with pytest.raises(ValueError, match="token_type_ids"):
        vlm(ids, R.pixels(), mask, labels=labels)


def test_without_image_token_id_one_is_added_and_the_table_grows():
    dec = R.decoder("qwen2")  # untied: input and output tables both grow
    rows = dec.get_input_embeddings().num_embeddings
    vlm = VisionLanguageModel(R.tower(), "linear", dec)
    assert vlm.image_token_id == rows
    assert (
        dec.get_input_embeddings().num_embeddings == rows + 1 == dec.get_output_embeddings().weight.shape[0]
    )
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    assert vlm(ids, R.pixels(), mask, types).logits.shape[-1] == rows + 1

    tok = R.tokenizer()
    vlm = VisionLanguageModel(R.tower(), "linear", R.decoder("qwen2"), tokenizer=tok)
    assert vlm.image_token_id == R.VOCAB == tok.convert_tokens_to_ids("<image>")  # a spare row: no growth
    assert vlm.decoder.get_input_embeddings().num_embeddings == rows


def test_image_token_id_past_the_embedding_table_is_refused():
    dec = R.decoder("qwen2")
    rows = dec.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"image_token_id {rows + 5}.*{rows} rows"):
        VisionLanguageModel(R.tower(), "linear", dec, image_token_id=rows + 5)
    assert VisionLanguageModel(R.tower(), "linear", dec, image_token_id=rows - 1).image_token_id == rows - 1
    assert dec.get_input_embeddings().num_embeddings == rows  # nothing grown


def test_naflex_tower_is_refused_at_construction(decoders):
    from vision_tower import NaFlexVisionConfig, NaFlexVisionTower

    fixed = {k: v for k, v in R.TOWER.items() if k != "image_size"}  # the VLM tests' tower, NaFlex
    cfg = NaFlexVisionConfig(**fixed, num_patches=16)
    with pytest.raises(ValueError, match="NaFlex.*fixed"):
        VisionLanguageModel(NaFlexVisionTower(cfg), "linear", decoders["gemma"])
    vlm = VisionLanguageModel(R.tower(), "linear", decoders["gemma"])
    with pytest.raises(ValueError, match="NaFlex.*fixed"):
        vlm.replace_tower(NaFlexVisionTower(cfg))


def test_precomputed_tower_features_give_the_same_logits(decoders):
    tower = R.tower(image_size=48)
    tower.feature_layer = -2
    vlm = VisionLanguageModel(tower, "patch_merger", decoders["qwen3"])
    px = R.pixels(size=48)
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    feats = vlm.tower(px)  # what a feature cache stores
    with torch.no_grad():
        from_pixels = vlm(ids, px, mask, types).logits
        from_cache = vlm(ids, None, mask, types, patch_features=feats.patch_features, grid=feats.grid).logits
    assert_close(from_cache, from_pixels, atol=0, rtol=0)


def test_align_stage_trains_the_connector_alone_and_no_decay_names(decoders):
    vlm = VisionLanguageModel(
        R.tower(), "resampler", decoders["gemma"], connector_options={"num_queries": 3, "num_heads": 4}
    )
    vlm.set_trainable(tower=False, connector=True, decoder=False)
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    vlm(ids, R.pixels(), mask, types, labels).loss.backward()
    grads = {n: p.grad for n, p in vlm.named_parameters()}
    assert all(g is not None for n, g in grads.items() if n.startswith("connector."))
    assert all(g is None for n, g in grads.items() if not n.startswith("connector."))
    nd = vlm.no_weight_decay()
    assert {"tower.pos_embed", "connector.queries", "connector.kv_proj.weight"} & nd == {
        "tower.pos_embed",
        "connector.queries",
    }
    assert "decoder.model.norm.weight" in nd and "decoder.model.layers.0.self_attn.q_proj.weight" not in nd


def test_gradient_checkpointing_gives_the_same_gradients(decoders):
    vlm = VisionLanguageModel(R.tower(), "mlp2x_gelu", decoders["llama"], attention="causal").train()
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)

    def grads():
        vlm.zero_grad()
        vlm(ids, R.pixels(), mask, types, labels).loss.backward()
        return {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}

    plain = grads()
    vlm.gradient_checkpointing_enable()
    assert vlm.tower.encoder.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in vlm.decoder.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("tower.") for k in plain)
    for k in plain:
        assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5)


def test_lora_on_the_decoder_trains_adapters_only(decoders, tmp_path):
    from peft import LoraConfig, get_peft_model

    vlm = VisionLanguageModel(R.tower(), "linear", decoders["qwen2"])
    vlm.tower.requires_grad_(False)
    vlm.decoder = get_peft_model(vlm.decoder, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    vlm(ids, R.pixels(), mask, types, labels).loss.backward()
    with_grad = {n for n, p in vlm.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or n.startswith("connector.") for n in with_grad)
    assert any("lora_B" in n for n in with_grad)
    with pytest.raises(FormatError, match="merge_and_unload"):  # peft would save the adapters alone
        vlm.save_pretrained(tmp_path / "n")
    vlm.decoder = vlm.decoder.merge_and_unload()
    vlm.save_pretrained(tmp_path / "n")
    assert VisionLanguageModel.from_pretrained(tmp_path / "n").decoder.config.model_type == "qwen2"


def test_connector_widths_must_fit_tower_and_decoder(decoders):
    with pytest.raises(ValueError, match=r"maps 32 -> 48 .* decoder embeds in 64"):
        VisionLanguageModel(R.tower(), build_connector("linear", 32, 48), decoders["gemma"])


def test_both_ways_of_building_the_prefix_mask_agree(decoders, monkeypatch):
    """transformers' block ids (fast) and the mask-function overlay (older transformers) give the same
    logits."""
    from connectors import inputs

    vlm = VisionLanguageModel(R.tower(), "linear", decoders["gemma2"])  # sliding-window layers too
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    mask[1, :2] = 0  # some padding
    logits = {}
    for block_ids in (True, False):
        monkeypatch.setattr(inputs, "BLOCK_IDS", block_ids)
        with torch.no_grad():
            logits[block_ids] = vlm(ids, R.pixels(), mask, types).logits
    assert_close(logits[True], logits[False], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention", ["prefix", "causal"])
@pytest.mark.parametrize("family", R.FAMILIES)
def test_logits_only_at_targets_give_the_same_loss_and_gradients(family, attention, decoders, monkeypatch):
    """Training's targets_only: lm_head (and Gemma 2's soft-capping) on the positions whose next token is
    a target only; loss and every gradient equal the full-logits path, the sum reduction too."""
    vlm = VisionLanguageModel(R.tower(), "mlp2x_gelu", decoders[family], attention=attention)
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    mask[1, -2:] = 0  # the second row ends in padding: its targets differ from the first row's
    px = R.pixels()

    def run(**kw):
        vlm.zero_grad(set_to_none=True)
        out = vlm(ids, px, mask, types, labels, **kw)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        return out, grads

    full, full_grads = run()
    if attention == "prefix":  # the suffix tokens are the targets: 4 in the first row, 2 in the padded one
        assert ((types == 1) & (mask == 1)).sum() == 4 + 2
    vocab = full.logits.shape[-1]
    # one chunk; a chunk per target position, each recomputed in the backward pass; 2 positions a chunk
    for chunk in (1 << 26, vocab, 2 * vocab):
        monkeypatch.setattr(target_loss, "CHUNK_VALUES", chunk)
        mine, grads = run(targets_only=True)
        assert mine.logits is None
        assert_close(mine.loss, full.loss, atol=1e-5, rtol=1e-5)
        assert grads.keys() == full_grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=f"{name} (chunk {chunk})")
    summed = vlm(ids, px, mask, types, labels, num_items_in_batch=7, targets_only=True).loss
    assert_close(summed, vlm(ids, px, mask, types, labels, num_items_in_batch=7).loss, atol=1e-5, rtol=1e-5)
