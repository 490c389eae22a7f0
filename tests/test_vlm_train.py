"""VLM training end to end under DeepSpeed: stage align then stage finetune, single-process from the
command line and on 2 gloo ranks under ZeRO-2 and ZeRO-3 (each followed by a tower swap,
configs/vlm/swap_tower.yaml); losses go down, frozen parts stay bit for bit,
the optimizer holds only what trains, a killed align run resumes to the same losses, and the exported
model evaluates from the command line as it did at the end of training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.distributed import kill_at_checkpoint, run_ranks, small_run, start_run
from tests.helpers.vlm_data import TOWER_B, make_assets
from tests.helpers.vlm_workers import losses, stages_worker
from training.runner.launch import launch_env
from training.runner.paths import ROOT
from vision_tower import VisionTower
from vision_tower.cli import main

pytestmark = pytest.mark.distributed
ALIGN = ROOT / "configs" / "vlm" / "tiny_align.yaml"
FINETUNE = ROOT / "configs" / "vlm" / "tiny_finetune.yaml"
EVAL = {
    "data.max_length": 40,
    "data.eval_samples": 11,
    "data.eval_batch_size": 5,
    "data.eval_max_new_tokens": 5,
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("vlm"))


def _eval_vlm(model: Path, assets: dict, max_length: int = 40) -> int:
    """``vision-tower eval vlm`` of a saved VLM on the held-out shards, with the training run's settings."""
    args = ["--max-samples", "11", "--batch-size", "5", "--max-new-tokens", "5"]
    args += ["--max-length", str(max_length)]
    return main(
        ["eval", "vlm", "--model", str(model), "--shards", assets["val"], *args, "--dtype", "float32"]
    )


def settings(assets: dict, out: Path, stage: str, **extra) -> list[str]:
    base = {
        "data.train_shards": assets["train"],
        "data.val_shards": assets["val"],
        **small_run(out),
        "run.save_every": 0,
        "optim.warmup_steps": 0,
        "optim.min_lr_ratio": 1.0,
        **EVAL,
    }
    if stage == "align":
        base.update(
            {
                "model.tower": assets["tower"],
                "model.decoder": assets["decoder"],
                "model.tokenizer": "null",
                "optim.lr": 3e-2,
            }
        )
    else:
        base.update({"optim.lr": 3e-3})
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def command(stage: str, overrides: list[str]) -> list[str]:
    """`vision-tower train-vlm` as one plain process (no launcher)."""
    config = ALIGN if stage == "align" else FINETUNE
    return [sys.executable, "-m", "vision_tower.cli", "train-vlm", "--config", str(config), *overrides]


