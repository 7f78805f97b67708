#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after tests/device/pack.sh here and with .device carried:
#   bash tests/device/check.sh [REGEX]
# Unpacks the suite, lists the devices ILGPU finds, runs `peft selfcheck` on CUDA (every kernel family against its
# double-precision reference) and then every test whose name matches REGEX (default: the CUDA-parameterised ones),
# ending with "N passed, N failed, N skipped". Logs go to $OUT when the device tool sets it.
set -uo pipefail
where=${1:-'"cuda"'}
out=${OUT:-/tmp}
dir=$(mktemp -d)
tar -C "$dir" -xJf .device/suite.tar.xz || { echo "no .device/suite.tar.xz: run tests/device/pack.sh first and carry .device"; exit 2; }
suite="$dir/suite/PeftSharp.Tests"
export DOTNET_CLI_TELEMETRY_OPTOUT=1
# ILGPU loads the driver's libcuda.so; on the lent machines the driver is mounted under /usr/local/nvidia.
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$suite" --peft devices 2>&1 | tee "$out/devices.txt"
"$suite" --peft selfcheck --device cuda 2>&1 | tee "$out/selfcheck.txt"
"$suite" --where "$where" 2>&1 | tee "$out/tests.txt"
rc=${PIPESTATUS[0]}
exit "$rc"
