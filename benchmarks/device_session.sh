#!/usr/bin/env bash
# One GPU session's work in one command, for a machine without network access.
#
#   bash benchmarks/device_session.sh STEP [STEP ...]      (output files go to $OUT, default ./out)
#
# Steps, each under its own time limit so that one slow step cannot eat the others:
#   gpu-tests    pytest's GPU tests: compat adapters and patch_fla against the peers, the CUDA-graph
#                decode replay, saved memory (tests marked `gpu`; the full matrix is the next step)
#   gluon-tests  the GPU tests of the Gluon kernels, few-step training and chunk 64 (a new Triton release's first
#                check; GPU_TESTS_K="..." picks others)
#   conformance-planned  the full conformance tier, as planned only
#   conformance  the full conformance tier on the Triton backend as planned, then forced to the one-pass
#                triton.chunk variant (JSON and JUnit reports)
#   context-parallel  distributed.wkv7 over 2 and 4 processes sharing the GPU: the test against one
#                process and float64, then bench_context_parallel.py (the summary pass's overhead)
#   bench        bench_wkv7.py with the peers on the issue's shapes (BENCH_ONLY="a,b" for some)
#   plot         bench_wkv7.py --plot over T
#   tune         the tune tool, one run per kernel group (tune-*.json; each report's table_entries
#                go into nvidia/tables/<arch>.json with --write-table). All ten groups take up to 40 minutes, more than one call:
#                choose some with TUNE_GROUPS="64:chunk_fwd 128:chunk_bwd_split" (K:kernels).
#
# Peers: the wheels in .peers/ (ANCHORS.md says which) go into their own --target folders, since
# rwkv-fla also ships a top-level `fla`. Their first calls autotune for minutes per shape family,
# so the Triton cache (autotune results included) is restored from .tcache/tc.tar.xz when
# present and saved to $OUT/tc.tar.xz at the end (compiled binaries and autotune results only):
# copy it back to .tcache/ and carry .tcache to skip the sweeps next time.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# TRITON_CACHE_AUTOTUNING=1 makes every autotuner keep its results in the cache, rwkv-fla's too
# (fla-core asks for it itself; rwkv-fla does not).
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/rwkv-backends-triton-cache} TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -f .tcache/tc.tar.xz ] && tar -xJf .tcache/tc.tar.xz -C "$TRITON_CACHE_DIR"
NAMES=()
if ls .peers/fla_core-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/peer-fla .peers/fla_core-*.whl .peers/einops-*.whl \
        && NAMES+=(fla fla-layer fla-layer-norecompute)
fi
if ls .peers/rwkv_fla-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/peer-rwkvfla .peers/rwkv_fla-*.whl .peers/einops-*.whl \
        && NAMES+=(rwkv-fla)
fi
# wind_rwkv's chunked CUDA kernel builds with nvcc on the card (one head size per process).
[ -d .peers/wind_rwkv ] && NAMES+=(wind)
PEERS=(--peer-path /tmp/peer-fla --peer-path /tmp/peer-rwkvfla --peer-path "$PWD/.peers")
# BENCH_PEERS="wind" times only those peers (fla-core's first calls autotune for minutes per shape).
[ -n "${BENCH_PEERS:-}" ] && NAMES=(${BENCH_PEERS//,/ })
[ ${#NAMES[@]} -gt 0 ] && PEERS+=(--peers "$(IFS=,; echo "${NAMES[*]}")")
export PYTHONPATH="src:tests:/tmp/peer-fla:/tmp/peer-rwkvfla${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T0=$(date +%s)
for step in "$@"; do
    echo "=== $step (t=$(( $(date +%s) - T0 ))s)"
    case $step in
        gpu-tests)   timeout 420 python3 -m pytest -q -rs -m gpu -k "not full_matrix" -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests ;;
        gluon-tests) timeout 420 python3 -m pytest -q -rs -m gpu -k "${GPU_TESTS_K:-gluon or chunk64 or few_steps}" -p no:cacheprovider \
                         --junitxml="$OUT/gpu-tests-gluon.xml" tests ;;
        conformance-planned) timeout 300 python3 -m rwkv_backends.conformance --backend triton \
                         --report "$OUT/conformance-full.json" --junit "$OUT/conformance-full.xml" | tail -n 3 ;;
        conformance) timeout 300 python3 -m rwkv_backends.conformance --backend triton \
                         --report "$OUT/conformance-full.json" --junit "$OUT/conformance-full.xml" | tail -n 3
                     # small cases plan the two-pass variant: check the one-pass kernels as well
                     timeout 300 python3 -m rwkv_backends.conformance --backend triton.chunk \
                         --report "$OUT/conformance-onepass.json" --junit "$OUT/conformance-onepass.xml" | tail -n 3 ;;
        context-parallel) timeout 300 python3 -m pytest -q -rs -m gpu -k several_processes_on_one_gpu -p no:cacheprovider \
                         --junitxml="$OUT/gpu-tests-context-parallel.xml" tests/test_distributed.py
                     timeout 300 python3 benchmarks/bench_context_parallel.py --out "$OUT/bench-context-parallel.json" | tail -n 9 ;;
        bench)       # BENCH_ONLY="long_T16384,head128" runs those shapes only; head 128 runs in a process of its
                     # own, where wind_rwkv builds for that head size
                     timeout 420 python3 benchmarks/bench_wkv7.py "${PEERS[@]}" --only "${BENCH_ONLY:-train_H32,train_H64,prefill_H32,prefill_H64,long_T16384,decode_B256}" \
                         --out "$OUT/bench.json" | tail -n 10
                     timeout 300 python3 benchmarks/bench_wkv7.py "${PEERS[@]}" --wind-head 128 --only head128 \
                         --out "$OUT/bench-head128.json" | tail -n 3 ;;
        plot)        timeout 420 python3 benchmarks/bench_wkv7.py "${PEERS[@]}" --only prefill_H32 \
                         --plot "$OUT/speedup.png" --out "$OUT/bench-plot.json" | tail -n 12 ;;
        tune)        # one tool run per kernel group ("K:kernels"), each with its own limit and JSON; the prep and
                     # the loaded forward share a run, since the tool picks their chunk size jointly
                     for group in ${TUNE_GROUPS:-64:chunk_fwd 64:chunk_bwd 64:chunk_prep,chunk_fwd_loaded \
                                  64:chunk_transition,chunk_fwd_transition 64:chunk_bwd_split 64:chunk_recompute \
                                  64:recurrent_fwd 128:chunk_prep,chunk_fwd_loaded \
                                  128:chunk_bwd_split 128:chunk_recompute}; do
                         name="tune-${group/:/-}"; name="${name//,/_}"
                         timeout 240 python3 -m rwkv_backends.tune --K "${group%%:*}" --kernels "${group#*:}" \
                             --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
                         echo "$name: rc $?"
                     done ;;
        *) echo "unknown step: $step" ;;
    esac
done
echo "=== done (t=$(( $(date +%s) - T0 ))s)"
[ -n "${KEEP_CACHE:-1}" ] && [ "${KEEP_CACHE:-1}" != 0 ] && ( cd "$TRITON_CACHE_DIR" && find . -type f \( -name '*.ptx' -o -name '*.ttir' -o -name '*.ttgir' -o -name '*.llir' \
    -o -name '*.source' \) -delete && tar -cJf "$OUT/tc.tar.xz" . )
