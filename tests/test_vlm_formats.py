"""VLM checkpoints: native, PaliGemma and LLaVA layouts, out to transformers and back, and the refusals."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from connectors import FormatError, VisionLanguageModel
from connectors.inputs import build_prompts
from tests.helpers import vlm_reference as R
from tests.helpers.hub import hub_cache
from vision_tower import ImageProcessor, VisionTower

LOGITS = dict(atol=1e-4, rtol=1e-4)


def _our_prompt_ids(vlm, prompts: list[str], num_image_tokens: int, causal: bool = False) -> torch.Tensor:
    """The ids ``generate(prompts=...)`` lays out for ``prompts`` (pad 0), to compare a processor's with."""
    return build_prompts(
        vlm.tokenizer,
        prompts,
        image_token_id=vlm.image_token_id,
        num_image_tokens=num_image_tokens,
        pad_token_id=0,
        causal=causal,
    ).input_ids


def _vlm(decoders, family, connector, attention, feature_layer=-1, size=32, **kw):
    tower = R.tower(seed=7)
    tower.feature_layer = feature_layer
    if size != 32:
        tower.resize_pos_embed(size)  # the resized table must travel in the checkpoint
    vlm = VisionLanguageModel(tower, connector, decoders[family], attention=attention, **kw)
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    return vlm


def _logits(model, ids, px, mask, types, paligemma=True):
    with torch.no_grad():
        if isinstance(model, VisionLanguageModel):
            return model(ids, px, mask, types).logits
        extra = {"token_type_ids": types} if paligemma else {}
        return model(input_ids=ids, pixel_values=px, attention_mask=mask, **extra).logits


def _same_as_transformers(vlm, hf, size, paligemma):
    """Equal logits on prompts with a prefix and a suffix, and equal greedy generations."""
    px = R.pixels(size=size)
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    ours = _logits(vlm, ids, px, mask, types)
    assert_close(ours, _logits(hf, ids, px, mask, types, paligemma), **LOGITS)
    prompt = ids[:, :-4]
    hf.generation_config.eos_token_id = None
    extra = {"token_type_ids": torch.zeros_like(prompt)} if paligemma else {}
    # ours never generates the image placeholder (it needs an image): ask transformers for the same
    suppress = {"suppress_tokens": [vlm.image_token_id]}
    theirs = hf.generate(
        input_ids=prompt, pixel_values=px, max_new_tokens=6, do_sample=False, **suppress, **extra
    )
    assert torch.equal(
        vlm.generate(px, input_ids=prompt, max_new_tokens=6, eos_token_id=[]), theirs[:, prompt.shape[1] :]
    )
    return ours


def _reloaded_same(out, ours, size):
    back = VisionLanguageModel.from_pretrained(out)
    px = R.pixels(size=size)
    ids, mask, types, _ = R.prompt_batch(back.image_token_id, back.num_image_tokens)
    assert_close(_logits(back, ids, px, mask, types), ours, atol=1e-6, rtol=1e-6)
    return back


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_paligemma_export_loads_in_transformers_and_back(family, decoders, tmp_path):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    vlm = _vlm(decoders, family, "linear", "prefix", size=48, processor=ImageProcessor(image_size=32))
    out = tmp_path / "pg"
    vlm.save_pretrained(out, format="paligemma")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 48 and cfg["text_config"]["model_type"] == family
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 48, "width": 48} and pre["image_seq_length"] == 36
    assert (out / "tokenizer.json").exists()
    hf = PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    ours = _same_as_transformers(vlm, hf, 48, paligemma=True)
    back = _reloaded_same(out, ours, 48)
    assert back.attention == "prefix" and back.processor.size == (48, 48) and back.tokenizer is not None
    # transformers' PaliGemmaProcessor reads the files and lays a prompt out as generate(prompts=...) does
    processor = AutoProcessor.from_pretrained(out)
    batch = processor(images=[Image.new("RGB", (40, 30))], text=["<image>caption en"], return_tensors="pt")
    ours_ids = _our_prompt_ids(back, ["caption en"], 36)
    assert torch.equal(batch["input_ids"], ours_ids) and batch["pixel_values"].shape == (1, 3, 48, 48)


@pytest.mark.parametrize(
    "family, connector, layer",
    [
        ("gemma", "linear", -2),
        ("qwen2", "mlp2x_gelu", -2),
        ("qwen3", "mlp2x_gelu", 1),
        ("llama", "linear", 2),
        ("gemma3_text", "mlp2x_gelu", -2),
    ],
)
def test_llava_export_loads_in_transformers_and_back(family, connector, layer, decoders, tmp_path):
    from transformers import LlavaForConditionalGeneration

    vlm = _vlm(decoders, family, connector, "causal", feature_layer=layer, size=40)
    out = tmp_path / "llava"
    vlm.save_pretrained(out, format="llava")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_feature_layer"] == layer and cfg["vision_feature_select_strategy"] == "full"
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ours = _same_as_transformers(vlm, hf, 40, paligemma=False)
    back = _reloaded_same(out, ours, 40)
    assert back.connector.name == ("linear" if connector == "linear" else "mlp")
    assert back.attention == "causal" and back.tower.feature_layer == layer


