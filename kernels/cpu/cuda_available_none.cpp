// cuda_available() for builds without CUDA.
#include "loom/kernels/rows.hpp"

namespace loom::kernels {

bool cuda_available() { return false; }

}  // namespace loom::kernels
