using System.Xml.Linq;
using NUnit.Framework;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

public sealed class LossCurveTests
{
    [TestCase(0.0, 5.5, 0.0, 6.0, 2.0)]
    [TestCase(0.0, 0.37, 0.0, 0.4, 0.1)]
    [TestCase(1.2, 1.3, 1.2, 1.3, 0.02)]
    [TestCase(0.0, 120.0, 0.0, 150.0, 50.0)]
    [TestCase(3.0, 3.0, 3.0, 4.0, 0.2)]
    public void NiceRange_RoundTicksCoveringTheData(double lo, double hi, double eLo, double eHi, double eStep)
    {
        var (l, h, s) = LossCurve.NiceRange(lo, hi);
        Assert.That((l, h, s), Is.EqualTo((eLo, eHi, eStep)).Using<(double, double, double)>((a, b) =>
            Math.Abs(a.Item1 - b.Item1) < 1e-9 && Math.Abs(a.Item2 - b.Item2) < 1e-9 && Math.Abs(a.Item3 - b.Item3) < 1e-9));
        Assert.That(l, Is.LessThanOrEqualTo(lo));
        Assert.That(h, Is.GreaterThanOrEqualTo(hi));
    }

    [Test]
    public void Smoothed_IsTheDebiasedMovingAverage()
    {
        var v = new[] { 4.0, 2.0, 3.0 };
        var s = LossCurve.Smoothed(v, 0.5);
        // Debiased EMA: (1 - w) sum w^k x / (1 - w^n).
        Assert.That(s[0], Is.EqualTo(4.0).Within(1e-12), "the first value is itself, not pulled to 0");
        Assert.That(s[1], Is.EqualTo((0.5 * 2 + 0.25 * 4) / 0.75).Within(1e-12));
        Assert.That(s[2], Is.EqualTo((0.5 * 3 + 0.25 * 2 + 0.125 * 4) / 0.875).Within(1e-12));
        Assert.That(LossCurve.Smoothed(v, 0), Is.EqualTo(v));
    }

    [Test]
    public void Svg_IsWellFormed_WithAxesLabelsBothCurvesAndEvalPoints()
    {
        var steps = Enumerable.Range(1, 50).Select(i => new StepMetrics(i, 5.0 / i + (i % 3) * 0.1, 1, 1e-3f, 100, i)).ToList();
        var doc = XDocument.Parse(LossCurve.Svg(steps, "a <run>", new[] { (50, 0.8) }));
        XNamespace ns = "http://www.w3.org/2000/svg";
        Assert.That(doc.Descendants(ns + "polyline").Count(), Is.EqualTo(2), "raw and smoothed");
        Assert.That(doc.Descendants(ns + "circle").Count(), Is.EqualTo(2), "the eval point and its legend mark");
        var texts = doc.Descendants(ns + "text").Select(t => t.Value).ToList();
        Assert.That(texts, Does.Contain("a <run>").And.Contain("step").And.Contain("loss (cross-entropy, nats)").And.Contain("held-out loss"));
        Assert.That(texts, Does.Contain("0").And.Contain("10").And.Contain("50"), "round step ticks");
        Assert.That(XDocument.Parse(LossCurve.Svg(Array.Empty<StepMetrics>(), "empty")).Descendants(ns + "text").Select(t => t.Value), Does.Contain("no finite steps to plot"));
    }
}
