// A parameter value that a builtin plugin's create() refuses is reported at that value in the
// manifest, "file:line:col: slot.key (component from library): create failed: message", through
// set_config_error (ABI 1.3) and loomp::invalid_param: whatever the message says, and for every kind
// of plugin. Messages about no single key stay at the component's table.
#include <catch2/catch.hpp>

#include <string>

#include "builtin_test_util.hpp"

namespace {

// bt::runtime names the source "<test>" and puts three lines of [loom] first, so a component's
// table starts on line 4 and its first parameter is on line 6.
std::string prefix(const std::string &at, const std::string &label, const std::string &component,
                   const std::string &library) {
  return "<test>:" + at + ": " + label + " (" + component + " from " + library + "): create failed: ";
}

} // namespace

TEST_CASE("a refused parameter value is reported at its key, for every kind of builtin", "[config]") {
  // Messages that begin "<component>: <key>" (which the host once parsed to find the key).
  CHECK(bt::build_error("[[sampler]]\nuse = \"top-k\"\nk = -3\n") ==
        prefix("6:5", "sampler[0].k", "top-k", "libloom-samplers.so") +
            "top-k: k must be >= 0 (0 disables the filter), got -3");
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nwidth = 2\nearly_stopping = \"maybe\"\n"),
             Catch::StartsWith(prefix("7:18", "sampler[0].early_stopping", "beam-search", "libloom-samplers.so") +
                               "beam-search: early_stopping must be"));
  CHECK_THAT(bt::build_error("[attention]\nuse = \"sdpa\"\nblock_size = 3\n"),
             Catch::StartsWith(prefix("6:14", "attention.block_size", "sdpa", "libloom-attention-sdpa.so")));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"lora\"\nr = 4\ndropout = 1.5\n"),
             Catch::StartsWith(prefix("7:11", "adapter[0].dropout", "lora", "libloom-adapter-lora.so") +
                               "lora: dropout must be in [0, 1)"));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"lora\"\ntarget_modules = []\n"),
             Catch::StartsWith(prefix("6:18", "adapter[0].target_modules", "lora", "libloom-adapter-lora.so")));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"bottleneck\"\nactivation = \"tanh\"\n"),
             Catch::StartsWith(prefix("6:14", "adapter[0].activation", "bottleneck", "libloom-adapter-bottleneck.so") +
                               "bottleneck: activation must be \"relu\", \"gelu\" or \"silu\", got \"tanh\""));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"bottleneck\"\nsize = 0\n"),
             Catch::StartsWith(prefix("6:8", "adapter[0].size", "bottleneck", "libloom-adapter-bottleneck.so") +
                               "bottleneck: size must be in [1, 65536], got 0"));
  CHECK_THAT(bt::build_error("[[retriever]]\nuse = \"bm25\"\ndocuments = \"/no/such/loom-dir\"\n"),
             Catch::StartsWith(prefix("6:13", "retriever[0].documents", "bm25", "libloom-retriever-bm25.so")));

  // Messages the host could not have parsed: no "<component>: " first, or another key named first.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"grammar\"\ngrammar_file = \"/no/such/loom.gbnf\"\n"),
             Catch::StartsWith(prefix("6:16", "sampler[0].grammar_file", "grammar", "libloom-grammar.so") +
                               "grammar_file: cannot open '/no/such/loom.gbnf'"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"json-schema\"\nschema = '{'\n"),
             Catch::StartsWith(prefix("6:10", "sampler[0].schema", "json-schema", "libloom-grammar.so")));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"repetition-penalty\"\nfrequency = 0.5\npresence = inf\n"),
             Catch::StartsWith(prefix("7:12", "sampler[0].presence", "repetition-penalty", "libloom-samplers.so") +
                               "repetition-penalty: presence must be finite"));
  // A path inside a parameter points at that element.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"logit-bias\"\n"
                             "bias = [{ token = 1, value = 2.0 }, { token = 2, value = nan }]\n"),
             Catch::StartsWith(prefix("6:58", "sampler[0].bias[1].value", "logit-bias", "libloom-samplers.so") +
                               "logit-bias: bias[1].value must be a finite number or -inf (ban)"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"logit-bias\"\nban = [3, -1]\n"),
             Catch::StartsWith(prefix("6:11", "sampler[0].ban[1]", "logit-bias", "libloom-samplers.so")));
  // A missing member is reported at the element that lacks it.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"logit-bias\"\nbias = [{ value = 1.0 }]\n"),
             Catch::StartsWith(prefix("6:9", "sampler[0].bias[0]", "logit-bias", "libloom-samplers.so") +
                               "logit-bias: bias[0].token is missing"));
}

TEST_CASE("a refused value the manifest does not set, or no single key, stays at the table", "[config]") {
  // Both grammar sources or neither: no one key is wrong.
  CHECK(bt::build_error("[[sampler]]\nuse = \"json-schema\"\n") ==
        prefix("4:1", "sampler[0]", "json-schema", "libloom-grammar.so") +
            "set exactly one of 'schema' and 'schema_file'");
}
