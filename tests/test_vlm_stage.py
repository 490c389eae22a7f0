"""The pieces of a VLM training stage, without DeepSpeed: configs, what each stage trains and with which
learning rate, LoRA merged at export, consolidated weights into a plain model, evaluation against a
hand loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from connectors import FormatError
from tests.helpers.vlm_data import make_assets
from training.data.feature_cache import extract_shards, tower_layout
from training.data.shards import SkipCounter, expand_shards, iter_tar_samples
from training.eval.vlm import evaluate_vlm, read_eval_items
from training.runner import Zero, deepspeed_config
from training.runner.paths import ROOT
from training.tasks.vlm import VLMTask
from training.tasks.vlm_config import load_vlm_config
from training.tasks.vlm_model import add_lora, load_plain, merge_lora

CONFIGS = sorted((ROOT / "configs" / "vlm").glob("*.yaml"))
TINY = ROOT / "configs" / "vlm" / "tiny_align.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("vlm"), n_train=64, n_val=12)


def overrides(assets, **extra) -> list[str]:
    base = {
        "model.tower": assets["tower"],
        "model.decoder": assets["decoder"],
        "model.tokenizer": "null",
        "data.train_shards": assets["train"],
        "data.val_shards": assets["val"],
        "data.max_length": 40,
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def build(assets, **extra):
    cfg = load_vlm_config(TINY, overrides(assets, **extra))
    task = VLMTask(cfg)
    task.build_model(Zero(0, {"bf16": {"enabled": False}}))
    return task


def test_configs_exist_and_load():
    assert {p.name for p in CONFIGS} >= {
        "tiny_align.yaml",
        "tiny_finetune.yaml",
        "so400m_gemma2b_align.yaml",
        "so400m_gemma2b_finetune.yaml",
        "qwen2_llava_align.yaml",
        "qwen2_llava_finetune.yaml",
        "tiny_anyres.yaml",
        "tiny_stripes.yaml",
    }
    for path in CONFIGS:
        cfg = load_vlm_config(path)
        ds = deepspeed_config(cfg.optim, cfg.run, cfg.data.batch_size, 8)
        assert ds["train_batch_size"] == cfg.data.batch_size * 8 * cfg.optim.grad_accum
        swap = cfg.model.swaps_tower  # a saved VLM with a new tower: its connector aligns first
        from_scratch = (
            path.name == "tiny_stripes.yaml"
        )  # the resolution task: one finetune stage from scratch
        assert (cfg.stage == "finetune") == (cfg.model.init_from is not None and not swap or from_scratch), (
            path.name
        )
        assert not swap or cfg.stage == "align", path.name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["stage=tune"], "stage must be one of"),
        (["finetune.decoder=lora"], "the finetune section applies to stage finetune"),
        (["stage=finetune", "finetune.decoder=half"], "finetune.decoder must be one of"),
        (["stage=finetune", "finetune.tower_lr=1e-5"], "set finetune.tower: true"),
        (["stage=finetune", "finetune.tower=true", "data.feature_cache=x"], "drop one"),
        (["model.init_from=x"], "a swap keeps them): drop model.decoder, model.tokenizer"),
        (
            [
                "model.init_from=x",
                "model.tower=null",
                "model.decoder=null",
                "model.tokenizer=null",
                "model.connector=mlp",
            ],
            "model.connector apply to a tower swap: set model.tower",
        ),
        (
            [
                "model.init_from=x",
                "model.decoder=null",
                "model.tokenizer=null",
                "model.keep_connector=true",
                "model.connector=mlp",
            ],
            "model.keep_connector keeps the saved connector: drop model.connector",
        ),
        (["model.keep_connector=true"], "model.keep_connector applies to a tower swap"),
        (["model.decoder=preset:huge"], "unknown decoder preset 'huge'"),
        (["model.tokenizer=null"], "model.tokenizer is required with a preset decoder"),
        (["model.connector=mlp3"], "model.connector 'mlp3' is unknown"),
        (["model.colour=red"], "unknown key(s) ['colour'] in model"),
        (["export.formats=[gguf]"], "export.formats: unknown ['gguf']"),
        (["data.max_length=0"], "data.max_length must be >= 1"),
        (["data.train_json=x.jsonl"], "set one of data.train_shards"),
        (["data.image_folder=images"], "data.image_folder holds the images of data.train_json"),
        (["data.max_bad_samples=-1"], "data.max_bad_samples must be >= 0"),
        (["model.chat_template=v9"], "model.chat_template 'v9': give a built-in (plain, v1)"),
        (["model.feature_layer=-2.0"], "model.feature_layer: expected an integer, got -2.0 (float)"),
        (
            [
                "model.decoder=my/gemma",
                "model.decoder_options={num_hidden_layers: 1}",
            ],  # a folder, not a preset
            "model.decoder_options override a preset decoder's config; this decoder is loaded",
        ),
        (
            ["model.image_layout=tiles"],
            "model.image_layout 'tiles' is unknown; known: anyres, anyres_max, anyres_max_9, fixed",
        ),
        (["model.layout_options={max_tiles: 4}"], "model.layout_options are options of model.image_layout"),
        (["data.max_image_tokens=0"], "data.max_image_tokens must be >= 1"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(extra, message):
    with pytest.raises(ValueError) as err:
        load_vlm_config(TINY, extra)
    assert message in str(err.value)


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_align_trains_the_connector_alone(assets):
    task = build(assets)
    vlm = task.vlm
    groups = task.param_groups(vlm)
    trained = names(vlm, [p for g in groups for p in g["params"]])
    assert trained == {f"connector.{n}" for n, _ in vlm.connector.named_parameters()}
    assert not any(p.requires_grad for p in [*vlm.tower.parameters(), *vlm.decoder.parameters()])
    assert not vlm.tower.training and vlm.decoder.training  # frozen tower in eval mode
    assert task.stage.formats == ["native", "paligemma"]  # gemma, linear, prefix, final layer: not llava


def test_finetune_trains_connector_decoder_and_tower_at_its_own_rate(assets):
    task = build(assets, stage="finetune", **{"finetune.tower": "true", "finetune.tower_lr": 1e-5})
    vlm = task.vlm
    groups = task.param_groups(vlm)
    tower = {f"tower.{n}" for n, _ in vlm.tower.named_parameters()}
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g.get("lr"), set()).update(names(vlm, g["params"]))
    assert by_lr[1e-5] == tower
    assert by_lr[None] == {n for n, _ in vlm.named_parameters()} - tower  # connector and decoder


def test_the_anyres_config_makes_a_saved_fixed_stage_1_a_stage_2_of_tiled_images(assets, tmp_path):
    """configs/vlm/tiny_anyres.yaml on a saved stage 1 in the fixed layout: the same tower, connector and
    decoder in the anyres layout, a fresh image_newline trained with connector and decoder; a later switch
    to anyres_max_9 keeps the trained image_newline (same name and shape), and no image_layout keeps the
    saved layout."""
    stage1 = build(assets).vlm
    stage1.save_pretrained(tmp_path / "stage1")

    def stage(init, *extra):
        paths = [f"model.init_from={init}", f"data.train_shards={assets['train']}", "data.val_shards=null"]
        task = VLMTask(load_vlm_config(ROOT / "configs" / "vlm" / "tiny_anyres.yaml", [*paths, *extra]))
        task.build_model(Zero(0, {"bf16": {"enabled": False}}))
        return task

    task = stage(tmp_path / "stage1")
    vlm = task.vlm
    assert vlm.image_layout.name == "anyres" and not stage1.layout_params
    for part in ("tower", "connector", "decoder"):
        saved, now = getattr(stage1, part).state_dict(), getattr(vlm, part).state_dict()
        assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved), part
    trained = names(vlm, [p for g in task.param_groups(vlm) for p in g["params"]])
    assert trained == {n for n, _ in vlm.named_parameters() if not n.startswith("tower.")}
    assert "layout_params.image_newline" in trained
    # a 32 px shapes image: 16 base tokens, 4x4 of its 1x2 tiles without the padding, 4 newlines
    item = task.builder().build(next(iter_tar_samples(expand_shards(assets["train"])[0], SkipCounter(1))))
    assert item.input_ids.count(vlm.image_token_id) == 36 and item.image_sizes == [(32, 32)]
    with torch.no_grad():
        vlm.layout_params["image_newline"].add_(1.0)  # as if trained
    vlm.save_pretrained(tmp_path / "stage2")
    again = stage(tmp_path / "stage2", "model.image_layout=anyres_max_9").vlm
    assert again.image_layout.name == "anyres_max" and again.image_layout.options["max_tiles"] == 9
    assert torch.equal(again.layout_params["image_newline"], vlm.layout_params["image_newline"])
    keep = ["model.image_layout=null", "model.layout_options={}"]
    kept = stage(tmp_path / "stage2", *keep).vlm
    assert kept.image_layout == vlm.image_layout
    assert torch.equal(kept.layout_params["image_newline"], vlm.layout_params["image_newline"])
    # a feature cache of fixed crops is refused for the saved anyres layout before anything trains; one of
    # the anyres crops is taken
    cache = tmp_path / "cache"
    extract_shards(stage1.tower, stage1.image_processor(), assets["val"], cache, progress=False)
    with pytest.raises(ValueError, match="another image layout .*cache 'fixed', model 'anyres'"):
        stage(tmp_path / "stage2", *keep, f"data.feature_cache={cache}")
    layout = tower_layout(stage1.tower, "anyres")
    extract_shards(
        stage1.tower, stage1.image_processor(), assets["val"], cache, layout=layout, progress=False
    )
    stage(tmp_path / "stage2", *keep, f"data.feature_cache={cache}")


def test_lora_trains_adapters_and_merges_into_the_plain_decoder(assets):
    task = build(
        assets,
        stage="finetune",
        **{"finetune.decoder": "lora", "finetune.lora.target_modules": "[q_proj, up_proj]"},
    )
    vlm = task.vlm
    trained = names(vlm, [p for g in task.param_groups(vlm) for p in g["params"]])
    adapters = {n for n, _ in vlm.decoder.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * 2 * 2  # 2 layers x (q_proj, up_proj) x (A, B)
    assert trained == {f"decoder.{n}" for n in adapters} | {
        f"connector.{n}" for n, _ in vlm.connector.named_parameters()
    }
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in vlm.decoder.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.2)  # B starts at zero: give the adapters something to merge
    ids = torch.randint(4, vlm.decoder.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = vlm.decoder(input_ids=ids).logits
        plain = load_plain(vlm, merge_lora(vlm.state_dict(), 32.0 / 16))  # alpha / r of the defaults
        got = plain.decoder(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="not linear layers of this decoder"):
        add_lora(
            plain.decoder, type("L", (), {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["c_attn"]})
        )


def test_consolidated_weights_load_into_a_plain_model_with_ties(assets):
    task = build(assets)
    vlm = task.vlm.eval()
    state = {n: p.detach().clone() for n, p in vlm.named_parameters()}  # as ZeRO gathers them: tied once
    state.update({n: b.clone() for n, b in vlm.named_buffers()})
    assert "decoder.lm_head.weight" not in state
    plain = load_plain(vlm, state).eval()
    assert plain.decoder.lm_head.weight is plain.decoder.model.embed_tokens.weight
    ids = torch.tensor([[vlm.image_token_id] * vlm.num_image_tokens + [1, 5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, pixels).logits, vlm(ids, pixels).logits)
    with pytest.raises(ValueError, match="unexpected"):
        load_plain(vlm, {**state, "decoder.extra.weight": torch.zeros(1)})


def test_a_causal_model_reading_a_block_output_exports_as_llava(assets):
    task = build(assets, **{"model.attention": "causal", "model.feature_layer": -2})
    assert task.stage.formats == ["native", "llava"]


def test_a_gemma3_stage_with_image_attention_builds_and_its_loss_reads_the_image_blocks(assets):
    """preset:tiny_gemma3 under attention image_bidirectional: built from the config, only the native format
    holds it, and the task's loss on a collated batch is the image-block one (not the causal one)."""
    task = build(
        assets,
        **{
            "model.decoder": "preset:tiny_gemma3",
            "model.tokenizer": assets["tokenizer"],
            "model.attention": "image_bidirectional",
        },
    )
    vlm = task.vlm
    assert vlm.decoder.config.model_type == "gemma3_text" and task.stage.formats == ["native"]
    b = task.builder()
    batch = b.collate(read_eval_items(b, assets["val"], 3))
    loss = task.loss(vlm, batch)
    loss.backward()
    assert all(p.grad is not None for p in vlm.connector.parameters())
    vlm.attention = "causal"
    with torch.no_grad():
        assert abs(task.loss(vlm, batch).item() - loss.item()) > 1e-4


