#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after `tests/device/pack.sh bench` here and with .device carried:
#   bash tests/device/targets.sh [DEVICE] [--small]
# The issues' performance targets on DEVICE (default cuda) in one short run (bench/PeftSharp.Bench/Targets.cs); the
# output also goes to $OUT/targets.txt when the device tool sets OUT.
set -uo pipefail
device=${1:-cuda}
shift || true
out=${OUT:-/tmp}
dir=$(mktemp -d)
tar -C "$dir" -xJf .device/bench.tar.xz || { echo "no .device/bench.tar.xz: run 'tests/device/pack.sh bench' first and carry .device"; exit 2; }
export DOTNET_CLI_TELEMETRY_OPTOUT=1
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
PEFTSHARP_BENCH_DEVICE="$device" "$dir/bench/PeftSharp.Bench" targets "$@" 2>&1 | tee "$out/targets.txt"
exit "${PIPESTATUS[0]}"
