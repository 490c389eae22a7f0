"""Time and peak memory of the sigmoid loss: plain path, open_clip's SigLipLoss, tiled path, ring.

Every measurement runs in a fresh process, so its peak resident memory is its own. "Extra" memory
is the peak RSS of one forward + backward minus the RSS once the inputs exist (the embedding
gradients, (B, D) each, are part of it for every method).

    python benchmarks/sigmoid_loss.py                      # B = 4096, 16384, 65536; D = 768; W = 2, 4
    python benchmarks/sigmoid_loss.py --batch 4096 --ranks  # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS counter (Linux clear_refs) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS") * 1024


def peak_since_reset() -> int:
    return _rss_kib("VmHWM") * 1024


def make_inputs(batch: int, dim: int, seed: int = 0):
    """Unit-norm embeddings that require grad, and t' = log 10, b = -10 shaped (1,)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, dim, generator=gen)
    img /= img.norm(dim=-1, keepdim=True)
    txt = torch.randn(batch, dim, generator=gen)
    txt /= txt.norm(dim=-1, keepdim=True)
    scale = torch.full((1,), math.log(10.0), requires_grad=True)
    bias = torch.full((1,), -10.0, requires_grad=True)
    return img.requires_grad_(), txt.requires_grad_(), scale, bias


def loss_fn(method: str, chunk: int):
    from training.losses import sigmoid_loss

    if method == "plain":
        return lambda x, y, s, b: sigmoid_loss(x, y, s, b, chunk_size=None)  # the default is tiled
    if method == "tiled":
        return lambda x, y, s, b: sigmoid_loss(x, y, s, b, chunk_size=chunk)
    if method == "open_clip":
        from open_clip.loss import SigLipLoss

        ref = SigLipLoss()
        return lambda x, y, s, b: ref(x, y, s.exp(), b)  # open_clip takes t itself, not log t
    raise ValueError(f"unknown method {method!r}")


def measure(method: str, batch: int, dim: int, chunk: int, repeats: int) -> dict:
    """One method at one size, in this (fresh) process: best time and peak extra memory."""
    fn = loss_fn(method, chunk)
    warm = make_inputs(256, dim)
    fn(*warm).backward()  # load kernels and allocator pools outside the measurement
    del warm
    inputs = make_inputs(batch, dim)
    base = reset_peak()
    times = []
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn(*inputs).backward()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "extra_bytes": peak_since_reset() - base}


def _ring_rank(rank: int, world: int, port: int, local_batch: int, dim: int, chunk: int, queue) -> None:
    import torch.distributed as dist

    from training.losses import sigmoid_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    warm = make_inputs(64, dim, seed=rank)
    sigmoid_loss(*warm, chunk_size=chunk).backward()
    inputs = make_inputs(local_batch, dim, seed=rank)
    dist.barrier()
    base = reset_peak()
    start = time.perf_counter()
    sigmoid_loss(*inputs, chunk_size=chunk).backward()
    seconds = time.perf_counter() - start
    queue.put((rank, seconds, peak_since_reset() - base))
    dist.barrier()
    dist.destroy_process_group()


def measure_ring(world: int, local_batch: int, dim: int, chunk: int) -> dict:
    """Per-rank peak extra memory of the ring path with `world` gloo ranks (max over ranks)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_ring_rank, args=(r, world, port, local_batch, dim, chunk, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"seconds": max(r[1] for r in results), "extra_bytes": max(r[2] for r in results)}


def run_fresh(*args: str) -> dict | None:
    """Run `--worker ...` in a new interpreter; None if it failed (e.g. killed for memory)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(r: dict | None, key: str) -> str:
    if r is None:
        return "failed"
    return f"{r['seconds']:.2f} s" if key == "seconds" else f"{r['extra_bytes'] / MiB:,.0f} MiB"


def single_process_table(batches: list[int], dim: int, chunk: int, methods: list[str], repeats: int) -> None:
    print(
        f"single process, D = {dim}, fp32, forward + backward, tile {chunk}, {torch.get_num_threads()} "
        "threads"
    )
    print("| B | method | time | peak extra memory | time vs open_clip | memory: open_clip / this |")
    print("|---|---|---|---|---|---|")
    per_pair = {}  # extra bytes per pair of the B x B methods, measured at the largest B they ran at
    for batch in batches:
        rows = {}
        for method in methods:
            bytes_per_pair = per_pair.get(method, 16.0)  # unmeasured: assume four fp32 B x B tensors
            if method != "tiled" and bytes_per_pair * batch**2 > 0.6 * _mem_total():
                need = bytes_per_pair * batch**2 / 2**30
                total = _mem_total() / 2**30
                print(
                    f"| {batch:,} | {method} | not run | ~{need:,.0f} GiB needed (B^2), machine has "
                    f"{total:.0f} | | |"
                )
                continue
            rows[method] = run_fresh(
                method, str(batch), str(dim), str(chunk), str(repeats if batch <= 4096 else 1)
            )
            if rows[method] is not None and method != "tiled":
                per_pair[method] = rows[method]["extra_bytes"] / batch**2
        ref = rows.get("open_clip")
        for method, r in rows.items():
            ratio_t = ratio_m = ""
            if ref and r:
                ratio_t = f"{r['seconds'] / ref['seconds']:.2f}x"
                ratio_m = f"{ref['extra_bytes'] / max(r['extra_bytes'], 1):.1f}x"
            print(
                f"| {batch:,} | {method} | {_fmt(r, 'seconds')} | {_fmt(r, 'mem')} | {ratio_t} | {ratio_m} |"
            )
        sys.stdout.flush()


def ring_table(worlds: list[int], local_batch: int, dim: int, chunk: int) -> None:
    print(f"\nmulti-rank ring (gloo, 1 thread per rank), local batch b = {local_batch:,}, D = {dim}")
    print("| W | global batch | per-rank peak extra memory | slowest rank time |")
    print("|---|---|---|---|")
    for world in worlds:
        r = run_fresh("ring", str(local_batch), str(dim), str(chunk), str(world))
        print(f"| {world} | {world * local_batch:,} | {_fmt(r, 'mem')} | {_fmt(r, 'seconds')} |")
        sys.stdout.flush()


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=None, help="tile side (default: the library default)")
    parser.add_argument("--methods", nargs="+", default=["plain", "open_clip", "tiled"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at B <= 4096 (best is kept)")
    parser.add_argument(
        "--ranks", type=int, nargs="*", default=[1, 2, 4, 8], help="world sizes for the ring table"
    )
    parser.add_argument("--local-batch", type=int, default=4096)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from training.losses import DEFAULT_CHUNK_SIZE

    chunk = args.chunk or DEFAULT_CHUNK_SIZE
    if args.worker:
        method, batch, dim, chunk_s, extra = args.worker
        if method == "ring":
            if int(extra) == 1:
                result = measure("tiled", int(batch), int(dim), int(chunk_s), 1)
            else:
                result = measure_ring(int(extra), int(batch), int(dim), int(chunk_s))
        else:
            result = measure(method, int(batch), int(dim), int(chunk_s), int(extra))
        print(json.dumps(result))
        return
    methods = [m for m in args.methods if m != "open_clip" or _has_open_clip()]
    if len(methods) < len(args.methods):
        print("open_clip is not installed: its rows are left out")
    single_process_table(args.batch, args.dim, chunk, methods, args.repeats)
    if args.ranks:
        ring_table(args.ranks, args.local_batch, args.dim, chunk)


def _has_open_clip() -> bool:
    try:
        import open_clip.loss  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
