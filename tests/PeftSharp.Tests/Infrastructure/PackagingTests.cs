using System.Diagnostics;
using System.IO.Compression;
using System.Xml.Linq;
using NUnit.Framework;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>
/// The packages as users get them: the three libraries and the `peft` .NET tool pack from the builds the suite just
/// made, each with its description, license, readme, XML docs and symbols, and the tool installs from that local
/// feed (and only from it) and runs.
/// </summary>
public sealed class PackagingTests : TempDirectoryTest
{
    private static readonly string[] Projects = { "kernels/PeftSharp.Kernels", "engine/PeftSharp.Engine", "managed/PeftSharp", "managed/PeftSharp.Trainer" };

    [Test]
    public void LibrariesAndTool_Pack_AndTheToolInstallsFromALocalFeed()
    {
        var root = new DirectoryInfo(TestContext.CurrentContext.TestDirectory);
        while (root != null && !File.Exists(Path.Combine(root.FullName, "Engine.sln"))) root = root.Parent;
        if (root == null) Assert.Ignore("no source tree above the test assembly (a packed suite): nothing to pack");
        string configuration = TestContext.CurrentContext.TestDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        string feed = Path.Combine(TempDir, "feed");
        foreach (var project in Projects)
        {
            // --no-build: the suite's own build made these outputs (the test project references every one of them).
            Run(root!.FullName, "pack", project, "-c", configuration, "--no-build", "-o", feed);
        }

        foreach (var (id, xml) in new[] { ("PeftSharp.Kernels", "PeftSharp.Kernels.xml"), ("PeftSharp.Engine", "PeftSharp.Engine.xml"), ("PeftSharp", "PeftSharp.xml"), ("peft", null) })
        {
            string package = Path.Combine(feed, $"{id}.0.1.0.nupkg");
            Assert.That(File.Exists(package), package);
            Assert.That(File.Exists(Path.ChangeExtension(package, ".snupkg")), $"{id}: symbols package");
            using var zip = ZipFile.OpenRead(package);
            var names = zip.Entries.Select(e => e.FullName).ToList();
            Assert.That(names, Does.Contain("README.md"), id);
            if (xml != null) Assert.That(names, Does.Contain($"lib/net10.0/{xml}"), $"{id}: XML docs");
            using var nuspec = zip.GetEntry($"{id}.nuspec")!.Open();
            var meta = XDocument.Load(nuspec).Root!.Elements().First(e => e.Name.LocalName == "metadata");
            string Field(string name) => meta.Elements().FirstOrDefault(e => e.Name.LocalName == name)?.Value ?? "";
            Assert.That(Field("description"), Has.Length.GreaterThan(40), $"{id}: a real description");
            Assert.That(Field("license"), Is.EqualTo("MIT"), id);
            Assert.That(Field("readme"), Is.EqualTo("README.md"), id);
            if (id == "peft") Assert.That(meta.Elements().Any(e => e.Name.LocalName == "packageTypes" && e.ToString().Contains("DotnetTool")), Is.True, "peft packs as a .NET tool");
        }

        // Install from the local feed alone (a nuget.config that clears every other source), then run it.
        string config = Path.Combine(TempDir, "nuget.config");
        File.WriteAllText(config, $"""<?xml version="1.0" encoding="utf-8"?><configuration><packageSources><clear /><add key="local" value="{feed}" /></packageSources></configuration>""");
        string tools = Path.Combine(TempDir, "tools");
        Run(TempDir, "tool", "install", "peft", "--tool-path", tools, "--configfile", config, "--version", "0.1.0");
        var (code, output) = Exec(Path.Combine(tools, OperatingSystem.IsWindows() ? "peft.exe" : "peft"), TempDir, "devices");
        Assert.That(code, Is.EqualTo(0), output);
        Assert.That(output, Does.Contain("auto picks"));
    }

    private static void Run(string directory, params string[] args)
    {
        var (code, output) = Exec(DotnetHost.Path, directory, args);
        Assert.That(code, Is.EqualTo(0), $"dotnet {string.Join(' ', args)}:\n{output}");
    }

    private static (int Code, string Output) Exec(string file, string directory, params string[] args)
    {
        var start = new ProcessStartInfo(file) { WorkingDirectory = directory, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) start.ArgumentList.Add(a);
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        start.Environment["DOTNET_NOLOGO"] = "1";
        using var process = Process.Start(start)!;
        var err = process.StandardError.ReadToEndAsync();
        string output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, output + err.Result);
    }
}
