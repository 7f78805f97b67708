namespace PeftSharp.Tests.Infrastructure;

/// <summary>The dotnet executable that runs this test process (dotnet test sets DOTNET_HOST_PATH), else "dotnet" from the PATH.</summary>
internal static class DotnetHost
{
    public static string Path => Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet";
}
