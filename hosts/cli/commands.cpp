#include "commands.hpp"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <cmath>
#include <chrono>
#include <functional>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "loom/core/document_chunks.hpp"
#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/passage_fusion.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/training.hpp"
#include "loom/loom_plugin_api.h"

namespace loom::cli {

namespace {

int64_t int_flag(const std::string &flag, const std::string &v, int64_t lo, int64_t hi);
int report(const Error &e);

} // namespace


namespace {
// A whole number flag's value within [lo, hi].
int64_t int_flag(const std::string &flag, const std::string &v, int64_t lo, int64_t hi) {
  int64_t out = 0;
  auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || ptr != v.data() + v.size() || out < lo || out > hi)
    throw Error(ErrorCategory::usage, flag + ": '" + v + "' is not a number between " + std::to_string(lo) + " and " +
                                          std::to_string(hi));
  return out;
}
} // namespace

// Parses MANIFEST [--set K=V]... [--steps N] [--warmup N] [--tokens]; throws loom::Error (usage).
ManifestArgs parse_manifest_args(const std::vector<std::string> &args, bool allow_steps, bool run_flags) {
  ManifestArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string &a = args[i];
    auto value = [&](const char *flag) -> std::string {
      if (i + 1 >= args.size()) throw Error(ErrorCategory::usage, std::string(flag) + " needs a value");
      return args[++i];
    };
    if (a == "--help" || a == "-h") {
      out.help = true;
    } else if (a == "--set") {
      out.overrides.push_back(value("--set"));
    } else if (a.rfind("--set=", 0) == 0) {
      out.overrides.push_back(a.substr(6));
    } else if (allow_steps && a == "--steps") {
      out.steps = int_flag("--steps", value("--steps"), 1, 1 << 20);
    } else if (run_flags && a == "--warmup") {
      out.warmup = int_flag("--warmup", value("--warmup"), 0, 100);
    } else if (run_flags && a == "--tokens") {
      out.print_tokens = true;
    } else if (!a.empty() && a[0] == '-') {
      throw Error(ErrorCategory::usage, "unknown option '" + a + "'");
    } else if (out.manifest.empty()) {
      out.manifest = a;
    } else {
      throw Error(ErrorCategory::usage, "unexpected argument '" + a + "'");
    }
  }
  if (!out.help && out.manifest.empty()) throw Error(ErrorCategory::usage, "a MANIFEST is required");
  return out;
}

namespace {
int report(const Error &e) {
  std::cerr << "loom: " << e.what() << "\n";
  return static_cast<int>(e.category());
}
} // namespace

int guarded(const char *usage, const std::function<int()> &body) {
  try {
    return body();
  } catch (const Error &e) {
    int code = report(e);
    if (e.category() == ErrorCategory::usage) std::cerr << usage;
    return code;
  } catch (const std::exception &e) {
    std::cerr << "loom: " << e.what() << "\n";
    return 1;
  }
}

namespace {

const char *kPluginsUsage = R"(usage: loom plugins [--json] [--path DIR]...

Lists every plugin library found in the search path (--path directories, then LOOM_PLUGIN_PATH,
then the builtin directory) with its components: kind, name, version, parameters, ABI.
Libraries that fail to load are listed on stderr with the reason.
  --json       print one JSON document instead of a table
  --path DIR   search DIR first (repeatable)
)";

const char *kValidateUsage = R"(usage: loom validate MANIFEST [--set KEY.PATH=VALUE]...

Parses MANIFEST, applies the overrides, and checks every component against the plugins found:
that it exists (with the version asked for) and that its table holds only declared keys of the
declared types. Creates nothing. Prints "ok" and exits 0 when the manifest is valid.
)";

const char *kRunUsage = R"(usage: loom run MANIFEST [--set KEY.PATH=VALUE]... [--steps N] [--warmup N] [--tokens]

Builds the pipeline MANIFEST describes and runs its [run] section: retrievers answer run.query,
tools run run.tool_calls, and the model ([model], or seeded random weights) continues run.prompt
through the attention, quantizer, adapter, parallel and sampler plugins, streaming the text. With
run.prompts, every prompt is generated in one batch and each sequence's text is printed at the
end; the last line counts the tokens of all sequences.
  --set K=V    override a manifest value, e.g. --set sampler[0].k=5 (value parsed as TOML, else a string)
  --steps N    generate N tokens instead of run.steps
  --warmup N   first run the same generation N times without output or timing (the printed run's
               rates then leave out first-use costs: kernel loading, GEMM heuristics, waiting for
               the other ranks to start); a seeded sampler's stream goes on across the runs
  --tokens     also print the generated token ids (a "tokens:" line per sequence) where a tokenizer
               prints text, to compare runs exactly (a model without a tokenizer always prints them)
)";

