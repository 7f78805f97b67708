using System.Globalization;
using System.Text;

namespace PeftSharp.Analysis;

/// <summary>A small SVG line chart (no plotting dependency): named series over shared axes, ticks at both ends and the middle, a legend on the right.</summary>
public static class SvgChart
{
    private static readonly string[] Colors = { "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f" };

    /// <summary>The chart; the y axis spans <paramref name="yRange"/>, or the data's range (from 0 when all values are positive).</summary>
    public static string Lines(string title, string xLabel, string yLabel, IReadOnlyList<(string Name, IReadOnlyList<(double X, double Y)> Points)> series,
        (double Lo, double Hi)? yRange = null)
    {
        const int W = 720, H = 400, L = 64, R = 170, T = 34, B = 46;
        var ic = CultureInfo.InvariantCulture;
        var all = series.SelectMany(s => s.Points).Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y)).ToList();
        double xLo = all.Count > 0 ? all.Min(p => p.X) : 0, xHi = all.Count > 0 ? all.Max(p => p.X) : 1;
        var (yLo, yHi) = yRange ?? (all.Count > 0 ? (Math.Min(0, all.Min(p => p.Y)), all.Max(p => p.Y)) : (0, 1));
        if (xHi <= xLo) xHi = xLo + 1;
        if (yHi <= yLo) yHi = yLo + 1;
        double X(double x) => L + (W - L - R) * (x - xLo) / (xHi - xLo);
        double Y(double y) => T + (H - T - B) * (1 - (y - yLo) / (yHi - yLo));
        var sb = new StringBuilder();
        sb.Append(ic, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">");
        sb.Append("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        sb.Append(ic, $"<text x=\"{(W - R) / 2}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{System.Security.SecurityElement.Escape(title)}</text>");
        for (int t = 0; t <= 4; t++)
        {
            double v = yLo + (yHi - yLo) * t / 4;
            sb.Append(ic, $"<line x1=\"{L}\" y1=\"{Y(v):F1}\" x2=\"{W - R}\" y2=\"{Y(v):F1}\" stroke=\"#e4e4e4\"/>");
            sb.Append(ic, $"<text x=\"{L - 6}\" y=\"{Y(v) + 4:F1}\" text-anchor=\"end\">{v:G3}</text>");
        }

        sb.Append(ic, $"<line x1=\"{L}\" y1=\"{H - B}\" x2=\"{W - R}\" y2=\"{H - B}\" stroke=\"black\"/>");
        sb.Append(ic, $"<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{H - B}\" stroke=\"black\"/>");
        foreach (double x in new[] { xLo, (xLo + xHi) / 2, xHi })
        {
            sb.Append(ic, $"<line x1=\"{X(x):F1}\" y1=\"{H - B}\" x2=\"{X(x):F1}\" y2=\"{H - B + 5}\" stroke=\"black\"/>");
            sb.Append(ic, $"<text x=\"{X(x):F1}\" y=\"{H - B + 18}\" text-anchor=\"middle\">{x:G3}</text>");
        }

        sb.Append(ic, $"<text x=\"{(L + W - R) / 2}\" y=\"{H - 8}\" text-anchor=\"middle\">{System.Security.SecurityElement.Escape(xLabel)}</text>");
        sb.Append(ic, $"<text x=\"16\" y=\"{(T + H - B) / 2}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {(T + H - B) / 2})\">{System.Security.SecurityElement.Escape(yLabel)}</text>");
        for (int g = 0; g < series.Count; g++)
        {
            var points = series[g].Points.Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y)).Select(p => string.Create(ic, $"{X(p.X):F1},{Y(p.Y):F1}"));
            string color = Colors[g % Colors.Length];
            sb.Append(ic, $"<polyline points=\"{string.Join(" ", points)}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>");
            sb.Append(ic, $"<line x1=\"{W - R + 14}\" y1=\"{T + 14 + 18 * g}\" x2=\"{W - R + 36}\" y2=\"{T + 14 + 18 * g}\" stroke=\"{color}\" stroke-width=\"2\"/>");
            sb.Append(ic, $"<text x=\"{W - R + 42}\" y=\"{T + 18 + 18 * g}\">{System.Security.SecurityElement.Escape(series[g].Name)}</text>");
        }

        sb.Append("</svg>");
        return sb.ToString();
    }
}
