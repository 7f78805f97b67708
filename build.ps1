# PowerShell mirror of the dotnet commands (see README.md). Usage:
#   ./build.ps1 [-Configuration Release|Debug] [-Test] [-Bench] [-Filter <BenchmarkDotNet filter>]
param(
    [ValidateSet('Debug', 'Release')][string]$Configuration = 'Release',
    [switch]$Test,
    [switch]$Bench,
    [string]$Filter = '*'
)
$ErrorActionPreference = 'Stop'
Set-Location $PSScriptRoot

dotnet build Engine.sln -c $Configuration
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }

if ($Test) {
    dotnet test tests/PeftSharp.Tests -c $Configuration --no-build
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}

if ($Bench) {
    dotnet run --project bench/PeftSharp.Bench -c Release -- --filter $Filter
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}
