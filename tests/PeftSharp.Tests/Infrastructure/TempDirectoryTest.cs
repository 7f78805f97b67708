using NUnit.Framework;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>Base for tests that write files: a fresh temporary directory per test, removed afterwards.</summary>
public abstract class TempDirectoryTest
{
    protected string TempDir { get; private set; } = null!;

    [SetUp]
    public void CreateTempDir() => TempDir = Directory.CreateTempSubdirectory("peftsharp-test-").FullName;

    [TearDown]
    public void RemoveTempDir() => Directory.Delete(TempDir, recursive: true);
}
