"""The shipped recipes at their real shapes: a few steps of each config on CPU ranks, memory measured
against an estimate from the shapes.

Each shipped config (``configs/vlm/so400m_gemma2b_*``, ``configs/vlm/qwen2_llava_*``,
``configs/pretrain/b16_224_scratch``, ``configs/pretrain/so400m_finetune``) runs as users run it,
``vision-tower train-vlm --config CONFIG`` / ``vision-tower pretrain --config CONFIG`` under torchrun on
``--ranks`` CPU ranks (gloo), with its DeepSpeed stage, gradient checkpointing, LoRA, ``max_length`` and
precision as written (``auto``: fp32 weights and a bf16 autocast forward on a CPU with AMX or
AVX512-BF16, such as this machine's Zen 4, else fp32). Overrides replace only what
cannot exist here:

- the hub ids by ``preset:`` sources of the same shapes (random weights): google/gemma-2b ->
  ``preset:gemma_2b``, Qwen/Qwen2-1.5B-Instruct -> ``preset:qwen2_1_5b`` (the models' vocabularies; the
  word tokenizer of the synthetic texts fits inside), google/siglip-so400m-patch14-384 ->
  ``preset:so400m_p14_384`` (so400m_finetune: ``model.preset`` in place of ``model.init_from``, built
  partitioned tower by tower as the load is);
- the /data paths by a few synthetic samples written here (coloured shapes at the tower's resolution;
  captions, or json prompt/answer for the finetune configs, LLaVA's ``USER: <image>`` layout for Qwen2);
- a finetune config's ``model.init_from`` (the align stage's ``export/native``) by a native VLM folder
  of the align config's model (the same presets, random weights) that this script builds and saves once,
  so a finetune config runs without its align stage having run; the run loads it as written;
- micro-batch 1, ``--steps`` steps, every step logged, no held-out data (no evaluation), no checkpoint
  before the end. The run is stopped once its last step is measured: the runner's final checkpoint and
  export (rank 0 consolidates the whole model, about three fp32 copies of it at once) are not part of a
  step; ``--full-run`` lets them run (only the ``native`` export), timed and measured apart.

Per rank it reports the step time (from the run's own logged throughput, first step left out as
warm-up; the ranks step together), the peak RSS over the timed steps (VmHWM of the rank process, reset
after step 1 and read when the last step is logged), the peak of building and stepping (and exporting,
with ``--full-run``), and beside them the estimate from the shapes: parameters, gradients, AdamW state
(fp32 m and v, and the fp32 master copy DeepSpeed's ZeRO optimizers keep of the trained partition), ZeRO
buffers (the gradient reduce bucket; at stage 3 the gathered parameters DeepSpeed keeps live, up to 1e9
elements by default, and the largest gradient whole) with autocast's bf16 copies of the trained weights,
and activations for one sample at the sample's length with the config's checkpointing. A config whose
estimate does not fit this machine's memory is not started: its figures and the reason are printed.

    python benchmarks/real_shapes.py --layers 2 --steps 2                    # smoke: 2 decoder layers
    python benchmarks/real_shapes.py --configs b16_224_scratch               # one config at full shape
    python benchmarks/real_shapes.py --configs qwen2_llava_finetune          # LoRA under ZeRO-3
    python benchmarks/real_shapes.py --estimate-only                         # the estimates alone
    python benchmarks/real_shapes.py --tiny                                  # each config as written, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "so400m_gemma2b_align": "configs/vlm/so400m_gemma2b_align.yaml",
    "so400m_gemma2b_finetune": "configs/vlm/so400m_gemma2b_finetune.yaml",
    "qwen2_llava_align": "configs/vlm/qwen2_llava_align.yaml",
    "qwen2_llava_finetune": "configs/vlm/qwen2_llava_finetune.yaml",
    "b16_224_scratch": "configs/pretrain/b16_224_scratch.yaml",
    "so400m_finetune": "configs/pretrain/so400m_finetune.yaml",
}
# what the configs name -> a preset of the same shapes (with --tiny: tiny presets, for a quick check that
# each config runs as written, its stage, ZeRO setting, LoRA and checkpointing included)
TINY = {
    "google/gemma-2b": "preset:tiny_gemma",
    "Qwen/Qwen2-1.5B-Instruct": "preset:tiny_qwen2",
    "google/siglip-so400m-patch14-384": "preset:tiny",
    "b16_224": "preset:tiny",
}
HUB = {
    "google/gemma-2b": "preset:gemma_2b",
    "Qwen/Qwen2-1.5B-Instruct": "preset:qwen2_1_5b",
    "google/siglip-so400m-patch14-384": "preset:so400m_p14_384",
}
GIB = 2**30
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
LIVE = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters (elements)
FILLER = (  # the words of the synthetic captions and answers
    "the picture shows a scene with a small object near the middle and some plain background around it "
    "while the light falls from the left side onto the table and the wall behind"
)


def source(name: str) -> str:
    """The ``preset:`` source of a hub id (or a pretraining preset's name, itself unless --tiny)."""
    return HUB.get(name, f"preset:{name}")


def read_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / CONFIGS[name]).read_text())


