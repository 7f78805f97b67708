using System.Globalization;
using System.Text;

namespace PeftSharp.Training;

/// <summary>
/// A small SVG writer for loss curves (no plotting dependency for two polylines and two axes): the raw per-step loss
/// in a light line, an exponentially smoothed one over it (TensorBoard's debiased moving average, weight 0.9 for long
/// runs), round tick values on both axes, labelled axes, and held-out evaluations as points when there are any.
/// </summary>
public static class LossCurve
{
    private const int W = 720, H = 400, Left = 70, Right = 20, Top = 34, Bottom = 50;

    public static string Svg(IReadOnlyList<StepMetrics> steps, string title, IReadOnlyList<(int Step, double Loss)>? evals = null)
    {
        var ic = CultureInfo.InvariantCulture;
        evals ??= Array.Empty<(int, double)>();
        var sb = new StringBuilder();
        sb.Append(ic, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">");
        sb.Append("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        sb.Append(ic, $"<text x=\"{W / 2}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{System.Security.SecurityElement.Escape(title)}</text>");
        var finite = steps.Where(s => double.IsFinite(s.Loss)).ToList();
        if (finite.Count > 0)
        {
            var losses = finite.Select(s => s.Loss).Concat(evals.Select(e => e.Loss)).Where(double.IsFinite).ToList();
            var (yLo, yHi, yStep) = NiceRange(Math.Min(0, losses.Min()), losses.Max());
            int maxStep = Math.Max(finite.Max(s => s.Step), evals.Count > 0 ? evals.Max(e => e.Step) : 1);
            var (xLo, _, xStep) = NiceRange(0, Math.Max(1, maxStep));
            double xHi = Math.Max(1, maxStep); // the axis ends at the last step; its ticks stay round
            double X(double step) => Left + (W - Left - Right) * (step - xLo) / (xHi - xLo);
            double Y(double loss) => Top + (H - Top - Bottom) * (1 - (loss - yLo) / (yHi - yLo));
            for (double v = yLo; v <= yHi + yStep / 2; v += yStep)
            {
                sb.Append(ic, $"<line x1=\"{Left}\" y1=\"{Y(v):F1}\" x2=\"{W - Right}\" y2=\"{Y(v):F1}\" stroke=\"#e4e4e4\"/>");
                sb.Append(ic, $"<text x=\"{Left - 6}\" y=\"{Y(v) + 4:F1}\" text-anchor=\"end\">{Tick(v, yStep)}</text>");
            }

            for (double v = xLo; v <= xHi + 1e-9; v += xStep)
            {
                sb.Append(ic, $"<line x1=\"{X(v):F1}\" y1=\"{H - Bottom}\" x2=\"{X(v):F1}\" y2=\"{H - Bottom + 5}\" stroke=\"black\"/>");
                sb.Append(ic, $"<text x=\"{X(v):F1}\" y=\"{H - Bottom + 18}\" text-anchor=\"middle\">{Tick(v, xStep)}</text>");
            }

            sb.Append(ic, $"<line x1=\"{Left}\" y1=\"{H - Bottom}\" x2=\"{W - Right}\" y2=\"{H - Bottom}\" stroke=\"black\"/>");
            sb.Append(ic, $"<line x1=\"{Left}\" y1=\"{Top}\" x2=\"{Left}\" y2=\"{H - Bottom}\" stroke=\"black\"/>");
            sb.Append(ic, $"<text x=\"{(Left + W - Right) / 2}\" y=\"{H - 12}\" text-anchor=\"middle\">step</text>");
            sb.Append(ic, $"<text x=\"16\" y=\"{(Top + H - Bottom) / 2}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {(Top + H - Bottom) / 2})\">loss (cross-entropy, nats)</text>");
            Polyline(sb, finite.Select(s => (X(s.Step), Y(s.Loss))), "#9ecae1", 1);
            double weight = Smoothing(finite.Count);
            Polyline(sb, Smoothed(finite.Select(s => s.Loss).ToList(), weight).Select((l, i) => (X(finite[i].Step), Y(l))), "#1f5fa8", 2);
            foreach (var (step, loss) in evals.Where(e => double.IsFinite(e.Loss)))
            {
                sb.Append(ic, $"<circle cx=\"{X(step):F1}\" cy=\"{Y(loss):F1}\" r=\"4.5\" fill=\"#d62728\"/>");
            }

            // Legend, top right.
            int lx = W - Right - 210, ly = Top + 8;
            sb.Append(ic, $"<rect x=\"{lx - 8}\" y=\"{ly - 10}\" width=\"210\" height=\"{(evals.Count > 0 ? 58 : 40)}\" fill=\"white\" stroke=\"#cccccc\"/>");
            sb.Append(ic, $"<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{lx + 24}\" y2=\"{ly}\" stroke=\"#9ecae1\"/><text x=\"{lx + 30}\" y=\"{ly + 4}\">per step</text>");
            sb.Append(ic, $"<line x1=\"{lx}\" y1=\"{ly + 18}\" x2=\"{lx + 24}\" y2=\"{ly + 18}\" stroke=\"#1f5fa8\" stroke-width=\"2\"/>");
            sb.Append(ic, $"<text x=\"{lx + 30}\" y=\"{ly + 22}\">smoothed ({weight:0.##})</text>");
            if (evals.Count > 0) sb.Append(ic, $"<circle cx=\"{lx + 12}\" cy=\"{ly + 36}\" r=\"4.5\" fill=\"#d62728\"/><text x=\"{lx + 30}\" y=\"{ly + 40}\">held-out loss</text>");
        }
        else
        {
            sb.Append(ic, $"<text x=\"{W / 2}\" y=\"{H / 2}\" text-anchor=\"middle\">no finite steps to plot</text>");
        }

        sb.Append("</svg>");
        return sb.ToString();
    }

