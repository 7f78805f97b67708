using PeftSharp.Model;

namespace PeftSharp.Bench;

/// <summary>
/// Exports a <see cref="LlamaModel"/>'s forward (B, T) token ids -> (B, T, V) logits as a plain ONNX graph, the way a
/// user would run the same model in ONNX Runtime: Gather, MatMul with transposed constant weights, RMSNorm from
/// Pow/ReduceMean/Sqrt/Div, rotate-half RoPE from Slice/Neg/Concat with precomputed cos/sin, GQA by Expand, causal
/// attention as MatMul + mask + Softmax + MatMul, SwiGLU from Sigmoid and Mul. Opset 17.
/// </summary>
internal static class LlamaOnnx
{
    public static byte[] Export(LlamaModel model, int batch, int seqLen)
    {
        var c = model.Config;
        int dm = c.HiddenSize, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads, d = c.HeadDim, g = h / hkv;
        var gr = new OnnxGraph().InputInt64("input_ids", batch, seqLen).Output("logits", batch, seqLen, c.VocabSize);
        float[] W(string name) => model[name].Value.ToArray();
        void LinearWeight(string name, string onnxName)
        {
            var w = W(name);
            int outDim = model[name].Value.Dim(0), inDim = model[name].Value.Dim(1);
            var wt = new float[w.Length];
            for (int o = 0; o < outDim; o++)
            for (int i = 0; i < inDim; i++)
                wt[i * outDim + o] = w[o * inDim + i];
            gr.Constant(onnxName, wt, inDim, outDim);
        }

        // RoPE tables (1, T, 1, D), rotate-half layout: cat(freqs, freqs).
        var cos = new float[seqLen * d];
        var sin = new float[seqLen * d];
        for (int t = 0; t < seqLen; t++)
        for (int i = 0; i < d / 2; i++)
        {
            float invFreq = MathF.Exp(-(2f * i / d) * MathF.Log(c.RopeTheta));
            float angle = t * invFreq;
            cos[t * d + i] = cos[t * d + i + d / 2] = MathF.Cos(angle);
            sin[t * d + i] = sin[t * d + i + d / 2] = MathF.Sin(angle);
        }

        var mask = new float[seqLen * seqLen];
        for (int i = 0; i < seqLen; i++)
        for (int j = i + 1; j < seqLen; j++)
            mask[i * seqLen + j] = float.NegativeInfinity;
        gr.Constant("cos", cos, 1, seqLen, 1, d).Constant("sin", sin, 1, seqLen, 1, d).Constant("mask", mask, seqLen, seqLen)
            .Constant("eps", new[] { c.RmsNormEps }).Constant("two", new[] { 2f }).Constant("scale", new[] { 1f / MathF.Sqrt(d) })
            .ConstantInt64("half_start", new long[] { 0 }, 1).ConstantInt64("half_mid", new long[] { d / 2 }, 1).ConstantInt64("half_end", new long[] { d }, 1)
            .ConstantInt64("axis3", new long[] { 3 }, 1)
            .ConstantInt64("shape_q", new long[] { batch, seqLen, h, d }, 4).ConstantInt64("shape_kv", new long[] { batch, seqLen, hkv, 1, d }, 5)
            .ConstantInt64("expand_kv", new long[] { batch, seqLen, hkv, g, d }, 5).ConstantInt64("shape_kv_full", new long[] { batch, seqLen, h, d }, 4)
            .ConstantInt64("shape_out", new long[] { batch, seqLen, h * d }, 3);
        gr.Constant("embed", W("model.embed_tokens.weight"), c.VocabSize, dm);
        gr.Node("Gather", new[] { "embed", "input_ids" }, new[] { "x0" });

        string Norm(string x, string weightName, string tag)
        {
            gr.Constant(tag + ".w", W(weightName), dm);
            gr.Node("Pow", new[] { x, "two" }, new[] { tag + ".sq" });
            gr.Node("ReduceMean", new[] { tag + ".sq" }, new[] { tag + ".ms" }, "", ("axes", new long[] { -1 }), ("keepdims", 1));
            gr.Node("Add", new[] { tag + ".ms", "eps" }, new[] { tag + ".mse" });
            gr.Node("Sqrt", new[] { tag + ".mse" }, new[] { tag + ".rms" });
            gr.Node("Div", new[] { x, tag + ".rms" }, new[] { tag + ".n" });
            gr.Node("Mul", new[] { tag + ".n", tag + ".w" }, new[] { tag + ".y" });
            return tag + ".y";
        }

        string Rope(string x, string tag)
        {
            gr.Node("Slice", new[] { x, "half_start", "half_mid", "axis3" }, new[] { tag + ".x1" });
            gr.Node("Slice", new[] { x, "half_mid", "half_end", "axis3" }, new[] { tag + ".x2" });
            gr.Node("Neg", new[] { tag + ".x2" }, new[] { tag + ".nx2" });
            gr.Node("Concat", new[] { tag + ".nx2", tag + ".x1" }, new[] { tag + ".rot" }, "", ("axis", 3));
            gr.Node("Mul", new[] { x, "cos" }, new[] { tag + ".c" });
            gr.Node("Mul", new[] { tag + ".rot", "sin" }, new[] { tag + ".s" });
            gr.Node("Add", new[] { tag + ".c", tag + ".s" }, new[] { tag + ".y" });
            return tag + ".y";
        }

        string x = "x0";
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            string t = $"l{l}";
            string hn = Norm(x, p + "input_layernorm.weight", t + ".in");
            foreach (var (proj, name) in new[] { ("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj") }) LinearWeight(p + $"self_attn.{name}.weight", $"{t}.w{proj}");
            gr.Node("MatMul", new[] { hn, t + ".wq" }, new[] { t + ".q" });
            gr.Node("MatMul", new[] { hn, t + ".wk" }, new[] { t + ".k" });
            gr.Node("MatMul", new[] { hn, t + ".wv" }, new[] { t + ".v" });
            gr.Node("Reshape", new[] { t + ".q", "shape_q" }, new[] { t + ".q4" });
            string qr = Rope(t + ".q4", t + ".rq");
            string KvFull(string src, string tag)
            {
                gr.Node("Reshape", new[] { src, "shape_kv" }, new[] { tag + ".5" });
                gr.Node("Expand", new[] { tag + ".5", "expand_kv" }, new[] { tag + ".e" });
                gr.Node("Reshape", new[] { tag + ".e", "shape_kv_full" }, new[] { tag + ".full" });
                return tag + ".full";
            }

            string kf = Rope(KvFull(t + ".k", t + ".kk"), t + ".rk");
            string vf = KvFull(t + ".v", t + ".vv");
            gr.Node("Transpose", new[] { qr }, new[] { t + ".qt" }, "", ("perm", new long[] { 0, 2, 1, 3 }));
            gr.Node("Transpose", new[] { kf }, new[] { t + ".kt" }, "", ("perm", new long[] { 0, 2, 3, 1 }));
            gr.Node("Transpose", new[] { vf }, new[] { t + ".vt" }, "", ("perm", new long[] { 0, 2, 1, 3 }));
            gr.Node("MatMul", new[] { t + ".qt", t + ".kt" }, new[] { t + ".s" });
            gr.Node("Mul", new[] { t + ".s", "scale" }, new[] { t + ".ss" });
            gr.Node("Add", new[] { t + ".ss", "mask" }, new[] { t + ".sm" });
            gr.Node("Softmax", new[] { t + ".sm" }, new[] { t + ".p" }, "", ("axis", -1));
            gr.Node("MatMul", new[] { t + ".p", t + ".vt" }, new[] { t + ".a" });
            gr.Node("Transpose", new[] { t + ".a" }, new[] { t + ".at" }, "", ("perm", new long[] { 0, 2, 1, 3 }));
            gr.Node("Reshape", new[] { t + ".at", "shape_out" }, new[] { t + ".a3" });
            gr.Node("MatMul", new[] { t + ".a3", t + ".wo" }, new[] { t + ".o" });
            gr.Node("Add", new[] { x, t + ".o" }, new[] { t + ".x1" });
            string h2 = Norm(t + ".x1", p + "post_attention_layernorm.weight", t + ".post");
            LinearWeight(p + "mlp.gate_proj.weight", t + ".wg");
            LinearWeight(p + "mlp.up_proj.weight", t + ".wu");
            LinearWeight(p + "mlp.down_proj.weight", t + ".wd");
            gr.Node("MatMul", new[] { h2, t + ".wg" }, new[] { t + ".g" });
            gr.Node("MatMul", new[] { h2, t + ".wu" }, new[] { t + ".u" });
            gr.Node("Sigmoid", new[] { t + ".g" }, new[] { t + ".sg" });
            gr.Node("Mul", new[] { t + ".g", t + ".sg" }, new[] { t + ".silu" });
            gr.Node("Mul", new[] { t + ".silu", t + ".u" }, new[] { t + ".act" });
            gr.Node("MatMul", new[] { t + ".act", t + ".wd" }, new[] { t + ".m" });
            gr.Node("Add", new[] { t + ".x1", t + ".m" }, new[] { t + ".x2" });
            x = t + ".x2";
        }

        string hf = Norm(x, "model.norm.weight", "final");
        LinearWeight(c.TieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight", "lm_head");
        gr.Node("MatMul", new[] { hf, "lm_head" }, new[] { "logits" });
        return gr.ToModel();
    }
}
