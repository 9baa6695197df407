#!/usr/bin/env bash
# The CPU-sized learning protocol: each algorithm AND its paper's baseline on our SAC behaviour data,
# hopper-sac-medium and hopper-sac-medium-replay, seeds 0 1 2. One piece per algorithm, resumable:
#
#     bash benchmark/protocols/cpu.sh opt        # offline sweep, then method and baseline from its offline.pt
#     bash benchmark/protocols/cpu.sh collect opt td3   # copy the finished runs' events into the results tree now
#     bash benchmark/protocols/cpu.sh carry opt-1m      # finished offline.pt files to results/protocol-cpu/checkpoints/
#     bash benchmark/protocols/cpu.sh report     # benchmark/results/protocol-cpu/report.md from what is committed
#
# Every reduction from the paper's protocol is in benchmark/protocols/cpu.md, next to the paper's value.
# Runs go to runs/protocol-cpu{,-offline}/ (WORKERS at a time, 2 by default, THREADS threads each, 1 by default); a
# finished piece's TensorBoard events and args.json are copied to benchmark/results/protocol-cpu/ to be committed
# (round 2 also carries offline.pt: cpu.md, "Sessions").
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}  # THREADS=2 WORKERS=1: one run on both cores
# glibc hands each large temporary (a CQL batch of 30 actions per state is megabytes) to mmap and back, a page fault
# per 4 KB: keeping freed memory in the heap removes that system time (cpu.md); the numbers are bit-identical.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296} MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-268435456}
DATASETS="hopper-sac-medium hopper-sac-medium-replay"
SEEDS=${SEEDS:-0 1 2}  # SEEDS=1 WORKERS=1: one seed of a piece on one core (two pieces side by side)
WORKERS=${WORKERS:-2}
OFFLINE=runs/protocol-cpu-offline
ONLINE=runs/protocol-cpu
RESULTS=benchmark/results/protocol-cpu
PRETRAINED="$OFFLINE/{label}/{dataset}/seed{seed}/*/offline.pt"
# Round 2's online arms start from a copy of the offline.pt here (carry), so that one session can pretrain and a later
# one, on a fresh machine, fine-tune: git add -f the copies a later session needs (cpu.md, "Sessions")
CARRIED=$RESULTS/checkpoints
CARRIED_PRETRAINED="$CARRIED/{label}/{dataset}/seed{seed}/*/offline.pt"
COMMON="--no-cuda --eval-episodes 10"

sweep() {  # sweep <sweep-dir> <algorithm> <label> <flags...>; online runs whose events are committed are skipped
    local dir=$1 algorithm=$2 label=$3 collected=()
    shift 3
    # not offline ones: their offline.pt is not committed (but so2-ablation's), and the online runs still need it
    [ "$dir" = "$ONLINE" ] && collected=(--collected "$RESULTS/online")
    python benchmark/sweep.py --algorithms "$algorithm" --label "$label" --datasets $DATASETS --seeds $SEEDS \
        --sweep-dir "$dir" --workers "$WORKERS" "${collected[@]}" -- $COMMON "$@" || true  # failures: failures.json
}

collect() {  # collect <label>: events and args.json of the finished runs (final.pt) into the results tree
    local label=$1 dir kind run
    for dir in "$OFFLINE" "$ONLINE"; do
        kind=online
        [ "$dir" = "$OFFLINE" ] && kind=offline
        for run in "$dir/$label"/*/seed*/*/final.pt; do
            [ -f "$run" ] || continue
            run=$(dirname "$run")
            mkdir -p "$RESULTS/$kind/${run#"$dir"/}"
            cp "$run"/events.out.tfevents.* "$run/args.json" "$RESULTS/$kind/${run#"$dir"/}/"
        done
    done
    return 0
}