def test_paligemma_checkpoint_made_by_transformers_loads_from_the_hub_cache(tmp_path, monkeypatch):
    text = R.decoder_config("gemma2").to_dict()
    hf = R.hf_paligemma(text, image_token_index=R.VOCAB + 1, projection_dim=64, seed=3)
    hf.save_pretrained(tmp_path / "src")
    hub_cache(tmp_path / "hub", "google/paligemma-tiny-test", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    vlm = VisionLanguageModel.from_pretrained("google/paligemma-tiny-test", cache_dir=tmp_path / "hub")
    assert vlm.image_token_id == R.VOCAB + 1 and vlm.connector.name == "linear" and vlm.attention == "prefix"
    px = R.pixels()
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    assert_close(_logits(vlm, ids, px, mask, types), _logits(hf, ids, px, mask, types), **LOGITS)


def test_llava_checkpoint_made_by_transformers_loads(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=R.hf_tower_config(model_type="siglip_vision_model", num_hidden_layers=3),
        text_config=R.decoder_config("llama").to_dict(),
        image_token_index=R.VOCAB,
        vision_feature_layer=-1,  # the last block's raw output (before the post-layernorm)
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    hf = R.randomize_(LlavaForConditionalGeneration(cfg).eval(), seed=4)
    hf.save_pretrained(tmp_path / "llava")
    vlm = VisionLanguageModel.from_pretrained(tmp_path / "llava")
    assert vlm.tower.feature_layer == 3 and vlm.connector.name == "mlp"
    px = R.pixels()
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    assert_close(_logits(vlm, ids, px, mask, types), _logits(hf, ids, px, mask, types, False), **LOGITS)


@pytest.mark.parametrize(
    "family, connector, options, attention",
    [
        ("gemma", "pixel_shuffle", {}, "causal"),
        ("gemma2", "resampler", {"num_queries": 3, "num_heads": 4}, "prefix"),
        ("qwen2", "patch_merger", {}, "prefix"),
        ("qwen3", "avg_pool", {"tokens_per_side": 2}, "prefix"),
        ("llama", "mlp", {"depth": 3, "act": "silu"}, "prefix"),
    ],
)
def test_native_holds_every_combination(family, connector, options, attention, decoders, tmp_path):
    from transformers import AutoModelForCausalLM

    vlm = _vlm(decoders, family, connector, attention, feature_layer=-2, size=48, connector_options=options)
    vlm.save_pretrained(tmp_path / "n")
    px = R.pixels(size=48)
    ids, mask, types, _ = R.prompt_batch(vlm.image_token_id, vlm.num_image_tokens)
    back = _reloaded_same(tmp_path / "n", _logits(vlm, ids, px, mask, types), 48)
    assert back.connector.config == vlm.connector.config and back.attention == attention
    prompt = ids[:, :-4]
    assert torch.equal(
        back.generate(px, input_ids=prompt, max_new_tokens=4),
        vlm.generate(px, input_ids=prompt, max_new_tokens=4),
    )
    # the parts load alone with the usual tools
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "n" / "decoder").config.model_type == family
    assert VisionTower.from_pretrained(tmp_path / "n" / "tower").config.image_size == 48


@pytest.mark.parametrize(
    "family, connector, attention, layer, fmt, words",
    [
        ("qwen2", "linear", "prefix", -1, "paligemma", ["Gemma-family", "'qwen2'", "llava", "native"]),
        ("gemma", "mlp2x_gelu", "prefix", -1, "paligemma", ["one linear layer", "'mlp'", "native"]),
        ("gemma", "linear", "causal", -1, "paligemma", ["bidirectionally", "llava"]),
        ("gemma", "linear", "prefix", -2, "paligemma", ["feature_layer=-2", "llava"]),
        ("llama", "linear", "prefix", -2, "llava", ["prefix attention", "native", "attention='causal'"]),
        ("llama", "pixel_shuffle", "causal", -2, "llava", ["'pixel_shuffle'", "native"]),
        ("llama", "linear", "causal", -1, "llava", ["post-layernorm", "feature_layer=-2"]),
        ("gemma2", "linear", "causal", -2, "llava", ["soft-capping", "paligemma", "native"]),
    ],
)
def test_formats_refuse_what_they_cannot_express(
    family, connector, attention, layer, fmt, words, decoders, tmp_path
):
    vlm = _vlm(decoders, family, connector, attention, feature_layer=layer)
    with pytest.raises(FormatError) as err:
        vlm.save_pretrained(tmp_path / "x", format=fmt)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "x").exists()