const char *kQuantizeUsage = R"(usage: loom quantize MANIFEST --out DIR [--set KEY.PATH=VALUE]...

Quantizes MANIFEST's [model] with its [quantizer] on the CPU (with [model] calibration text for
activation-aware methods such as int4's "awq") and writes DIR/model.safetensors: each linear as
the quantizer stores it, every other tensor as the checkpoint stores it, and the quantization
metadata; the model's config and tokenizer files are copied beside it. A manifest whose [model]
path is DIR and whose [quantizer] is the same component loads it without re-quantizing.
  --out DIR    the directory to write (created when missing)
  --set K=V    override a manifest value, e.g. --set quantizer.group_size=64
)";

const char *kTrainUsage = R"(usage: loom train MANIFEST [--set KEY.PATH=VALUE]... [--steps N]

Trains MANIFEST's [model] on its [train] data on the CPU (float32; Llama family and GPT-2) and writes,
in train.out: train_log.jsonl (a line per step and per evaluation), checkpoint/ (resumable with
[train] resume = "OUT/checkpoint"), model/ (the trained model, loadable as a [model] path) and
loss.png (when gnuplot is installed). A progress line shows step, loss, tokens/s and the ETA.
  --steps N    stop after N steps of this run (saving the checkpoint), to resume later
  --set K=V    override a manifest value, e.g. --set train.lr=3e-4
)";

std::string kind_label(loom_kind k) { return kind_name(k); }

const char *kIndexUsage = R"(usage: loom index build MANIFEST --docs PATH --out DIR [--chunk BYTES] [--overlap BYTES] [--set K=V]...
       loom index query MANIFEST --index DIR [--top-k N] [--set K=V]... QUESTION...

build: cuts the *.txt and *.md files under PATH (or the one file PATH) into chunks of at most
--chunk bytes (default 800) ending at a paragraph, line or word break, each starting --overlap
bytes (default 100) before the previous one's end; adds them to every [[retriever]] of MANIFEST
(doc_id "file#n", metadata: source, chunk, byte offsets) and saves each retriever's index under
DIR/<slot>. query: loads those indexes (nothing is re-ingested) and prints each retriever's
top --top-k (default 5) passages for QUESTION and, with several retrievers, their reciprocal
rank fusion (k = 60).
)";


} // namespace

