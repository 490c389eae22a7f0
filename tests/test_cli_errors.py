"""Every expected failure of the installed `vision-tower` command is one line on stderr,
`vision-tower <cmd>: error: ...` naming the file or argument, with exit code 2 and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers.hf_reference import hf_vision
from tests.helpers.shards import write_tar

# What a command says it chose before it starts (precision, compilation, the CPU allocator): status, not
# part of the error.
STATUS_LINES = ("precision: ", "compile: ", "allocator: ")


class Evil:
    """Unpickling this runs a shell command: the weights-only loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _class_folders(root: Path, names: dict[str, int]) -> Path:
    """``{class folder: number of images}`` under ``root``."""
    for name, count in names.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(root / name / f"{i}.png")
    return root


def _cut_prompt_model(folder: Path) -> Path:
    """A tiny SiglipModel whose text tower reads 4 tokens, with the demo's tokenizer beside it:
    every shapes prompt is cut before the class name."""
    from training.demo import caption_corpus
    from training.tokenizer_train import train_tokenizer
    from vision_tower import SiglipConfig, SiglipModel, get_preset

    base = get_preset("tiny").to_dict()
    cfg = SiglipConfig.from_dict(
        {**base, "text": {**base["text"], "vocab_size": 128, "max_position_embeddings": 4}}
    )
    SiglipModel(cfg).save_pretrained(folder)
    train_tokenizer(caption_corpus(), folder, vocab_size=128, max_length=4)
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (command-line arguments, strings the error line must hold)."""
    root = tmp_path_factory.mktemp("errors")
    good = root / "good"
    hf_vision(seed=3, patch_size=8, image_size=32).save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    trunc = _copy(good, root / "trunc")
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    garbage = _copy(good, root / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not safetensors" * 8)
    badjson = _copy(good, root / "badjson")
    (badjson / "config.json").write_text('{"model_type": "siglip_vision_model",\n "hidden_size": }\n')
    fused = _copy(good, root / "fused")
    sd = load_file(good / "model.safetensors")
    (k_proj,) = [k for k in sd if k.endswith("encoder.layers.1.self_attn.k_proj.weight")]  # with or without
    sd[k_proj] = torch.zeros(48, 47)  # a prefix, as transformers 4.x / 5.x save it
    save_file(sd, fused / "model.safetensors")
    pickled = _copy(good, root / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"weight": Evil()}, pickled / "pytorch_model.bin")
    images = _class_folders(root / "images", {"red": 1})
    (root / "exists.safetensors").write_bytes(b"x")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("model:\n  preset: tiny\n data: [\n")
    templates = {
        "named.txt": "a photo of a {}\na photo of a {x}\n",
        "two.txt": "a {}{}\n",
        "empty.txt": "\n",
        "string.json": '"a photo of a {}"',
    }
    for name, text in templates.items():
        (root / name).write_text(text)
    one_class = _class_folders(root / "one", {"red_circle": 2})
    empty_class = _class_folders(root / "holes", {"red_circle": 2, "red_square": 0, "blue_star": 1})
    two = _class_folders(root / "two", {"red_circle": 1, "red_square": 1})
    cut = _cut_prompt_model(root / "cut")
    badtok = _copy(cut, root / "badtok")
    (badtok / "tokenizer_config.json").write_text('{\n  "model_max_length": 4,\n  oops\n}\n')

    (root / "notatar.tar").write_bytes(b"these bytes are not a tar archive" * 40)
    (root / "empty.tar").write_bytes(b"")
    write_tar(root / "nothing.tar", [])
    (root / "previous" / "shapes").mkdir(parents=True)  # a demo ran here before
    extract = ["extract", "--model", str(good), "--images", str(images)]
    zs = ["eval", "zero-shot", "--model", str(cut), "--images"]
    out = str(root / "never.safetensors")
    return {
        "truncated safetensors": (
            ["info", str(trunc)],
            [f"{trunc / 'model.safetensors'}: not a readable safetensors"],
        ),
        "invalid safetensors": (
            ["extract", "--model", str(garbage), "--images", str(images), "--out", out],
            [f"{garbage / 'model.safetensors'}: not a readable safetensors"],
        ),
        "corrupt config.json": (
            ["info", str(badjson)],
            [f"{badjson / 'config.json'}: invalid JSON at line 2, column"],
        ),
        "corrupt tokenizer_config.json": (
            [*zs, str(two), "--tokenizer", str(badtok)],
            [f"{badtok / 'tokenizer_config.json'}: invalid JSON at line 3"],
        ),
        "wrong-shape fused attention": (
            ["convert", str(fused), str(root / "out1")],
            ["encoder.layers.1.self_attn.{q,k,v}_proj.weight differ in shape", "k_proj': (48, 47)"],
        ),
        "refused pickle": (
            ["info", str(pickled)],
            [f"{pickled / 'pytorch_model.bin'}: refused to unpickle", "system"],
        ),
        "batch size 0": (
            [*extract, "--out", out, "--batch-size", "0"],
            ["argument --batch-size: must be a positive integer, got 0"],
        ),
        "batch size -1": (
            [*extract, "--out", out, "--batch-size", "-1"],
            ["argument --batch-size: must be a positive integer, got -1"],
        ),
        "image size 0": (
            ["convert", str(good), str(root / "out2"), "--image-size", "0"],
            ["argument --image-size: must be a positive"],
        ),
        "image size -16": (
            [*extract, "--out", out, "--image-size", "-16"],
            ["argument --image-size: must be a positive integer, got -16"],
        ),
        "image size off the patch grid": (
            ["convert", str(good), str(root / "out3"), "--image-size", "33"],
            ["image_size 33 is not a positive multiple of the patch size 8", "32 or 40"],
        ),
        "non-integer layer": (
            [*extract, "--out", out, "--layer", "1.5"],
            ["argument --layer: invalid int value: '1.5'"],
        ),
        "output is a folder": ([*extract, "--out", str(root)], [f"--out {root} is a folder"]),
        "output exists": (
            [*extract, "--out", str(root / "exists.safetensors")],
            ["exists.safetensors already exists", "--overwrite"],
        ),
        "output folder not empty": (
            ["convert", str(good), str(good)],
            [f"{good} is a folder that is not empty"],
        ),
        "cuda without cuda": (
            [*extract, "--out", out, "--device", "cuda"],
            ["--device cuda: CUDA is not available"],
        ),
        "unknown device": ([*extract, "--out", out, "--device", "tpu"], ["--device tpu: not a device torch"]),
        "demo over a previous demo": (
            ["demo", "--out", str(root / "previous")],
            [f"{root / 'previous'} already holds a demo (shapes)", "--overwrite"],
        ),
        "no shard is a tar": (
            [
                "pretrain",
                "--config",
                "configs/pretrain/demo_tiny.yaml",
                f"data.train_shards={root / 'notatar.tar'}",
                f"run.out_dir={root / 'run'}",
            ],
            [f"data.train_shards: no shard holds a sample: {root / 'notatar.tar'} is not a tar archive"],
        ),
        "empty shard (pretrain)": (
            [
                "pretrain",
                "--config",
                "configs/pretrain/demo_tiny.yaml",
                f"data.train_shards={root / 'empty.tar'}",
                f"run.out_dir={root / 'run'}",
            ],
            [f"data.train_shards: no shard holds a sample: {root / 'empty.tar'} is not a tar archive (empty"],
        ),
        **{
            f"{what} (train-vlm)": (
                [
                    "train-vlm",
                    "--config",
                    "configs/vlm/tiny_align.yaml",
                    f"data.train_shards={shards}",
                    "data.val_shards=null",
                    f"run.out_dir={root / 'run'}",
                ],
                [f"data.train_shards: no shard holds a sample: {first} is {why}"],
            )
            for what, shards, first, why in [
                ("no shard is a tar", root / "notatar.tar", root / "notatar.tar", "not a tar archive"),
                ("empty shard", root / "empty.tar", root / "empty.tar", "not a tar archive (empty file)"),
                ("tar without members", root / "nothing.tar", root / "nothing.tar", "a tar archive without"),
                (
                    "every shard bad",
                    f"{root / 'notatar.tar'}::{root / 'empty.tar'}",
                    root / "notatar.tar",
                    "not a tar archive (invalid header) (and the 1 other shard(s) likewise)",
                ),
            ]
        },
        "corrupt yaml": (["pretrain", "--config", str(bad_yaml)], [f"{bad_yaml} line 3: not valid YAML"]),
        "template {x}": (
            [*zs, str(two), "--templates", str(root / "named.txt")],
            [f"{root / 'named.txt'}: template 'a photo of a {{x}}'"],
        ),
        "template {}{}": (
            [*zs, str(two), "--templates", str(root / "two.txt")],
            [f"{root / 'two.txt'}: template 'a {{}}{{}}'"],
        ),
        "empty templates": (
            [*zs, str(two), "--templates", str(root / "empty.txt")],
            [f"{root / 'empty.txt'}: no templates"],
        ),
        "templates as a JSON string": (
            [*zs, str(two), "--templates", str(root / "string.json")],
            [f"{root / 'string.json'}: expected a JSON list of templates", "got a str"],
        ),
        "one class": ([*zs, str(one_class)], ["1 class folder(s) ['red_circle']", "needs at least two"]),
        "class without images": (
            [*zs, str(empty_class)],
            ["class folder(s) without images", "['red_square']"],
        ),
        "prompts cut alike": (
            [*zs, str(two)],
            [
                "classes ['red circle', 'red square'] get identical token ids",
                "cut at the tokenizer's max_length (4",
            ],
        ),
    }


# Cases also run through the installed console script (each start imports torch, so the rest run in this
# process through the same `main` the script calls): an error of each kind (a file, an argument that
# argparse refuses, a training command's config).
THROUGH_THE_SCRIPT = ("truncated safetensors", "batch size 0", "corrupt yaml")


def _run_script(args: list[str]) -> tuple[int, str]:
    exe = shutil.which("vision-tower")
    assert exe, "the vision-tower console script is not on PATH: install the package (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stderr


def _run_here(args: list[str], capsys) -> tuple[int, str]:
    """`main(args)` as the console script runs it: its return value or argparse's SystemExit is the exit
    code; an exception escaping `main` would be the script's traceback."""
    from vision_tower.cli import main

    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exit_:
        rc = exit_.code
    except Exception:  # noqa: BLE001 - the script would print a traceback: report it as one
        import traceback

        return 1, capsys.readouterr().err + "Traceback (in process)\n" + traceback.format_exc()
    return rc, capsys.readouterr().err


