"""Damaged or mismatched VLM folders are refused in one line before any tensor is loaded: safetensors headers
(truncated, inconsistent, a dtype that is not the data's, a decoder tensor of the wrong shape), config files
that are not JSON objects or hold a field of the wrong type, and a tokenizer with ids past the decoder's
input embedding table (in loading, generation and train-vlm, before DeepSpeed starts)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from connectors import VisionLanguageModel
from connectors.decoder import IMAGE_TOKEN, num_embeddings
from tests.helpers import vlm_reference as R
from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import qa_members
from training.runner.launch import launch_env
from training.runner.paths import ROOT
from vision_tower import ImageProcessor
from vision_tower.cli import main

DOWN = "model.layers.0.mlp.down_proj.weight"  # (64, 128) in the reference decoders


def word_tokenizer(n: int, image: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``n`` ids (the last one ``<image>`` when ``image``)."""
    words = [*R.SPECIALS, *(f"w{i}" for i in range(n - len(R.SPECIALS) - image))]
    words += [IMAGE_TOKEN] if image else []
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A native and a PaliGemma folder of one tiny VLM (decoder table 260 rows, tokenizer 257 ids), and an
    image."""
    root = tmp_path_factory.mktemp("vlm")
    decoder = R.decoder_folder("gemma", root / "decoder", seed=3)
    vlm = VisionLanguageModel(R.tower(seed=4), "linear", decoder, processor=ImageProcessor(image_size=32))
    vlm.save_pretrained(root / "native")
    vlm.save_pretrained(root / "pg", format="paligemma")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "image.png")
    return root


def copy(folders: Path, kind: str, tmp_path: Path) -> Path:
    out = tmp_path / kind
    shutil.copytree(folders / kind, out)
    return out


def read_header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def retype(file: Path, name: str, dtype: str) -> None:
    """Declare tensor ``name`` as ``dtype`` (same item size: the data bytes stay where they are)."""
    header, data = read_header(file)
    header[name]["dtype"] = dtype
    write_header(file, header, data)


def generate_cli(model: Path, image: Path) -> subprocess.CompletedProcess:
    """The installed ``vision-tower generate``, as a user runs it."""
    cmd = [sys.executable, "-m", "vision_tower.cli", "generate", "--model", str(model), "--image", str(image)]
    cmd += ["--max-new-tokens", "2", "--dtype", "float32"]
    return subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)


def generate_main(model: Path, image: Path, capsys) -> tuple[int, str]:
    code = main(["generate", "--model", str(model), "--image", str(image), "--max-new-tokens", "2"])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("vision-tower generate: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- through the installed command
def test_a_truncated_decoder_file_is_one_line_naming_it(folders, tmp_path):
    model = copy(folders, "native", tmp_path)
    file = model / "decoder" / "model.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    proc = generate_cli(model, folders / "image.png")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{file}: not a readable safetensors file" in line and "(truncated)" in line


def test_f32_data_declared_i32_is_refused_naming_tensor_and_dtype(folders, tmp_path):
    model = copy(folders, "native", tmp_path)
    retype(model / "decoder" / "model.safetensors", DOWN, "I32")
    proc = generate_cli(model, folders / "image.png")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and proc.stdout == ""  # nothing generated from integer weights
    assert f"{model / 'decoder' / 'model.safetensors'}:" in line and f"{DOWN} is I32" in line


def test_a_decoder_tensor_of_the_wrong_shape_names_expected_and_found(folders, tmp_path):
    model = copy(folders, "native", tmp_path)
    file = model / "decoder" / "model.safetensors"
    sd = load_file(file)
    sd[DOWN] = sd[DOWN][:, :100].contiguous()
    save_file(sd, file, metadata={"format": "pt"})
    proc = generate_cli(model, folders / "image.png")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2
    assert f"{DOWN}: the decoder (GemmaForCausalLM) expects (64, 128), the file has (64, 100)" in line
    assert "ignore_mismatched_sizes" not in proc.stderr


def test_a_tokenizer_larger_than_the_decoder_table_is_refused_by_generate(folders, tmp_path):
    model = copy(folders, "pg", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    word_tokenizer(405, image=True).save_pretrained(model)
    proc = generate_cli(model, folders / "image.png")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2
    assert "the tokenizer has 405 tokens (ids up to 403 and <image> = 404)" in line
    assert "input embedding table has 260 rows" in line


# --------------------------------------------------------------------- each damage, same command in-process
def _truncate_connector(model: Path) -> str:
    file = model / "connector.safetensors"
    file.write_bytes(file.read_bytes()[:-16])
    return f"{file}: not a readable safetensors file: the header describes"


def _shift_offsets(model: Path) -> str:
    file = model / "model.safetensors"
    header, data = read_header(file)
    name = "language_model." + DOWN
    header[name]["data_offsets"][1] += 4
    write_header(file, header, data)
    return f"tensor '{name}' is F32 of shape (64, 128) (32768 bytes) but its data_offsets span 32772 bytes"


def _header_not_json(model: Path) -> str:
    file = model / "tower" / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8] = ord("[")  # the header's opening brace
    file.write_bytes(bytes(raw))
    return f"{file}: not a readable safetensors file: the header is not JSON"


def _connector_i32(model: Path) -> str:
    retype(model / "connector.safetensors", "proj.weight", "I32")
    return "non-floating-point tensors for floating-point weights (1): ['proj.weight: int32']"


def _tower_i32(model: Path) -> str:
    retype(model / "tower" / "model.safetensors", "vision_model.encoder.layers.0.mlp.fc1.weight", "I32")
    return "['encoder.blocks.0.mlp.fc1.weight: int32']"


def _paligemma_decoder_i32(model: Path) -> str:
    retype(model / "model.safetensors", "language_model." + DOWN, "I32")
    return f"language_model.{DOWN} is I32"


def _paligemma_projector_i32(model: Path) -> str:
    retype(model / "model.safetensors", "multi_modal_projector.linear.weight", "I32")
    return "(multi_modal_projector) does not fit LinearConnector: non-floating-point tensors"


def _paligemma_decoder_shape(model: Path) -> str:
    file = model / "model.safetensors"
    sd = load_file(file)
    name = "language_model." + DOWN
    sd[name] = sd[name][:, :100].contiguous()
    save_file(sd, file, metadata={"format": "pt"})
    return f"{name}: the decoder (GemmaForCausalLM) expects (64, 128), the file has (64, 100)"


def _edit_json(file: Path, **fields) -> None:
    data = json.loads(file.read_text())
    data.update(fields)
    file.write_text(json.dumps(data))


def _config_list(model: Path) -> str:
    (model / "config.json").write_text("[1, 2]")
    return f"{model / 'config.json'}: expected a JSON object {{...}}, found a JSON list"


def _preprocessor_list(model: Path) -> str:
    (model / "preprocessor_config.json").write_text('["size", 32]')
    return f"{model / 'preprocessor_config.json'}: expected a JSON object {{...}}, found a JSON list"


def _preprocessor_field(model: Path) -> str:
    _edit_json(model / "preprocessor_config.json", image_mean="abc")
    return (
        f"{model / 'preprocessor_config.json'}: field 'image_mean' must be a number or a list, found \"abc\""
    )


def _native_field(model: Path) -> str:
    _edit_json(model / "config.json", feature_layer="-1")
    return f"{model / 'config.json'}: field 'feature_layer' must be an integer, found \"-1\""


def _decoder_field(model: Path) -> str:
    _edit_json(model / "decoder" / "config.json", hidden_size="64")
    return f"{model / 'decoder' / 'config.json'}: Field 'hidden_size' expected int, got str"


def _connector_option(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    _edit_json(model / "config.json", connector={**config["connector"], "options": {"colour": "red"}})
    return f"{model / 'config.json'}: connector: unknown option(s) ['colour'] for connector 'linear'"


def _connector_option_type(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    _edit_json(model / "config.json", connector={**config["connector"], "options": {"bias": "no"}})
    return f"{model / 'config.json'}: connector: connector 'linear' option bias='no': expected bool"


def _tower_field(model: Path) -> str:
    _edit_json(model / "tower" / "config.json", hidden_size="32")
    return (
        f"{model / 'tower'} (config.json): VisionConfig: field 'hidden_size' must be an integer, found '32'"
    )


def _paligemma_text_field(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    _edit_json(model / "config.json", text_config={**config["text_config"], "num_hidden_layers": 2.5})
    return f"{model / 'config.json'}: Field 'num_hidden_layers' expected int, got float"


DAMAGE = {
    "native": [
        _truncate_connector,
        _header_not_json,
        _connector_i32,
        _tower_i32,
        _config_list,
        _preprocessor_list,
        _preprocessor_field,
        _native_field,
        _decoder_field,
        _tower_field,
        _connector_option,
        _connector_option_type,
    ],
    "pg": [
        _shift_offsets,
        _paligemma_decoder_i32,
        _paligemma_projector_i32,
        _paligemma_decoder_shape,
        _paligemma_text_field,
    ],
}


@pytest.mark.parametrize(
    "kind, damage", [(k, d) for k, ds in DAMAGE.items() for d in ds], ids=lambda v: getattr(v, "__name__", v)
)
def test_each_damaged_folder_is_one_line_from_generate_and_an_error_from_the_api(
    kind, damage, folders, tmp_path, capsys
):
    model = copy(folders, kind, tmp_path)
    expected = damage(model)
    code, err = generate_main(model, folders / "image.png", capsys)
    assert code == 2 and expected in one_error_line(err)
    with pytest.raises(ValueError) as caught:
        VisionLanguageModel.from_pretrained(model)
    assert expected in str(caught.value)


# ----------------------------------------------------------------------------- tokenizer against the table
def test_tokenizer_against_the_decoder_table_in_the_api(tmp_path):
    decoder = R.decoder("gemma", seed=5, vocab_size=258)
    with pytest.raises(ValueError, match=r"has 405 tokens .* table has 258 rows"):
        VisionLanguageModel(R.tower(), "linear", decoder, tokenizer=word_tokenizer(405, image=True))
    with pytest.raises(ValueError, match=r"has 300 tokens \(ids up to 299\) .* table has 258 rows"):
        VisionLanguageModel(R.tower(), "linear", decoder, tokenizer=word_tokenizer(300))
    assert num_embeddings(decoder) == 258  # refused before anything grew

    # smaller is fine: <image> is added after the tokenizer's ids, inside the table, which keeps its size
    small = VisionLanguageModel(R.tower(), "linear", decoder, tokenizer=word_tokenizer(128))
    assert small.image_token_id == 128 and num_embeddings(small.decoder) == 258
    # a tokenizer exactly as large as the table without <image>: its one new row is added
    full = VisionLanguageModel(R.tower(), "linear", decoder, tokenizer=word_tokenizer(258))
    assert full.image_token_id == 258 and num_embeddings(full.decoder) == 259
    # the same tokenizer saved with <image> (one id past a fresh 258-row table) is that case again
    again = VisionLanguageModel(
        R.tower(), "linear", R.decoder("gemma", seed=5, vocab_size=258), tokenizer=full.tokenizer
    )
    assert again.image_token_id == 258 and num_embeddings(again.decoder) == 259


def test_train_vlm_refuses_a_tokenizer_larger_than_the_decoder_before_deepspeed(tmp_path):
    write_tar(tmp_path / "shards" / "qa-000.tar", qa_members(4))
    decoder = R.decoder_folder("gemma", tmp_path / "decoder", vocab_size=258)
    word_tokenizer(405, image=True).save_pretrained(tmp_path / "big-tokenizer")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vision_tower.cli", "train-vlm", "--config", "configs/vlm/tiny_align.yaml"]
    settings = {
        "model.tower": "preset:tiny",
        "model.decoder": str(decoder),
        "model.tokenizer": str(tmp_path / "big-tokenizer"),
        "data.train_shards": str(tmp_path / "shards"),
        "data.val_shards": "null",
        "run.out_dir": str(out),
        "run.steps": 2,
    }
    cmd += [f"{k}={v}" for k, v in settings.items()]
    proc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("vision-tower train-vlm: error: the tokenizer (model.tokenizer "), lines
    assert "has 405 tokens" in lines[-1] and "table has 258 rows" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before the run folder, the lock or the engine


def test_a_decoder_smaller_than_its_tokenizer_in_a_training_config_passes_the_check(tmp_path):
    from training.tasks.vlm_config import VLMModelSection
    from training.tasks.vlm_model import check_vocabulary

    decoder = R.decoder_folder("gemma", tmp_path / "decoder", vocab_size=258)  # tokenizer: 256 ids
    word_tokenizer(128).save_pretrained(tmp_path / "small")
    word_tokenizer(259).save_pretrained(tmp_path / "big")
    check_vocabulary(VLMModelSection(tower="preset:tiny", decoder=str(decoder)))
    check_vocabulary(
        VLMModelSection(tower="preset:tiny", decoder=str(decoder), tokenizer=str(tmp_path / "small"))
    )
    with pytest.raises(ValueError, match=r"model.tokenizer .* has 259 tokens"):
        check_vocabulary(
            VLMModelSection(tower="preset:tiny", decoder=str(decoder), tokenizer=str(tmp_path / "big"))
        )


def test_a_tokenizer_without_eos_is_refused_before_training_saying_how_to_fix_it(tmp_path):
    from training.tasks.vlm_config import VLMModelSection
    from training.tasks.vlm_model import check_vocabulary

    decoder = R.decoder_folder("gemma", tmp_path / "decoder", vocab_size=258)
    tokenizer = word_tokenizer(128)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(ValueError, match='has no eos token, .*set "eos_token" in its tokenizer_config.json'):
        check_vocabulary(
            VLMModelSection(tower="preset:tiny", decoder=str(decoder), tokenizer=str(tmp_path / "no-eos"))
        )


@pytest.mark.parametrize("reader", ["load_decoder", "config_rows", "load_tokenizer"])
def test_a_missing_decoder_folder_is_named_as_a_missing_path(tmp_path, reader):
    """Not huggingface_hub's advice on how repo ids are written."""
    import connectors.decoder

    missing = tmp_path / "stage1" / "decoder"
    with pytest.raises(FileNotFoundError, match=f"'{missing}' is neither an existing local path nor a hub"):
        getattr(connectors.decoder, reader)(missing)


