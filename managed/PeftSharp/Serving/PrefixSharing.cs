namespace PeftSharp.Serving;

/// <summary>Which shared prefixes a batch uses: only those requests name (Told), those plus common token prefixes it finds (Auto), or none.</summary>
public enum PrefixSharing
{
    Off,
    Told,
    Auto,
}
