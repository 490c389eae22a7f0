"""`vision-tower generate` and `vision-tower info` on VLM checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from connectors import VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import make_assets, png
from training.demo.shapes import make_sample
from vision_tower import ImageProcessor
from vision_tower.cli import main


def _vlm(tmp_path, family="gemma", connector="linear", attention="prefix", layer=-1, tokenizer=True):
    folder = R.decoder_folder(family, tmp_path / "dec", seed=21)
    if not tokenizer:
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()
    tower = R.tower(seed=22)
    tower.feature_layer = layer
    vlm = VisionLanguageModel(
        tower, connector, folder, attention=attention, processor=ImageProcessor(image_size=32)
    )
    R.randomize_(vlm.connector, seed=23, scale=0.5)
    return vlm


def test_generate_prints_the_greedy_continuation_of_image_and_prompt(tmp_path, capsys):
    vlm = _vlm(tmp_path)
    vlm.save_pretrained(tmp_path / "pg", format="paligemma")
    capsys.readouterr()  # what saving printed (DeepSpeed's import warning) is not the command's
    image = tmp_path / "cat.png"
    Image.new("RGB", (50, 40), (200, 120, 30)).save(image)
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "pg"),
                "--image",
                str(image),
                "--prompt",
                "caption en",
                "--max-new-tokens",
                "5",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip()

    tok = vlm.tokenizer
    words = tok.convert_tokens_to_ids(["caption", "en"])
    ids = torch.tensor([[vlm.image_token_id] * 16 + [tok.bos_token_id, *words]])  # PaliGemma's layout
    pixels = ImageProcessor(image_size=32)([Image.open(image)])
    expected = vlm.generate(pixels, input_ids=ids, max_new_tokens=5)
    assert printed == tok.decode(expected[0], skip_special_tokens=True) and printed
    # the sampling flags reach generate: top-k 1 draws the greedy tokens; a penalty and sampling run
    base = ["generate", "--model", str(tmp_path / "pg"), "--image", str(image), "--prompt", "caption en"]
    base += ["--max-new-tokens", "5", "--dtype", "float32"]
    assert main([*base, "--sample", "--top-k", "1", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    flags = [
        "--sample",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.3",
        "--seed",
        "4",
    ]
    assert main([*base, *flags]) == 0 and capsys.readouterr().out.strip() != ""
    assert main([*base, "--top-p", "0.9"]) == 2  # shaping a draw without --sample
    assert "pass do_sample=True (--sample)" in capsys.readouterr().err


def test_generate_without_tokenizer_files_says_so(tmp_path, capsys):
    vlm = _vlm(tmp_path, tokenizer=False)
    vlm.save_pretrained(tmp_path / "n")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["generate", "--model", str(tmp_path / "n"), "--image", str(image)]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_info_describes_vlm_checkpoints_of_every_format(tmp_path, capsys):
    vlm = _vlm(tmp_path, family="qwen2", connector="mlp2x_gelu", attention="causal", layer=-2)
    vlm.save_pretrained(tmp_path / "llava", format="llava")
    vlm.replace_tower(R.tower(seed=24, image_size=64), "pixel_shuffle")
    vlm.save_pretrained(tmp_path / "native")
    assert main(["info", str(tmp_path / "llava")]) == 0
    out = capsys.readouterr().out
    for text in [
        "llava layout",
        "feature layer: -2",
        "connector: mlp 32 -> 64",
        "act=gelu",
        "tokens per image: 16",
        "decoder: qwen2, 2 layers, width 64, vocabulary 260",
        "attention: causal",
    ]:
        assert text in out, out
    assert main(["info", str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out
    assert (
        "native layout" in out and "64 px -> 8x8 tokens" in out and "connector: pixel_shuffle 32 -> 64" in out
    )
    assert "tokens per image: 16" in out, out
    vlm.tower.save_pretrained(tmp_path / "tower")  # a tower alone is still described as before
    assert main(["info", str(tmp_path / "tower")]) == 0
    assert "(image tower)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- eval vlm on awkward shards
@pytest.fixture(scope="module")
def demo_vlm(tmp_path_factory) -> Path:
    """A native VLM folder whose decoder has the demo's word-level tokenizer (it holds `<image>` and
    `<eos>` as words of its vocabulary)."""
    root = tmp_path_factory.mktemp("demo-vlm")
    assets = make_assets(root / "assets", n_train=8, n_val=8)
    vlm = VisionLanguageModel(
        R.tower(seed=25), "linear", assets["decoder"], processor=ImageProcessor(image_size=32)
    )
    vlm.save_pretrained(root / "native")
    return root / "native"


def _qa_shard(path: Path, pairs: list[tuple[str, str]]) -> Path:
    members = []
    for i, (prompt, answer) in enumerate(pairs):
        members.append((f"s{i}.png", png(make_sample("val", i, image_size=32).image)))
        members.append((f"s{i}.json", json.dumps({"prompt": prompt, "answer": answer}).encode()))
    return write_tar(path, members)


def _eval(model: Path, shard: Path, capsys, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", "vlm", "--model", str(model), "--shards", str(shard), "--dtype", "float32", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if f"vision-tower {command}: error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0][lines[0].index("vision-tower") :]


def test_eval_vlm_reads_image_and_eos_written_in_the_text_as_text(demo_vlm, tmp_path, capsys):
    """Once the image-token count of every row failed ("input_ids hold 17 image tokens ... the images give
    16"): now both samples are evaluated."""
    shard = _qa_shard(
        tmp_path / "val.tar", [("caption <image>", "a <image> red"), ("what <eos> is", "a <eos> b")]
    )
    code, out, err = _eval(demo_vlm, shard, capsys)
    assert code == 0, err[-3000:]
    assert json.loads(out)["eval_samples"] == 2


def test_eval_vlm_names_why_every_sample_was_skipped(demo_vlm, tmp_path, capsys):
    bad = write_tar(tmp_path / "bad.tar", [("s0.png", b"not a png"), ("s0.txt", b"red"), ("s1.txt", b"red")])
    twice = _qa_shard(tmp_path / "twice.tar", [("<image> and <image>", "red")])
    code, _, err = _eval(demo_vlm, f"{bad}::{twice}", capsys)
    assert code == 2
    assert _error(err, "eval") == (
        f"vision-tower eval: error: no usable held-out sample in '{bad}::{twice}': every sample was skipped "
        "(1 bad_caption, 1 bad_image, 1 missing_image)"
    )


def test_eval_vlm_names_its_own_max_length_option(demo_vlm, tmp_path, capsys):
    shard = _qa_shard(tmp_path / "val.tar", [("what colour", "red")])
    code, _, err = _eval(demo_vlm, shard, capsys, "--max-length", "5")
    assert code == 2
    assert _error(err, "eval").startswith("vision-tower eval: error: --max-length 5 leaves no room for text")


def test_generate_refuses_a_device_torch_does_not_know(demo_vlm, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["generate", "--model", str(demo_vlm), "--image", str(image), "--device", "tpu"]) == 2
    assert _error(capsys.readouterr().err, "generate") == (
        "vision-tower generate: error: --device tpu: not a device torch knows (cpu, cuda, cuda:N, mps, ...)"
    )


def test_generate_refuses_a_prompt_with_two_image_tokens_and_one_image(demo_vlm, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    args = ["generate", "--model", str(demo_vlm), "--image", str(image), "--prompt", "<image> a <image>"]
    assert main(args) == 2
    assert _error(capsys.readouterr().err, "generate") == (
        "vision-tower generate: error: 1 image(s) for prompts that take 2 ([2]): a prompt takes one image "
        "per <image> it writes, one if it writes none"
    )