carry() {  # carry <label>: each finished offline run's offline.pt and args.json to
    # $CARRIED/<label>/<dataset>/seed<N>/<run>/
    local label=$1 run dest
    for run in "$OFFLINE/$label"/*/seed*/*/final.pt; do
        [ -f "$run" ] || continue
        run=$(dirname "$run")
        dest=$CARRIED/${run#"$OFFLINE"/}
        [ "$dest/offline.pt" -nt "$run/offline.pt" ] && continue
        mkdir -p "$dest" && cp "$run/offline.pt" "$run/args.json" "$dest/"
    done
    return 0
}

round2_offline() {  # round2_offline <algorithm> <label> <flags...>: the offline sweep, skipping the seeds whose offline
    # events are committed; with RULE=1 the hand-over rule on this sweep's seeds (handover_rule.py, its keeper linking
    # their checkpoints meanwhile); then the finished phases carried and their events collected
    local algorithm=$1 label=$2 keeper= folders=() dataset seed
    shift 2
    for dataset in $DATASETS; do for seed in $SEEDS; do folders+=("$OFFLINE/$label/$dataset/seed$seed"); done; done
    if [ "${RULE:-0}" = 1 ]; then
        python benchmark/protocols/handover_rule.py keep "${folders[@]}" &
        keeper=$!
        trap 'kill $keeper 2>/dev/null' EXIT  # also when this script is interrupted
    fi
    python benchmark/sweep.py --algorithms "$algorithm" --label "$label" --datasets $DATASETS --seeds $SEEDS \
        --sweep-dir "$OFFLINE" --workers "$WORKERS" --collected "$RESULTS/offline" -- $COMMON "$@" || true
    if [ -n "$keeper" ]; then
        kill -0 "$keeper" 2>/dev/null || { echo "error: the checkpoint keeper of $label stopped early" >&2; exit 1; }
        kill "$keeper"
        wait "$keeper" 2>/dev/null || true
        trap - EXIT
        # a failure stops the piece: its online arms must not start from a hand-over the rule has not passed
        python benchmark/protocols/handover_rule.py apply "${folders[@]}"
    fi
    carry "$label"
    mkdir -p "$RESULTS/offline"
    collect "$label"
}

piece() {  # piece <algorithm> <baseline label> <offline flags> -- <online flags> -- <baseline flags>
    # With SEPARATE=1 the baseline flags change the networks (ensemble size, preset): the baseline then gets
    # its own offline sweep with them, else it starts from the method's offline.pt. METHOD_OFFLINE holds flags
    # of the method's offline sweep alone (e.g. its ensemble size, which the baseline's preset sets otherwise).
    local algorithm=$1 baseline=$2
    shift 2
    local offline=() online=() base=() part=0
    for arg in "$@"; do
        if [ "$arg" = "--" ]; then part=$((part + 1)); continue; fi
        case $part in 0) offline+=("$arg") ;; 1) online+=("$arg") ;; 2) base+=("$arg") ;; esac
    done
    local pretrained=${PRETRAINED//\{label\}/$algorithm} base_pretrained=${PRETRAINED//\{label\}/$algorithm}
    # shellcheck disable=SC2086
    sweep "$OFFLINE" "$algorithm" "$algorithm" "${offline[@]}" ${METHOD_OFFLINE:-} --online-steps 0
    if [ "${SEPARATE:-0}" = 1 ]; then
        base_pretrained=${PRETRAINED//\{label\}/$baseline}
        sweep "$OFFLINE" "$algorithm" "$baseline" "${offline[@]}" "${base[@]}" --online-steps 0
    fi
    sweep "$ONLINE" "$algorithm" "$algorithm" --pretrained "$pretrained" "${online[@]}"
    sweep "$ONLINE" "$algorithm" "$baseline" --pretrained "$base_pretrained" "${online[@]}" "${base[@]}"
    mkdir -p "$RESULTS/online" "$RESULTS/offline"
    collect "$algorithm"
    collect "$baseline"
}

case ${1:-} in
opt)
    # paper: 1M TD3+BC updates; 300k online env steps incl. N_tau 25k; N_pretrain 50k; kappa over 150k; width 256
    piece opt td3 --hidden-dim 128 --offline-steps 50000 --offline-eval-freq 10000 \
        -- --online-steps 20000 --n-tau 2500 --n-pretrain 5000 --kappa-steps 10000 --eval-freq 1000 \
        -- --no-new-critic --no-online-pretraining --n-tau 0 --replay uniform
    ;;
