using System.Diagnostics;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>The scheduler's side: admission, variant residency and one model step (run on the scheduler thread only).</summary>
public sealed partial class VariantServer
{
    /// <summary>Admits waiting requests in arrival order while rows and KV blocks allow (one whose variant cannot be made resident yet is passed over).</summary>
    private void Admit()
    {
        CleanUnloaded();
        foreach (var job in waiting.ToList())
        {
            if (running.Count >= options.MaxRows) break;
            if (job.Request.MaxTokens == 0 && !job.Request.PromptLogprobs)
            {
                job.Admitted = Stopwatch.GetTimestamp();
                Finish(job, () => Complete(job, "", stopped: false));
                continue;
            }

            bool resident;
            try
            {
                resident = EnsureResident(job.Entry);
            }
            catch (Exception ex)
            {
                Fail(job, ex);
                continue;
            }

            if (!resident) continue;
            if (!TryPlace(job)) break; // KV memory: later requests wait behind this one
            if (job.Done.Task.IsCompleted) continue; // refused while placed
            waiting.Remove(job);
            running.Add(job);
            job.Admitted = Stopwatch.GetTimestamp();
            promptTokens += job.Prompt.Length;
            cachedTokens += job.CachedTokens;
        }
    }

    /// <summary>
    /// Finds the request's longest cached prefix, caches its prompt's remaining whole blocks as a new node, and
    /// reserves its own cache for the rest of the prompt and its max tokens. False (nothing changed) when the KV
    /// blocks are not free even after idle cached prefixes leave.
    /// </summary>
    private bool TryPlace(Job job)
    {
        int n = job.Prompt.Length, b = options.BlockSize;
        int variant = job.Entry == null ? -1 : set.IndexOf(job.Entry.Key);
        var root = set.PrefixOf(variant);
        int rootLength = root?.Length ?? 0;
        if (rootLength + n > model.Config.ContextLimit)
        {
            Fail(job, new ArgumentException($"prompt of {n} tokens after {rootLength} virtual tokens exceeds {model.Config.ContextLimitText}"));
            return true;
        }

        // An activated LoRA's positions before its invocation are the base's: it reads and adds base prefixes up to there.
        bool baseOwned = job.ActiveFrom > 0;
        long id = baseOwned ? 0 : job.Entry?.Id ?? 0;
        // A prompt to score is computed whole in the request's own cache (aligned 0: nothing found, nothing added): cached
        // positions would have no logits.
        int aligned = prefixes.Enabled && !job.Request.PromptLogprobs ? Math.Min((n - 1) / b * b, baseOwned ? job.ActiveFrom / b * b : n) : 0;
        var (match, end) = prefixes.Find(id, job.Prompt, aligned);
        bool split = match != null && end < match.End;
        int prefixEnd = aligned > end ? aligned : end;
        int capacity = Math.Min(model.Config.ContextLimit - rootLength - prefixEnd, n - prefixEnd + job.Request.MaxTokens);
        int need = Blocks(capacity) + (split ? Blocks(end - match!.Start) : 0) + (aligned > end ? Blocks(aligned - end) : 0);
        if (match != null) match.Users++; // pinned while room is made
        while (running.Sum(j => j.Blocks) + prefixes.Blocks + need > KvBlocks && prefixes.EvictOne())
        {
        }

        if (match != null) match.Users--;
        if (running.Sum(j => j.Blocks) + prefixes.Blocks + need > KvBlocks) return false;

        var node = match;
        if (split) node = CopyOut(match!, end, job);
        if (aligned > end)
        {
            var cache = new KvCache(model, aligned - end, node?.Cache ?? root);
            node = prefixes.Add(cache, node, id, baseOwned ? null : job.Entry?.Key, job.Prompt, end, aligned);
        }

        if (node != null) node.Users++;
        job.Prefix = node;
        job.Cache = new KvCache(model, capacity, node?.Cache ?? root);
        job.Blocks = Blocks(capacity);
        job.Fed = prefixEnd;
        job.CachedTokens = end;
        return true;
    }

    /// <summary>A new node holding the first <paramref name="end"/> prompt positions of <paramref name="node"/>'s chain, its own part copied from <paramref name="node"/>.</summary>
    private PrefixCacheStore.Node CopyOut(PrefixCacheStore.Node node, int end, Job job)
    {
        var c = model.Config;
        int positions = end - node.Start;
        var cache = new KvCache(model, positions, node.Cache.Parent);
        lock (model.GenerationLock)
        {
            var ops = model.Device.Ops;
            for (int l = 0; l < c.NumHiddenLayers; l++)
            {
                ops.Copy(node.Cache.Keys[l].View(0, 1, positions, c.NumKeyValueHeads, c.HeadDim), cache.Keys[l].View(0, 1, positions, c.NumKeyValueHeads, c.HeadDim));
                ops.Copy(node.Cache.Values[l].View(0, 1, positions, c.NumKeyValueHeads, c.HeadDim), cache.Values[l].View(0, 1, positions, c.NumKeyValueHeads, c.HeadDim));
            }
        }

        cache.Length = positions;
        return prefixes.Add(cache, node.Parent, node.Variant, node.VariantKey, job.Prompt, node.Start, end);
    }

