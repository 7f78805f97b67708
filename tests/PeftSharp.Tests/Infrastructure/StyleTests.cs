using System.Text.RegularExpressions;
using NUnit.Framework;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>The line length .editorconfig states is the one the code keeps.</summary>
public sealed class StyleTests
{
    [Test]
    public void SourceLines_StayWithinEditorConfigMaxLineLength()
    {
        var root = new DirectoryInfo(TestContext.CurrentContext.TestDirectory);
        while (root != null && !File.Exists(Path.Combine(root.FullName, "Engine.sln"))) root = root.Parent;
        if (root == null) Assert.Ignore("no source tree above the test assembly (a packed suite): nothing to check");
        var config = File.ReadAllText(Path.Combine(root!.FullName, ".editorconfig"));
        var limit = Regex.Match(config, @"\[\*\.cs\][^\[]*?max_line_length\s*=\s*(\d+)", RegexOptions.Singleline);
        Assert.That(limit.Success, Is.True, ".editorconfig states max_line_length for [*.cs]");
        int max = int.Parse(limit.Groups[1].Value);
        var longLines = new List<string>();
        foreach (var top in new[] { "kernels", "engine", "managed", "tests", "bench" })
        {
            foreach (var file in Directory.EnumerateFiles(Path.Combine(root.FullName, top), "*.cs", SearchOption.AllDirectories))
            {
                if (file.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}") || file.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}")) continue;
                int n = 0;
                foreach (var line in File.ReadLines(file))
                {
                    n++;
                    if (line.Length > max) longLines.Add($"{Path.GetRelativePath(root.FullName, file)}:{n} ({line.Length})");
                }
            }
        }

        Assert.That(longLines, Is.Empty, $"lines over {max} characters");
    }
}
