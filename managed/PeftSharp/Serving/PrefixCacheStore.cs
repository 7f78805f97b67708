using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>
/// Cached prompt prefixes of a <see cref="VariantServer"/>, as a tree of KV caches (each node continues its parent,
/// as a shared prefix does). Nodes cover whole blocks; every block boundary a node covers is keyed by a hash of the
/// variant's id and the tokens through it (as vLLM hashes the adapter into the block key), so a later request of the
/// same variant finds its longest cached prefix at block granularity. A match that ends inside a node is copied out
/// into a node of its own (the copy costs a memory copy, not a prefill). Idle leaves leave least recently used first.
/// </summary>
internal sealed class PrefixCacheStore : IDisposable
{
    private readonly int block;
    private readonly Dictionary<(long Variant, ulong Hash), (Node Node, int End)> boundaries = new();
    private readonly List<Node> nodes = new();
    private int nextId;

    public PrefixCacheStore(int block, bool enabled)
    {
        this.block = block;
        Enabled = enabled;
    }

    /// <summary>Off under a sliding window (a cached prefix would have to leave a request's window) or when asked.</summary>
    public bool Enabled { get; }

    /// <summary>KV blocks the cached prefixes hold.</summary>
    public int Blocks => nodes.Sum(n => n.Blocks);

    /// <summary>Nodes still being prefilled whose parent is complete, oldest first.</summary>
    public IEnumerable<Node> Filling => nodes.Where(n => !n.Ready && (n.Parent == null || n.Parent.Ready));

    /// <summary>
    /// The longest cached prefix of <paramref name="tokens"/> for <paramref name="variant"/> ending at a block boundary
    /// at most <paramref name="limit"/>: the node and the boundary (0 and null when none). A boundary inside a node
    /// that is still filling is passed over (it cannot be copied yet).
    /// </summary>
    public (Node? Node, int End) Find(long variant, int[] tokens, int limit)
    {
        if (!Enabled) return (null, 0);
        var hashes = Hashes(variant, tokens, limit);
        for (int i = hashes.Length - 1; i >= 0; i--)
        {
            int end = (i + 1) * block;
            if (!boundaries.TryGetValue((variant, hashes[i]), out var hit) || hit.End != end) continue;
            if (!hit.Node.Tokens.AsSpan(0, end).SequenceEqual(tokens.AsSpan(0, end))) continue; // a hash collision
            if (end < hit.Node.End && !hit.Node.Ready) continue;
            return hit;
        }

        return (null, 0);
    }

    /// <summary>
    /// Adds a node over prompt positions [start, end) of <paramref name="tokens"/>, continuing <paramref name="parent"/>
    /// (its cache's parent is the parent node's cache, or the variant's root).
    /// </summary>
    public Node Add(KvCache cache, Node? parent, long variant, string? variantKey, int[] tokens, int start, int end)
    {
        var node = new Node(++nextId, cache, parent, variant, variantKey, tokens[..end], start, end, (end - start + block - 1) / block);
        if (parent != null) parent.Children++;
        nodes.Add(node);
        var hashes = Hashes(variant, tokens, end);
        for (int b = start + block; b <= end; b += block) boundaries[(variant, hashes[b / block - 1])] = (node, b);
        return node;
    }

    /// <summary>A reader is done with <paramref name="node"/>; a node left half-filled with no reader is dropped.</summary>
    public void Release(Node node, long tick)
    {
        node.Users--;
        node.LastUse = tick;
        if (!node.Ready && node.Users == 0 && node.Children == 0) Remove(node);
    }

    /// <summary>Drops the least recently used idle leaf; false when none is idle.</summary>
    public bool EvictOne()
    {
        var idle = nodes.Where(n => n.Ready && n.Users == 0 && n.Children == 0).MinBy(n => n.LastUse);
        if (idle == null) return false;
        Remove(idle);
        return true;
    }

    /// <summary>Drops every idle node of a variant (it was unloaded, or its virtual-token root was freed), leaves first.</summary>
    public void DropVariant(long variant)
    {
        Node? leaf;
        while ((leaf = nodes.FirstOrDefault(n => n.Variant == variant && n.Users == 0 && n.Children == 0)) != null) Remove(leaf);
    }

    /// <summary>Drops nodes that are not complete (after a failed step their contents are unknown), leaves first.</summary>
    public void DropUnready()
    {
        Node? leaf;
        while ((leaf = nodes.FirstOrDefault(n => !n.Ready && n.Children == 0)) != null) Remove(leaf);
    }

    /// <summary>A key that is equal for sequences reading the same chain of nodes, so they sit side by side in a step.</summary>
    public static string ChainKey(Node? node)
    {
        var ids = new List<int>();
        for (var n = node; n != null; n = n.Parent) ids.Add(n.Id);
        ids.Reverse();
        return string.Join(",", ids.Select(i => i.ToString("D8")));
    }

    public void Dispose()
    {
        foreach (var n in nodes) n.Cache.Dispose();
        nodes.Clear();
        boundaries.Clear();
    }

    private void Remove(Node node)
    {
        nodes.Remove(node);
        node.Cache.Dispose();
        foreach (var key in boundaries.Where(kv => kv.Value.Node == node).Select(kv => kv.Key).ToList()) boundaries.Remove(key);
        if (node.Parent is not { } parent) return;
        parent.Children--;
        // A half-filled parent kept only for this child is dropped with it (nothing would read it, and its variant may leave).
        if (!parent.Ready && parent.Users == 0 && parent.Children == 0) Remove(parent);
    }

    /// <summary>Hash of the variant and the tokens through each block boundary up to <paramref name="limit"/> (FNV-1a, chained block to block).</summary>
    private ulong[] Hashes(long variant, int[] tokens, int limit)
    {
        var hashes = new ulong[Math.Min(limit, tokens.Length) / block];
        ulong h = 14695981039346656037UL ^ (ulong)variant;
        for (int i = 0; i < hashes.Length * block; i++)
        {
            h = (h ^ (uint)tokens[i]) * 1099511628211UL;
            if ((i + 1) % block == 0) hashes[i / block] = h;
        }

        return hashes;
    }

    /// <summary>One cached prefix: prompt positions [Start, End) in its own cache, after its parent's.</summary>
    internal sealed class Node(int id, KvCache cache, Node? parent, long variant, string? variantKey, int[] tokens, int start, int end, int blocks)
    {
        public int Id { get; } = id;

        public KvCache Cache { get; } = cache;

        public Node? Parent { get; } = parent;

        /// <summary>The variant's load id (0: the base).</summary>
        public long Variant { get; } = variant;

        /// <summary>The variant's name in the server's <see cref="VariantSet"/> (null: the base), for binding its rows while it fills.</summary>
        public string? VariantKey { get; } = variantKey;

        /// <summary>The prompt's tokens through <see cref="End"/>.</summary>
        public int[] Tokens { get; } = tokens;

        public int Start { get; } = start;

        public int End { get; } = end;

        public int Blocks { get; } = blocks;

        public bool Ready => Cache.Length == End - Start;

        /// <summary>Requests reading it directly.</summary>
        public int Users { get; set; }

        /// <summary>Nodes continuing it.</summary>
        public int Children { get; set; }

        public long LastUse { get; set; }
    }
}
