#!/usr/bin/env bash
# Packs the test suite (with the peft host inside it) for a GPU machine that has no .NET SDK: published self-contained
# for linux-x64 and compressed into .device/suite.tar.xz at the repository root, a folder git ignores. Run it here,
# then hand .device to the device tool's run as carry and run tests/device/check.sh there (see tests/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .device
mkdir -p .device
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dotnet publish tests/PeftSharp.Tests -c Release -r linux-x64 --self-contained -p:UseAppHost=true -o "$stage/suite" >/dev/null
tar -C "$stage" -cJf .device/suite.tar.xz suite
echo "packed $(du -sh "$stage/suite" | cut -f1) into .device/suite.tar.xz ($(du -h .device/suite.tar.xz | cut -f1))"
