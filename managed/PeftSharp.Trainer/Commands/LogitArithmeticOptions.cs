using System.CommandLine;
using PeftSharp.Engine;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Variants;

namespace PeftSharp.Trainer.Commands;

/// <summary>
/// The flags of decoding from summed logits, shared by `generate` and `eval`: --contrast NAME (a variant against the
/// base) and --proxy-base / --proxy-expert (proxy-tuning --model by a small tuned/untuned pair).
/// </summary>
internal sealed class LogitArithmeticOptions
{
    public Option<string?> Contrast { get; } = new("--contrast")
    {
        Description = "Contrastive generation: (1 + alpha) x this variant's logits - alpha x the base's, both rows of each request in one mixed batch",
    };

    public Option<float> ContrastAlpha { get; } = new("--contrast-alpha")
    {
        Description = "With --contrast: how far past the fine-tune to move (0: the fine-tune alone)", DefaultValueFactory = _ => 1f,
    };

    public Option<string?> ProxyBase { get; } = new("--proxy-base") { Description = "Proxy-tuning: the small untuned model folder (--model is the large one)" };

    public Option<string?> ProxyExpert { get; } = new("--proxy-expert") { Description = "Proxy-tuning: the small tuned model, as an adapter or delta folder of --proxy-base, or a model folder" };

    public Option<float> ProxyAlpha { get; } = new("--proxy-alpha") { Description = "Proxy-tuning: weight of the small pair's logit difference", DefaultValueFactory = _ => 1f };

    public IEnumerable<Option> All => new Option[] { Contrast, ContrastAlpha, ProxyBase, ProxyExpert, ProxyAlpha };

    /// <summary>What a parse asked for, with the flags that only make sense together checked.</summary>
    public Request Read(ParseResult r)
    {
        bool Given(Option f) => r.GetResult(f) is { Implicit: false };
        if (Given(ContrastAlpha) && !Given(Contrast)) throw new ArgumentException("--contrast-alpha applies to --contrast NAME");
        if (Given(ProxyAlpha) && !Given(ProxyBase)) throw new ArgumentException("--proxy-alpha applies to --proxy-base and --proxy-expert");
        if (Given(ProxyBase) != Given(ProxyExpert)) throw new ArgumentException("proxy-tuning needs both --proxy-base (the small untuned model) and --proxy-expert (its tuned form)");
        if (Given(Contrast) && Given(ProxyBase)) throw new ArgumentException("--contrast and --proxy-base are two ways to decode; choose one");
        return new Request(r.GetValue(Contrast), r.GetValue(ContrastAlpha), r.GetValue(ProxyBase), r.GetValue(ProxyExpert), r.GetValue(ProxyAlpha));
    }

    /// <summary>Logit arithmetic asked for: a contrast against the base (--contrast) or proxy-tuning (--proxy-base, --proxy-expert).</summary>
    public sealed record Request(string? Contrast, float ContrastAlpha, string? ProxyBase, string? ProxyExpert, float ProxyAlpha)
    {
        public bool Any => Contrast != null || ProxyBase != null;

        /// <summary>
        /// The terms over <paramref name="model"/> and its <paramref name="set"/>, a description of them, and what was
        /// loaded for them (the small models and their set), which the caller disposes.
        /// </summary>
        public (IReadOnlyList<LogitTerm> Terms, string What, List<IDisposable> Owned) Terms(Device device, LlamaModel model, VariantSet set)
        {
            var owned = new List<IDisposable>();
            try
            {
                if (Contrast != null)
                {
                    set.IndexOf(Contrast);
                    return (LogitArithmetic.Contrastive(set, Contrast, ContrastAlpha), $"contrastive (1 + {ContrastAlpha:G3}) x {Contrast} - {ContrastAlpha:G3} x base", owned);
                }

                var small = Host.LoadTextModel(ProxyBase!, device);
                owned.Add(small);
                string what = $"proxy-tuned --model + {ProxyAlpha:G3} x (expert - small)";
                if (!VariantFolder.IsVariant(ProxyExpert!))
                {
                    var expert = Host.LoadTextModel(ProxyExpert!, device);
                    owned.Add(expert);
                    return (LogitArithmetic.ProxyTuning(model, small, ProxyAlpha, expertModel: expert), what, owned);
                }

                var smallSet = new VariantSet(small);
                owned.Insert(0, smallSet); // disposed before its model
                smallSet.Add("expert", VariantFolder.Load(ProxyExpert!, small));
                return (LogitArithmetic.ProxyTuning(model, small, ProxyAlpha, smallSet, "expert"), what, owned);
            }
            catch
            {
                foreach (var d in owned) d.Dispose();
                throw;
            }
        }
    }
}