def align_of(name: str) -> str | None:
    """The shipped config whose ``export/native`` a finetune config's ``model.init_from`` names."""
    init = (read_yaml(name).get("model") or {}).get("init_from") or ""
    for other in CONFIGS:
        out = (read_yaml(other).get("run") or {}).get("out_dir")
        if out and init.startswith(out.rstrip("/") + "/export"):
            return other
    return None


# ----------------------------------------------------------------------------- shapes and estimate
@dataclass
class Part:
    params: int
    trained: int
    largest: int  # elements of the largest parameter (gathered whole at ZeRO-3)
    acts: float  # bytes of activations of one sample


@dataclass
class Plan:
    name: str
    kind: str  # train-vlm or pretrain
    zero: int
    dtype_bytes: int  # parameters, gradients (fp32 unless DeepSpeed's bf16 is on)
    act_bytes: int  # activations (bf16 under autocast)
    tokens: int  # the sample's length (decoder tokens, or image + text tokens)
    image_size: int
    parts: dict[str, Part] = field(default_factory=dict)


def count(module: Any, trained: bool) -> Part:
    sizes = [p.numel() for p in module.parameters()]
    return Part(sum(sizes), sum(sizes) if trained else 0, max(sizes), 0.0)


def block_acts(
    tokens: int,
    width: int,
    mlp: int,
    heads: int,
    kv_width: int,
    layers: int,
    b: int,
    *,
    grad: bool,
    checkpointing: bool,
) -> float:
    """Activation bytes of a transformer stack for one sequence: without gradients one block's transient
    tensors; with checkpointing each block's input plus one block's tensors (and their gradients) while it
    is recomputed; without, every block's. Attention scores counted as materialised (heads x T x T)."""
    block = tokens * b * (4 * width + 2 * kv_width + 3 * mlp) + heads * tokens * tokens * b
    if not grad:
        return block
    if checkpointing:
        return layers * tokens * width * b + 2 * block
    return layers * block + block


def tower_acts(c, tokens: int, b: int, *, grad: bool, checkpointing: bool) -> float:
    """:func:`block_acts` of one of our towers' configs (image or text: multi-head attention, no GQA)."""
    width, mlp, heads, layers = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers
    return block_acts(tokens, width, mlp, heads, width, layers, b, grad=grad, checkpointing=checkpointing)


