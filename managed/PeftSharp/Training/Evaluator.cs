using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Serving;

namespace PeftSharp.Training;

public static class Evaluator
{
    public static EvalResult Evaluate(LlamaModel model, IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true, int batchSize = 16)
    {
        var tok = model.Tokenizer;
        double lossSum = 0;
        int counted = 0;
        for (int i = 0; i < examples.Count; i += batchSize)
        {
            var batch = examples.Skip(i).Take(batchSize).ToList();
            var (ids, targets) = Batcher.Encode(batch, tok, seqLen, completionOnly);
            var (l, c) = model.Loss(ids, targets, batch.Count, backward: false);
            lossSum += l * c;
            counted += c;
        }

        int correct = 0;
        foreach (var e in examples)
        {
            string got = Generator.Greedy(model, e.Prompt, maxTokens: tok.EncodeEnd(e.Completion).Length);
            if (got == e.Completion) correct++;
        }

        double loss = counted == 0 ? 0 : lossSum / counted;
        return new EvalResult(loss, Math.Exp(loss), examples.Count == 0 ? 0 : (double)correct / examples.Count, examples.Count);
    }
}
