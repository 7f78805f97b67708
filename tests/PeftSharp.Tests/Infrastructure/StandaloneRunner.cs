using System.Diagnostics;
using System.Security;
using NUnit.Framework.Api;
using NUnit.Framework.Interfaces;
using NUnit.Framework.Internal;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>
/// The test assembly as a program of its own, for machines without the .NET SDK: a GPU machine lent for a few minutes
/// has no `dotnet test`, so the suite is published self-contained (tests/device/pack.sh) and run there as
/// `PeftSharp.Tests [--where REGEX] [--list]` (or `PeftSharp.Tests --peft ARGS...` for the host). It runs NUnit's
/// own framework runner in process (the runner NUnitLite wraps, which NuGet does not serve here) over the tests whose
/// full name matches REGEX (all of them without one;
/// `"cuda"` picks every test parameterised by the CUDA backend), prints each failure with its message, and ends with
/// the CI line "N passed, N failed, N skipped"; the exit code is the number of failures, at most 100.
/// `dotnet test` does not come through here: it runs the same tests through the NUnit adapter.
/// </summary>
public static class StandaloneRunner
{
    public static int Main(string[] args)
    {
        // The peft host in the same process and runtime (the published folder has no apphost of its own for it).
        if (args.Length > 0 && args[0] == "--peft") return PeftSharp.Trainer.Program.Run(args[1..], Console.Out, Console.Error);

        string? where = null;
        bool list = false;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--where" when i + 1 < args.Length:
                    where = args[++i];
                    break;
                case "--list":
                    list = true;
                    break;
                default:
                    Console.Error.WriteLine($"PeftSharp.Tests: unknown argument '{args[i]}'; use [--where REGEX] [--list], or --peft ARGS...");
                    return 2;
            }
        }

        var runner = new NUnitTestAssemblyRunner(new DefaultTestAssemblyBuilder());
        runner.Load(typeof(StandaloneRunner).Assembly, new Dictionary<string, object>());
        var filter = Filter(where);
        if (list)
        {
            foreach (var name in Leaves(runner.ExploreTests(filter))) Console.WriteLine(name);
            return 0;
        }

        // NUnit redirects Console.Out to the running test's output while it runs, so the listener keeps the real one.
        var listener = new Listener(Console.Out);
        var clock = Stopwatch.StartNew();
        runner.Run(listener, filter);
        Console.WriteLine($"// {clock.Elapsed.TotalSeconds:F1} s{(where == null ? "" : $", tests matching /{where}/")}");
        Console.WriteLine($"{listener.Passed} passed, {listener.Failed} failed, {listener.Skipped} skipped");
        return Math.Min(listener.Failed, 100);
    }

    /// <summary>NUnit's filter for full names matching a regular expression, or every test.</summary>
    internal static ITestFilter Filter(string? where) => where == null
        ? TestFilter.Empty
        : TestFilter.FromXml($"<filter><test re=\"1\">{SecurityElement.Escape(where)}</test></filter>");

    private static IEnumerable<string> Leaves(ITest test) =>
        test.HasChildren ? test.Tests.SelectMany(Leaves) : new[] { test.FullName };

    /// <summary>Counts the leaf results and prints failures and skips with their messages.</summary>
    private sealed class Listener(TextWriter log) : ITestListener
    {
        public int Passed, Failed, Skipped;

        public void TestStarted(ITest test)
        {
        }

        public void TestFinished(ITestResult result)
        {
            if (result.Test.IsSuite)
            {
                // A fixture whose one-time setup failed reports its children through the suite's result.
                if (result.ResultState.Site == FailureSite.SetUp && result.ResultState.Status == TestStatus.Failed)
                {
                    log.WriteLine($"FAILED (setup) {result.FullName}: {result.Message}");
                }

                return;
            }

            switch (result.ResultState.Status)
            {
                case TestStatus.Passed:
                    Passed++;
                    break;
                case TestStatus.Failed:
                    Failed++;
                    log.WriteLine($"FAILED {result.FullName}: {result.Message?.Trim()}");
                    if (!string.IsNullOrEmpty(result.StackTrace)) log.WriteLine(Indent(result.StackTrace));
                    break;
                default:
                    Skipped++;
                    log.WriteLine($"skipped {result.FullName}: {result.Message?.Trim()}");
                    break;
            }
        }

        public void TestOutput(TestOutput output)
        {
        }

        public void SendMessage(TestMessage message)
        {
        }

        private static string Indent(string s) =>
            string.Join('\n', s.Split('\n').Take(8).Select(l => "    " + l.TrimEnd()));
    }
}
