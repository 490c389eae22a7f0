#!/usr/bin/env bash
# On a machine with a CUDA GPU: the `gpu`-marked tests and the three side-by-side comparisons (the VLM
# training step against transformers' PaliGemma, the SigLIP pretraining step against open_clip, and
# `vision-tower extract` against transformers' processor + model loop) on the GPU, written as one markdown
# table. Sized to finish in under 8 minutes on one H100 (not yet run on one: see the README).
#
#   bash benchmarks/gpu.sh [OUT.md]            # default OUT: gpu-benchmarks.md in the current folder
#   bash benchmarks/gpu.sh --smoke [OUT.md]    # the same steps on CPU at tiny shapes, to check the script
#
# Needs the dev extra (open_clip, pytest): pip install -e ".[dev]".
set -euo pipefail

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=1
    shift
fi
out=$(realpath -m "${1:-gpu-benchmarks.md}")
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if [[ $smoke == 0 ]] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: CUDA is not available here (use --smoke to check the script on CPU)" >&2
    exit 2
fi

work=$(mktemp -d -t gpu_bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [[ $smoke == 1 ]]; then
    device=cpu
    vlm_args=(--sizes tiny --batch 2 --answer 8 --repeats 1)
    pretrain_args=(--batch 2 --steps 1)
    extract_args=(--preset b16_224 --sizes 224 --images 4 --batch 2)
else
    device=cuda
    vlm_args=(--sizes pg224 pg448 --batch 8 --answer 32 --repeats 5)
    pretrain_args=(--batch 256 --steps 10 --warmup 3)
    extract_args=(--images 256 --batch 32)
fi

start=$SECONDS
echo "== gpu-marked tests"
set +e
HF_HUB_OFFLINE=1 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py | tee "$work/tests.txt"
set -e
tests=$(grep -E "passed|failed|skipped|error" "$work/tests.txt" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')

echo "== VLM training step, stage align ($((SECONDS - start)) s so far)"
"$python" benchmarks/vlm_train_step.py --device "$device" --stage align --skip-everywhere "${vlm_args[@]}" \
    --json "$work/vlm.json"
echo "== SigLIP pretraining step ($((SECONDS - start)) s so far)"
"$python" benchmarks/pretrain_vs_open_clip.py --device "$device" "${pretrain_args[@]}" --json "$work/pretrain.json"
echo "== extract ($((SECONDS - start)) s so far)"
"$python" benchmarks/extract_vs_transformers.py --device "$device" "${extract_args[@]}" --json "$work/extract.json"

"$python" benchmarks/gpu_table.py --vlm "$work/vlm.json" --pretrain "$work/pretrain.json" \
    --extract "$work/extract.json" --tests "$tests" > "$out"
echo "Took $((SECONDS - start)) s." >> "$out"
echo
cat "$out"
echo "written to $out"