baq)
    # paper: pi_BC 100k, backbone 1M updates, 30k online steps; IQL backbone (the card expects its larger gain)
    piece baq iql --backbone iql --bc-steps 20000 --offline-steps 50000 --offline-eval-freq 10000 \
        -- --online-steps 30000 --eval-freq 2500 \
        -- --no-use-weight --no-use-priority
    ;;
so2)
    # paper: EDAC N=50 (hopper), width 256, 3M offline updates, 100k online env steps x N_upc 10, warm-up 5k
    piece so2 edac --num-critics 10 --hidden-dim 64 --offline-steps 20000 --offline-eval-freq 5000 \
        -- --online-steps 5000 --warmup-steps 250 --eval-freq 500 \
        -- --target-noise 0 --updates-per-step 1 --actor-update-freq 1
    ;;
so2-ablation)
    # SO2's own ablation ([SO2] Fig. 5/6), paired per seed: SO2 again (so2-rerun), N_upc 10 without PVU
    # (--target-noise 0) and PVU with N_upc 1, all three from the same EDAC offline.pt. These offline.pt files are
    # committed (results/protocol-cpu/checkpoints/so2-ablation/, 1.6 MB each): an offline run made again with
    # another version of the code or libraries differs in float rounding, and a hand-over moves with it.
    checkpoints=$RESULTS/checkpoints/so2-ablation
    if ! ls "$checkpoints"/*/seed*/offline.pt >/dev/null 2>&1; then
        sweep "$OFFLINE" so2 so2-ablation --num-critics 10 --hidden-dim 64 --offline-steps 20000 \
            --offline-eval-freq 5000 --online-steps 0
        for run in "$OFFLINE"/so2-ablation/*/seed*/*/offline.pt; do  # <dataset>/seed<N>/<run>/offline.pt
            dest=$checkpoints/$(dirname "$(dirname "${run#"$OFFLINE"/so2-ablation/}")")
            mkdir -p "$dest" && cp "$run" "$dest/offline.pt"
        done
        collect so2-ablation
    fi
    online=(--pretrained "$checkpoints/{dataset}/seed{seed}/offline.pt" --online-steps 5000 --warmup-steps 250)
    online+=(--eval-freq 500)
    sweep "$ONLINE" so2 so2-upc1 "${online[@]}" --updates-per-step 1 --actor-update-freq 1
    collect so2-upc1
    sweep "$ONLINE" so2 so2-no-pvu "${online[@]}" --target-noise 0
    collect so2-no-pvu
    sweep "$ONLINE" so2 so2-rerun "${online[@]}"
    collect so2-rerun
    ;;
enoto)
    # paper: CQL-N N=10, width 256, 1M offline updates, 250k online steps; baseline CQL -> SAC (2 critics)
    # --no-normalize-states: the committed runs predate the state normalization default (raw states, official)
    SEPARATE=1 METHOD_OFFLINE="--num-critics 5" piece enoto cql-sac --hidden-dim 64 --no-normalize-states \
        --offline-steps 10000 --offline-eval-freq 5000 \
        -- --online-steps 30000 --eval-freq 2500 \
        -- --preset cql_sac
    ;;
off2on)
    # paper: 5 CQL agents, width 256, 1M offline updates (BC for the first 40k), 250k online steps
    # --no-normalize-states: as for enoto
    SEPARATE=1 piece off2on uniform-n1 --hidden-dim 64 --no-normalize-states --offline-steps 10000 --bc-steps 400 \
        --offline-eval-freq 5000 \
        -- --online-steps 30000 --eval-freq 2500 \
        -- --replay uniform --num-agents 1
    ;;
