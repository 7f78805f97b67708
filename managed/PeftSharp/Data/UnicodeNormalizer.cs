using System.Runtime.InteropServices;
using System.Text;

namespace PeftSharp.Data;

/// <summary>
/// Unicode normalization (NFC, NFD, NFKC, NFKD) that is real whatever the process's globalization mode. With ICU
/// (the default on Linux and macOS, and Windows 10+) <see cref="string.Normalize(NormalizationForm)"/> does it; in
/// invariant-globalization mode, where that call returns its input unchanged (PeftSharp's own host and tests run so,
/// for culture-free output), the normalizer calls ICU's unorm2 C API itself, loaded by name. Where no ICU can be
/// found, non-ASCII text is refused with an error rather than tokenized unnormalized (ASCII is its own normal form).
/// </summary>
public static unsafe class UnicodeNormalizer
{
    private static readonly Lazy<bool> RuntimeNormalizes = new(() => "e\u0301".Normalize(NormalizationForm.FormC) == "\u00E9");
    private static readonly Lazy<Icu?> Library = new(Icu.TryLoad);

    /// <summary>What normalizes here: "the runtime (ICU)", "ICU N loaded directly", or null when nothing can.</summary>
    public static string? Provider => RuntimeNormalizes.Value ? "the runtime (ICU)" : Library.Value?.Description;

    /// <summary><paramref name="text"/> in <paramref name="form"/>; <paramref name="source"/> names the file whose normalizer asked, for the error.</summary>
    public static string Normalize(string text, NormalizationForm form, string source = "tokenizer.json")
    {
        if (Ascii.IsValid(text)) return text;
        if (RuntimeNormalizes.Value) return text.Normalize(form);
        var icu = Library.Value ?? throw new NotSupportedException(
            $"{source}: its {form} normalizer needs ICU, and this process runs in invariant-globalization mode with no libicu to load " +
            "(install libicu, or run with DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=0); text outside ASCII is not tokenized unnormalized");
        return icu.Normalize(text, form);
    }

    /// <summary>ICU's unorm2_getNF*Instance and unorm2_normalize, from libicuuc (versioned or plain symbol names).</summary>
    private sealed class Icu
    {
        private readonly delegate* unmanaged[Cdecl]<IntPtr, char*, int, char*, int, int*, int> normalize;
        private readonly IntPtr[] instances; // by NormalizationForm: FormC 1, FormD 2, FormKC 5, FormKD 6

        private Icu(string description, delegate* unmanaged[Cdecl]<IntPtr, char*, int, char*, int, int*, int> normalize, IntPtr[] instances)
        {
            Description = description;
            this.normalize = normalize;
            this.instances = instances;
        }

        public string Description { get; }

        public static Icu? TryLoad()
        {
            var names = new List<(string Library, string Suffix)>();
            if (OperatingSystem.IsWindows())
            {
                names.Add(("icu.dll", ""));
                names.Add(("icuuc.dll", ""));
            }
            else if (OperatingSystem.IsMacOS())
            {
                names.Add(("libicucore.dylib", ""));
            }
            else
            {
                for (int v = 90; v >= 50; v--) names.Add(($"libicuuc.so.{v}", $"_{v}"));
            }

            foreach (var (library, suffix) in names)
            {
                if (!NativeLibrary.TryLoad(library, out var handle)) continue;
                IntPtr Export(string name) =>
                    NativeLibrary.TryGetExport(handle, name + suffix, out var p) || NativeLibrary.TryGetExport(handle, name, out p) ? p : IntPtr.Zero;
                var normalizeFn = Export("unorm2_normalize");
                if (normalizeFn == IntPtr.Zero) continue;
                var instances = new IntPtr[7];
                bool ok = true;
                foreach (var (form, getter) in new[] { (1, "unorm2_getNFCInstance"), (2, "unorm2_getNFDInstance"), (5, "unorm2_getNFKCInstance"), (6, "unorm2_getNFKDInstance") })
                {
                    var fn = Export(getter);
                    if (fn == IntPtr.Zero)
                    {
                        ok = false;
                        break;
                    }

                    int error = 0;
                    instances[form] = ((delegate* unmanaged[Cdecl]<int*, IntPtr>)fn)(&error);
                    if (error > 0 || instances[form] == IntPtr.Zero) ok = false;
                }

                if (ok) return new Icu($"ICU loaded directly ({library})", (delegate* unmanaged[Cdecl]<IntPtr, char*, int, char*, int, int*, int>)normalizeFn, instances);
            }

            return null;
        }

        public string Normalize(string text, NormalizationForm form)
        {
            var instance = instances[(int)form];
            // NFD and NFKD can grow a string (one code point decomposes into up to 18 under NFKD); ICU says how much
            // it needs when the buffer is short (U_BUFFER_OVERFLOW_ERROR = 15), and the call is repeated with that.
            int capacity = Math.Max(16, text.Length * 3);
            for (int attempt = 0; attempt < 3; attempt++)
            {
                var buffer = new char[capacity];
                int error = 0, length;
                fixed (char* src = text)
                fixed (char* dst = buffer)
                {
                    length = normalize(instance, src, text.Length, dst, capacity, &error);
                }

                if (error == 15)
                {
                    capacity = length + 1;
                    continue;
                }

                if (error > 0) throw new InvalidOperationException($"ICU unorm2_normalize failed with error {error}");
                return new string(buffer, 0, length);
            }

            throw new InvalidOperationException("ICU unorm2_normalize kept asking for a larger buffer");
        }
    }
}
