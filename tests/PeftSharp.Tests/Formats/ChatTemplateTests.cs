using System.Diagnostics;
using System.Text.Json.Nodes;
using NUnit.Framework;
using PeftSharp.Data;

namespace PeftSharp.Tests.Formats;

/// <summary>
/// Chat templates against Jinja2 itself: every case of Fixtures/ChatTemplates/cases.json (the templates Llama 3 / 3.2,
/// Qwen2 / 2.5 / 3 and Mistral v0.1 / v0.3 ship, over plain, tool-calling and thinking conversations, plus snippets
/// aimed at whitespace control, scoping, printing, operators, filters, tests and methods) was rendered by Jinja2 3.1
/// under Hugging Face's environment (generate.py) into expected.json; the text must match exactly, and a case Jinja2
/// refused must be refused.
/// </summary>
public sealed class ChatTemplateTests
{
    private static string Fixtures => Path.Combine(TestContext.CurrentContext.TestDirectory, "Fixtures", "ChatTemplates");

    private static JsonObject Cases => (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures, "cases.json")))!;

    public static IEnumerable<TestCaseData> CaseNames()
    {
        string dir = Path.Combine(AppContext.BaseDirectory, "Fixtures", "ChatTemplates");
        var cases = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "cases.json")))!;
        return cases["cases"]!.AsArray().Select(c => new TestCaseData(c!["name"]!.GetValue<string>()).SetName("Render_" + c["name"]!.GetValue<string>()));
    }

    [TestCaseSource(nameof(CaseNames))]
    public void Render_MatchesJinja2(string name)
    {
        var all = Cases;
        var c = all["cases"]!.AsArray().Single(x => x!["name"]!.GetValue<string>() == name)!.AsObject();
        var expected = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures, "expected.json")))![name]!.AsObject();
        var variables = c["variables"]?.DeepClone().AsObject() ?? new JsonObject();
        var special = new Dictionary<string, string> { ["bos_token"] = "<s>", ["eos_token"] = "</s>" };
        var messages = c["messages"] is { } m ? all["conversations"]![m.GetValue<string>()]!.DeepClone().AsArray() : new JsonArray();
        var tools = c["tools"]?.GetValue<bool>() == true ? all["tools"]!.DeepClone().AsArray() : null;
        bool prompt = c["add_generation_prompt"]?.GetValue<bool>() ?? true;
        string source = c["source"]?.GetValue<string>() ?? File.ReadAllText(Path.Combine(Fixtures, c["template"]!.GetValue<string>()));

        string Render() => ChatTemplate.Parse(source, name, special).Render(messages, prompt, tools, variables);
        if (expected["text"] is { } text)
        {
            string rendered;
            try
            {
                rendered = Render();
            }
            catch (PeftSharpInputException refusal)
            {
                Assert.Fail($"Jinja2 rendered it, PeftSharp refused: {refusal.Message}");
                return;
            }

            Assert.That(rendered, Is.EqualTo(text.GetValue<string>()));
            return;
        }

        string error = expected["error"]!.GetValue<string>();
        var e = Assert.Throws<PeftSharpInputException>(() => Render())!;
        Assert.That(e.Message, Does.StartWith(name + ":"), "the error names the template");
        if (name.Contains("refused") || name == "raise") Assert.That(e.Message, Does.Contain(error), "raise_exception's message reaches the user");
    }

    [Test]
    public void Expected_IsWhatJinja2RendersToday()
    {
        // The committed expected.json must be what generate.py writes; needs Debian's python3-jinja2.
        const string python = "/usr/bin/python3";
        if (!File.Exists(python) || Run(python, "-c \"import jinja2\"").Code != 0) Assert.Ignore("python3 with jinja2 (Debian python3-jinja2) is not installed");
        string work = Path.Combine(Path.GetTempPath(), "chat-templates-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(work);
        try
        {
            foreach (var f in Directory.GetFiles(Fixtures).Where(f => !f.EndsWith("expected.json"))) File.Copy(f, Path.Combine(work, Path.GetFileName(f)));
            var (code, output) = Run(python, Path.Combine(work, "generate.py"));
            Assert.That(code, Is.EqualTo(0), output);
            var fresh = JsonNode.Parse(File.ReadAllText(Path.Combine(work, "expected.json")))!;
            var committed = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures, "expected.json")))!;
            Assert.That(JsonNode.DeepEquals(fresh, committed), Is.True, "expected.json is stale: rerun generate.py");
        }
        finally
        {
            Directory.Delete(work, true);
        }
    }

    [TestCase("{% include 'x.jinja' %}", "include")]
    [TestCase("{% for m in messages recursive %}{% endfor %}", "recursive")]
    [TestCase("{% filter upper %}x{% endfilter %}", "filter")]
    public void Parse_UnsupportedStatement_IsRefusedWithLine(string source, string construct)
    {
        var e = Assert.Throws<NotSupportedException>(() => ChatTemplate.Parse("\n" + source, "tpl.jinja"))!;
        Assert.That(e.Message, Does.Contain("tpl.jinja: chat template line 2").And.Contain(construct));
    }

    [TestCase("{{ x | no_such_filter }}", "no_such_filter")]
    [TestCase("{{ x is no_such_test }}", "no_such_test")]
    [TestCase("{{ 'x'.replace() }}", "line 2")]
    public void Render_UnknownFilterOrTest_IsRefusedWithLine(string source, string name)
    {
        var t = ChatTemplate.Parse("a\n" + source, "tpl.jinja");
        var e = Assert.Throws<PeftSharpInputException>(() => t.Render(new JsonArray()))!;
        Assert.That(e.Message, Does.Contain("tpl.jinja: chat template line 2").And.Contain(name));
    }

    [TestCase("{% if x %}never closed", "endif")]
    [TestCase("{{ 'unterminated }}", "string")]
    [TestCase("{{ (1 }}", "never closed")]
    public void Parse_SyntaxError_NamesTemplateAndLine(string source, string what)
    {
        var e = Assert.Throws<PeftSharpInputException>(() => ChatTemplate.Parse(source, "tpl.jinja"))!;
        Assert.That(e.Message, Does.StartWith("tpl.jinja: chat template line 1").And.Contain(what));
    }

    [Test]
    public void ForFolder_ReadsJinjaFileFirstThenTokenizerConfig()
    {
        string dir = Path.Combine(Path.GetTempPath(), "chat-folder-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            Assert.That(ChatTemplate.ForFolder(dir), Is.Null, "no template");
            File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"),
                """
                {"bos_token": {"content": "<B>"}, "eos_token": "<E>",
                 "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}cfg{{ eos_token }}"}]}
                """);
            var messages = new JsonArray();
            Assert.That(ChatTemplate.ForFolder(dir)!.Render(messages), Is.EqualTo("<B>cfg<E>"), "the list's default template, special tokens as objects or strings");
            File.WriteAllText(Path.Combine(dir, ChatTemplate.JinjaFile), "{{ bos_token }}jinja");
            Assert.That(ChatTemplate.ForFolder(dir)!.Render(messages), Is.EqualTo("<B>jinja"), "chat_template.jinja wins (transformers 4.47+ and 5 write it)");
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    private static (int Code, string Output) Run(string file, string args)
    {
        var p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        string output = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, output);
    }
}
