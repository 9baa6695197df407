#!/usr/bin/env bash
# Everything a GPU check needs, in one command of at most 8.2 minutes (the sum of the step limits, the wheel install's
# included; only the smoke dataset is made beside the other steps), every result under OUTDIR:
#
#     bash benchmark/gpu_check.sh OUTDIR            # on the GPU machine (CUDA tests, speed, smoke runs)
#     bash benchmark/gpu_check.sh OUTDIR --quick    # a 1-minute rehearsal of the same steps (CI runs it on the CPU)
#
# 1. the CUDA tests (FastUpdate replays of every script's phase steps, under torch.cuda.set_sync_debug_mode
#    ("error"))
# 2. benchmark/speed.py for all five scripts on the device, hopper sizes, eager and cudagraphs, with the scripts'
#    determinism settings and without, -> speed_<device>.{md,json}; then compile and compile+cudagraphs for SO2
#    and OPT, and eager with TF32 matmuls for SO2, -> extra/speed_<device>.{md,json}; each written row by row
# 3. SO2 and OPT learning smoke runs (side by side; on CUDA each also with --cudagraphs) on a small local
#    dataset -> smoke_runs.tar.gz (their TensorBoard events, args.json, logs and a summary, smoke.txt)
# plus env.txt (versions, device) and log.txt (all output, the CUDA tests' included): at most 7 files in both
# branches (the device returns 8). Without CUDA it says so and runs the same steps on the CPU (the CUDA tests then
# skip, speed measures eager only). gymnasium, mujoco, minari and tyro are installed from .whl/ where the machine
# lacks them (the device machine has Python 3.12 and torch but none of these): fetch them here with
# `bash benchmark/gpu_wheels.sh` and carry .whl with the call. A step that fails is recorded, and the next steps
# still run; the exit status is that of the first failed step.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ] || { [ $# -eq 2 ] && [ "$2" != "--quick" ]; } || [ $# -gt 2 ]; then
    echo "usage: bash benchmark/gpu_check.sh OUTDIR [--quick]" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "error: cannot create $1" >&2; exit 2; }
QUICK=${2:-}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec > >(tee "$OUTDIR/log.txt") 2>&1
status=0
step() {  # step <name> <timeout seconds> <copy of its output> <command...>: run, record its exit code, go on
    local name=$1 limit=$2 copy=$3
    shift 3
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$copy"
    local code=$?
    echo "== $name: exit $code"
    [ $code -ne 0 ] && [ $status -eq 0 ] && status=$code
    return 0
}

if ! $PYTHON -c "import gymnasium, mujoco, minari, tyro" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: gymnasium/mujoco/minari/tyro are missing and there is no .whl/: run bash benchmark/gpu_wheels.sh" >&2
        exit 2
    fi
    timeout 60 $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
$PYTHON - >"$OUTDIR/env.txt" <<'EOF'
import platform, sys
import gymnasium, minari, mujoco, numpy, torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("numpy", numpy.__version__, "gymnasium", gymnasium.__version__, "mujoco", mujoco.__version__, "minari", minari.__version__)
EOF
cat "$OUTDIR/env.txt"
[ "$DEVICE" = cpu ] && echo "no CUDA device: the same steps on the CPU (the CUDA tests skip)"

if [ -n "$QUICK" ]; then
    SPEED=(--offline-iterations 2 --online-iterations 1 --tiny-iterations 5) TESTS=(tests/test_cuda.py -k so2)
    TINY=(--hidden-dim 32 --batch-size 32 --offline-steps 50 --online-steps 60 --eval-freq 30)
    SMOKE_SO2=("${TINY[@]}" --warmup-steps 20 --num-critics 2 --mixed-batch-size 64 --updates-per-step 2)
    SMOKE_OPT=("${TINY[@]}" --n-tau 20 --n-pretrain 10)
    DATA_STEPS=2000 LIMIT=120 SPEED_ALGORITHMS=(opt)
else
    # Sized from CPU dispatch floors (eager, tiny nets: ~10 ms per SO2 online env step of 10 updates, ~12.5 ms per
    # OPT one, a few ms per offline update) to end in about half of LIMIT with four processes sharing the GPU.
    SPEED=() TESTS=(tests -m cuda)
    SMOKE_SO2=(--offline-steps 5000 --online-steps 3000 --warmup-steps 500 --num-critics 10 --eval-freq 1000)
    SMOKE_OPT=(--offline-steps 10000 --online-steps 3000 --n-tau 500 --n-pretrain 1000 --eval-freq 1000)
    DATA_STEPS=50000 LIMIT=140 SPEED_ALGORITHMS=(so2 enoto baq off2on opt)