enoto-strong)
    # Issue #34 item 2: ENOTO from strong hand-overs. Its defaults (10 critics, width 256, standardised states)
    # beside CQL -> SAC and CQL -> CQL, both from ONE 2-critic CQL pretraining of the same length per seed.
    DATASETS=hopper-sac-medium
    offline=(--offline-steps 10000 --offline-eval-freq 2500 --checkpoint-freq 1000 --online-steps 0)
    RULE=1 round2_offline enoto enoto-strong "${offline[@]}"
    RULE=1 round2_offline enoto cql2-strong "${offline[@]}" --preset cql_sac
    online=(--online-steps 30000 --eval-freq 2500 --checkpoint-freq 2500)
    sweep "$ONLINE" enoto enoto-strong --pretrained "${CARRIED_PRETRAINED//\{label\}/enoto-strong}" "${online[@]}"
    for preset in cql_sac cql_cql; do
        sweep "$ONLINE" enoto "${preset//_/-}-strong" --pretrained "${CARRIED_PRETRAINED//\{label\}/cql2-strong}" \
            "${online[@]}" --preset "$preset"
    done
    mkdir -p "$RESULTS/online" "$RESULTS/offline"
    for label in enoto-strong cql2-strong cql-sac-strong cql-cql-strong; do collect "$label"; done
    ;;
off2on-strong)
    # Issue #34 item 3: Off2On (5 agents, balanced replay) beside one agent with uniform replay, each from its own
    # pretraining; width 256, standardised states (the defaults).
    DATASETS=hopper-sac-medium
    offline=(--offline-steps 10000 --bc-steps 400 --offline-eval-freq 2500 --checkpoint-freq 1000 --online-steps 0)
    RULE=1 round2_offline off2on off2on-strong "${offline[@]}"
    RULE=1 round2_offline off2on uniform-n1-strong "${offline[@]}" --num-agents 1
    online=(--online-steps 30000 --eval-freq 2500 --checkpoint-freq 2500)
    sweep "$ONLINE" off2on off2on-strong --pretrained "${CARRIED_PRETRAINED//\{label\}/off2on-strong}" "${online[@]}"
    sweep "$ONLINE" off2on uniform-n1-strong --pretrained "${CARRIED_PRETRAINED//\{label\}/uniform-n1-strong}" \
        "${online[@]}" --replay uniform
    mkdir -p "$RESULTS/online" "$RESULTS/offline"
    for label in off2on-strong uniform-n1-strong; do collect "$label"; done
    ;;
opt-1m)
    # Issue #34 item 4: OPT at the paper's offline budget (1M TD3+BC updates, width 256), then OPT and plain TD3
    # from each offline.pt at the protocol's online settings. Resumable: run it again after an interruption.
    DATASETS=hopper-sac-medium
    round2_offline opt opt-1m --offline-steps 1000000 --offline-eval-freq 50000 --checkpoint-freq 10000 --online-steps 0
    online=(--pretrained "${CARRIED_PRETRAINED//\{label\}/opt-1m}" --online-steps 20000 --n-tau 2500 --n-pretrain 5000)
    online+=(--kappa-steps 10000 --eval-freq 1000)
    sweep "$ONLINE" opt opt-1m "${online[@]}"
    sweep "$ONLINE" opt td3-1m "${online[@]}" --no-new-critic --no-online-pretraining --n-tau 0 --replay uniform
    mkdir -p "$RESULTS/online" "$RESULTS/offline"
    for label in opt-1m td3-1m; do collect "$label"; done
    ;;
collect)  # collect <label...>: copy what has finished so far (e.g. before a session ends)
    shift
    mkdir -p "$RESULTS/online" "$RESULTS/offline"
    for label in "$@"; do collect "$label"; done
    ;;
