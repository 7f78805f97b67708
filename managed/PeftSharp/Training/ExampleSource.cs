using PeftSharp.Data;

namespace PeftSharp.Training;

/// <summary>A deterministic example source that can be rewound to a position (for resuming).</summary>
public sealed class ExampleSource
{
    private readonly Func<IEnumerable<Example>> open;
    private readonly long? count;
    private IEnumerator<Example> stream;

    /// <param name="open">The examples from the start.</param>
    /// <param name="count">How many <paramref name="open"/> yields when it is finite: a seek then costs at most one pass.</param>
    public ExampleSource(Func<IEnumerable<Example>> open, long? count = null)
    {
        this.open = open;
        this.count = count;
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

    /// <summary>Back to the state after <paramref name="position"/> examples: a finite source wraps, so only position mod its count is replayed.</summary>
    public void Seek(long position)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        stream = open().GetEnumerator();
        Position = 0;
        long replay = count is long n and > 0 ? position % n : position;
        while (Position < replay) Next((int)Math.Min(4096, replay - Position));
        Position = position;
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

    public static ExampleSource List(IReadOnlyList<Example> examples) => new(() => examples, examples.Count);
}
