/* An application embedding Loom through libloom's C API, as a C99 program would. */
#include <stdio.h>
#include <string.h>

#include "loom/loom.h"

static int passed = 0, failed = 0;

#define EXPECT(cond)                                                             \
  do {                                                                           \
    if (cond) {                                                                  \
      ++passed;                                                                  \
    } else {                                                                     \
      ++failed;                                                                  \
      fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, __LINE__, \
              #cond, loom_last_error());                                         \
    }                                                                            \
  } while (0)

static int32_t count_tokens(void *user, int32_t step, int32_t token) {
  (void)step;
  (void)token;
  int *count = (int *)user;
  ++*count;
  return *count >= 5; /* stop after five tokens */
}

int main(void) {
  const char *manifest =
      "[loom]\nplugin_paths = [\"" LOOM_TEST_PLUGIN_DIR "/swap\"]\n"
      "[run]\nsteps = 8\n"
      "[attention]\nuse = \"sdpa\"\n"
      "[[sampler]]\nuse = \"swap-probe\"\nversion = \"<2\"\n";
  loom_runtime *rt = NULL;
  EXPECT(loom_runtime_create_from_string(manifest, "embedded.toml", NULL, 0, &rt) == LOOM_OK);
  if (rt == NULL) return 1;

  int32_t tokens[16];
  size_t written = 0;
  EXPECT(loom_runtime_run(rt, 0, NULL, NULL, tokens, 16, &written) == LOOM_OK);
  EXPECT(written == 8 && tokens[0] == 1 && tokens[7] == 1);

  /* Swap the sampler for version 2 of the probe: later tokens come from it. */
  EXPECT(loom_runtime_swap(rt, "sampler[0]", "use = \"swap-probe\"\nversion = \">=2\"\n") == LOOM_OK);
  int count = 0;
  EXPECT(loom_runtime_run(rt, 0, count_tokens, &count, tokens, 16, &written) == LOOM_OK);
  EXPECT(count == 5 && written == 5 && tokens[0] == 2);

  /* A failed swap says why and leaves the old sampler serving. */
  EXPECT(loom_runtime_swap(rt, "sampler[0]", "use = \"no-such-sampler\"\n") != LOOM_OK);
  EXPECT(strstr(loom_last_error(), "no-such-sampler") != NULL);
  EXPECT(loom_runtime_run(rt, 2, NULL, NULL, tokens, 16, &written) == LOOM_OK && tokens[0] == 2);
  loom_runtime_destroy(rt);

  /* A batch of prompts: every sequence's tokens through the C API. */
  const char *batch =
      "[loom]\nplugin_paths = [\"" LOOM_TEST_PLUGIN_DIR "/swap\"]\n"
      "[run]\nsteps = 3\nprompts = [[1, 2], [3], [4, 5, 6]]\n"
      "[attention]\nuse = \"sdpa\"\n"
      "[[sampler]]\nuse = \"swap-probe\"\nversion = \"<2\"\n";
  EXPECT(loom_runtime_create_from_string(batch, "batch.toml", NULL, 0, &rt) == LOOM_OK);
  if (rt == NULL) return 1;
  EXPECT(loom_runtime_run(rt, 0, NULL, NULL, tokens, 16, &written) == LOOM_OK && written == 3);
  size_t sequences = 0, total = 0;
  EXPECT(loom_runtime_sequence_count(rt, &sequences) == LOOM_OK && sequences == 3);
  EXPECT(loom_runtime_sequence_tokens(rt, 2, tokens, 2, &written, &total) == LOOM_OK && written == 2 && total == 3 &&
         tokens[0] == 1);
  const char *text = NULL;
  int32_t stopped = -1;
  EXPECT(loom_runtime_sequence_text(rt, 1, &text, &stopped) == LOOM_OK && text != NULL && text[0] == '\0' && stopped == 0);
  EXPECT(loom_runtime_sequence_tokens(rt, 3, tokens, 16, &written, NULL) == LOOM_ERR_NOT_FOUND);
  loom_runtime_destroy(rt);

  /* Bad input: errors name the source, nothing crashes. */
  loom_runtime *bad = NULL;
  EXPECT(loom_runtime_create_from_string("[attention\n", "broken.toml", NULL, 0, &bad) != LOOM_OK && bad == NULL);
  EXPECT(strncmp(loom_last_error(), "broken.toml:1:", 14) == 0);
  const char *overrides[] = {"attention.use=nothing"};
  EXPECT(loom_runtime_create_from_string("[attention]\nuse = \"sdpa\"\n", NULL, overrides, 1, &bad) != LOOM_OK);
  EXPECT(strstr(loom_last_error(), "no attention component 'nothing'") != NULL);
  EXPECT(loom_runtime_create_from_file("/nonexistent.toml", NULL, 0, &bad) != LOOM_OK);
  EXPECT(loom_runtime_run(NULL, 0, NULL, NULL, NULL, 0, NULL) == LOOM_ERR_INVALID_ARGUMENT);
  loom_runtime_destroy(NULL);

  /* The shipped main manifest works through the C API as well. */
  EXPECT(loom_runtime_create_from_file(LOOM_SOURCE_DIR "/configs/greedy.toml", NULL, 0, &rt) == LOOM_OK);
  EXPECT(loom_runtime_run(rt, 3, NULL, NULL, tokens, 16, &written) == LOOM_OK && written == 3);
  loom_runtime_destroy(rt);

  printf("c_host_test: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