def vlm_plan(name: str, args: argparse.Namespace, text: dict[str, Any]) -> Plan:
    import torch
    from transformers import AutoModelForCausalLM

    from connectors import build_connector
    from connectors.decoder_presets import decoder_config, preset_decoder_name
    from training.tasks.vlm_config import LORA_TARGETS
    from vision_tower import VisionTower
    from vision_tower.presets import preset_name

    cfg = read_yaml(name)
    first = align_of(name) if cfg["model"].get("init_from") else name
    m = read_yaml(first)["model"]
    ft = cfg.get("finetune") or {}
    stage = cfg.get("stage", "align")
    with torch.device("meta"):
        tower = VisionTower.from_preset(preset_name(source(m["tower"])), use_head=False)
        options = {"num_hidden_layers": args.layers} if args.layers else {}
        dconf = decoder_config(preset_decoder_name(source(m["decoder"])), text["tokenizer"], **options)
        decoder = AutoModelForCausalLM.from_config(dconf)
        connector = build_connector(m.get("connector", "linear"), tower.config.hidden_size, dconf.hidden_size)
    b = args.act_bytes
    tower_trains = stage == "finetune" and bool(ft.get("tower"))
    full = stage == "finetune" and ft.get("decoder", "full") == "full"
    gc = bool(cfg["model"].get("gradient_checkpointing"))
    n_img = (tower.config.image_size // tower.config.patch_size) ** 2
    tokens = n_img + text["text_tokens"]
    tc = tower.config
    plan = Plan(name, "train-vlm", zero_stage(cfg), args.dtype_bytes, b, tokens, tc.image_size)
    plan.parts["tower"] = count(tower, tower_trains)
    plan.parts["tower"].acts = tower_acts(tc, n_img, b, grad=tower_trains, checkpointing=gc)
    plan.parts["connector"] = count(connector, True)
    plan.parts["connector"].acts = 3 * n_img * (tc.hidden_size + dconf.hidden_size) * b
    part = count(decoder, full)
    if stage == "finetune" and ft.get("decoder") == "lora":
        lora = ft.get("lora") or {}
        r = int(lora.get("r", 16))
        targets = lora.get("target_modules") or LORA_TARGETS
        extra = sum(
            r * (mod.in_features + mod.out_features)
            for n, mod in decoder.named_modules()
            if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
        )
        part = Part(part.params + extra, extra, part.largest, 0.0)
    d = dconf
    head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    part.acts = (
        block_acts(
            tokens,
            d.hidden_size,
            d.intermediate_size,
            d.num_attention_heads,
            d.num_key_value_heads * head_dim,
            d.num_hidden_layers,
            b,
            grad=True,
            checkpointing=gc,
        )
        + 3 * text["targets"] * d.vocab_size * 4
    )  # logits at the targets only: fp32, log-softmax, gradient
    plan.parts["decoder"] = part
    return plan


def pretrain_plan(name: str, args: argparse.Namespace) -> Plan:
    import torch

    from vision_tower import SiglipModel, get_preset

    cfg = read_yaml(name)
    m = cfg["model"]
    preset = preset_name_of(m.get("preset") or m["init_from"])
    config = get_preset(preset)
    if args.layers:
        config.vision.num_hidden_layers = config.text.num_hidden_layers = args.layers
    with torch.device("meta"):
        model = SiglipModel(config)
    b, gc = args.act_bytes, bool(m.get("gradient_checkpointing"))
    v, t = config.vision, config.text
    n_img = (v.image_size // v.patch_size) ** 2
    plan = Plan(
        name,
        "pretrain",
        zero_stage(cfg),
        args.dtype_bytes,
        b,
        n_img + t.max_position_embeddings,
        v.image_size,
    )
    for part, c, n in (("vision", v, n_img), ("text", t, t.max_position_embeddings)):
        plan.parts[part] = count(getattr(model, part), True)
        plan.parts[part].acts = tower_acts(c, n, b, grad=True, checkpointing=gc)
    return plan


def preset_name_of(src: str) -> str:
    return source(src).split(":", 1)[1]


def zero_stage(cfg: dict[str, Any]) -> int:
    return json.loads((ROOT / cfg["run"]["deepspeed"]).read_text())["zero_optimization"]["stage"]


def estimate(plan: Plan, world: int) -> dict[str, float]:
    """GiB per rank."""
    parts, b, z = plan.parts.values(), plan.dtype_bytes, plan.zero
    total = sum(p.params for p in parts)
    trained = sum(p.trained for p in parts)
    params = total * b / (world if z == 3 else 1)
    grads = trained * b / (world if z >= 2 else 1)
    optim = trained * (8 + (4 if z >= 1 or b == 2 else 0)) / (world if z >= 1 else 1)
    buffers = min(BUCKET, trained) * b if z >= 1 else 0.0  # the gradient reduce bucket's touched part
    if z == 3:  # gathered parameters a rank keeps between uses (DeepSpeed's stage3_max_live_parameters and
        # stage3_max_reuse_distance, 1e9 elements by default; checkpointing's recompute reuses every layer),
        # at least the largest one, whole; and the largest gradient, whole, if it trains
        big = max(parts, key=lambda p: p.largest)
        buffers += max(min(LIVE, total), big.largest) * b + (big.largest * b if big.trained else 0)
    if plan.act_bytes < b:  # autocast keeps a bf16 copy of each trained weight it casts, whole, per forward,
        # and casts each frozen one as it is used: the largest (the decoder's embedding as lm_head) at once
        buffers += trained * plan.act_bytes + max(p.largest for p in parts) * plan.act_bytes
    acts = sum(p.acts for p in parts)
    out = {"params": params, "grads": grads, "optimizer": optim, "buffers": buffers, "activations": acts}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- data
def make_texts(args: argparse.Namespace) -> dict[str, Any]:
    """The words of every synthetic text, the tokenizer folder's contents and the per-sample lengths."""
    from training.demo.decoders import word_tokenizer

    answer = " ".join((FILLER.split() * 8)[: args.answer_words])
    prompts = {
        "caption": "caption en",
        "gemma_qa": "answer en describe the picture in detail",
        "llava_qa": "USER: <image>\nDescribe the picture in detail. ASSISTANT:",
    }
    tok = word_tokenizer([answer, *prompts.values(), "red green blue circle square triangle small large"])
    answer_ids = len(tok(answer, add_special_tokens=False).input_ids) + 1  # and eos
    prompt_ids = max(len(tok(p).input_ids) for p in prompts.values())
    return {
        "tokenizer": tok,
        "answer": answer,
        "prompts": prompts,
        "targets": answer_ids,
        "text_tokens": prompt_ids + answer_ids,
    }


def write_data(root: Path, image_size: int, texts: dict[str, Any], samples: int) -> dict[str, Path]:
    """Shards at ``image_size``: captions (``txt``) and json prompt/answer for each prompt kind."""
    import io
    import tarfile

    from training.demo.shapes import make_sample

    out = {}
    for kind in ("caption", "gemma_qa", "llava_qa"):
        path = root / f"data-{image_size}" / kind / "train-000000.tar"
        out[kind] = path.parent
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                buf = io.BytesIO()
                make_sample("train", i, image_size=image_size).image.save(buf, "PNG")
                if kind == "caption":
                    text = ("txt", texts["answer"].encode())
                else:
                    record = {"prompt": texts["prompts"][kind], "answer": texts["answer"]}
                    text = ("json", json.dumps(record).encode())
                for ext, data in (("png", buf.getvalue()), text):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def spm_tokenizer(root: Path, texts: dict[str, Any]) -> Path:
    from training.tokenizer_train import train_tokenizer

    folder = root / "spm"
    if not folder.exists():
        corpus = [texts["answer"], *texts["prompts"].values()] * 50
        train_tokenizer(corpus, folder, vocab_size=256, max_length=64)
    return folder


# ----------------------------------------------------------------------------- runs
def init_folder(name: str, args: argparse.Namespace, root: Path) -> Path:
    """A native VLM folder of the model a finetune config starts from (its align config's, presets for
    the hub ids, ``--layers`` decoder layers), built once in fp32 and saved as the align stage exports."""
    import torch

    from training.tasks.vlm_config import VLMModelSection
    from training.tasks.vlm_model import assemble

    first = align_of(name)
    folder = root / "init" / f"{first}-{'tiny' if args.tiny else args.layers or 'full'}"
    if (folder / "config.json").exists():
        return folder
    m = dict(read_yaml(first)["model"])
    m.pop("gradient_checkpointing", None)
    m.update(tower=source(m["tower"]), decoder=source(m["decoder"]), tokenizer=str(root / "tokenizer"))
    if args.layers:
        m["decoder_options"] = {"num_hidden_layers": args.layers}
    start = time.perf_counter()
    torch.manual_seed(0)
    vlm = assemble(VLMModelSection(**m), torch.float32)
    vlm.save_pretrained(folder, format="native")
    del vlm
    print(
        f"{name}: model.init_from is {folder} ({first}'s model, built and saved in "
        f"{time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return folder


def overrides(name: str, args: argparse.Namespace, root: Path, data: dict[str, Path]) -> list[str]:
    cfg = read_yaml(name)
    out = root / "runs" / name
    o = {
        "run.out_dir": out,
        "run.steps": args.steps,
        "run.log_every": 1,
        "run.save_every": 0,
        "run.eval_every": 0,
        "run.keep_checkpoints": 1,
        "data.batch_size": 1,
        "data.num_workers": args.num_workers,
        "data.shuffle_buffer": 8,
        "data.val_shards": "null",
    }
    m = cfg["model"]
    if "stage" in cfg:  # train-vlm
        ft = "finetune" if cfg["stage"] == "finetune" else None
        llava = m.get("attention") == "causal" or "qwen" in name
        o["data.train_shards"] = data["caption" if not ft else ("llava_qa" if llava else "gemma_qa")]
        o["export.formats"] = "[native]"
        if m.get("init_from"):
            o["model.init_from"] = init_folder(name, args, root)
        else:
            o["model.tower"] = source(m["tower"])
            o["model.decoder"] = source(m["decoder"])
            o["model.tokenizer"] = root / "tokenizer"
            if args.layers:
                o["model.decoder_options"] = json.dumps({"num_hidden_layers": args.layers})
    else:  # pretrain
        o["data.train_shards"] = data["caption"]
        o["data.zeroshot_dir"] = "null"
        o["data.tokenizer"] = root / "spm"
        if m.get("init_from"):
            o["model.init_from"] = "null"
        if m.get("init_from") or preset_name_of(m["preset"]) != m["preset"]:
            o["model.preset"] = preset_name_of(m.get("preset") or m["init_from"])
        if args.layers:
            o["model.vision"] = json.dumps({"num_hidden_layers": args.layers})
            o["model.text"] = json.dumps({"num_hidden_layers": args.layers})
    return [f"{k}={v}" for k, v in o.items()] + list(args.override)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def run_one(name: str, args: argparse.Namespace, root: Path, data) -> dict[str, Any]:
    """Launch the config's command on ``args.ranks`` ranks; poll the ranks' memory and its metrics."""
    from training.runner.launch import launch_env, torchrun_command

    cmd = "train-vlm" if "stage" in read_yaml(name) else "pretrain"
    over = overrides(name, args, root, data)
    argv = torchrun_command(args.ranks, ["-m", "vision_tower.cli", cmd, "--config", CONFIGS[name], *over])
    print("$ vision-tower", cmd, "--config", CONFIGS[name], " ".join(over), flush=True)
    out = root / "runs" / name
    if out.exists():  # never remove what this run did not write
        raise SystemExit(f"{out} exists: give another --workdir, or remove it yourself")
    log = root / f"{name}.log"
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    ranks: dict[int, int] = {}  # rank -> pid
    hwm_run: dict[int, float] = {}
    steps_hwm: dict[int, float] = {}
    reset_done = False
    with open(log, "w") as f:
        proc = subprocess.Popen(
            argv, env=launch_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        while proc.poll() is None:
            try:
                for pid in _children(proc.pid):
                    rank = _rank_of(pid)
                    if rank is not None:
                        ranks[rank] = pid
                        hwm_run[rank] = max(hwm_run.get(rank, 0.0), _status(pid, "VmHWM"))
                logged = _steps(metrics)
                if logged and not reset_done:
                    for pid in ranks.values():  # peak RSS from here on: the timed steps
                        Path(f"/proc/{pid}/clear_refs").write_text("5")
                    reset_done = True
                if logged and max(logged) >= args.steps and not steps_hwm:
                    steps_hwm = {rank: _status(pid, "VmHWM") for rank, pid in ranks.items()}
                    steps_end = time.perf_counter()
                    if not args.full_run:  # the final checkpoint and export are not a step
                        os.killpg(proc.pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass  # a process that ended between listing and reading
            time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0 and not (steps_hwm and not args.full_run):
        tail = log.read_text()[-3000:]
        return {"name": name, "failed": f"exit {proc.returncode}; log {log}:\n{tail}"}
    logged = _steps(metrics)
    per_step = args.ranks  # micro-batch 1 x ranks x grad_accum 1
    times = [per_step / _rate(r) for s, r in sorted(logged.items()) if s > 1]
    result = {
        "name": name,
        "step_s": statistics.median(times) if times else float("nan"),
        "first_step_s": per_step / _rate(logged[1]) if 1 in logged else float("nan"),
        "loss": [round(r["loss"], 4) for _, r in sorted(logged.items())],
        "steps_hwm": steps_hwm,
        "run_hwm": hwm_run,
        "wall_s": wall,
        "after_steps_s": wall - (steps_end - start) if steps_hwm and args.full_run else float("nan"),
        "disk_gib": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / GIB,
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def _rate(record: dict[str, Any]) -> float:
    """The logged throughput (``samples_per_s``, ``images_per_s`` or ``rows_per_s``)."""
    return next(v for k, v in record.items() if k.endswith("_per_s"))


def _steps(metrics: Path) -> dict[int, dict[str, Any]]:
    if not metrics.exists():
        return {}
    rows = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r and not r.get("final"):
            rows[r["step"]] = r
    return rows


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--layers", type=int, default=0, help="decoder (pretrain: both towers') depth; 0: real"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="synthetic samples per shard")
    parser.add_argument("--answer-words", type=int, default=48, help="words of each caption / answer")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=None, help="default: this machine's MemTotal")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--estimate-only", action="store_true")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="one more override, every run"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny presets: does each config run as written?")
    parser.add_argument(
        "--full-run", action="store_true", help="let each run write its final checkpoint and export"
    )
    args = parser.parse_args()
    from vision_tower.hardware import cpu_fast_bf16

    # precision auto (every shipped config; their DeepSpeed JSONs leave bf16 "auto"): on a CPU with AMX or
    # AVX512-BF16 the runner keeps fp32 weights and runs the forward under bf16 autocast, else fp32
    args.dtype_bytes = 4
    args.act_bytes = 2 if cpu_fast_bf16()[0] else 4

    if args.tiny:
        HUB.update(TINY)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    memory = args.memory_gib or _mem_total()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="real_shapes_"))
    root.mkdir(parents=True, exist_ok=True)
    args.runtime = runtime_gib()
    print(
        f"runtime per rank (imports, no model): {args.runtime:.2f} GiB; memory {memory:.1f} GiB", flush=True
    )
    texts = make_texts(args)
    texts["tokenizer"].save_pretrained(root / "tokenizer")
    rows = []
    try:
        for name in names:
            plan = vlm_plan(name, args, texts) if "stage" in read_yaml(name) else pretrain_plan(name, args)
            est = estimate(plan, args.ranks)
            need = args.ranks * (est["total"] + args.runtime)
            print(_describe(plan, est, args), flush=True)
            if args.estimate_only:
                rows.append({"name": name, "plan": plan, "est": est, "skipped": "estimate only"})
                continue
            if need > 0.9 * memory:
                why = (
                    f"does not fit: {args.ranks} ranks x ({est['total']:.1f} GiB estimated + "
                    f"{args.runtime:.1f} GiB runtime) = {need:.1f} GiB > 90% of {memory:.1f} GiB"
                )
                print(f"{name}: skipped, {why}", flush=True)
                rows.append({"name": name, "plan": plan, "est": est, "skipped": why})
                continue
            size = plan.image_size
            data = write_data(root, size, texts, args.samples)
            if plan.kind == "pretrain":
                spm_tokenizer(root, texts)
            result = run_one(name, args, root, data)
            print(json.dumps({k: v for k, v in result.items()}, default=str), flush=True)
            rows.append({**result, "plan": plan, "est": est})
    finally:
        print(_table(rows, args))
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def runtime_gib() -> float:
    """Peak RSS of a process that imports what a rank imports, before any model: the estimate's floor."""
    from training.runner.launch import launch_env

    code = (
        "import resource, deepspeed, transformers, peft, vision_tower.cli, connectors, training.tasks.vlm, "
        "training.tasks.siglip; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=launch_env(), cwd=ROOT, capture_output=True, text=True
    )
    try:
        return int(out.stdout.split()[-1]) * 1024 / GIB
    except (IndexError, ValueError):
        raise RuntimeError(f"measuring the runtime's memory failed: {out.stderr[-2000:]}") from None


def _mem_total() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def _describe(plan: Plan, est: dict[str, float], args: argparse.Namespace) -> str:
    parts = ", ".join(
        f"{k} {p.params / 1e6:.1f}M ({p.trained / 1e6:.1f}M trained)" for k, p in plan.parts.items()
    )
    figures = ", ".join(f"{k} {v:.2f}" for k, v in est.items())
    whole = sum(p.params for p in plan.parts.values()) * 4 / GIB
    figures += f"; the whole model in fp32 {whole:.2f} (export on rank 0, --full-run: about 3x that)"
    return (
        f"\n## {plan.name}: ZeRO-{plan.zero}, {args.ranks} ranks, micro-batch 1, {plan.tokens} tokens, "
        f"weights fp32, {'bf16 autocast' if plan.act_bytes == 2 else 'fp32'}\n  {parts}\n"
        f"  estimate per rank (GiB): {figures}"
    )


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        "| config | rank | step s | peak RSS steps GiB | peak RSS build+steps GiB | est. params | grads "
        "| AdamW | ZeRO buffers | activations | est. total (+runtime) |\n|" + "---|" * 11
    )
    lines = [head]
    for row in rows:
        est = row["est"]
        figures = " | ".join(
            f"{est[k]:.2f}" for k in ("params", "grads", "optimizer", "buffers", "activations")
        )
        total = f"{est['total']:.2f} ({est['total'] + args.runtime:.2f})"
        if "skipped" in row or "failed" in row:
            why = row.get("skipped") or row["failed"].splitlines()[0]
            lines.append(f"| {row['name']} | all | {why} | | | {figures} | {total} |")
            continue
        for rank in sorted(row["steps_hwm"] or row["run_hwm"]):
            steps, run = row["steps_hwm"].get(rank, float("nan")), row["run_hwm"].get(rank, float("nan"))
            lines.append(
                f"| {row['name']} | {rank} | {row['step_s']:.2f} | {steps:.2f} | {run:.2f} | {figures} "
                f"| {total} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