def test_an_export_format_that_cannot_hold_the_model_is_refused_before_training(assets):
    with pytest.raises(FormatError, match="export.formats lists 'paligemma'"):
        build(assets, **{"model.attention": "causal", "export.formats": "[native, paligemma]"})


def test_eval_reads_every_held_out_sample_unless_told_otherwise(assets):
    """``eval vlm`` without ``--max-samples`` evaluates the whole held-out set (counted here from the tar
    members themselves), and ``--max-samples N`` the first N."""
    import tarfile

    from training.data import expand_shards
    from training.data.vlm import builder_for

    task = build(assets)
    b = builder_for(task.vlm, max_length=40, caption_prompt="")
    keys = set()
    for url in expand_shards(assets["val"]):
        with tarfile.open(url) as tar:
            keys |= {(url, m.name.split(".")[0]) for m in tar.getmembers()}
    assert len(read_eval_items(b, assets["val"])) == len(keys) > 7
    assert len(read_eval_items(b, assets["val"], 7)) == 7


def test_evaluation_equals_a_hand_loop(assets):
    task = build(assets, stage="finetune")
    vlm = task.vlm
    from training.data.vlm import builder_for

    b = builder_for(vlm, max_length=40, caption_prompt="")
    items = read_eval_items(b, assets["val"], 7)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in vlm.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    # a reference that the model answers by construction: its own greedy output for item 0
    first = vlm.eval().generate(
        b.collate(items[:1])["pixel_values"], prompts=[items[0].prompt], max_new_tokens=6
    )
    eos = b.tokenizer.eos_token_id
    row = first[0].tolist()
    items[0].text = b.tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
    result = evaluate_vlm(vlm, items, b, batch_size=3, max_new_tokens=6)
    # by hand, one sample at a time
    losses, matches = [], 0
    vlm.eval()
    with torch.no_grad():
        for item in items:
            batch = b.collate([item])
            logits = vlm(
                batch["input_ids"], batch["pixel_values"], token_type_ids=batch["token_type_ids"]
            ).logits[0]
            for pos in range(item.num_prefix, len(item.input_ids)):
                losses.append(F.cross_entropy(logits[pos - 1], torch.tensor(item.input_ids[pos])))
            new = vlm.generate(batch["pixel_values"], prompts=[item.prompt], max_new_tokens=6)[0].tolist()
            text = b.tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
            matches += " ".join(text.split()).lower() == " ".join(item.text.split()).lower()
    assert matches >= 1 and result.samples == 7
    assert result.exact_match == pytest.approx(matches / 7)
    assert result.loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_generation_never_emits_the_image_placeholder():
    """A decoder whose favourite next token is the image placeholder still answers with text (fed back, a
    placeholder would need an image)."""
    from connectors import VisionLanguageModel
    from tests.helpers import vlm_reference as R

    vlm = VisionLanguageModel(R.tower(), "pixel_shuffle", R.decoder("gemma"), tokenizer=R.tokenizer()).eval()

    def favour_placeholder(module, inputs, logits):
        logits[..., vlm.image_token_id] += 1e4
        return logits

    vlm.decoder.lm_head.register_forward_hook(favour_placeholder)
    with torch.no_grad():
        out = vlm.decoder(input_ids=torch.tensor([[1, 5, 6]])).logits[0, -1]
    assert out.argmax().item() == vlm.image_token_id
    new = vlm.generate(R.pixels(1), prompts=["caption en"], max_new_tokens=4)
    assert vlm.image_token_id not in new.tolist()[0] and new.shape == (1, 4)


