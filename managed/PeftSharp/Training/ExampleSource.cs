using PeftSharp.Data;

namespace PeftSharp.Training;

/// <summary>A deterministic example source that can be rewound to a position (for resuming).</summary>
public sealed class ExampleSource
{
    private readonly Func<IEnumerable<Example>> open;
    private IEnumerator<Example> stream;

    public ExampleSource(Func<IEnumerable<Example>> open)
    {
        this.open = open;
        stream = open().GetEnumerator();
    }

    /// <summary>Examples consumed so far.</summary>
    public long Position { get; private set; }

    /// <summary>Finite sources (files) wrap around.</summary>
    public List<Example> Next(int count)
    {
        var batch = new List<Example>(count);
        while (batch.Count < count)
        {
            if (!stream.MoveNext())
            {
                stream = open().GetEnumerator();
                if (!stream.MoveNext()) throw new InvalidOperationException("the data source is empty");
            }

            batch.Add(stream.Current);
            Position++;
        }

        return batch;
    }

    public void Seek(long position)
    {
        stream = open().GetEnumerator();
        Position = 0;
        while (Position < position) Next((int)Math.Min(4096, position - Position));
    }

    /// <summary>
    /// The next <paramref name="count"/> batches encoded as training encodes them (<see cref="Batcher"/>): for a look
    /// at the data before training (masks, initialisations, calibration). With <paramref name="rewind"/> the source
    /// returns to where it was, so training then sees the same examples.
    /// </summary>
    public List<(int[] Tokens, int[] Targets)> EncodeBatches(ITokenizer tokenizer, int count, int batchSize, int seqLen, bool completionOnly, bool rewind)
    {
        long start = Position;
        var batches = Enumerable.Range(0, count).Select(_ => Batcher.Encode(Next(batchSize), tokenizer, seqLen, completionOnly)).ToList();
        if (rewind) Seek(start);
        return batches;
    }

    public static ExampleSource Tasks(IReadOnlyList<string> tasks, int seed, Split split) => new(() => TaskSuite.Stream(tasks, seed, split));

    public static ExampleSource List(IReadOnlyList<Example> examples) => new(() => examples);
}
