using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Optim;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class EmbeddingTests : BackendTest
{
    public EmbeddingTests(string backend)
        : base(backend)
    {
    }

    [TestCase(1, 1, 1, TestName = "Embedding_N1_V1_D1")]
    [TestCase(9, 5, 3, TestName = "Embedding_N9_V5_D3_RepeatedIds")]
    [TestCase(4, 300, 17, TestName = "Embedding_N4_V300_D17_MostRowsUnused")]
    public void Embedding_ForwardAndScatterAdd_MatchReference(int tokens, int vocab, int dim)
    {
        var ids = TestData.Ints(tokens, 7, vocab);
        var table = TestData.Uniform(vocab * dim, 8);
        var dy = TestData.Uniform(tokens * dim, 9);
        var tids = Indices("ids", ids);
        var e = new float[tokens * dim];
        EmbeddingReference.Forward(ids, table, e, dim);
        var y = Output("y", tokens, dim);
        Ops.Embedding(tids, Input("table", table, vocab, dim), y);
        Expect(y, e, Tolerances.Exact, "embedding");

        var ed = new float[vocab * dim];
        EmbeddingReference.Backward(ids, dy, ed, dim);
        var dt = Output("dtable", vocab, dim);
        Ops.EmbeddingBackward(tids, Input("dy", dy, tokens, dim), dt);
        Expect(dt, ed, Tolerances.Dot(tokens), "embedding backward");
    }

    [Test]
    public void Embedding_IdOutOfRange_ErrorNamesIdAndTable()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.Embedding(Indices("tokens", new[] { 0, 5 }), Input("embed", new float[10], 5, 2), Output("y", 2, 2)))!;
        Assert.That(e.Message, Does.Contain("id 5").And.Contain("'embed' [5, 2]"));
    }
}
