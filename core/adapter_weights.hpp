// Private to core: an adapter instance's weights from a Hugging Face PEFT directory
// ([[adapter]] weights = "dir"), loaded once the instance is attached to its modules.
#pragma once

#include "loom/core/instance.hpp"

namespace loom {

// Does nothing when the instance has no weights directory. Otherwise reads
// dir/adapter_config.json (for `lora`: peft_type, r, lora_alpha, use_rslora and target_modules
// must agree with the component's table) and dir/adapter_model.safetensors (float32, bfloat16 or
// float16 tensors under PEFT's names), which must hold exactly the attached sites' parameters, and
// passes them to the plugin's load(). Throws loom::Error naming the file and the key or tensor.
void load_adapter_weights(Instance &adapter);

}  // namespace loom
