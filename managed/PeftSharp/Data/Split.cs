namespace PeftSharp.Data;

/// <summary>Which side of the by-example split to draw from.</summary>
public enum Split
{
    Train,
    HeldOut,
}
