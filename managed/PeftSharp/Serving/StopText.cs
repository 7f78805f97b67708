namespace PeftSharp.Serving;

/// <summary>Stop texts over a growing completion: where one first appears, and how much of the tail to hold back while streaming.</summary>
internal static class StopText
{
    /// <summary>The index where the first stop text starts in <paramref name="text"/>, or -1.</summary>
    public static int Find(string text, IReadOnlyList<string> stops)
    {
        int at = -1;
        foreach (var s in stops)
        {
            if (s.Length == 0) continue;
            int i = text.IndexOf(s, StringComparison.Ordinal);
            if (i >= 0 && (at < 0 || i < at)) at = i;
        }

        return at;
    }

    /// <summary>
    /// Characters at the end of <paramref name="text"/> not to stream yet: the longest tail that begins a stop text
    /// (the next tokens may complete it) and a trailing replacement character (a UTF-8 sequence cut between tokens).
    /// </summary>
    public static int HoldBack(string text, IReadOnlyList<string> stops)
    {
        int hold = 0;
        foreach (var s in stops)
        {
            for (int k = Math.Min(s.Length - 1, text.Length); k > hold; k--)
            {
                if (text.AsSpan(text.Length - k).SequenceEqual(s.AsSpan(0, k)))
                {
                    hold = k;
                    break;
                }
            }
        }

        return text.Length > hold && text[^(hold + 1)] == '\uFFFD' ? hold + 1 : hold;
    }
}