    /// <summary>
    /// Makes a variant resident in the device pools; when <see cref="VariantServerOptions.MaxLoras"/> are, the least
    /// recently used one that no running request or filling prefix needs leaves first. False when none can leave.
    /// </summary>
    private bool EnsureResident(Entry? entry)
    {
        if (entry == null) return true;
        if (resident.ContainsKey(entry))
        {
            resident[entry] = ++tick;
            return true;
        }

        if (resident.Count >= options.MaxLoras)
        {
            var idle = resident.Where(kv => !running.Any(j => j.Entry == kv.Key)).OrderBy(kv => kv.Value).Select(kv => kv.Key).FirstOrDefault();
            if (idle == null) return false;
            Evict(idle);
        }

        set.Add(entry.Key, entry.Variant);
        resident[entry] = ++tick;
        return true;
    }

    private void Evict(Entry entry)
    {
        set.Remove(entry.Key);
        resident.Remove(entry);
        // A prefix-tuned variant's cached prefixes continue its virtual tokens, which leave with it.
        if (entry.Variant is PeftPrefixAdapter) prefixes.DropVariant(entry.Id);
    }

    /// <summary>Unloaded variants whose last request has ended leave the device and the prefix cache.</summary>
    private void CleanUnloaded()
    {
        foreach (var e in resident.Keys.Where(e => e.Unloaded && !running.Any(j => j.Entry == e) && !waiting.Any(j => j.Entry == e)).ToList())
        {
            Evict(e);
            prefixes.DropVariant(e.Id);
        }
    }

    /// <summary>
    /// One model step: a token for every decoding row, then prompt chunks of filling prefixes and prefilling requests
    /// (oldest first) up to <see cref="VariantServerOptions.PrefillChunk"/> tokens; then samples every request whose
    /// prompt is now complete.
    /// </summary>
    private void Step()
    {
        var seqs = new List<(KvCache Cache, int[] Tokens, int Variant, int ActiveFrom, Job? Job, string Order)>();
        int budget = options.PrefillChunk;
        int IndexOf(string? key) => key == null ? -1 : set.IndexOf(key);
        // Prefill first: the oldest piece of prompt work (a filling prefix or a prompt) runs alone, whole, while it fits
        // the budget: a joining request's first token then costs its own prefill, not its and every other arrival's
        // plus every running row's decode. The decoding rows wait for at most one budget of prompt tokens in all before
        // they decode again; a long prompt runs in chunks beside them.
        var decoding = running.Where(j => j.Next >= 0).ToList();
        var prefilling = running.Where(j => j.Next < 0 && (j.Prefix == null || j.Prefix.Ready)).ToList(); // their prefixes computed
        int oldest = prefixes.Filling.Select(n => n.End - n.Start - n.Cache.Length).FirstOrDefault();
        if (oldest == 0) oldest = prefilling.Select(j => j.Prompt.Length - j.Fed).FirstOrDefault();
        bool prefillOnly = options.PrefillFirst && decoding.Count > 0 && oldest > 0 && prefilledSinceDecode + oldest <= budget;
        prefilledSinceDecode = prefillOnly ? prefilledSinceDecode + oldest : 0;
        if (prefillOnly)
        {
            prefillOnlySteps++;
            budget = oldest;
        }

        foreach (var job in prefillOnly ? new List<Job>() : decoding)
        {
            seqs.Add((job.Cache!, new[] { job.Next }, IndexOf(job.Entry?.Key), 0, job, PrefixCacheStore.ChainKey(job.Prefix)));
        }

        foreach (var node in prefixes.Filling.ToList())
        {
            if (budget == 0) break;
            int from = node.Start + node.Cache.Length, take = Math.Min(node.End - from, budget);
            seqs.Add((node.Cache, node.Tokens[from..(from + take)], IndexOf(node.VariantKey), 0, null, PrefixCacheStore.ChainKey(node.Parent)));
            budget -= take;
        }

        foreach (var job in prefilling)
        {
            if (budget == 0) break;
            int take = Math.Min(job.Prompt.Length - job.Fed, budget);
            // Rows of this chunk before an activated LoRA's invocation start are the base's (-1).
            seqs.Add((job.Cache!, job.Prompt[job.Fed..(job.Fed + take)], IndexOf(job.Entry?.Key), job.ActiveFrom - job.Fed, job, PrefixCacheStore.ChainKey(job.Prefix)));
            budget -= take;
        }

        if (seqs.Count == 0) return;
        // Sequences under one prefix side by side: their rows attend to it as one matrix.
        seqs = seqs.OrderBy(s => s.Variant).ThenBy(s => s.Order, StringComparer.Ordinal).ToList();
        float[][] logits;
        lock (model.GenerationLock)
        {
            var rows = seqs.SelectMany(s => VariantSet.ActivatedRows(s.Variant, s.ActiveFrom, 0, s.Tokens.Length)).ToArray();
            using var bound = set.Count > 0 ? set.Bind(rows, activationResolved: true) : null;
            var caches = seqs.Select(s => s.Cache).ToArray();
            var tokens = seqs.Select(s => s.Tokens).ToArray();
            if (seqs.Any(s => s.Job is { Next: < 0, Request.PromptLogprobs: true }))
            {
                // A prompt being scored needs every position's logits: each one scores the prompt token after it.
                var every = model.DecodeBatchEveryPosition(caches, tokens, bound);
                logits = new float[seqs.Count][];
                int row = 0;
                for (int i = 0; i < seqs.Count; i++)
                {
                    if (seqs[i].Job is { Next: < 0, Request.PromptLogprobs: true } scored)
                    {
                        for (int k = 0; k < seqs[i].Tokens.Length; k++)
                        {
                            int next = scored.Fed + k + 1;
                            if (next < scored.Prompt.Length) scored.PromptLogprobs.Add(TokenLogprob.Of(every[row + k], scored.Prompt[next], scored.Request.TopLogprobs ?? 0));
                        }
                    }

                    row += seqs[i].Tokens.Length;
                    logits[i] = every[row - 1];
                }
            }
            else
            {
                logits = model.DecodeBatch(caches, tokens, bound);
            }
        }

        steps++;
        for (int i = 0; i < seqs.Count; i++)
        {
            if (seqs[i].Job is not { } job) continue;
            if (job.Next < 0)
            {
                job.Fed += seqs[i].Tokens.Length;
                if (job.Fed < job.Prompt.Length) continue;
                if (job.Request.MaxTokens == 0) // a prompt scored, nothing to generate
                {
                    Finish(job, () => Complete(job, "", stopped: false));
                    continue;
                }
            }

            Sample(job, logits[i]);
        }
    }

