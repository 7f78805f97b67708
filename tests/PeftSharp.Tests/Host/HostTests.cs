using NUnit.Framework;

namespace PeftSharp.Tests.Host;

public sealed class HostTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PeftSharp.Trainer.Program.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    [Test]
    public void Devices_ListsCpuAndAutoChoice()
    {
        var (code, output, _) = Run("devices");
        Assert.That(code, Is.EqualTo(0));
        Assert.That(output, Does.Contain("cpu").And.Contain("auto picks"));
    }

    [Test]
    public void SelfCheck_OnCpu_AllOpsPass()
    {
        var (code, output, err) = Run("selfcheck", "--device", "cpu");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(output, Does.Contain("matmul").And.Contain("attention").And.Not.Contain("FAILED"));
    }

    [Test]
    public void BadFlagOrDevice_OneLineErrorAndNonZeroExit()
    {
        var (code, _, err) = Run("selfcheck", "--devise", "cpu");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err, Does.Contain("--devise"));
        (code, _, err) = Run("selfcheck", "--device", "quantum");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(err, Does.Contain("quantum"));
    }
}
