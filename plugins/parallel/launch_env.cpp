#include "launch_env.hpp"

#include <cerrno>
#include <cstdlib>
#include <optional>

#include "loom_plugin_util.hpp"

namespace loomp::parallel {
namespace {

std::optional<long> env_int(const char* name, long lo, long hi) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi)
    invalid(std::string("parallel: environment variable ") + name + "=\"" + text + "\" is not an integer in [" +
            std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

}  // namespace

LaunchEnv read_launch_env() {
  LaunchEnv e;
  const char* rank_var = "RANK";
  const char* world_var = "WORLD_SIZE";
  const char* local_var = "LOCAL_RANK";
  if (std::getenv("RANK") != nullptr || std::getenv("WORLD_SIZE") != nullptr) {
    e.launcher = "torchrun";
  } else if (std::getenv("OMPI_COMM_WORLD_RANK") != nullptr) {
    e.launcher = "mpirun";
    rank_var = "OMPI_COMM_WORLD_RANK";
    world_var = "OMPI_COMM_WORLD_SIZE";
    local_var = "OMPI_COMM_WORLD_LOCAL_RANK";
  } else {
    return e;
  }
  constexpr long kMaxWorld = 1 << 16;
  const auto rank = env_int(rank_var, 0, kMaxWorld - 1);
  const auto world = env_int(world_var, 1, kMaxWorld);
  if (!rank || !world)
    invalid(std::string("parallel: launched by ") + e.launcher + " but " + (rank ? world_var : rank_var) + " is not set");
  if (*rank >= *world)
    invalid(std::string("parallel: ") + rank_var + " = " + std::to_string(*rank) + " is outside " + world_var + " = " +
            std::to_string(*world));
  e.rank = static_cast<int>(*rank);
  e.world = static_cast<int>(*world);
  e.local_rank = static_cast<int>(env_int(local_var, 0, kMaxWorld - 1).value_or(0));
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr != '\0') e.master_addr = addr;
  e.master_port = static_cast<int>(env_int("MASTER_PORT", 1, 65535).value_or(29500));
  return e;
}

}  // namespace loomp::parallel
