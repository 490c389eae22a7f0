"""Precision that follows the machine: the detection mocked both ways, explicit choices, and what
`vision-tower extract` / `eval` report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers.hardware import write_cpuinfo
from tests.helpers.hf_reference import hf_vision
from vision_tower import ImageProcessor, VisionTower, load_image
from vision_tower.cli import main
from vision_tower.features import COMPILE_MIN_BATCHES, decide_compile
from vision_tower.hardware import choose_precision, keep_freed_cpu_memory, read_cpuinfo_flags

ZEN4 = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = "fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN3 = "fpu sse2 avx avx2 fma"
SKYLAKE_X = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni"  # AVX-512 but no bf16


def test_cpuinfo_flags_are_parsed(tmp_path):
    flags = read_cpuinfo_flags(write_cpuinfo(tmp_path / "cpuinfo", SAPPHIRE_RAPIDS))
    assert {"amx_bf16", "avx512_bf16", "amx_tile"} <= flags and "flags" not in flags
    assert read_cpuinfo_flags(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "flags, dtype, named",
    [
        (ZEN4, torch.bfloat16, "avx512_bf16"),
        (SAPPHIRE_RAPIDS, torch.bfloat16, "amx_bf16"),
        (ZEN3, torch.float32, "no amx_bf16 or avx512_bf16"),
        (SKYLAKE_X, torch.float32, "no amx_bf16 or avx512_bf16"),
    ],
    ids=["zen4", "sapphire-rapids", "zen3", "skylake-x"],
)
def test_auto_follows_the_cpu_flags(cpu, flags, dtype, named):
    cpu(flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = choose_precision("auto")
    assert choice.dtype == dtype and named in choice.reason and choice.reason.startswith("auto")
    assert choice.describe().startswith(f"precision: {choice.name} (auto: ")


def test_auto_needs_onednn_for_cpu_bf16(cpu, monkeypatch):
    cpu(ZEN4)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    choice = choose_precision("auto")
    assert choice.dtype == torch.float32 and "without oneDNN" in choice.reason


def test_explicit_dtype_wins_and_slow_bf16_warns(cpu):
    cpu(ZEN3)
    with pytest.warns(UserWarning, match="bfloat16 was requested but CPU has no amx_bf16 or avx512_bf16"):
        choice = choose_precision("bfloat16")
    assert choice.dtype == torch.bfloat16 and choice.warning is not None
    cpu(ZEN4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision(torch.bfloat16).dtype == torch.bfloat16
        assert choose_precision("float32").dtype == torch.float32  # fast bf16 does not override fp32
        assert choose_precision("fp16").dtype == torch.float16
        assert choose_precision(None).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'bf17'.*bfloat16"):
        choose_precision("bf17")


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((7, 5), torch.float32)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, cpu, capability, dtype):
    cpu(ZEN3)  # the CPU does not matter for a CUDA device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    choice = choose_precision("auto", "cuda")
    assert choice.dtype == dtype and "Test GPU" in choice.reason


def test_compile_auto_from_enough_batches(monkeypatch):
    monkeypatch.setattr(
        "vision_tower.features.compile_support", lambda device=None: (True, "C++ compiler g++")
    )
    assert decide_compile(None, COMPILE_MIN_BATCHES - 1)[0] is False
    assert decide_compile(None, COMPILE_MIN_BATCHES) == (
        True,
        f"auto: {COMPILE_MIN_BATCHES} batches, C++ compiler g++",
    )
    assert decide_compile(True, 1) == (True, "requested") and decide_compile(False, 10**6)[0] is False
    monkeypatch.setattr(
        "vision_tower.features.compile_support", lambda device=None: (False, "no C++ compiler")
    )
    assert decide_compile(None, 10**6) == (False, f"auto: {10**6} batches, no C++ compiler")


def _extract(tmp_path, capsys, *extra: str):
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (40 + 7 * i, 31), (30 * i, 100, 200)).save(images / f"img{i}.png")
    out = tmp_path / "f.safetensors"
    args = ["extract", "--model", str(tmp_path / "m"), "--images", str(images), "--out", str(out)]
    assert main([*args, "--batch-size", "2", "--quiet", "--overwrite", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    with safe_open(out, "pt") as f:
        return lines, f.metadata(), f.get_tensor("patch_features"), json.loads(f.metadata()["files"])


@pytest.mark.parametrize(
    "flags, dtype", [(ZEN4, torch.bfloat16), (ZEN3, torch.float32)], ids=["zen4", "zen3"]
)
def test_extract_auto_says_what_it_picked_and_runs_in_it(cpu, tmp_path, capsys, flags, dtype):
    hf_vision(seed=41, num_hidden_layers=2).save_pretrained(tmp_path / "m")
    cpu(flags)
    lines, meta, feats, files = _extract(tmp_path, capsys)
    name = str(dtype).removeprefix("torch.")
    assert lines[0].startswith(f"precision: {name} (auto: CPU has")
    assert lines[1] == f"compile: off (auto: 2 batch(es), compiling pays from {COMPILE_MIN_BATCHES})"
    assert meta["dtype"] == name and meta["dtype_reason"].startswith("auto: CPU has")
    assert meta["compiled"] == "false"
    tower = VisionTower.from_pretrained(tmp_path / "m", dtype="auto").eval()  # the same rule in Python
    assert tower.pos_embed.dtype == dtype
    with torch.no_grad():
        expected = tower(ImageProcessor(image_size=32)([load_image(f) for f in files])).patch_features
    torch.testing.assert_close(feats, expected.float(), atol=0, rtol=0)


def test_extract_explicit_dtype_wins(cpu, tmp_path, capsys):
    hf_vision(seed=42, num_hidden_layers=1).save_pretrained(tmp_path / "m")
    cpu(ZEN4)
    lines, meta, _, _ = _extract(tmp_path, capsys, "--dtype", "float32")
    assert lines[0] == "precision: float32 (requested)" and meta["dtype"] == "float32"
    cpu(ZEN3)
    with pytest.warns(UserWarning, match="bfloat16 was requested"):
        lines, meta, _, _ = _extract(tmp_path, capsys, "--dtype", "bfloat16")
    assert meta["dtype"] == "bfloat16"


def test_eval_reports_the_precision_and_loads_the_model_in_it(cpu, tmp_path, capsys, monkeypatch):
    from training.demo import caption_corpus
    from training.tokenizer_train import train_tokenizer
    from vision_tower import SiglipModel

    torch.manual_seed(0)
    SiglipModel.from_preset("tiny").save_pretrained(tmp_path / "m")
    train_tokenizer(caption_corpus(), tmp_path / "m", vocab_size=128, max_length=16)
    for i, name in enumerate(["red circle", "blue square"]):
        (tmp_path / "zs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200 * (1 - i), 20, 200 * i)).save(tmp_path / "zs" / name / "a.png")
    loaded = []
    original = SiglipModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loaded.append(model.logit_scale.dtype)
        return model

    monkeypatch.setattr(SiglipModel, "from_pretrained", classmethod(recording))
    args = ["eval", "zero-shot", "--model", str(tmp_path / "m"), "--images", str(tmp_path / "zs")]
    for flags, extra, dtype in ((ZEN4, [], "bfloat16"), (ZEN4, ["--dtype", "float32"], "float32")):
        cpu(flags)
        assert main([*args, *extra]) == 0
        out = capsys.readouterr()
        result = json.loads(out.out)  # stdout stays one JSON document
        assert result["dtype"] == dtype and result["n"] == 2
        assert out.err.splitlines()[0].startswith(f"precision: {dtype} (")
        assert loaded[-1] == getattr(torch, dtype)


# A fresh process allocates a 30 MiB tensor and reports how many bytes glibc's mallinfo2 counts in mmapped
# blocks before and after: glibc maps a block that large by itself (its threshold starts at 128 KiB), unless
# keep_freed_cpu_memory raised the threshold to 32 MiB, when it comes from the heap (and stays there freed).
MALLINFO_SCRIPT = """
import ctypes, sys, torch
from vision_tower.hardware import keep_freed_cpu_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2
said = keep_freed_cpu_memory() if sys.argv[1] == "keep" else ""
before = mallinfo2().hblkhd
x = torch.ones(30 * 2**20 // 4)
print(mallinfo2().hblkhd - before, said, sep="|")
"""


def _mmapped_growth(mode: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", MALLINFO_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "VISION_TOWER_KEEP"))},
    ).stdout
    grown, said = out.strip().splitlines()[-1].split("|")
    return int(grown), said


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_training_keeps_freed_blocks_below_32_mib_on_the_heap():
    plain, _ = _mmapped_growth("plain")
    kept, said = _mmapped_growth("keep")
    assert plain >= 30 * 2**20  # glibc's default: its own mapping, unmapped and faulted in again each step
    assert kept == 0, said  # from the heap, reused when freed
    assert "keeps freed memory for reuse (mmap threshold 32 MiB, trim threshold 1 GiB)" in said


@pytest.mark.parametrize(
    "env, said",
    [
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "allocator: glibc malloc as set by MALLOC_TRIM_THRESHOLD_"),
        (
            {"VISION_TOWER_KEEP_FREED_MEMORY": "0"},
            "allocator: as it comes (VISION_TOWER_KEEP_FREED_MEMORY=0)",
        ),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "allocator: jemalloc (LD_PRELOAD)"),
    ],
)
def test_a_users_allocator_choice_is_left_alone(env, said, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert keep_freed_cpu_memory.__wrapped__() == said  # returns before any mallopt call
