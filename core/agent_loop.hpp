// Private to core: the agent loop's turns ([agent]; core/agent_loop.cpp), apart from how a turn
// is generated, so that tests can script the model's actions.
//
// Ownership: borrows the manifest and the pipeline (its tool instances are shared with the
// calls); a call that overruns call_timeout_s is moved to `abandoned`, which the owner (the
// decoder) joins later; finished ones are joined at the next call, and a tool instance with a
// call still running there is not called again (its plugin may be serial). Thread-safety: one thread runs a loop.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "loom/core/chat_template.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/runtime.hpp"
#include "tool_arguments.hpp"

namespace loom {

// A tool call on its own thread, so that the loop can stop waiting for it.
struct CallState {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  loom_status status = LOOM_OK;
  std::string content, error;
  bool is_error = false;
};

// A call the loop stopped waiting for: still running on `thread` inside `instance`.
struct AbandonedCall {
  std::thread thread;
  std::shared_ptr<CallState> state;
  const Instance *instance = nullptr;
};

struct AgentTurn {
  std::string text;     // what the model wrote
  int64_t tokens = 0;   // tokens it took
};

class AgentLoop {
 public:
  // Finds the offered tools (agent.tools, or all) and compiles their schemas; throws
  // loom::Error (manifest) naming agent.tools or the missing [[tool]].
  // `llama3_native`: with agent.format = "native", describe and parse Llama 3's bare JSON calls
  // instead of <tool_call> blocks.
  AgentLoop(const Manifest &manifest, Pipeline &pipeline, std::vector<AbandonedCall> &abandoned, bool llama3_native = false);
  ~AgentLoop();
  AgentLoop(const AgentLoop &) = delete;
  AgentLoop &operator=(const AgentLoop &) = delete;

  // The grammar of one action: oneOf {"tool": NAME, "arguments": ...} per tool, {"final": ...}.
  const std::string &action_schema() const { return action_schema_; }
  // A turn: the conversation so far and the turn's token limit -> the model's text, or nullopt
  // when the conversation leaves no room for a turn (the loop then stops: "context full").
  using TurnFn = std::function<std::optional<AgentTurn>(const std::vector<ChatMessage> &, int64_t)>;
  // Runs turns after `task` (the user's messages) until an answer or a limit, recording them in
  // result.agent_steps / agent_stop / agent_answer and the calls in result.tool_results.
  void run(const std::vector<ChatMessage> &task, const TurnFn &turn, RunResult &result);

 private:
  struct Tool {
    std::shared_ptr<Instance> owner;
    std::string name, description, schema_json;
    std::unique_ptr<ArgumentSchema> schema;
  };
  // A native reply as the JSON action the loop reads: the first call, or {"final": text}.
  std::string native_action(const std::string &text) const;
  // {text the model sees, failed}: the tool's (capped) output, its error, or a timeout.
  std::pair<std::string, bool> call(const Tool &tool, const std::string &arguments);

  const Manifest &manifest_;
  Pipeline &pipeline_;
  std::vector<AbandonedCall> &abandoned_;
  std::vector<Tool> tools_;
  std::string action_schema_, system_message_;
  bool native_ = false, llama3_ = false;
};

}  // namespace loom
