// Where this process sits in a launched world: its rank, the world's size, its GPU on the host,
// and where the ranks meet. Read from the launcher's environment, torchrun's names first
// (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then OpenMPI's mpirun
// (OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK; the meeting point still
// from MASTER_ADDR / MASTER_PORT, default 127.0.0.1:29500). Neither: a world of one.
//
// Thread-safety: read_launch_env reads the environment; call it before starting threads that
// change it.
#ifndef LOOM_PLUGINS_PARALLEL_LAUNCH_ENV_HPP
#define LOOM_PLUGINS_PARALLEL_LAUNCH_ENV_HPP

#include <string>

namespace loomp::parallel {

struct LaunchEnv {
  int rank = 0, world = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string launcher = "none";  // "torchrun", "mpirun" or "none": for messages
};

// Throws loomp::Fail (invalid argument) naming the variable when one is malformed or the rank
// is outside the world.
LaunchEnv read_launch_env();

}  // namespace loomp::parallel

#endif
