using System.Globalization;
using System.Text;

namespace PeftSharp.Training;

/// <summary>A small SVG writer for loss curves: no plotting dependency for one polyline and two axes.</summary>
public static class LossCurve
{
    public static string Svg(IReadOnlyList<StepMetrics> steps, string title)
    {
        const int w = 640, h = 360, left = 60, right = 20, top = 30, bottom = 40;
        var ic = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        sb.Append(ic, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
        sb.Append("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        sb.Append(ic, $"<text x=\"{w / 2}\" y=\"18\" text-anchor=\"middle\">{System.Security.SecurityElement.Escape(title)}</text>");
        if (steps.Count > 0)
        {
            double maxLoss = steps.Max(s => s.Loss), minLoss = Math.Min(0, steps.Min(s => s.Loss));
            int maxStep = steps.Max(s => s.Step);
            double X(int step) => left + (w - left - right) * (maxStep <= 1 ? 0 : (step - 1.0) / (maxStep - 1));
            double Y(double loss) => top + (h - top - bottom) * (1 - (loss - minLoss) / Math.Max(1e-9, maxLoss - minLoss));
            sb.Append(ic, $"<line x1=\"{left}\" y1=\"{h - bottom}\" x2=\"{w - right}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
            sb.Append(ic, $"<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
            for (int i = 0; i <= 4; i++)
            {
                double loss = minLoss + (maxLoss - minLoss) * i / 4;
                sb.Append(ic, $"<text x=\"{left - 6}\" y=\"{Y(loss) + 4:F1}\" text-anchor=\"end\">{loss:F2}</text>");
            }

            sb.Append(ic, $"<text x=\"{left}\" y=\"{h - 20}\">1</text><text x=\"{w - right}\" y=\"{h - 20}\" text-anchor=\"end\">{maxStep}</text>");
            sb.Append(ic, $"<text x=\"{w / 2}\" y=\"{h - 8}\" text-anchor=\"middle\">step</text>");
            sb.Append("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
            foreach (var s in steps) sb.Append(ic, $"{X(s.Step):F1},{Y(s.Loss):F1} ");
            sb.Append("\"/>");
        }

        sb.Append("</svg>");
        return sb.ToString();
    }
}
