"""Nothing executes from a user's files: shard specs that would run a command are refused, transformers
never runs a model folder's own Python, and pickled decoder weights are never unpickled. Each refusal is
one clear error, and the would-be payload (a marker file) is never written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from connectors.decoder import load_decoder, load_tokenizer
from tests.helpers import vlm_reference as R
from training.data.shards import expand_shards, iter_tar_samples, local_shard
from vision_tower import CheckpointError
from vision_tower.cli import main


class Payload:
    """Unpickling this writes the marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.marker))


@pytest.mark.parametrize(
    "spec",
    ["pipe:touch {marker}; cat a.tar", "pipe:cat a.tar", "http://example.invalid/a.tar", "s3://bucket/a.tar"],
)
def test_a_shard_that_would_run_a_command_is_refused(tmp_path, spec):
    marker = tmp_path / "ran"
    spec = spec.format(marker=marker)
    with pytest.raises(ValueError, match="only local tar files are read"):
        expand_shards(spec)
    with pytest.raises(ValueError, match="only local tar files are read"):
        list(iter_tar_samples(spec, counter=None))
    assert not marker.exists()


def test_local_paths_and_file_urls_are_read(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    assert local_shard(f"file://{shard}") == str(shard) == local_shard(f"file:{shard}")
    assert expand_shards([str(shard), f"file:{shard}"]) == [str(shard), str(shard)]


@pytest.mark.parametrize(
    "argv",
    [
        ["train-tokenizer", "--shards", "pipe:touch {marker}", "--out", "{tmp}/tok"],
        ["extract", "--model", "preset:tiny", "--shards", "pipe:touch {marker}", "--out", "{tmp}/cache"],
    ],
)
def test_the_commands_refuse_a_pipe_shard_in_one_line(tmp_path, capsys, argv):
    marker = tmp_path / "ran"
    args = [a.format(marker=marker, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vision-tower {argv[0]}: error: shard 'pipe:touch")
    assert "only local tar files are read" in err[0]
    assert not marker.exists()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return R.decoder_folder("qwen2", tmp_path_factory.mktemp("decoder") / "qwen2", seed=3)


def _custom_code_folder(src, dst, marker, *, config: bool):
    """A copy of ``src`` whose config (or tokenizer) names a class only its own Python file defines; the
    file writes ``marker`` when imported."""
    shutil.copytree(src, dst)
    (dst / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    name, entry = (
        ("config.json", "AutoModelForCausalLM") if config else ("tokenizer_config.json", "AutoTokenizer")
    )
    data = json.loads((dst / name).read_text())
    if config:
        data.update(
            model_type="my_custom_lm", auto_map={"AutoConfig": "custom_code.Config", entry: "custom_code.LM"}
        )
    else:
        data.update(tokenizer_class="MyCustomTokenizer", auto_map={entry: ["custom_code.Tok", None]})
    (dst / name).write_text(json.dumps(data))
    return dst


def test_a_decoder_asking_for_its_own_code_is_refused(decoder, tmp_path):
    marker = tmp_path / "ran"
    folder = _custom_code_folder(decoder, tmp_path / "custom", marker, config=True)
    with pytest.raises(ValueError, match="asks to run its own Python code") as info:
        load_decoder(folder)
    assert "trust_remote_code" not in str(info.value)  # no advice to run it
    assert not marker.exists()


def test_a_tokenizer_asking_for_its_own_code_never_runs_it(decoder, tmp_path):
    marker = tmp_path / "ran"
    folder = _custom_code_folder(decoder, tmp_path / "custom", marker, config=False)
    # with tokenizer.json beside it, the folder is read as the fast tokenizer transformers ships
    assert load_tokenizer(folder)("a b c")["input_ids"]
    (folder / "tokenizer.json").unlink()  # now only the folder's own class could read it: not loaded
    with pytest.raises(ValueError, match="asks to run its own Python code") as info:
        load_tokenizer(folder)  # not transformers' advice to install sentencepiece or tiktoken
    assert "sentencepiece" not in str(info.value)
    assert not marker.exists()


def test_every_transformers_load_says_trust_remote_code_false(decoder, monkeypatch):
    """On a terminal transformers asks "Do you wish to run the custom code? [y/N]" unless told no: every
    load must tell it, whatever the folder holds."""
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_decoder(decoder)
    load_tokenizer(decoder)
    assert seen and all(flag is False for flag in seen), seen


def test_pickled_decoder_weights_are_never_unpickled(decoder, tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "pickled"
    shutil.copytree(decoder, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match="pickled \\(pytorch_model.bin\\), which vision-tower never unpickles"
    ):
        load_decoder(folder)
    assert not marker.exists()


# ----------------------------------------------------------------------------- through the commands
@pytest.fixture(scope="module")
def native(decoder, tmp_path_factory):
    """A native VLM folder around the qwen2 decoder."""
    from connectors import VisionLanguageModel
    from vision_tower import ImageProcessor

    out = tmp_path_factory.mktemp("vlm") / "native"
    vlm = VisionLanguageModel(
        R.tower(seed=4), "linear", decoder, attention="causal", processor=ImageProcessor(image_size=32)
    )
    vlm.save_pretrained(out)
    return out


def _error_line(err: str, command: str) -> str:
    """The command's one error line (model loading may print progress before it)."""
    lines = [line for line in err.splitlines() if line.startswith(f"vision-tower {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _train_vlm(tmp_path, **settings) -> list[str]:
    from tests.helpers.shards import write_tar

    shard = write_tar(tmp_path / "train-0.tar", [("a.txt", b"a red circle")])
    base = {
        "model.tower": "preset:tiny",
        "data.train_shards": shard,
        "data.val_shards": "null",
        "model.tokenizer": "null",
        "run.out_dir": tmp_path / "run",
        **settings,
    }
    return ["train-vlm", "--config", "configs/vlm/tiny_align.yaml", *(f"{k}={v}" for k, v in base.items())]


@pytest.mark.parametrize("where", ["data.train_shards", "data.val_shards", "eval vlm --shards"])
def test_train_vlm_and_eval_vlm_refuse_a_pipe_shard_in_one_line(native, decoder, tmp_path, capsys, where):
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat a.tar"
    if where == "eval vlm --shards":
        command, args = "eval", ["eval", "vlm", "--model", str(native), "--shards", spec]
    else:
        command, args = "train-vlm", _train_vlm(tmp_path, **{"model.decoder": decoder, where: spec})
    capsys.readouterr()
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err, command)
    assert f"shard '{spec}': only local tar files are read" in line, line
    assert not marker.exists() and not (tmp_path / "run").exists()


def _generate_error(model: Path, tmp_path: Path, capsys) -> str:
    """What ``vision-tower generate --model MODEL`` on a 32 px image prints to stderr; it must exit 2."""
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--image", str(image)]) == 2
    return capsys.readouterr().err


def test_generate_refuses_a_vlm_whose_decoder_asks_for_its_own_code(native, tmp_path, capsys):
    marker = tmp_path / "ran"
    model = tmp_path / "custom"
    shutil.copytree(native, model)
    shutil.rmtree(model / "decoder")
    _custom_code_folder(native / "decoder", model / "decoder", marker, config=True)
    err = _generate_error(model, tmp_path, capsys)
    assert _error_line(err, "generate") == (
        f"vision-tower generate: error: {model / 'decoder'}: the model folder asks to run its own Python "
        "code (auto_map) for a class that transformers does not ship; vision-tower never runs code from "
        "model files: use a model transformers supports"
    )
    assert "trust_remote_code" not in err and not marker.exists()


@pytest.mark.parametrize("part", ["model.decoder", "model.tokenizer"])
def test_train_vlm_refuses_a_folder_asking_for_its_own_code_before_the_run(decoder, tmp_path, capsys, part):
    marker = tmp_path / "ran"
    folder = _custom_code_folder(decoder, tmp_path / "custom", marker, config=part == "model.decoder")
    if part == "model.tokenizer":
        (folder / "tokenizer.json").unlink()  # only the folder's own class could read it
    settings = {"model.decoder": decoder, part: folder}
    capsys.readouterr()
    assert main(_train_vlm(tmp_path, **settings)) == 2
    line = _error_line(capsys.readouterr().err, "train-vlm")
    assert f"{folder}: the model folder asks to run its own Python code (auto_map)" in line, line
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_generate_refuses_a_vlm_whose_decoder_weights_are_pickled(native, tmp_path, capsys):
    marker = tmp_path / "ran"
    model = tmp_path / "pickled"
    shutil.copytree(native, model)
    (model / "decoder" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(str(marker))}, model / "decoder" / "pytorch_model.bin")
    err = _generate_error(model, tmp_path, capsys)
    assert _error_line(err, "generate").startswith(
        f"vision-tower generate: error: {model / 'decoder'}: the decoder's weights are pickled "
        "(pytorch_model.bin), which vision-tower never unpickles"
    )
    assert "weights_only=False" not in err and not marker.exists()