PRESET = ["model.decoder=preset:tiny_gemma", "model.tokenizer={tokenizer}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-vlm", "--config", str(TINY), "stage=tune"], "stage must be one of"),
        (["train-vlm", "--config", str(TINY), "data.feature_cache=/nowhere"], "is not a feature cache"),
        # refused while the model is built, before the engine: no run folder content is left behind
        (
            ["train-vlm", "--config", str(TINY), "model.connector_options={{colour: red}}"],
            "unknown option(s) ['colour'] for connector 'linear'; known options: ['bias']",
        ),
        (
            ["train-vlm", "--config", str(TINY), *PRESET, "model.decoder_options={{num_hidden_layer: 4}}"],
            "decoder preset 'tiny_gemma': unknown option(s) ['num_hidden_layer'] for a gemma config",
        ),
        (
            ["train-vlm", "--config", str(TINY), *PRESET, "model.decoder_options={{num_attention_heads: 3}}"],
            "decoder preset 'tiny_gemma': num_attention_heads 3 is not a multiple of num_key_value_heads 2",
        ),
        (
            # image tokens + 2 (16, bos, a one-word caption prompt): it passed, then every sample was skipped
            ["train-vlm", "--config", str(TINY), "data.max_length=18", "data.caption_prompt=caption"],
            "data.max_length 18 leaves no room for a caption: one image and the caption prompt take 18",
        ),
        (
            [
                "train-vlm",
                "--config",
                str(TINY),
                "model.image_layout=anyres",
                "model.layout_options={{tiles: 4}}",
            ],
            "unknown option(s) ['tiles'] for image layout 'anyres'; known options: ['grid_pinpoints']",
        ),
        (
            ["train-vlm", "--config", str(TINY), "data.max_image_tokens=15"],
            "data.max_image_tokens 15 is below the 16 tokens every image takes (image layout 'fixed')",
        ),
        (
            ["train-vlm", "--config", str(TINY), "model.decoder={tmp}/stage1/decoder"],
            "/stage1/decoder' is neither an existing local path nor a hub repo id",
        ),
        (
            ["train-vlm", "--config", str(TINY), "model.decoder={tower}"],
            "holds a 'siglip_vision_model' model, not a causal language model",
        ),
        (
            ["extract", "--model", "preset:tiny", "--shards", "x", "--out", "o", "--no-head"],
            "--no-head does not apply",
        ),
    ],
)
def test_command_errors_are_one_line(assets, argv, message, capsys, tmp_path, monkeypatch):
    from vision_tower.cli import main

    monkeypatch.chdir(tmp_path)
    if argv[0] == "train-vlm":  # the case's own settings after the common ones: the last of a key wins
        given = [a.format(tmp=tmp_path, **assets) for a in argv[3:]]
        argv = [*argv[:3], *overrides(assets, **{"run.out_dir": tmp_path / "run"}), *given]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vision-tower")]
    assert len(err) == 1 and err[0].startswith(f"vision-tower {argv[0]}: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # no checkpoints/ left


def test_eval_vlm_without_held_out_data_is_an_argparse_error_of_its_own_command(capsys):
    from vision_tower.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "vlm", "--model", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1] == "vision-tower eval vlm: error: one of the arguments --shards --json is required", err


