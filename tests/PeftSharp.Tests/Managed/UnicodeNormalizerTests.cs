using System.Text;
using NUnit.Framework;
using PeftSharp.Data;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// Normalization is real in this process, which runs in invariant-globalization mode (where string.Normalize returns
/// its input): composed and decomposed accents, Hangul jamo, compatibility ligatures and circled digits, and a code
/// point whose NFKD form is 18 characters long (the output buffer must grow).
/// </summary>
public sealed class UnicodeNormalizerTests
{
    [TestCase("e\u0301", NormalizationForm.FormC, "\u00E9")]
    [TestCase("\u00E9", NormalizationForm.FormD, "e\u0301")]
    [TestCase("\u1100\u1161\u11A8", NormalizationForm.FormC, "\uAC01")]
    [TestCase("\uAC01", NormalizationForm.FormD, "\u1100\u1161\u11A8")]
    [TestCase("\uFB01ve \u2460", NormalizationForm.FormKC, "five 1")]
    [TestCase("\uFB01", NormalizationForm.FormC, "\uFB01")]
    [TestCase("Vi\u1EC7t", NormalizationForm.FormD, "Vie\u0323\u0302t")]
    [TestCase("plain ascii", NormalizationForm.FormKD, "plain ascii")]
    public void Normalize_MatchesTheUnicodeForms(string input, NormalizationForm form, string expected)
    {
        Assume.That(UnicodeNormalizer.Provider, Is.Not.Null, "no ICU on this machine: non-ASCII text is refused instead (checked below)");
        Assert.That(UnicodeNormalizer.Normalize(input, form), Is.EqualTo(expected), UnicodeNormalizer.Provider);
    }

    [Test]
    public void Normalize_GrowsItsBufferForLongDecompositions_AndSaysWhoNormalizes()
    {
        Assume.That(UnicodeNormalizer.Provider, Is.Not.Null);
        TestContext.Out.WriteLine($"normalized by {UnicodeNormalizer.Provider}; string.Normalize here: {"e\u0301".Normalize(NormalizationForm.FormC) == "\u00E9"}");
        string nfkd = UnicodeNormalizer.Normalize(new string('\uFDFA', 3), NormalizationForm.FormKD);
        Assert.That(nfkd.Length, Is.EqualTo(3 * 18), "U+FDFA decomposes into 18 code points");
    }
}