int cmd_plugins(const std::vector<std::string> &args) {
  return guarded(kPluginsUsage, [&] {
    bool json = false;
    std::vector<std::filesystem::path> extra;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--help" || args[i] == "-h") {
        std::cout << kPluginsUsage;
        return 0;
      } else if (args[i] == "--json") {
        json = true;
      } else if (args[i] == "--path") {
        if (i + 1 >= args.size()) throw Error(ErrorCategory::usage, "--path needs a directory");
        extra.emplace_back(args[++i]);
      } else {
        throw Error(ErrorCategory::usage, "unknown argument '" + args[i] + "'");
      }
    }
    Registry registry(Registry::default_search_paths(extra));
    registry.scan();
    for (const auto &d : registry.diagnostics()) std::cerr << "loom: warning: " << d << "\n";
    if (json) {
      nlohmann::json doc;
      doc["abi"] = {{"major", LOOM_ABI_MAJOR}, {"minor", LOOM_ABI_MINOR}};
      doc["search_paths"] = nlohmann::json::array();
      for (const auto &p : registry.search_paths()) doc["search_paths"].push_back(p.string());
      doc["libraries"] = nlohmann::json::array();
      for (const auto &lib : registry.libraries()) {
        const auto &d = lib->descriptor();
        nlohmann::json l = {{"path", lib->path().string()}, {"name", d.name}, {"version", d.version},
                            {"license", d.license}, {"abi", std::to_string(d.abi_major) + "." + std::to_string(d.abi_minor)}};
        l["components"] = nlohmann::json::array();
        for (const auto *c : lib->components()) {
          nlohmann::json comp = {{"kind", kind_label(c->kind)}, {"name", c->name}, {"version", c->version},
                                 {"description", c->description ? c->description : ""},
                                 {"threading", c->threading == LOOM_THREADING_CONCURRENT ? "concurrent" : "serial"}};
          comp["params"] = nlohmann::json::array();
          for (uint32_t i = 0; i < c->param_count; ++i) {
            const auto &p = c->params[i];
            comp["params"].push_back({{"key", p.key}, {"type", value_type_name(p.type)}, {"required", p.required != 0},
                                      {"default", p.default_value ? p.default_value : ""},
                                      {"description", p.description ? p.description : ""}});
          }
          l["components"].push_back(std::move(comp));
        }
        doc["libraries"].push_back(std::move(l));
      }
      doc["errors"] = registry.diagnostics();
      std::cout << doc.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      return 0;
    }
    std::cout << "plugin ABI " << LOOM_ABI_MAJOR << "." << LOOM_ABI_MINOR << "\n";
    for (const auto &lib : registry.libraries()) {
      const auto &d = lib->descriptor();
      std::cout << "\n" << d.name << " " << d.version << "  (ABI " << d.abi_major << "." << d.abi_minor << ", "
                << d.license << ")\n  " << lib->path().string() << "\n";
      for (const auto *c : lib->components()) {
        std::cout << "  " << std::left << std::setw(10) << kind_label(c->kind) << " " << std::setw(20) << c->name << " "
                  << std::setw(8) << c->version << " " << (c->description ? c->description : "") << "\n";
        for (uint32_t i = 0; i < c->param_count; ++i) {
          const auto &p = c->params[i];
          std::cout << "             " << p.key << " (" << value_type_name(p.type)
                    << (p.required ? ", required" : p.default_value ? std::string(", default ") + p.default_value : std::string())
                    << ")" << (p.description ? std::string(": ") + p.description : std::string()) << "\n";
        }
      }
    }
    return 0;
  });
}

int cmd_validate(const std::vector<std::string> &args) {
  return guarded(kValidateUsage, [&] {
    ManifestArgs a = parse_manifest_args(args, false);
    if (a.help) {
      std::cout << kValidateUsage;
      return 0;
    }
    Manifest m = parse_manifest_file(a.manifest, a.overrides);
    Registry registry(Registry::default_search_paths(m.plugin_paths));
    registry.scan();
    for (const auto &spec : m.components) {
      ComponentRef ref;
      try {
        ref = registry.find(spec.kind, spec.use, spec.version_range, spec.library);
      } catch (const Error &e) {
        throw Error(e.category(), spec.table->where() + ": " + spec.slot + ": " + e.what());
      }
      spec.table->resolve(*ref.component, spec.slot);
    }
    std::cout << "ok: " << a.manifest << " (" << m.components.size() << " components)\n";
    return 0;
  });
}