fi

export MINARI_DATASETS_PATH=$(mktemp -d) O2O_OFFLINE=1
RUNS=$(mktemp -d)
trap 'rm -rf "$MINARI_DATASETS_PATH" "$RUNS"' EXIT
# the smoke dataset is made on the side while the tests and the speed steps use the GPU
timeout 90 $PYTHON -m utils.make_dataset --env-id Hopper-v5 --dataset-id mujoco/hopper/medium-v0 \
    --steps "$DATA_STEPS" --no-progress >"$RUNS/dataset.log" 2>&1 &
dataset=$!

step "CUDA tests" 90 /dev/null $PYTHON -m pytest -v -p no:cacheprovider "${TESTS[@]}"  # a line per test
if [ "$DEVICE" = cuda ]; then
    step "speed" 80 /dev/null $PYTHON benchmark/speed.py --device cuda --configs hopper --modes eager cudagraphs \
        --deterministic on off --algorithms "${SPEED_ALGORITHMS[@]}" --out "$OUTDIR" "${SPEED[@]}"
    step "speed, compiled" 90 /dev/null $PYTHON benchmark/speed.py --device cuda --configs hopper \
        --modes compile compile+cudagraphs --algorithms so2 opt --out "$OUTDIR/extra" "${SPEED[@]}"
    step "speed, TF32" 30 /dev/null $PYTHON benchmark/speed.py --device cuda --configs hopper --modes eager \
        --matmul high --algorithms so2 --out "$OUTDIR/extra" --append "${SPEED[@]}"
else  # the CPU rehearsal: eager only (a compilation takes minutes here; tests/test_fast.py covers compile)
    step "speed" 80 /dev/null $PYTHON benchmark/speed.py --device cpu --configs hopper --out "$OUTDIR" \
        --algorithms "${SPEED_ALGORITHMS[@]}" "${SPEED[@]}"
    step "speed, second table" 80 /dev/null $PYTHON benchmark/speed.py --device cpu --configs hopper \
        --out "$OUTDIR/extra" --algorithms "${SPEED_ALGORITHMS[@]}" "${SPEED[@]}"
    step "speed, appended" 80 /dev/null $PYTHON benchmark/speed.py --device cpu --configs hopper \
        --out "$OUTDIR/extra" --append --algorithms "${SPEED_ALGORITHMS[@]}" "${SPEED[@]}"
fi

wait $dataset
code=$?
echo "== smoke dataset: exit $code"
[ $code -ne 0 ] && { cat "$RUNS/dataset.log"; [ $status -eq 0 ] && status=$code; }
COMMON=(--env-id hopper-medium --run-dir "$RUNS" --no-progress --eval-episodes 5)
VARIANTS=("")
[ "$DEVICE" = cuda ] && VARIANTS+=(cudagraphs)
pids=() names=()
for variant in "${VARIANTS[@]}"; do
    for algorithm in so2 opt; do
        smoke=SMOKE_${algorithm^^}[@]
        name=$algorithm${variant:+-$variant}
        timeout "$LIMIT" $PYTHON algorithms/$algorithm.py "${COMMON[@]}" "${!smoke}" --exp-name "$name" \
            ${variant:+--$variant} >"$RUNS/$name.log" 2>&1 &
        pids+=($!) names+=("$name")
    done
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    code=$?
    echo "== smoke run ${names[$i]}: exit $code"
    [ $code -ne 0 ] && [ $status -eq 0 ] && status=$code
done
$PYTHON - "$RUNS" >"$RUNS/smoke.txt" <<'EOF'
import sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    events = EventAccumulator(str(run)).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("offline/normalized_score", "eval/normalized_score", "offline/UPS", "charts/UPS", "charts/SPS"):
        if tag in tags:
            print(run.name, tag, [(e.step, round(e.value, 2)) for e in events.Scalars(tag)])
for log in sorted(Path(sys.argv[1]).glob("*.log")):
    print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-5:]))
EOF
cat "$RUNS/smoke.txt"
(cd "$RUNS" && tar -czf "$OUTDIR/smoke_runs.tar.gz" --exclude='*.pt' .)
echo "gpu_check: exit $status; results in $OUTDIR"
exit $status
