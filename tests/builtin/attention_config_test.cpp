// Attention plugins' device and dtype decisions that need no GPU, so they run in CI: sdpa takes
// CUDA configs (float32, bfloat16) only in builds with CUDA and refuses them clearly elsewhere;
// flash (built with CUDA only) describes itself and refuses configs it has no kernels for before
// it touches a GPU. Numerics on the GPU are in attention_cuda_test.cpp.
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdio>

#include <cmath>

#include "builtin_test_util.hpp"

namespace {

loom_attention_config config(int32_t heads, int32_t kv_heads, int32_t head_dim, DLDataType dtype, DLDevice device) {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = 1;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.max_positions = 256;
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  c.dtype = dtype;
  c.device = device;
  return c;
}

constexpr DLDataType kF32{kDLFloat, 32, 1};
constexpr DLDataType kBF16{kDLBfloat, 16, 1};
constexpr DLDevice kCpu{kDLCPU, 0};
constexpr DLDevice kCuda{kDLCUDA, 0};

// prepare() on the component of `components_toml`; returns the status, fills layout and error.
struct Prepared {
  loom_status status;
  loom_kv_layout layout;
  std::string error;
};
Prepared prepare(loom::Runtime &rt, const loom_attention_config &c) {
  loom::Instance &inst = rt.pipeline().at("attention");
  Prepared p{};
  p.layout.struct_size = sizeof(p.layout);
  p.status = inst.vtable<loom_attention_vtable>()->prepare(inst.handle(), &c, &p.layout);
  p.error = inst.last_error();
  return p;
}

} // namespace

TEST_CASE("sliding_window sets the window the plugin applies and reports (ABI 1.4)", "[sdpa][flash][attention][window]") {
  std::vector<std::string> plugins = {"sdpa"};
#if LOOM_TEST_HAVE_CUDA
  plugins.push_back("flash");
#endif
  for (const std::string &name : plugins) {
    INFO(name);
    const DLDataType dtype = name == "flash" ? kBF16 : kF32;
    const DLDevice device = name == "flash" ? kCuda : kCpu;
    auto model_window = config(8, 2, 64, dtype, device);
    model_window.sliding_window = 32;
    // 0 (the default): the model's window, reported back; none when the model has none.
    auto rt = bt::runtime("[attention]\nuse = \"" + name + "\"\n");
    const Prepared first = prepare(*rt, model_window);
    if (name == "flash" && first.status == LOOM_ERR_DEVICE) { // flash's prepare needs a device
      std::printf("flash: prepare failed (%s): its window checks are skipped without a CUDA device\n",
                  first.error.c_str());
      continue;
    }
    REQUIRE(first.status == LOOM_OK);
    CHECK(first.layout.window == 32);
    CHECK(prepare(*rt, config(8, 2, 64, dtype, device)).layout.window == 0);
    // Its own window replaces the model's.
    auto own = bt::runtime("[attention]\nuse = \"" + name + "\"\nsliding_window = 8\n");
    CHECK(prepare(*own, model_window).layout.window == 8);
    CHECK(prepare(*own, config(8, 2, 64, dtype, device)).layout.window == 8);
    CHECK_THAT(bt::build_error("[attention]\nuse = \"" + name + "\"\nsliding_window = -1\n"),
               Catch::Contains("attention.sliding_window") && Catch::Contains("must be 0"));
  }
}

