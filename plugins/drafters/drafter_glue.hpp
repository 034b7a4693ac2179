// The drafter vtable for a class D (plugins/drafters): D(host, ctx) reads its config, then
// D::propose(const loom_draft_batch&) and D::release(int64_t seq) do the work; guard() turns
// exceptions into statuses at the ABI edge.
#pragma once

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::drafters {

template <class D>
struct DrafterGlue {
  static loom_status propose(void* inst, const loom_draft_batch* batch) {
    auto* d = static_cast<D*>(inst);
    return guard(d->host, d->ctx, [&] {
      if (batch == nullptr || batch->n_seqs < 0 || (batch->n_seqs > 0 && (!batch->seq_ids || !batch->context ||
                                                                          !batch->context_len || !batch->max_draft ||
                                                                          !batch->draft_out || !batch->n_out)))
        invalid("propose: a batch with missing arrays");
      d->propose(*batch);
    });
  }
  static void release(void* inst, int64_t seq) noexcept {
    try {
      static_cast<D*>(inst)->release(seq);
    } catch (...) {  // forgetting state does not fail
    }
  }
  static constexpr loom_drafter_vtable kVtable = {
      sizeof(loom_drafter_vtable),
      {&create_instance<D>, &destroy_instance<D>, nullptr, nullptr, nullptr},
      &propose,
      &release};
};

}  // namespace loomp::drafters