    /// <summary>The smoothing weight: none for a handful of steps, up to 0.9 for long runs.</summary>
    public static double Smoothing(int steps) => steps < 10 ? 0 : Math.Min(0.9, 1 - 10.0 / steps);

    /// <summary>Exponential moving average with the start debiased (as TensorBoard smooths scalars).</summary>
    public static IReadOnlyList<double> Smoothed(IReadOnlyList<double> values, double weight)
    {
        var result = new double[values.Count];
        double ema = 0, norm = 0;
        for (int i = 0; i < values.Count; i++)
        {
            ema = weight * ema + (1 - weight) * values[i];
            norm = weight * norm + (1 - weight);
            result[i] = ema / norm;
        }

        return result;
    }

    /// <summary>An axis range from <paramref name="lo"/> to <paramref name="hi"/> widened to round ticks (1, 2 or 5 times a power of ten, 4 to 8 of them).</summary>
    public static (double Lo, double Hi, double Step) NiceRange(double lo, double hi)
    {
        if (!(hi > lo)) hi = lo + 1;
        double raw = (hi - lo) / 5, mag = Math.Pow(10, Math.Floor(Math.Log10(raw)));
        double step = new[] { 1.0, 2, 5, 10 }.Select(m => m * mag).First(s => s >= raw * (1 - 1e-9)); // 0.1 / 5 is 0.0200...02
        return (Math.Floor(lo / step) * step, Math.Ceiling(hi / step) * step, step);
    }

    private static string Tick(double v, double step)
    {
        int decimals = Math.Max(0, -(int)Math.Floor(Math.Log10(step) + 1e-9));
        return Math.Round(v, decimals).ToString("F" + decimals, CultureInfo.InvariantCulture);
    }

    private static void Polyline(StringBuilder sb, IEnumerable<(double X, double Y)> points, string colour, double width)
    {
        var ic = CultureInfo.InvariantCulture;
        sb.Append(ic, $"<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width}\" points=\"");
        foreach (var (x, y) in points) sb.Append(ic, $"{x:F1},{y:F1} ");
        sb.Append("\"/>");
    }
}