carry)  # carry <label...>: copy finished offline.pt files to $CARRIED again (e.g. after a hand-over rule extension)
    shift
    for label in "$@"; do carry "$label"; done
    ;;
report)
    python benchmark/report.py --sweep-dir "$RESULTS/online" --out "$RESULTS" --baseline opt=td3 --baseline baq=iql \
        --baseline so2=edac --baseline enoto=cql-sac --baseline off2on=uniform-n1 \
        --only opt td3 baq iql so2 edac enoto cql-sac off2on uniform-n1 \
        --command "bash benchmark/protocols/cpu.sh <algorithm> (flags: benchmark/protocols/cpu.md)"
    # SO2's ablation: three arms from one EDAC offline.pt per seed, so the differences are taken per seed
    python benchmark/report.py --sweep-dir "$RESULTS/online" --out "$RESULTS/so2-ablation" --paired --drop-step 5000 \
        --only so2-rerun so2-no-pvu so2-upc1 --baseline so2-rerun=so2-no-pvu --baseline so2-rerun=so2-upc1 \
        --command "bash benchmark/protocols/cpu.sh so2-ablation (flags: benchmark/protocols/cpu.md)" || true
    arm_logs() {  # arm_logs <report dir> <arms...>: the logs' Q diagnostics per arm and seed, where that report is
        local out=$1
        shift
        if [ -d "$out" ]; then
            python benchmark/diagnostics/arm_logs.py --sweep-dir "$RESULTS/online" --arms "$@" --per-seed \
                --out "$out/logs.md" > /dev/null || true
        fi
    }
    arm_logs "$RESULTS/so2-ablation" so2-rerun so2-no-pvu so2-upc1
    # Round 2 (issue #34): ENOTO and Off2On from strong hand-overs (each arm its own pretraining: unpaired), OPT
    # and TD3 from one 1M-update offline.pt per seed (paired)
    python benchmark/report.py --sweep-dir "$RESULTS/online" --out "$RESULTS/strong" --lowest-until 10000 \
        --only enoto-strong cql-sac-strong cql-cql-strong off2on-strong uniform-n1-strong \
        --baseline enoto-strong=cql-sac-strong --baseline enoto-strong=cql-cql-strong \
        --baseline off2on-strong=uniform-n1-strong \
        --command "bash benchmark/protocols/cpu.sh enoto-strong|off2on-strong (flags: benchmark/protocols/cpu.md)" || true
    python benchmark/report.py --sweep-dir "$RESULTS/online" --out "$RESULTS/opt-1m" --paired --lowest-until 10000 \
        --only opt-1m td3-1m \
        --baseline opt-1m=td3-1m --command "bash benchmark/protocols/cpu.sh opt-1m (flags: benchmark/protocols/cpu.md)" \
        || true
    arm_logs "$RESULTS/strong" enoto-strong cql-sac-strong cql-cql-strong off2on-strong uniform-n1-strong
    arm_logs "$RESULTS/opt-1m" opt-1m td3-1m
    offline_curves() {  # offline_curves <report dir> <labels...>: every seed's offline evaluations up to the hand-over
        local out=$1
        shift
        if [ -d "$out" ]; then
            python benchmark/diagnostics/offline_curves.py --sweep-dir "$RESULTS/offline" --labels "$@" \
                --out "$out/offline.md" || true
        fi
    }
    offline_curves "$RESULTS/strong" enoto-strong cql2-strong off2on-strong uniform-n1-strong
    offline_curves "$RESULTS/opt-1m" opt-1m
    ;;
*)
    echo "usage: bash benchmark/protocols/cpu.sh opt|baq|so2|so2-ablation|enoto|off2on|enoto-strong|off2on-strong|opt-1m|collect LABEL...|carry LABEL...|report" >&2
    exit 2
    ;;
esac