def test_max_length_must_leave_room_for_a_caption_after_the_image_and_the_prompt(assets):
    from training.data.vlm import builder_for

    vlm = build(assets).vlm
    tok = vlm.tokenizer
    # counted independently: the placeholders, bos, then the prompt and its newline as plain text
    prompt = len(tok("look\n", add_special_tokens=False, split_special_tokens=True)["input_ids"])
    prefix = vlm.num_image_tokens + (tok.bos_token_id is not None) + prompt
    with pytest.raises(ValueError, match=f"take {prefix} tokens .* raise data.max_length above {prefix}"):
        builder_for(vlm, max_length=prefix, caption_prompt="look")
    assert builder_for(vlm, max_length=prefix + 1, caption_prompt="look").max_length == prefix + 1


def test_generation_past_the_decoders_positions_warns():
    from connectors import VisionLanguageModel
    from tests.helpers import vlm_reference as R

    vlm = VisionLanguageModel(R.tower(), "pixel_shuffle", R.decoder("gemma"), tokenizer=R.tokenizer()).eval()
    limit = vlm.decoder.config.max_position_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the positions: no warning
        vlm.generate(R.pixels(1), prompts=["caption en"], max_new_tokens=2)
    with pytest.warns(UserWarning, match=f"past the decoder's {limit} positions") as record:
        vlm.generate(R.pixels(1), prompts=["caption en"], max_new_tokens=limit)
    assert len([w for w in record if "past the decoder's" in str(w.message)]) == 1  # once per call
