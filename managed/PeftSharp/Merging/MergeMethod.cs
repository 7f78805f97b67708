namespace PeftSharp.Merging;

/// <summary>The merge methods PeftSharp implements, by mergekit's names.</summary>
public enum MergeMethod
{
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Slerp,
    ModelStock,
    Della,
    DellaLinear,
    Passthrough,
    Nuslerp,
    Karcher,
    Sce,
}