int cmd_run(const std::vector<std::string> &args) {
  return guarded(kRunUsage, [&] {
    ManifestArgs a = parse_manifest_args(args, true, true);
    if (a.help) {
      std::cout << kRunUsage;
      return 0;
    }
    auto runtime = Runtime::from_file(a.manifest, a.overrides);
    DLDevice dev = runtime->device();
    std::cout << "pipeline " << a.manifest << " on " << (dev.device_type == kDLCUDA ? "cuda" : "cpu") << "\n";
    for (const auto &slot : runtime->pipeline().slots()) {
      const Instance &i = runtime->pipeline().at(slot);
      std::cout << "  " << std::left << std::setw(14) << slot << " " << i.desc().name << " " << i.desc().version << " ("
                << i.library().path().filename().string() << ")\n";
    }
    std::cout << "  model          " << runtime->backend_description() << "\n" << std::flush;
    const bool batch = runtime->prompts().size() > 1;
    // An agent's turns are printed once each, after the run (its conversation changes every turn).
    const bool agent = runtime->manifest().agent.enabled;
    bool has_text = runtime->decode({}).has_value() && !agent;
    // Stream (one prompt): print what each new token adds to the text. The generation is decoded
    // after the prompt's last tokens each time (pieces keep their context spacing; the cache keeps
    // the text so far, so a token's decode does not grow with the prompt or the reply), and the last
    // characters are held back while they could still begin a stop string, which is never printed.
    std::vector<int32_t> context = runtime->prompt();
    std::vector<int32_t> streamed;  // the tokens of the reply so far
    ContinuationCache streamed_text;
    std::string prompt_text = has_text && !batch ? *runtime->decode(context) : std::string();
    size_t hold = 0;
    for (const auto &stop : runtime->manifest().run.stop) hold = std::max(hold, stop.size());
    size_t printed = 0;
    // The prompt is echoed with the first token, so that what the run logs first (a quantizer's
    // summary, say) does not land inside the streamed text.
    bool echoed = false;
    auto echo = [&] {
      if (echoed) return;
      echoed = true;
      // A RAG prompt is made when the run starts (its passages retrieved then): take it now.
      if (runtime->prompt() != context && !batch) {
        context = runtime->prompt();
        if (has_text) prompt_text = *runtime->decode(context);
      }
      std::cout << prompt_text;
    };
    TokenCallback stream;
    if (has_text && !batch)
      stream = [&](int32_t, int32_t token) {
        echo();
        streamed.push_back(token);
        const std::string text = runtime->continuation(context, streamed, {}, nullptr, 0, &streamed_text);
        // Printable: up to the first stop string, short of what could begin one, and short of a
        // trailing U+FFFD (a character whose bytes are split across tokens).
        size_t end = text.size() > hold ? text.size() - hold : 0;
        for (const auto &stop : runtime->manifest().run.stop) end = std::min(end, text.find(stop));
        static const std::string replacement = "\xEF\xBF\xBD";
        size_t bad = text.rfind(replacement);
        if (bad != std::string::npos && bad + replacement.size() == text.size()) end = std::min(end, bad);
        if (end > printed) {
          std::cout << text.substr(printed, end - printed) << std::flush;
          printed = end;
        }
        return true;
      };
    for (int64_t i = 0; i < a.warmup; ++i) runtime->run(a.steps);  // untimed, unprinted
    RunResult r = runtime->run(a.steps, stream);
    echo();
    if (has_text && !batch) std::cout << (r.text.size() > printed ? r.text.substr(printed) : std::string()) << "\n";
    const auto print_ids = [](const std::vector<int32_t> &tokens) {
      std::cout << "tokens:";
      for (int32_t t : tokens) std::cout << " " << t;
    };
    // Sequence i is prompt i, or with run.n samples per prompt sample i % n of prompt i / n,
    // labelled [prompt.sample].
    const size_t samples = static_cast<size_t>(runtime->manifest().run.n);
    const auto label = [&](size_t i) {
      return samples > 1 ? "[" + std::to_string(i / samples) + "." + std::to_string(i % samples) + "] "
                         : "[" + std::to_string(i) + "] ";
    };
    if (batch)
      for (size_t i = 0; i < r.sequences.size(); ++i) {
        const SequenceResult &seq = r.sequences[i];
        std::cout << label(i);
        if (has_text) std::cout << *runtime->decode(seq.prompt) << seq.text;
        else print_ids(seq.tokens);
        std::cout << (seq.stopped ? "  (stopped)" : "") << "\n";
        if (has_text && a.print_tokens) {
          std::cout << label(i);
          print_ids(seq.tokens);
          std::cout << "\n";
        }
      }
    if (!runtime->manifest().run.query.empty()) {
      std::cout << "query: " << runtime->manifest().run.query << "\n";
      for (const auto &p : r.passages) {
        std::string text = p.text.substr(0, p.text.find('\n'));
        if (text.size() > 72) text = text.substr(0, 69) + "...";
        std::cout << "  " << p.retriever_slot << "  " << p.doc_id << "  " << std::fixed << std::setprecision(3) << p.score
                  << " " << p.score_kind << "  " << text << "\n";
      }
    }
    if (!r.context.empty()) {  // RAG: what the prompt cites as [1], [2], ...
      std::cout << "context:";
      for (size_t i = 0; i < r.context.size(); ++i) std::cout << " [" << i + 1 << "] " << r.context[i].doc_id;
      std::cout << "\n";
    }
    // The agent loop's turns (and its tool calls: not listed again below).
    for (size_t i = 0; i < r.agent_steps.size(); ++i) {
      const AgentStep &s = r.agent_steps[i];
      std::string shown = s.result;
      std::replace(shown.begin(), shown.end(), '\n', ' ');
      if (shown.size() > 160) shown = shown.substr(0, 157) + "...";
      std::cout << "agent turn " << i + 1 << " (" << s.tokens << " tokens): "
                << (s.tool.empty() ? s.action : s.tool + " " + s.arguments_json) << " -> "
                << shown << "\n";
    }
    if (!r.agent_stop.empty())
      std::cout << "agent: stopped (" << r.agent_stop << ")" << (r.agent_answer.empty() ? "" : ": " + r.agent_answer) << "\n";
    for (const auto &t : r.tool_results) {
      if (!r.agent_steps.empty()) break;
      std::cout << "tool " << t.tool << (t.is_error ? " (error)" : "") << ": " << t.content << "\n";
    }
    if ((!has_text || a.print_tokens) && !batch && !agent) {
      print_ids(r.tokens);
      std::cout << "\n";
    }
    // Totals over every sequence of the batch.
    size_t prompt_tokens = 0, generated = 0, stopped = 0;
    for (const auto &seq : r.sequences) {
      prompt_tokens += seq.prompt.size();
      generated += seq.tokens.size();
      stopped += seq.stopped ? 1 : 0;
    }
    auto rate = [](size_t n, double s) { return s > 0 ? static_cast<double>(n) / s : 0.0; };
    std::cout << generated << " tokens in " << std::fixed << std::setprecision(3) << r.seconds << " s: prompt "
              << prompt_tokens << " tokens at " << std::setprecision(1) << rate(prompt_tokens, r.prefill_seconds)
              << " tokens/s, generation " << generated << " tokens at " << rate(generated, r.decode_seconds) << " tokens/s";
    if (batch) std::cout << " (" << r.sequences.size() << " sequences, " << stopped << " stopped by a stop token or string)";
    else if (r.stopped) std::cout << " (stopped by a stop token or string)";
    std::cout << "\n";
    if (r.scheduler.used)
      std::cout << "scheduler: " << r.scheduler.steps << " steps, " << r.scheduler.preemptions << " preemptions, prefix cache "
                << r.scheduler.cached_tokens << " of " << r.scheduler.prompt_tokens << " prompt tokens ("
                << std::setprecision(1) << 100.0 * r.scheduler.prefix_cache_hit_rate << "%), KV pool "
                << r.scheduler.kv_blocks << " blocks of " << r.scheduler.block_size << "\n";
    if (r.scheduler.drafted_tokens > 0 || r.scheduler.drafter_failures > 0)
      std::cout << "speculative: " << r.scheduler.accepted_tokens << " of " << r.scheduler.drafted_tokens
                << " drafted tokens accepted (" << std::setprecision(1) << 100.0 * r.scheduler.acceptance_rate() << "%)"
                << (r.scheduler.drafter_failures > 0
                        ? ", " + std::to_string(r.scheduler.drafter_failures) + " drafter calls failed: " + r.scheduler.drafter_error
                        : std::string())
                << "\n";
    return r.cancelled ? 1 : 0;
  });
}