TEST_CASE("sdpa takes CUDA configs exactly when the build has CUDA", "[sdpa][attention]") {
  auto rt = bt::runtime("[attention]\nuse = \"sdpa\"\nblock_size = 8\n");
#if LOOM_TEST_HAVE_CUDA
  // prepare() only records the geometry: no GPU is needed to accept it.
  auto f32 = prepare(*rt, config(4, 2, 16, kF32, kCuda));
  CHECK(f32.status == LOOM_OK);
  CHECK(f32.layout.bytes_per_block == 2u * 8 * 2 * 16 * 4);
  CHECK(f32.layout.cache_dtype.code == kDLFloat);
  auto bf16 = prepare(*rt, config(4, 2, 16, kBF16, kCuda));
  CHECK(bf16.status == LOOM_OK);
  CHECK(bf16.layout.bytes_per_block == 2u * 8 * 2 * 16 * 2);
  CHECK(bf16.layout.cache_dtype.code == kDLBfloat);
  auto f16 = prepare(*rt, config(4, 2, 16, DLDataType{kDLFloat, 16, 1}, kCuda));
  CHECK(f16.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(f16.error, Catch::Contains("float32 and bfloat16"));
#else
  auto cuda = prepare(*rt, config(4, 2, 16, kF32, kCuda));
  CHECK(cuda.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(cuda.error, Catch::Contains("no CUDA support"));
#endif
  // The CPU path stays float32 only.
  auto cpu_bf16 = prepare(*rt, config(4, 2, 16, kBF16, kCpu));
  CHECK(cpu_bf16.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(cpu_bf16.error, Catch::Contains("float32"));
  auto cpu = prepare(*rt, config(4, 2, 16, kF32, kCpu));
  CHECK(cpu.status == LOOM_OK);
  CHECK(cpu.layout.bytes_per_block == 2u * 8 * 2 * 16 * 4);
}

#if LOOM_TEST_HAVE_CUDA
TEST_CASE("flash describes itself and checks block_size", "[flash][attention]") {
  auto rt = bt::runtime("[attention]\nuse = \"flash\"\n");
  const loom_component_desc &d = rt->pipeline().at("attention").desc();
  CHECK(std::string(d.name) == "flash");
  CHECK(d.kind == LOOM_KIND_ATTENTION);
  CHECK(d.threading == LOOM_THREADING_SERIAL);
  REQUIRE(d.param_count == 3);
  CHECK(std::string(d.params[2].key) == "sliding_window");
  CHECK(std::string(d.params[0].key) == "block_size");
  CHECK(std::string(d.params[0].default_value) == "16");
  CHECK(std::string(d.params[1].key) == "kv_dtype");
  CHECK(std::string(d.params[1].default_value) == "\"auto\"");
  CHECK(d.vtable != nullptr);
  CHECK_THAT(bt::build_error("[attention]\nuse = \"flash\"\nblock_size = 12\n"),
             Catch::Contains("flash: block_size must be a power of two"));
  CHECK_THAT(bt::build_error("[attention]\nuse = \"flash\"\nblock_size = 2048\n"), Catch::Contains("block_size"));
  CHECK_THAT(bt::build_error("[attention]\nuse = \"flash\"\nblocks = 16\n"), Catch::Contains("blocks"));
  CHECK(bt::build_error("[attention]\nuse = \"flash\"\nblock_size = 64\n").empty());
}

TEST_CASE("flash takes kv_dtype auto, bf16, int8 and fp8 and refuses others by name", "[flash][attention][kv]") {
  for (const char *kv : {"auto", "bf16", "int8", "fp8"}) {
    INFO(kv);
    CHECK(bt::build_error(std::string("[attention]\nuse = \"flash\"\nkv_dtype = \"") + kv + "\"\n").empty());
  }
  CHECK_THAT(bt::build_error("[attention]\nuse = \"flash\"\nkv_dtype = \"int4\"\n"),
             Catch::Contains("attention.kv_dtype") &&
                 Catch::Contains("must be \"auto\", \"bf16\", \"int8\" or \"fp8\", got \"int4\""));
  // bf16 storage is the bf16 compute dtype's own cache; under float16 compute it is refused.
  auto rt = bt::runtime("[attention]\nuse = \"flash\"\nkv_dtype = \"bf16\"\n");
  auto f16 = prepare(*rt, config(8, 2, 64, DLDataType{kDLFloat, 16, 1}, kCuda));
  CHECK(f16.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(f16.error, Catch::Contains("kv_dtype \"bf16\" needs bfloat16 compute"));
}

TEST_CASE("flash refuses configs it has no kernels for, by name, before touching a GPU", "[flash][attention]") {
  auto rt = bt::runtime("[attention]\nuse = \"flash\"\n");
  auto head_dim = prepare(*rt, config(8, 2, 96, kBF16, kCuda));
  CHECK(head_dim.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(head_dim.error, Catch::Contains("head_dim 96 is not supported") && Catch::Contains("64 and 128"));
  auto dtype = prepare(*rt, config(8, 2, 64, kF32, kCuda));
  CHECK(dtype.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(dtype.error, Catch::Contains("dtype float32 is not supported"));
  auto cpu = prepare(*rt, config(8, 2, 64, kBF16, kCpu));
  CHECK(cpu.status == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(cpu.error, Catch::Contains("CUDA only") && Catch::Contains("cpu"));
  auto groups = prepare(*rt, config(6, 4, 64, kBF16, kCuda));
  CHECK(groups.status == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(groups.error, Catch::Contains("multiple of n_kv_heads"));
  auto window = config(8, 2, 64, kBF16, kCuda);
  window.sliding_window = -1;
  CHECK(prepare(*rt, window).status == LOOM_ERR_INVALID_ARGUMENT);

  // Refused prepares leave the instance unprepared.
  loom::Instance &inst = rt->pipeline().at("attention");
  loom_attention_batch b{};
  b.struct_size = sizeof(b);
  CHECK(inst.vtable<loom_attention_vtable>()->forward(inst.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(inst.last_error(), Catch::Contains("flash: forward called before prepare"));
}
#endif

TEST_CASE("a host from before ABI 1.4 gets back only the layout fields its struct has", "[sdpa][attention][abi]") {
  auto rt = bt::runtime("[attention]\nuse = \"sdpa\"\n");
  loom::Instance &inst = rt->pipeline().at("attention");
  auto c = config(8, 2, 64, kF32, kCpu);
  c.sliding_window = 32;
  loom_kv_layout layout{};
  layout.struct_size = static_cast<uint32_t>(offsetof(loom_kv_layout, window)); // ABI 1.3's layout
  layout.window = -7;                                                          // past its end
  REQUIRE(inst.vtable<loom_attention_vtable>()->prepare(inst.handle(), &c, &layout) == LOOM_OK);
  CHECK(layout.struct_size == offsetof(loom_kv_layout, window));
  CHECK(layout.block_size > 0);
  CHECK(layout.bytes_per_block > 0);
  CHECK(layout.window == -7);
  // A struct without bytes_per_block is refused by name.
  layout.struct_size = static_cast<uint32_t>(offsetof(loom_kv_layout, bytes_per_block));
  CHECK(inst.vtable<loom_attention_vtable>()->prepare(inst.handle(), &c, &layout) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(inst.last_error(), Catch::Contains("layout_out struct_size"));
}