@pytest.mark.parametrize("reader", ["load_decoder", "config_rows"])
def test_a_tower_folder_given_as_the_decoder_is_named_as_not_a_language_model(tmp_path, reader):
    import connectors.decoder
    from vision_tower import VisionTower, get_preset

    VisionTower(get_preset("tiny").vision).save_pretrained(tmp_path / "tower")
    with pytest.raises(
        ValueError, match="holds a 'siglip_vision_model' model, not a causal language model"
    ) as e:
        getattr(connectors.decoder, reader)(tmp_path / "tower")
    assert "\n" not in str(e.value) and "Config," not in str(e.value)  # not transformers' list of classes


def test_train_vlm_with_a_tokenizer_smaller_than_the_decoder_trains_evaluates_and_exports(tmp_path, capsys):
    """A 128-id tokenizer with a 258-row decoder: <image> is id 128, inside the table, which keeps its 258
    rows; once every step trained and the final evaluation crashed (IndexError), with no export."""
    write_tar(tmp_path / "shards" / "qa-000.tar", qa_members(4))
    decoder = R.decoder_folder("gemma", tmp_path / "decoder", vocab_size=258)
    word_tokenizer(128).save_pretrained(tmp_path / "small")
    out = tmp_path / "run"
    settings = {
        "model.tower": "preset:tiny",
        "model.decoder": decoder,
        "model.tokenizer": tmp_path / "small",
        "data.train_shards": tmp_path / "shards",
        "data.val_shards": tmp_path / "shards",
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.eval_samples": 4,
        "data.eval_max_new_tokens": 2,
        "run.out_dir": out,
        "run.steps": 1,
        "export.formats": "[native]",
    }
    capsys.readouterr()
    args = [
        "train-vlm",
        "--config",
        "configs/vlm/tiny_align.yaml",
        *(f"{k}={v}" for k, v in settings.items()),
    ]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_samples"] == 4 and result["val_loss"] > 0
    exported = out / "export" / "native"
    assert json.loads((exported / "decoder" / "config.json").read_text())["vocab_size"] == 258
    assert json.loads((exported / "config.json").read_text())["image_token_id"] == 128


@pytest.mark.parametrize("command", ["extract", "convert", "train-vlm model.tower"])
def test_a_vlm_folder_where_a_tower_goes_names_its_tower_folder(folders, tmp_path, capsys, command):
    native = folders / "native"
    if command == "extract":
        args = ["extract", "--model", str(native), "--images", str(folders / "image.png")]
        args += ["--out", str(tmp_path / "f.safetensors")]
    elif command == "convert":
        args = ["convert", str(native), str(tmp_path / "out")]
    else:
        write_tar(tmp_path / "shards" / "qa-000.tar", qa_members(2))
        settings = {
            "model.tower": native,
            "model.decoder": native / "decoder",
            "model.tokenizer": native,
            "data.train_shards": tmp_path / "shards",
            "data.val_shards": "null",
            "run.out_dir": tmp_path / "out",
        }
        args = [
            "train-vlm",
            "--config",
            "configs/vlm/tiny_align.yaml",
            *(f"{k}={v}" for k, v in settings.items()),
        ]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vision-tower ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0] == (
        f"vision-tower {args[0]}: error: {native} holds a vision-language model (its parts in sub-folders), "
        f"not a SigLIP checkpoint: its vision tower is the folder {native / 'tower'}"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
