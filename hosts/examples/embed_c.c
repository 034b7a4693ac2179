/* An application embedding Loom through libloom's C API (loom/loom.h): a runtime from a
 * manifest, a streamed generation, a chat reply, embeddings, a component swap, destroy.
 * usage: embed_c MANIFEST      (configs/server.toml works: the default model with [embedding])
 * Prints what it does; exits non-zero on the first failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loom/loom.h"

static int check(loom_status status, const char *what) {
  if (status == LOOM_OK) return 1;
  fprintf(stderr, "embed_c: %s failed (%d): %s\n", what, (int)status, loom_last_error());
  return 0;
}

/* Streams each piece of text to stdout and counts the pieces. */
static int32_t print_piece(void *user, const char *piece, size_t length) {
  ++*(int *)user;
  fwrite(piece, 1, length, stdout);
  fflush(stdout);
  return 0;
}

/* Options with their own sampling (temperature 0: greedy), the rest at the defaults. */
static loom_generate_options sampling_options(int64_t max_tokens, double temperature) {
  loom_generate_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.max_tokens = max_tokens;
  o.use_sampling = 1;
  o.temperature = temperature;
  return o;
}

/* Keeps each sample's streamed pieces (up to 4 KB each). */
struct samples_seen {
  char text[3][4096];
  size_t length[3];
};
static int32_t collect_sample(void *user, size_t sample, const char *piece, size_t length) {
  struct samples_seen *seen = user;
  if (sample >= 3 || seen->length[sample] + length > sizeof seen->text[0]) return 1;
  memcpy(seen->text[sample] + seen->length[sample], piece, length);
  seen->length[sample] += length;
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: embed_c MANIFEST\n");
    return 2;
  }
  loom_runtime *rt = NULL;
  if (!check(loom_runtime_create_from_file(argv[1], NULL, 0, &rt), "create")) return 1;

  /* A greedy continuation, streamed, with a stop string. */
  loom_generate_options options = sampling_options(32, 0.0);
  const char *stops[] = {"\n"};
  options.stop = stops;
  options.stop_count = 1;
  int pieces = 0;
  char *text = NULL;
  int32_t stopped = 0;
  printf("generate: And God said");
  if (!check(loom_runtime_generate(rt, "And God said", &options, print_piece, &pieces, &text, &stopped), "generate")) return 1;
  printf("\ngenerate: %d pieces, %zu bytes, stopped=%d\n", pieces, strlen(text), (int)stopped);
  if (pieces == 0 || strlen(text) == 0) return 1;

  /* The same greedy generation again gives the same text. */
  char *again = NULL;
  if (!check(loom_runtime_generate(rt, "And God said", &options, NULL, NULL, &again, NULL), "generate again")) return 1;
  printf("generate: repeatable=%d\n", strcmp(text, again) == 0);
  if (strcmp(text, again) != 0) return 1;
  loom_free_string(again);
  loom_free_string(text);

  /* A chat reply with seeded sampling. */
  loom_chat_message messages[] = {{"system", "Answer as the King James Bible."}, {"user", "Who made the light?"}};
  options.temperature = 0.8;
  options.top_p = 0.95;
  options.use_seed = 1;
  options.seed = 42;
  options.stop_count = 0;
  if (!check(loom_runtime_chat(rt, messages, 2, &options, NULL, NULL, &text, NULL), "chat")) return 1;
  printf("chat: %s\n", text);
  loom_free_string(text);

  /* Three samples of one prompt in one batch; sample 0 is the single generation's text. */
  struct samples_seen seen;
  memset(&seen, 0, sizeof seen);
  char *samples[3] = {NULL, NULL, NULL};
  int32_t samples_stopped[3] = {-1, -1, -1};
  options.max_tokens = 16;
  if (!check(loom_runtime_generate_n(rt, "And God said", &options, 3, collect_sample, &seen, samples, samples_stopped),
             "generate_n"))
    return 1;
  if (!check(loom_runtime_generate(rt, "And God said", &options, NULL, NULL, &text, NULL), "generate (sample 0)")) return 1;
  int distinct = strcmp(samples[0], samples[1]) != 0 || strcmp(samples[0], samples[2]) != 0;
  for (int j = 0; j < 3; ++j) {
    printf("generate_n: [%d] %s\n", j, samples[j]);
    /* The streamed pieces make up each sample's text. */
    if (seen.length[j] != strlen(samples[j]) || memcmp(seen.text[j], samples[j], seen.length[j]) != 0) return 1;
    if (samples_stopped[j] != 0 && samples_stopped[j] != 1) return 1;
  }
  printf("generate_n: sample 0 = generate: %d, samples differ: %d\n", strcmp(samples[0], text) == 0, distinct);
  if (strcmp(samples[0], text) != 0 || !distinct) return 1;
  for (int j = 0; j < 3; ++j) loom_free_string(samples[j]);
  loom_free_string(text);
  if (loom_runtime_generate_n(rt, "And God said", &options, 0, NULL, NULL, samples, NULL) != LOOM_ERR_INVALID_ARGUMENT) return 1;
  printf("generate_n: n = 0 refused: %s\n", loom_last_error());

  /* top_k 1 leaves one candidate: greedy, however hot; ignore_eos runs to max_tokens. */
  loom_generate_options hot = sampling_options(12, 1.5);
  hot.top_k = 1;
  char *one = NULL, *greedy = NULL;
  if (!check(loom_runtime_generate(rt, "And God said", &hot, NULL, NULL, &one, NULL), "generate top_k 1")) return 1;
  hot.temperature = 0.0;
  hot.top_k = 0;
  if (!check(loom_runtime_generate(rt, "And God said", &hot, NULL, NULL, &greedy, NULL), "generate greedy")) return 1;
  printf("generate: top_k 1 at temperature 1.5 = greedy: %d\n", strcmp(one, greedy) == 0);
  if (strcmp(one, greedy) != 0) return 1;
  loom_free_string(one);
  loom_free_string(greedy);
  hot.max_tokens = 40;
  hot.ignore_eos = 1;
  int32_t ended = -1;
  if (!check(loom_runtime_generate(rt, "And God said", &hot, NULL, NULL, &one, &ended), "generate ignore_eos")) return 1;
  printf("generate: ignore_eos: stopped=%d, %zu bytes\n", (int)ended, strlen(one));
  if (ended != 0) return 1;
  loom_free_string(one);
  hot.min_tokens = 41;
  if (loom_runtime_generate(rt, "And God said", &hot, NULL, NULL, &one, NULL) == LOOM_OK) return 1;
  printf("generate: min_tokens > max_tokens refused: %s\n", loom_last_error());

  /* Embeddings: ask for the size first, then fill. */
  const char *texts[] = {"In the beginning", "God created the heaven"};
  size_t dim = 0;
  if (loom_runtime_embed(rt, texts, 2, NULL, 0, &dim) != LOOM_ERR_INVALID_ARGUMENT || dim == 0) {
    fprintf(stderr, "embed_c: the size query did not report the dimension\n");
    return 1;
  }
  float *vectors = malloc(2 * dim * sizeof(float));
  if (!check(loom_runtime_embed(rt, texts, 2, vectors, 2 * dim, &dim), "embed")) return 1;
  double norm = 0;
  for (size_t i = 0; i < dim; ++i) norm += (double)vectors[i] * vectors[i];
  printf("embed: 2 x %zu floats, |v0| = %.4f\n", dim, sqrt(norm));
  free(vectors);

  /* Swap the first sampler while the runtime lives; a bad swap says why and changes nothing. */
  if (!check(loom_runtime_swap(rt, "sampler[0]", "use = \"temperature\"\nt = 0.5"), "swap")) return 1;
  if (loom_runtime_swap(rt, "sampler[0]", "use = \"no-such-sampler\"") == LOOM_OK) return 1;
  printf("swap: ok; a bad one refused: %s\n", loom_last_error());
  options.use_sampling = 0; /* the manifest's (swapped) chain */
  if (!check(loom_runtime_generate(rt, "And God said", &options, NULL, NULL, &text, NULL), "generate after swap")) return 1;
  loom_free_string(text);

  loom_runtime_destroy(rt);
  printf("embed_c: done\n");
  return 0;
}