def run(cmd: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def decreasing(values: list[float]) -> bool:
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k < sum(values[:k]) / k


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(a: dict, b: dict, keys=None) -> None:
    keys = sorted(a) if keys is None else keys
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert different == [], different[:5]


NEWLINE = "layout_params.image_newline"


def anyres(assets: dict) -> dict:
    """A stage in LLaVA-NeXT's image layout on the sized shard: wide, tall and large images, each cut into
    its own crops (36 to 88 image tokens for the 32 px tower)."""
    return {"model.image_layout": "anyres", "data.train_shards": assets["sized"], "data.max_length": 100}


def assert_anyres_export(native: Path) -> torch.Tensor:
    """The native export records the anyres layout and holds its image_newline (64,), returned."""
    assert json.loads((native / "config.json").read_text())["image_layout"]["name"] == "anyres"
    newline = load_file(native / "layout.safetensors")
    assert list(newline) == ["image_newline"] and newline["image_newline"].shape == (64,)
    return newline["image_newline"]


LEAN = ["data.num_workers=0", "export.formats=[native]"]  # 2 ranks on 2 cores: no loader processes
ALIGN_STEPS = {"run.steps": 16, "run.save_every": 4, "run.keep_checkpoints": 8}


def two_stages(assets: dict, a: Path, f: Path, align: dict, finetune: dict, *extra: str):
    """Settings of a 6-step align into ``a``, then a 6-step finetune into ``f`` from align's native export,
    each lean on 2 cores and ending in ``extra``."""
    first = settings(assets, a, "align", **{"run.steps": 6, **align})
    init = a / "export" / "native"
    second = settings(assets, f, "finetune", **{"run.steps": 6, "model.init_from": init, **finetune})
    return [*first, *LEAN, *extra], [*second, *LEAN, *extra]


def swap_stage(assets: dict, f: Path, s: Path, deepspeed: str, *extra: str) -> list[str]:
    """Settings of configs/vlm/swap_tower.yaml: a 6-step align into ``s`` of a fresh connector between
    finetune's decoder (from its native export) and a tower of another width and patch size (48 wide, 16 px
    patches at 48 px: 3x3 tokens instead of 4x4)."""
    tower = s.parent / "tower_b"
    VisionTower.from_preset("tiny", use_head=False, **TOWER_B).save_pretrained(tower)
    values = {"run.steps": 6, "model.init_from": f / "export" / "native", "model.tower": tower}
    swap = settings(assets, s, "finetune", **values, **{"optim.lr": 3e-2, "run.deepspeed": deepspeed})
    return [*swap, *LEAN, *extra]


def assert_swapped(r: dict, f: Path, s: Path) -> None:
    """The swap stage trained its connector alone (with the anyres layout's image_newline, kept from
    finetune), kept finetune's decoder bit for bit, and recorded it."""
    assert decreasing(r["swap"]["losses"]), r["swap"]
    held = set(r["swap"]["held"])
    assert NEWLINE in held and held - {NEWLINE} and all(k.startswith("connector.") for k in held - {NEWLINE})
    native = s / "export" / "native"
    assert_same(weights(native / "decoder"), weights(f / "export" / "native" / "decoder"))
    record = json.loads((native / "tower_swap.json").read_text())
    assert (record["replaced"]["tokens_per_image"], record["now"]["tokens_per_image"]) == (16, 9)
    assert load_file(native / "connector.safetensors")["proj.weight"].shape == (64, TOWER_B["hidden_size"])


@pytest.fixture(scope="module")
def align_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "run"
    run(command("align", settings(assets, out, "align", **ALIGN_STEPS)))
    return out


def test_align_trains_the_connector_and_leaves_tower_and_decoder_bit_for_bit(assets, align_run):
    assert decreasing(losses(str(align_run))), losses(str(align_run))
    native = align_run / "export" / "native"
    assert_same(weights(native / "tower"), weights(Path(assets["tower"])))
    decoder, source = weights(native / "decoder"), weights(Path(assets["decoder"]))
    assert decoder.keys() == source.keys()
    assert_same(decoder, source)
    # the connector moved: every tensor differs from its initial value (seed 0 builds the same one)
    from training.runner import Zero
    from training.tasks.vlm_config import load_vlm_config
    from training.tasks.vlm_model import build_stage_model

    torch.manual_seed(0)
    cfg = load_vlm_config(ALIGN, settings(assets, align_run, "align"))
    init = build_stage_model(
        cfg, Zero(0, {"bf16": {"enabled": False}}), torch.float32
    ).vlm.connector.state_dict()
    trained = load_file(native / "connector.safetensors")
    assert trained.keys() == init.keys() and all(not torch.equal(trained[k], init[k]) for k in init)
    final = json.loads((align_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and {"val_loss", "exact_match", "eval_samples"} <= final.keys()
    assert (
        json.loads((align_run / "export" / "paligemma" / "config.json").read_text())["model_type"]
        == "paligemma"
    )
    assert not (align_run / "export" / "llava").exists()  # prefix attention, final layer: not LLaVA's


def test_killed_align_run_resumes_to_the_same_losses(assets, align_run, tmp_path):
    out = tmp_path / "killed"
    cmd = command("align", settings(assets, out, "align", **ALIGN_STEPS))
    proc = start_run(cmd)
    kill_at_checkpoint(proc, out, "step00000004")
    assert len(losses(str(out))) < 16, "the run finished before it was killed"
    run([*cmd, "--resume"])
    full, resumed = losses(str(align_run)), losses(str(out))
    assert len(resumed) == 16
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)


def test_lora_finetune_from_align_and_eval_of_the_export(assets, align_run, tmp_path, capsys):
    out = tmp_path / "lora"
    overrides = settings(
        assets,
        out,
        "finetune",
        **{
            "run.steps": 8,
            "model.init_from": align_run / "export" / "native",
            "finetune.decoder": "lora",
            "finetune.lora.target_modules": "[q_proj, v_proj]",
        },
    )
    run(command("finetune", overrides))
    assert decreasing(losses(str(out))), losses(str(out))
    native = out / "export" / "native"
    before = weights(align_run / "export" / "native" / "decoder")
    after = weights(native / "decoder")
    assert after.keys() == before.keys()  # adapters merged: plain names
    targeted = [k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targeted) == 4 and all(not torch.equal(after[k], before[k]) for k in targeted)
    assert_same(after, before, [k for k in before if k not in targeted])  # embeddings, norms, k/o/mlp
    assert_same(weights(native / "tower"), weights(Path(assets["tower"])))
    # the saved model evaluates from the command line as it did at the end of training
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    code = _eval_vlm(native, assets)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_samples"] == final["eval_samples"] == 11
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert result["exact_match"] == final["exact_match"]


def test_two_ranks_zero2_anyres_align_then_full_finetune_with_the_tower_at_its_own_rate_then_a_swap(
    assets, tmp_path
):
    """Stage align in LLaVA-NeXT's anyres layout (images of three sizes): its image_newline trains with the
    connector and is saved; finetune and swap keep the saved layout."""
    a, f, s = tmp_path / "align", tmp_path / "finetune", tmp_path / "swap"
    tower = {"finetune.tower": "true", "finetune.tower_lr": 1e-4, "model.gradient_checkpointing": "true"}
    tower["data.max_length"] = 100  # the saved anyres layout: 36 tokens for the 32 px shapes images
    zero2 = "configs/deepspeed/zero2.json"
    align, finetune = two_stages(assets, a, f, {"run.deepspeed": zero2, **anyres(assets)}, tower)
    swap = swap_stage(assets, f, s, zero2)
    results = run_ranks(stages_worker, 2, align, finetune, swap, timeout=400, backend=None)
    r = results[0]
    assert_swapped(r, f, s)
    assert decreasing(r["align"]["losses"]) and decreasing(r["finetune"]["losses"]), r
    connector = set(r["align"]["held"]) - {NEWLINE}
    assert NEWLINE in r["align"]["held"] and connector and all(k.startswith("connector.") for k in connector)
    assert not r["align"]["partitioned"]  # ZeRO-2 keeps whole parameters
    held = r["finetune"]["held"]
    assert {k for k, lr in held.items() if lr == 1e-4} == {k for k in held if k.startswith("tower.")} != set()
    assert any(k.startswith("decoder.") for k in held) and connector | {NEWLINE} <= held.keys()
    assert_same(weights(a / "export" / "native" / "decoder"), weights(Path(assets["decoder"])))
    tower_before, tower_after = weights(Path(assets["tower"])), weights(f / "export" / "native" / "tower")
    assert tower_after.keys() == tower_before.keys()
    assert all(not torch.equal(tower_after[k], tower_before[k]) for k in tower_before if "weight" in k)
    # image_newline moved from its initial value in align (seed 0 draws the same one) and again in finetune
    from training.runner import Zero
    from training.tasks.vlm_config import load_vlm_config
    from training.tasks.vlm_model import build_stage_model

    torch.manual_seed(0)
    cfg = load_vlm_config(ALIGN, align)
    init = build_stage_model(cfg, Zero(0, {"bf16": {"enabled": False}}), torch.float32).vlm.layout_params
    aligned = assert_anyres_export(a / "export" / "native")
    assert (aligned - init["image_newline"].detach()).abs().max() > 1e-3
    finetuned = assert_anyres_export(f / "export" / "native")
    assert (finetuned - aligned).abs().max() > 1e-3
    assert_anyres_export(s / "export" / "native")


def test_two_ranks_zero3_align_from_the_feature_cache_then_anyres_lora_finetune_then_a_swap(
    assets, tmp_path, capsys
):
    """Align in the fixed layout from the feature cache, then LLaVA-NeXT's stage 2: a LoRA finetune that
    switches to anyres (a fresh image_newline, partitioned and trained with the connector)."""
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "extract",
                "--model",
                assets["tower"],
                "--shards",
                assets["train"],
                "--out",
                str(cache),
                "--quiet",
            ]
        )
        == 0
    )
    assert "wrote the feature cache" in capsys.readouterr().out
    a, f = tmp_path / "align", tmp_path / "finetune"
    zero3 = {"run.deepspeed": "configs/deepspeed/zero3.json", "model.gradient_checkpointing": "true"}
    lora = {"finetune.decoder": "lora", "run.deepspeed": zero3["run.deepspeed"], **anyres(assets)}
    # fp32, not auto: the in-training evaluation is compared with `eval vlm --dtype float32` below, and auto
    # trains and evaluates under bf16 autocast on a CPU with bf16 matmul
    from_cache = {"data.feature_cache": cache, **zero3}
    align, finetune = two_stages(assets, a, f, from_cache, lora, "run.precision=fp32")
    s = tmp_path / "swap"
    swap = swap_stage(assets, f, s, zero3["run.deepspeed"], "run.precision=fp32")
    results = run_ranks(stages_worker, 2, align, finetune, swap, timeout=400, backend=None)
    r = results[0]
    assert_swapped(r, f, s)
    assert r["swap"]["partitioned"]  # the kept decoder never whole on a rank
    assert decreasing(r["align"]["losses"]) and decreasing(r["finetune"]["losses"]), r
    assert all(k.startswith("connector.") for k in r["align"]["held"])
    # the decoder (and finetune's image_newline) never whole on a rank
    assert r["align"]["partitioned"] and r["finetune"]["partitioned"]
    lora = r["finetune"]["held"]
    assert NEWLINE in lora and any(".lora_" in k for k in lora)
    assert all(k.startswith("connector.") or ".lora_" in k for k in set(lora) - {NEWLINE})
    native = a / "export" / "native"
    assert not (native / "layout.safetensors").exists()  # the fixed layout learns nothing of its own
    assert_same(weights(native / "tower"), weights(Path(assets["tower"])))
    assert_same(weights(native / "decoder"), weights(Path(assets["decoder"])))
    assert_anyres_export(f / "export" / "native")
    # in-training evaluation on 2 ranks (padded shares, fixed-length generation) equals the command's on 1
    final = r["finetune"]["final"]
    code = _eval_vlm(f / "export" / "native", assets, max_length=100)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert result["exact_match"] == final["exact_match"] and result["eval_samples"] == 11
