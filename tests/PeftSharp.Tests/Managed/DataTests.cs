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

    /// <summary>
    /// Documents become [BOS] text [EOS] streams cut into windows of T + 1 ids overlapping by one: every id after the
    /// first is a target exactly once, no document needs to fit a window, and the last window may be short.
    /// </summary>
    [TestCase(4)]
    [TestCase(1)]
    [TestCase(7)]
    [TestCase(100)]
    public void Windows_EveryTokenATargetOnce_DocumentsSeparatedByEos(int seqLen)
    {
        ITokenizer tok = ByteTokenizer.Instance;
        var docs = new[] { new Example(DataFiles.TextTask, "", "hello world"), new Example(DataFiles.TextTask, "", "ab") };
        var stream = docs.SelectMany(d => tok.EncodeStart(d.Completion).Append(ByteTokenizer.Eos)).ToArray();
        var windows = DataFiles.Windows(docs, tok, seqLen);
        Assert.That(windows.All(w => w.Ids!.Length is >= 2 && w.Ids.Length <= seqLen + 1), Is.True);
        Assert.That(windows.Count, Is.EqualTo((stream.Length - 1 + seqLen - 1) / seqLen), "ceil((ids - 1) / T) windows");
        var (tokens, targets) = Batcher.Encode(windows, tok, seqLen, completionOnly: true);
        var trained = targets.Where(t => t != Batcher.IgnoreIndex).ToArray();
        Assert.That(trained, Is.EqualTo(stream[1..]), "each id after the first is predicted once, in order (completionOnly does not mask windows)");
        for (int r = 0; r < windows.Count; r++)
        {
            for (int i = 0; i < seqLen; i++)
            {
                int at = r * seqLen + i;
                if (targets[at] != Batcher.IgnoreIndex) Assert.That(stream[r * seqLen + i + 1], Is.EqualTo(targets[at]));
                if (targets[at] != Batcher.IgnoreIndex) Assert.That(stream[r * seqLen + i], Is.EqualTo(tokens[at]));
            }
        }

        Assert.That(windows.All(w => !w.HasPrompt), Is.True, "windows are not exact-matched");
        Assert.Throws<ArgumentException>(() => DataFiles.Windows(new[] { new Example("jsonl", "p", "c") }, tok, 4));
    }

    [Test]
    public void HoldOut_SeededFraction_KeepsOrder_RefusesWhatLeavesNothing()
    {
        var examples = Enumerable.Range(0, 50).Select(i => new Example("jsonl", $"p{i}", $"c{i}")).ToList();
        var (train, held) = DataFiles.HoldOut(examples, 0.1, seed: 3);
        Assert.That((train.Count, held.Count), Is.EqualTo((45, 5)));
        Assert.That(train.Concat(held).OrderBy(e => int.Parse(e.Prompt[1..])), Is.EqualTo(examples), "a partition");
        Assert.That(held.Select(e => int.Parse(e.Prompt[1..])), Is.Ordered, "file order kept");
        Assert.That(DataFiles.HoldOut(examples, 0.1, seed: 3).HeldOut, Is.EqualTo(held), "seeded");
        Assert.That(DataFiles.HoldOut(examples, 0.1, seed: 4).HeldOut, Is.Not.EqualTo(held));
        Assert.That(DataFiles.HoldOut(examples.Take(3).ToList(), 0.01, seed: 1).HeldOut, Has.Count.EqualTo(1), "at least one");
        Assert.That(Assert.Throws<ArgumentException>(() => DataFiles.HoldOut(examples.Take(1).ToList(), 0.5, 1))!.Message, Does.Contain("leaves none to train on"));
        Assert.Throws<ArgumentException>(() => DataFiles.HoldOut(examples, 1.0, 1));
        Assert.Throws<ArgumentException>(() => DataFiles.HoldOut(examples, 0, 1));
    }

    [Test]
    public void Jsonl_TextLines_AreDocuments_OneKindPerFile()
    {
        string path = Path.Combine(Path.GetTempPath(), $"peftsharp-{Guid.NewGuid():N}.jsonl");
        try
        {
            File.WriteAllText(path, "{\"text\": \"first document\"}\n{\"text\": \"second\", \"meta\": 1}\n");
            Assert.That(DataFiles.ReadJsonl(path), Is.EqualTo(new[] { new Example(DataFiles.TextTask, "", "first document"), new Example(DataFiles.TextTask, "", "second") }));
            File.WriteAllText(path, "{\"text\": \"doc\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n");
            Assert.That(Assert.Throws<PeftSharpInputException>(() => DataFiles.ReadJsonl(path))!.Message, Does.StartWith($"{path}:2:").And.Contain("one kind per file"));
            File.WriteAllText(path, "{\"text\": 5}\n");
            Assert.That(Assert.Throws<PeftSharpInputException>(() => DataFiles.ReadJsonl(path))!.Message, Does.Contain("\"text\" is not a string"));
        }
        finally
        {
            File.Delete(path);
        }
    }
}