int cmd_quantize(const std::vector<std::string> &args) {
  return guarded(kQuantizeUsage, [&] {
    std::vector<std::string> rest;
    std::string out;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--out") {
        if (i + 1 >= args.size()) throw Error(ErrorCategory::usage, "--out needs a directory");
        out = args[++i];
      } else {
        rest.push_back(args[i]);
      }
    }
    ManifestArgs a = parse_manifest_args(rest, false);
    if (a.help) {
      std::cout << kQuantizeUsage;
      return 0;
    }
    if (out.empty()) throw Error(ErrorCategory::usage, "--out DIR is required");
    a.overrides.push_back("loom.device=cpu"); // the CPU backend quantizes and exports
    auto runtime = Runtime::from_file(a.manifest, a.overrides);
    const auto start = std::chrono::steady_clock::now();
    runtime->export_quantized(out);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto path = std::filesystem::path(out) / "model.safetensors";
    std::cout << "wrote " << path.string() << " (" << std::fixed << std::setprecision(1)
              << static_cast<double>(std::filesystem::file_size(path)) / (1024.0 * 1024.0) << " MiB, quantized by "
              << runtime->pipeline().list(LOOM_KIND_QUANTIZER).front()->desc().name << " in " << std::setprecision(2) << seconds << " s)\n";
    return 0;
  });
}