def test_unknown_format_and_non_vlm_checkpoints_are_named(decoders, tmp_path):
    vlm = _vlm(decoders, "gemma", "linear", "prefix")
    with pytest.raises(ValueError, match="unknown format 'gguf'; known formats: native, paligemma, llava"):
        vlm.save_pretrained(tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        VisionLanguageModel.from_pretrained(decoders["gemma"])


def test_state_dict_argument_replaces_the_live_weights(decoders, tmp_path):
    """A trainer saves weights consolidated from ZeRO-3 this way."""
    vlm = _vlm(decoders, "gemma", "linear", "prefix")
    sd = {k: v.clone() for k, v in vlm.state_dict().items()}
    sd["connector.proj.bias"] = torch.full_like(sd["connector.proj.bias"], 0.5)
    vlm.save_pretrained(tmp_path / "pg", format="paligemma", state_dict=sd)
    back = VisionLanguageModel.from_pretrained(tmp_path / "pg")
    assert torch.equal(back.connector.proj.bias, sd["connector.proj.bias"])
    assert torch.equal(back.connector.proj.weight, vlm.connector.proj.weight)


def test_replace_tower_keeps_the_decoder_and_builds_a_connector_of_the_new_width(decoders, tmp_path):
    vlm = _vlm(decoders, "gemma2", "linear", "prefix", processor=ImageProcessor(image_size=32))
    vlm.save_pretrained(tmp_path / "pg", format="paligemma")
    vlm = VisionLanguageModel.from_pretrained(tmp_path / "pg")
    before = {k: v.clone() for k, v in vlm.decoder.state_dict().items()}
    wide = R.tower(seed=9, hidden_size=48, image_size=64)
    wide.feature_layer = -2
    vlm.replace_tower(wide, "pixel_shuffle")
    assert (vlm.connector.in_dim, vlm.connector.out_dim, vlm.num_image_tokens) == (48, 64, 16)
    assert vlm.processor.size == (64, 64)
    assert all(torch.equal(before[k], v) for k, v in vlm.decoder.state_dict().items())
    ids, mask, types, labels = R.prompt_batch(vlm.image_token_id, 16)
    assert torch.isfinite(vlm(ids, R.pixels(size=64), mask, types, labels).loss)
    vlm.replace_tower(R.tower(seed=10, hidden_size=40), depth=1)  # same kind, new width and options
    assert (vlm.connector.name, vlm.connector.in_dim, vlm.connector.options["depth"]) == (
        "pixel_shuffle",
        40,
        1,
    )


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_llava_export_is_driven_by_its_own_processor(family, decoders, tmp_path):
    """transformers' AutoProcessor from the exported folder builds the ids our generate builds for the same
    prompt, and LlavaForConditionalGeneration continues it as we do."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    vlm = _vlm(decoders, family, "mlp2x_gelu", "causal", -2, processor=ImageProcessor(image_size=32))
    out = tmp_path / "llava"
    vlm.save_pretrained(out, format="llava")
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaProcessor"
    prompt = "USER: <image>\nwhat is it? ASSISTANT:"
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    ours = _our_prompt_ids(vlm, [prompt], vlm.num_image_tokens)
    assert torch.equal(batch["input_ids"], ours), (batch["input_ids"], ours)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(**batch, max_new_tokens=5, do_sample=False, suppress_tokens=[vlm.image_token_id])
    mine = vlm.generate(batch["pixel_values"], [prompt], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(theirs[:, batch["input_ids"].shape[1] :], mine)
    # a prompt without <image> (a caption prompt, as training lays it out): what transformers users write,
    # "<image>" + prompt, gives the same ids and the same continuation
    batch = processor(images=[image], text=["<image>caption en"], return_tensors="pt")
    ours = _our_prompt_ids(vlm, ["caption en"], vlm.num_image_tokens, causal=True)
    assert torch.equal(batch["input_ids"], ours), (batch["input_ids"], ours)
    theirs = hf.generate(**batch, max_new_tokens=5, do_sample=False, suppress_tokens=[vlm.image_token_id])
    mine = vlm.generate(batch["pixel_values"], ["caption en"], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(theirs[:, batch["input_ids"].shape[1] :], mine)


def test_repetition_penalty_sampling_and_stop_strings(decoders, tmp_path):
    """Greedy with a repetition penalty continues as transformers' generate with the same penalty; sampling
    at top-k 1 is greedy, a seed repeats its draw; a stop string ends the text after it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from connectors.generation import generate_text

    vlm = _vlm(decoders, "qwen2", "mlp2x_gelu", "causal", -2, processor=ImageProcessor(image_size=32))
    out = tmp_path / "llava"
    vlm.save_pretrained(out, format="llava")
    prompt = "USER: <image>\nwhat is it? ASSISTANT:"
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    batch = AutoProcessor.from_pretrained(out)(images=[image], text=[prompt], return_tensors="pt")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None
    px, n = batch["pixel_values"], 12

    def ours(**kw):
        return vlm.generate(px, [prompt], max_new_tokens=n, eos_token_id=[], **kw)

    greedy = ours()
    penalised = ours(repetition_penalty=1.8)
    theirs = hf.generate(
        **batch,
        max_new_tokens=n,
        do_sample=False,
        repetition_penalty=1.8,
        suppress_tokens=[vlm.image_token_id],
    )
    assert torch.equal(penalised, theirs[:, batch["input_ids"].shape[1] :])
    assert not torch.equal(penalised, greedy)  # the penalty changed the continuation
    assert len(set(penalised[0].tolist())) > len(set(greedy[0].tolist()))
    assert torch.equal(ours(do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(
        ours(do_sample=True, temperature=5.0, seed=1), ours(do_sample=True, temperature=5.0, seed=1)
    )
    assert not torch.equal(
        ours(do_sample=True, temperature=5.0, seed=1), ours(do_sample=True, temperature=5.0, seed=2)
    )
    with pytest.raises(ValueError, match="do_sample=True"):
        ours(top_p=0.9)
    with pytest.raises(ValueError, match="temperature"):
        ours(do_sample=True, temperature=0.0)
    file = tmp_path / "red.png"
    image.save(file)
    (full,) = generate_text(vlm, [file], [prompt], max_new_tokens=n, eos_token_id=[])
    stop = full[len(full) // 3 : len(full) // 3 + 2]
    (cut,) = generate_text(vlm, [file], [prompt], max_new_tokens=n, eos_token_id=[], stop_strings=[stop])
    assert cut == full[: full.index(stop) + len(stop)] and len(cut) < len(full), (full, stop, cut)


@pytest.mark.parametrize(
    "fmt, family, connector, attention, layer",
    [("paligemma", "gemma", "linear", "prefix", -1), ("llava", "qwen2", "mlp2x_gelu", "causal", -2)],
)
def test_a_saved_vlm_with_its_tower_swapped_for_another_width_loads_in_transformers_as_saved(
    fmt, family, connector, attention, layer, decoders, tmp_path
):
    """A PaliGemma / LLaVA folder, loaded, its tower replaced by one of another width and patch size (2x2
    tokens instead of 4x4), saved again: transformers' model and AutoProcessor read it as saved, the decoder
    is the saved one, and the swap record comes back."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, PaliGemmaForConditionalGeneration

    hf_class = PaliGemmaForConditionalGeneration if fmt == "paligemma" else LlavaForConditionalGeneration
    first = tmp_path / "first"
    _vlm(
        decoders, family, connector, attention, layer, processor=ImageProcessor(image_size=32)
    ).save_pretrained(first, format=fmt)
    vlm = VisionLanguageModel.from_pretrained(first)
    new = R.tower(seed=11, hidden_size=48, intermediate_size=96, patch_size=16)
    new.feature_layer = layer
    vlm.replace_tower(new, processor=ImageProcessor(image_size=32, mean=(0.4, 0.4, 0.4)), source="tower-b")
    R.randomize_(vlm.connector, seed=9, scale=0.3)
    assert (vlm.connector.in_dim, vlm.num_image_tokens, vlm.tower_swap["replaced"]["tokens_per_image"]) == (
        48,
        4,
        16,
    )
    out = tmp_path / "swapped"
    vlm.save_pretrained(out, format=fmt)
    hf = hf_class.from_pretrained(out).eval()
    _same_as_transformers(vlm, hf, 32, paligemma=fmt == "paligemma")
    processor = AutoProcessor.from_pretrained(out)
    prompt = "<image>caption en"
    batch = processor(images=[Image.new("RGB", (40, 30), (200, 30, 60))], text=[prompt], return_tensors="pt")
    ours = _our_prompt_ids(vlm, ["caption en"], 4, causal=attention == "causal")
    assert torch.equal(batch["input_ids"], ours), (batch["input_ids"], ours)
    pixels = vlm.image_processor()(Image.new("RGB", (40, 30), (200, 30, 60)))  # the new tower's statistics
    assert_close(batch["pixel_values"], pixels.reshape(batch["pixel_values"].shape))
    back = VisionLanguageModel.from_pretrained(out)
    assert back.tower_swap == vlm.tower_swap and back.tower_swap["tower"] == "tower-b"
    assert tuple(back.processor.mean) == (0.4, 0.4, 0.4)  # the processor given with the new tower
    saved = VisionLanguageModel.from_pretrained(first).decoder.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in back.decoder.state_dict().items())
