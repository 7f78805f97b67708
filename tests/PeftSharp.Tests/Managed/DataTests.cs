using NUnit.Framework;
using PeftSharp.Data;

namespace PeftSharp.Tests.Managed;

public sealed class DataTests
{
    [Test]
    public void ByteTokenizer_RoundTripsUnicode()
    {
        var t = new ByteTokenizer();
        const string text = "héllo, wörld → 42";
        Assert.That(t.Decode(t.Encode(text)), Is.EqualTo(text));
        Assert.That(t.Decode(new[] { ByteTokenizer.Bos, 104, 105, ByteTokenizer.Eos }), Is.EqualTo("hi"));
    }

    [Test]
    public void TaskSuite_ExamplesAreCorrect()
    {
        var rng = new Random(1);
        for (int i = 0; i < 200; i++)
        {
            foreach (var task in TaskSuite.Tasks)
            {
                var e = TaskSuite.Generate(task, rng);
                Assert.That(e.Prompt, Does.StartWith(task + " ").And.EndWith("="));
                string input = e.Prompt[(task.Length + 1)..^1];
                switch (task)
                {
                    case "copy": Assert.That(e.Completion, Is.EqualTo(input)); break;
                    case "reverse": Assert.That(e.Completion, Is.EqualTo(new string(input.Reverse().ToArray()))); break;
                    case "sort": Assert.That(e.Completion, Is.EqualTo(new string(input.Order().ToArray()))); break;
                    case "add": Assert.That(int.Parse(e.Completion), Is.EqualTo(input.Split('+').Sum(int.Parse))); break;
                    case "multiply": Assert.That(int.Parse(e.Completion), Is.EqualTo(input.Split('*').Select(int.Parse).Aggregate(1, (a, b) => a * b))); break;
                    case "lookup":
                        var parts = input.Split(' ');
                        Assert.That(parts[..^1].Single(p => p[0] == parts[^1][0])[1..], Is.EqualTo(e.Completion));
                        break;
                    case "brackets": Assert.That(e.Completion, Is.AnyOf("yes", "no")); break;
                }
            }
        }
    }

    [Test]
    public void TaskSuite_SplitsAreDisjointAndDeterministic()
    {
        var train = TaskSuite.Stream(TaskSuite.Tasks, 3, Split.Train).Take(2000).Select(e => e.Prompt).ToHashSet();
        var held = TaskSuite.Stream(TaskSuite.Tasks, 3, Split.HeldOut).Take(200).Select(e => e.Prompt).ToList();
        Assert.That(held.Where(train.Contains), Is.Empty);
        Assert.That(TaskSuite.Stream(new[] { "add" }, 9, Split.Train).Take(5), Is.EqualTo(TaskSuite.Stream(new[] { "add" }, 9, Split.Train).Take(5)));
        Assert.Throws<ArgumentException>(() => TaskSuite.Stream(new[] { "juggle" }, 1, Split.Train).First());
    }

    [Test]
    public void TaskSuite_RenamedTask_IsTheTaskUnderItsNewTag_BadSpecsErrorNamingThem()
    {
        var renamed = TaskSuite.Stream(new[] { "sort@~" }, 4, Split.Train).Take(50).ToList();
        foreach (var e in renamed)
        {
            Assert.That(e.Prompt, Does.StartWith("~ ").And.EndWith("="), e.Prompt);
            string word = e.Prompt[2..^1];
            Assert.That(e.Completion, Is.EqualTo(new string(word.OrderBy(c => c).ToArray())), e.Prompt);
            Assert.That(e.Task, Is.EqualTo("sort@~"));
        }

        Assert.That(renamed.Select(e => e.Prompt).Distinct().Count(), Is.GreaterThan(10));
        foreach (string bad in new[] { "juggle@~", "sort@", "sort@a b", "sort@x=y", "sort@~@" })
        {
            var error = Assert.Throws<ArgumentException>(() => TaskSuite.Stream(new[] { bad }, 1, Split.Train).First())!;
            Assert.That(error.Message, Does.Contain($"'{bad}'"), bad);
        }
    }

    [Test]
    public void Batcher_CompletionOnly_TrainsOnlyTheCompletion()
    {
        var tok = new ByteTokenizer();
        var (tokens, targets) = Batcher.Encode(new[] { new Example("t", "ab=", "c") }, tok, seqLen: 8, completionOnly: true);
        // Inputs [BOS a b = c PAD PAD PAD] (EOS is only ever a target); target at "=" is "c", at "c" is EOS, the rest ignored.
        Assert.That(tokens, Is.EqualTo(new[] { ByteTokenizer.Bos, 'a', 'b', '=', 'c', ByteTokenizer.Pad, ByteTokenizer.Pad, ByteTokenizer.Pad }));
        Assert.That(targets, Is.EqualTo(new[] { -100, -100, -100, 'c', ByteTokenizer.Eos, -100, -100, -100 }));
        var (_, all) = Batcher.Encode(new[] { new Example("t", "ab=", "c") }, tok, seqLen: 8, completionOnly: false);
        Assert.That(all[..5], Is.EqualTo(new[] { 'a', 'b', '=', 'c', ByteTokenizer.Eos }));
        Assert.Throws<ArgumentException>(() => Batcher.Encode(new[] { new Example("t", "abcdefgh=", "c") }, tok, 8, true));
    }

    [Test]
    public void Jsonl_MalformedLine_ErrorNamesFileAndLine()
    {
        string path = Path.Combine(Path.GetTempPath(), $"peftsharp-{Guid.NewGuid():N}.jsonl");
        try
        {
            File.WriteAllText(path, "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"c\"}\n");
            var e = Assert.Throws<PeftSharpInputException>(() => DataFiles.ReadJsonl(path))!;
            Assert.That(e.Message, Does.StartWith($"{path}:3:").And.Contain("completion"));
            File.WriteAllText(path, "{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n");
            Assert.That(Assert.Throws<PeftSharpInputException>(() => DataFiles.ReadJsonl(path))!.Message, Does.StartWith($"{path}:2:"));
            File.WriteAllText(path, "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
            Assert.That(DataFiles.ReadJsonl(path).Single(), Is.EqualTo(new Example("jsonl", "a", "b")));
        }
        finally
        {
            File.Delete(path);
        }
    }
}
