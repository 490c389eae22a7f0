"""A core install (`pip install .`, no extras) runs the tower commands (`info`, `extract`, `convert`) and,
for a command that needs an extra, says in one line which extra to install before doing any work.

The core environment is built from the package's own metadata: the installed distributions that the core
requirements reach (torch, safetensors, huggingface_hub, ...) and nothing else, linked into one folder,
plus the package installed from its source with `pip install --no-deps --target`. The interpreter runs
with `-S`, so the test environment's site-packages (transformers, DeepSpeed, ...) is not on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.test_wheel import _copy_source

pytestmark = pytest.mark.slow


def _closure(extra: str = "", dist: str = "vision-tower") -> dict[str, metadata.Distribution]:
    """The installed distributions that ``dist``'s requirements reach with ``extra`` (none: the core).
    An extra that includes another (``vision-tower[connectors]``) is followed too."""
    extras = {extra}
    while True:  # the extras that ``extra`` includes, transitively
        more = {
            e
            for r in map(Requirement, metadata.requires(dist) or [])
            if r.name.lower() == dist
            and r.marker is not None
            and any(r.marker.evaluate({"extra": x}) for x in extras)
            for e in r.extras
        }
        if more <= extras:
            break
        extras |= more
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), extras) for r in metadata.requires(dist) or []]
    while todo:
        req, wanted = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name == dist or (
            req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted)
        ):
            continue
        if name in found:
            continue
        found[name] = metadata.distribution(req.name)
        todo.extend((Requirement(r), {""}) for r in found[name].requires or [])
    return found


def _link_site(dst: Path, extra: str = "") -> None:
    """Link every top-level file and folder that the closure of ``extra`` installed into ``dst``."""
    dst.mkdir(parents=True)
    for d in _closure(extra).values():
        base = Path(d.locate_file(""))
        for f in d.files or []:
            top = f.parts[0]
            if top == ".." or top.endswith(".pth") or (dst / top).exists():
                continue
            if (base / top).exists():
                (dst / top).symlink_to(base / top)


def _environment(tmp: Path, extra: str = ""):
    """``run(*args)`` runs the installed ``vision-tower`` (``run(module=code)``: python code) with only the
    package and the closure of ``extra`` importable; returns ``(run, work folder)``."""
    deps, site, src = tmp / "deps", tmp / "site", tmp / "src"
    _link_site(deps, extra)
    _copy_source(src)  # pip builds in the source folder: a copy keeps the checkout clean
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q"]
        + ["--target", str(site), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(deps)]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    work = tmp / "work"
    work.mkdir()

    def run(*args: str, module: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-S"] + (
            ["-c", module] if module else [str(site / "bin" / "vision-tower"), *args]
        )
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    return run, work


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return _environment(tmp_path_factory.mktemp("core"))


def test_the_core_environment_holds_no_extra(core):
    run, _ = core
    probe = run(
        module="import importlib.util as u; "
        "print(sorted(m for m in ('transformers', 'deepspeed', 'webdataset', 'peft', 'accelerate', 'torch') "
        "if u.find_spec(m)))"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "['torch']"


def test_core_install_runs_info_extract_and_convert(core):
    run, work = core
    info = run("info", "preset:tiny")
    assert info.returncode == 0, info.stderr
    assert "image tower" in info.stdout and "token grid" in info.stdout

    images = work / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40 + 8 * i, 32), colour).save(images / f"{i}.png")
    out = work / "feats.safetensors"
    extract = run("extract", "--model", "preset:tiny", "--images", str(images), "--out", str(out), "--quiet")
    assert extract.returncode == 0, extract.stderr[-3000:]
    assert out.is_file() and "3 images, 0 skipped" in extract.stdout

    convert = run("convert", "preset:tiny", str(work / "timm"), "--to", "timm")
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert (work / "timm" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["pretrain", "--config", "configs/pretrain/demo_tiny.yaml"], "train"),
        (["demo", "--out", "demo-out"], "train"),
        (["eval", "vlm", "--model", "m", "--shards", "s"], "train"),
        (["extract", "--model", "preset:tiny", "--shards", "s", "--out", "cache"], "train"),
        (["generate", "--model", "m", "--image", "i.png"], "connectors"),
    ],
)
def test_a_command_that_needs_an_extra_names_it_before_any_work(core, argv, extra):
    run, work = core
    before = sorted(p.name for p in work.iterdir())
    result = run(*argv)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vision-tower {argv[0]}: error: ")
    assert f"[{extra}] extra" in lines[0]
    assert f'pip install "vision-tower[{extra}]"' in lines[0]
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written


def test_connectors_install_reads_a_sentencepiece_only_tokenizer(tmp_path):
    """`pip install ".[connectors]"` reads a decoder tokenizer folder that holds only the sentencepiece
    `tokenizer.model` (as Gemma and Llama folders without tokenizer.json, and the demo's decoder tokenizer
    before it is saved): transformers converts it to a fast tokenizer, which needs protobuf. The README's
    main job failed here when protobuf came only with [dev]."""
    import io
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle", "a blue square", "a green star"] * 20),
        model_writer=model,
        vocab_size=40,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
        **dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
        **dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>"),
    )
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))

    run, _ = _environment(tmp_path / "env", "connectors")
    code = (
        "import importlib.util as u; from connectors.decoder import load_tokenizer; "
        f"t = load_tokenizer({str(folder)!r}); ids = t('a red circle', "
        "add_special_tokens=False)['input_ids']; "
        "print([m for m in ('deepspeed', 'webdataset') if u.find_spec(m)], t.decode(ids))"
    )
    result = run(module=code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[] a red circle"