    /// <summary>Draws the request's next token, streams the text it makes visible and ends the request when it is done.</summary>
    private void Sample(Job job, float[] logits)
    {
        var r = job.Request;
        int t = Generator.Next(r, logits, job.Rng);
        if (job.FirstToken == 0) job.FirstToken = Stopwatch.GetTimestamp();
        bool stopped = stopTokens.Contains(t);
        if (!stopped)
        {
            job.Output.Add(t);
            generationTokens++;
            if (r.TopLogprobs is int top) job.Logprobs.Add(TokenLogprob.Of(logits, t, top));
        }

        string text = model.Tokenizer.Decode(job.Output);
        int at = StopText.Find(text, r.Stop);
        bool done = stopped || at >= 0 || job.Output.Count >= r.MaxTokens || job.Cache!.Length >= job.Cache.Capacity;
        string visible = at >= 0 ? text[..at] : text;
        int end = done ? visible.Length : visible.Length - StopText.HoldBack(visible, r.Stop);
        if (end > job.Emitted)
        {
            job.Text.Writer.TryWrite(visible[job.Emitted..end]);
            job.Emitted = end;
        }

        if (done) Finish(job, () => Complete(job, text, stopped));
        else job.Next = t;
    }

    private void Complete(Job job, string text, bool stopped)
    {
        var result = BatchGenerator.Result(job.Request, text, job.Output.Count, job.Prompt.Length, stopped, job.CachedTokens) with
        {
            QueueTime = Stopwatch.GetElapsedTime(job.Submitted, job.Admitted),
            TimeToFirstToken = job.FirstToken == 0 ? TimeSpan.Zero : Stopwatch.GetElapsedTime(job.Submitted, job.FirstToken),
            Logprobs = job.Request.TopLogprobs == null ? null : job.Logprobs.ToArray(),
            PromptLogprobs = job.Request.PromptLogprobs ? job.PromptLogprobs.ToArray() : null,
            PromptTokenIds = job.Request.PromptLogprobs ? job.Prompt : null,
        };
        queueTimes = queueTimes.With(result.QueueTime.TotalSeconds);
        endToEndTimes = endToEndTimes.With(Stopwatch.GetElapsedTime(job.Submitted).TotalSeconds);
        if (job.FirstToken != 0) firstTokenTimes = firstTokenTimes.With(result.TimeToFirstToken.TotalSeconds);
        job.Done.TrySetResult(result);
        job.Text.Writer.TryComplete();
    }
}