int cmd_index(const std::vector<std::string> &args) {
  return guarded(kIndexUsage, [&] {
    if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
      std::cout << kIndexUsage;
      return 0;
    }
    if (args.empty() || (args[0] != "build" && args[0] != "query"))
      throw Error(ErrorCategory::usage, "index: the first argument is build or query");
    const bool build = args[0] == "build";
    std::string manifest, docs, out, index, question;
    std::vector<std::string> overrides;
    int64_t chunk = 800, overlap = 100, top_k = 5;
    for (size_t i = 1; i < args.size(); ++i) {
      const std::string &a = args[i];
      auto value = [&](const char *flag) -> std::string {
        if (i + 1 >= args.size()) throw Error(ErrorCategory::usage, std::string(flag) + " needs a value");
        return args[++i];
      };
      if (a == "--set") overrides.push_back(value("--set"));
      else if (build && a == "--docs") docs = value("--docs");
      else if (build && a == "--out") out = value("--out");
      else if (build && a == "--chunk") chunk = int_flag("--chunk", value("--chunk"), 2, 1 << 24);
      else if (build && a == "--overlap") overlap = int_flag("--overlap", value("--overlap"), 0, 1 << 23);
      else if (!build && a == "--index") index = value("--index");
      else if (!build && a == "--top-k") top_k = int_flag("--top-k", value("--top-k"), 1, 1000);
      else if (!a.empty() && a[0] == '-') throw Error(ErrorCategory::usage, "unknown option '" + a + "'");
      else if (manifest.empty()) manifest = a;
      else if (!build) question += (question.empty() ? "" : " ") + a;
      else throw Error(ErrorCategory::usage, "unexpected argument '" + a + "'");
    }
    if (manifest.empty()) throw Error(ErrorCategory::usage, "a MANIFEST is required");
    if (build && (docs.empty() || out.empty())) throw Error(ErrorCategory::usage, "index build needs --docs and --out");
    if (!build && (index.empty() || question.empty())) throw Error(ErrorCategory::usage, "index query needs --index and a QUESTION");
    // One manifest serves `index build` and the runs that load its output (`index = DIR`): a
    // build starts from empty retrievers, so it does not load what it is about to write.
    Manifest parsed = parse_manifest_file(manifest, overrides);
    if (build)
      for (auto &c : parsed.components) c.index.clear();
    auto runtime = std::make_unique<Runtime>(std::move(parsed));
    const auto retrievers = runtime->pipeline().list(LOOM_KIND_RETRIEVER);
    if (retrievers.empty()) throw Error(ErrorCategory::manifest, manifest + ": no [[retriever]] to index for");
    namespace fs = std::filesystem;
    if (build) {
      const std::vector<DocumentChunk> chunks = chunk_documents(docs, chunk, overlap);
      // With [embedding], the model embeds every chunk once, for the dense retrievers; the saved
      // index keeps the vectors, so a query later embeds only its question.
      std::vector<std::vector<float>> vectors;
      if (runtime->manifest().embedding.enabled) {
        std::vector<std::string> texts;
        for (const auto &c : chunks) texts.push_back(c.text);
        const auto start = std::chrono::steady_clock::now();
        vectors = runtime->embed(texts, /*query=*/false);
        std::cout << "embedded " << vectors.size() << " chunks in " << std::fixed << std::setprecision(1)
                  << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s ("
                  << (vectors.empty() ? 0 : vectors.front().size()) << " dimensions)\n";
      }
      std::vector<loom_document> abi;
      for (size_t i = 0; i < chunks.size(); ++i) {
        const auto &c = chunks[i];
        abi.push_back(loom_document{sizeof(loom_document), c.doc_id.c_str(), c.text.c_str(), c.metadata_json.c_str(),
                                    vectors.empty() ? nullptr : vectors[i].data(),
                                    vectors.empty() ? 0 : static_cast<int32_t>(vectors[i].size())});
      }
      for (const auto &r : retrievers) {
        const auto *vt = r->vtable<loom_retriever_vtable>();
        for (size_t at = 0; at < abi.size(); at += 256)
          r->check(vt->add(r->handle(), abi.data() + at, static_cast<uint32_t>(std::min<size_t>(256, abi.size() - at))), "add");
        if (vt->save == nullptr)
          throw Error(ErrorCategory::runtime, r->slot() + " (" + r->desc().name + "): this retriever keeps its index in memory only");
        const fs::path dir = fs::path(out) / r->slot();
        fs::create_directories(dir);
        r->check(vt->save(r->handle(), dir.string().c_str()), "save");
        uint64_t count = 0;
        r->check(vt->count(r->handle(), &count), "count");
        std::cout << r->slot() << " (" << r->desc().name << "): " << count << " documents, saved to " << dir.string() << "\n";
      }
      std::cout << "indexed " << chunks.size() << " chunks of " << docs << "\n";
      return 0;
    }
    // Each retriever's top passages, then (with several) their reciprocal rank fusion.
    std::vector<PassageResult> all;
    const std::vector<float> question_vector =
        runtime->manifest().embedding.enabled ? runtime->embed({question}, /*query=*/true).front() : std::vector<float>{};
    const auto print = [](int rank, const PassageResult &p) {
      std::string text = p.text;
      std::replace(text.begin(), text.end(), '\n', ' ');
      if (text.size() > 72) text = text.substr(0, 69) + "...";
      std::cout << "  " << rank << ". " << p.doc_id << "  " << std::fixed << std::setprecision(3) << p.score << "  " << text
                << "\n";
    };
    for (const auto &r : retrievers) {
      const auto *vt = r->vtable<loom_retriever_vtable>();
      const fs::path dir = fs::path(index) / r->slot();
      if (vt->load == nullptr || !fs::is_directory(dir))
        throw Error(ErrorCategory::runtime, dir.string() + ": no saved index for " + r->slot() + " (loom index build first)");
      r->check(vt->load(r->handle(), dir.string().c_str()), "load");
      loom_query q{};
      q.struct_size = sizeof(q);
      q.text = question.c_str();
      q.embedding = question_vector.empty() ? nullptr : question_vector.data();
      q.embedding_dim = static_cast<int32_t>(question_vector.size());
      q.top_k = static_cast<int32_t>(top_k);
      struct Sink {
        std::vector<PassageResult> *all;
        std::string slot;
      } sink{&all, r->slot()};
      const size_t first = all.size();
      r->check(vt->search(r->handle(), &q,
                          [](void *user, const loom_passage *p) -> loom_status {
                            auto *s = static_cast<Sink *>(user);
                            PassageResult found;
                            found.retriever_slot = s->slot;
                            found.doc_id = p->doc_id ? p->doc_id : "";
                            found.score = p->score;
                            found.text = p->text ? p->text : "";
                            s->all->push_back(std::move(found));
                            return LOOM_OK;
                          },
                          &sink),
               "search");
      for (size_t i = first; i < all.size(); ++i) print(static_cast<int>(i - first + 1), all[i]);
      if (all.size() == first) std::cout << "  (nothing found)\n";
      std::cout << r->slot() << " (" << r->desc().name << "): " << all.size() - first << " passage(s) for \"" << question
                << "\"\n";
    }
    if (retrievers.size() > 1) {
      const auto fused = fuse_passages(all, top_k);
      for (size_t i = 0; i < fused.size(); ++i) print(static_cast<int>(i + 1), fused[i]);
      std::cout << "fused (reciprocal rank, k = 60): " << fused.size() << " passage(s)\n";
    }
    return 0;
  });
}