def _is_one_line_error(command: str, rc: int, stderr: str, wanted: list[str]) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(STATUS_LINES)]
    last = lines[-1] if lines else ""
    usage = any(line.startswith("usage: vision-tower") for line in lines)  # argparse's own errors
    return (
        rc == 2
        and "Traceback" not in stderr
        and last.startswith(f"vision-tower {command}: error: ")
        and all(w in last for w in wanted)
        and (usage or len(lines) == 1)
        and "weights_only=False" not in stderr
    )


def test_every_expected_failure_is_one_line_with_exit_code_2(cases, capsys):
    if torch.cuda.is_available():
        cases = {k: v for k, v in cases.items() if k != "cuda without cuda"}
    failures = []
    for name, (args, wanted) in cases.items():
        runs = [("in process", *_run_here(args, capsys))]
        if name in THROUGH_THE_SCRIPT:
            runs.append(("console script", *_run_script(args)))
        for how, rc, stderr in runs:
            if not _is_one_line_error(args[0], rc, stderr, wanted):
                failures.append(f"{name} ({how}): exit {rc}, stderr:\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_a_bare_key_error_is_a_bug_and_keeps_its_traceback(monkeypatch, capsys):
    """Unknown names ("unknown preset 'x'; known presets: ...") are one line; a KeyError that only names a
    missing key (a bug such as metrics["top5"]) must not pass for a user's mistake."""
    import argparse

    from vision_tower import cli

    def command_raising(err: KeyError):
        def run(args):
            raise err

        class Parser:
            def parse_known_args(self, argv):
                return argparse.Namespace(command="info", func=run), []

        return Parser

    monkeypatch.setattr(
        cli, "build_parser", command_raising(KeyError("unknown preset 'x'; known presets: tiny"))
    )
    assert cli.main([]) == 2
    assert (
        capsys.readouterr().err.strip() == "vision-tower info: error: unknown preset 'x'; known presets: tiny"
    )
    monkeypatch.setattr(cli, "build_parser", command_raising(KeyError("top5")))
    with pytest.raises(KeyError, match="top5"):
        cli.main([])


@pytest.mark.parametrize(
    "rank, diverged, agreed, wanted",
    [
        ("0", False, False, "vision-tower info: error: bad shard x.tar"),
        ("1", False, False, ""),  # the same input on every rank: rank 0 says it
        ("1", True, False, "vision-tower info: error: rank 1: bad shard x.tar"),  # this rank's own data
        ("1", True, True, ""),  # agreed over the ranks: rank 0 says it
        ("0", True, True, "vision-tower info: error: bad shard x.tar"),
    ],
)
def test_under_a_launcher_one_rank_says_an_error_every_rank_meets(
    monkeypatch, capsys, rank, diverged, agreed, wanted
):
    import argparse

    from vision_tower import cli, errors

    def run(args):
        err = ValueError("bad shard x.tar")
        raise errors.agreed(err) if agreed else err

    class Parser:
        def parse_known_args(self, argv):
            return argparse.Namespace(command="info", func=run), []

    monkeypatch.setattr(cli, "build_parser", Parser)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setitem(errors._state, "diverged", diverged)
    assert cli.main([]) == 2  # every rank exits with 2, whichever says the line
    assert capsys.readouterr().err.strip() == wanted


@pytest.mark.parametrize("command", ["pretrain", "train-vlm"])
def test_shards_whose_every_sample_is_bad_stop_the_run_in_one_line(tmp_path, capsys, command):
    """Readable tars whose every image is broken: found once the run has started (1001 skips in a row), said
    in one line after the progress bar, not as the DataLoader's traceback."""
    from tests.helpers import vlm_reference as R

    members = [m for i in range(3) for m in [(f"s{i}.png", b"not a png"), (f"s{i}.txt", b"a red circle")]]
    shard = write_tar(tmp_path / "bad-0.tar", members)
    settings = {"data.train_shards": shard, "data.val_shards": "null", "data.num_workers": 0}
    settings.update({"run.out_dir": tmp_path / "run", "run.steps": 1})
    if command == "pretrain":
        from training.demo import caption_corpus
        from training.tokenizer_train import train_tokenizer

        train_tokenizer(caption_corpus(), tmp_path / "tok", vocab_size=128, max_length=16)
        settings.update({"data.tokenizer": tmp_path / "tok", "data.zeroshot_dir": "null"})
        config = "configs/pretrain/demo_tiny.yaml"
    else:
        decoder = R.decoder_folder("gemma", tmp_path / "decoder", seed=3)
        settings.update({"model.tower": "preset:tiny", "model.decoder": decoder, "model.tokenizer": "null"})
        config = "configs/vlm/tiny_align.yaml"
    rc, err = _run_here([command, "--config", config, *(f"{k}={v}" for k, v in settings.items())], capsys)
    head = f"vision-tower {command}: error: "
    assert rc == 2 and err.count(head) == 1 and "Traceback" not in err, err[-3000:]
    line = err[err.index(head) :].splitlines()[0]
    assert line.startswith(f"{head}1001 samples in a row were skipped, the last one s"), line
    assert f" in {shard}: bad_image " in line, line
    assert line.endswith("; check the shards, the image decoder and the transforms"), line
