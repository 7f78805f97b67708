#!/usr/bin/env bash
# Packs a program for a GPU machine that has no .NET SDK: published self-contained for linux-x64 and compressed into
# .device/ at the repository root, a folder git ignores. Run it here, then hand .device to the device tool's run as
# carry (see tests/device/README.md).
#   bash tests/device/pack.sh          the test suite, with the peft host inside it  -> .device/suite.tar.xz
#   bash tests/device/pack.sh bench    the benchmarks (for `targets`)                -> .device/bench.tar.xz
# One of the two at a time: together they pass the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-suite}
case "$what" in
    suite) project=tests/PeftSharp.Tests ;;
    bench) project=bench/PeftSharp.Bench ;;
    *) echo "pack.sh: unknown '$what' (suite or bench)" >&2; exit 2 ;;
esac
rm -rf .device
mkdir -p .device
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dotnet publish "$project" -c Release -r linux-x64 --self-contained -p:UseAppHost=true -o "$stage/$what" >/dev/null
tar -C "$stage" -cJf ".device/$what.tar.xz" "$what"
echo "packed $(du -sh "$stage/$what" | cut -f1) into .device/$what.tar.xz ($(du -h ".device/$what.tar.xz" | cut -f1))"