int cmd_train(const std::vector<std::string> &args) {
  return guarded(kTrainUsage, [&] {
    ManifestArgs a = parse_manifest_args(args, true);
    if (a.help) {
      std::cout << kTrainUsage;
      return 0;
    }
    const Manifest manifest = parse_manifest_file(a.manifest, a.overrides);
    TrainOptions options;
    options.stop_after = a.steps;
    const auto start = std::chrono::steady_clock::now();
    const TrainResult r = train(manifest, options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "trained to step " << r.step << " of " << manifest.train.steps << " in " << std::fixed
              << std::setprecision(1) << seconds << " s (" << r.train_sequences << " training and "
              << r.validation_sequences << " validation sequences) on " << r.device;
    if (!r.val_loss.empty()) {
      std::cout << "; validation loss ";
      if (r.val_loss.size() > 1) std::cout << std::setprecision(4) << r.val_loss.front().second << " -> ";
      std::cout << std::setprecision(4) << r.val_loss.back().second << ", perplexity " << std::setprecision(2)
                << std::exp(r.val_loss.back().second);
    }
    std::cout << "\n";
    if (!r.writer) std::cout << "(this rank of a data parallel run; rank 0 writes the log, checkpoints and model)\n";
    else if (!r.model_dir.empty()) std::cout << "model: " << r.model_dir.string() << "\n";
    else if (!r.adapter_dir.empty()) std::cout << "adapter: " << r.adapter_dir.string() << "\n";
    else std::cout << "checkpoint: " << (manifest.train.out / "checkpoint").string() << "\n";
    if (!r.plot.empty()) std::cout << "plot: " << r.plot.string() << "\n";
    return 0;
  });
}

} // namespace loom::cli
