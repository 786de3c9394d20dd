/* llama.cpp's abort callback for a worker's batch, in C.
 *
 * ggml calls the abort callback after every node of the compute graph, hundreds of times a
 * step. Through ctypes each call takes the GIL and costs ~10% of decode speed, so a Python
 * callback can only be armed for prefill steps. This one costs a few loads per call: it stays
 * armed in every step, and a stop in decode lands mid-step, not at the step's end.
 *
 * It reads the pool's cancel flags (shared memory, written by the web process) for the
 * sequences in the batch being decoded: flags[index[i]] >= job_id[i] means that job is
 * cancelled. No Python.h: built as a plain shared object and loaded with ctypes.
 */
#include <stdbool.h>
#include <stdint.h>

#define EDISON_MAX_WATCHED 64  /* pool.slots is at most 64 */

struct edison_watch {
    const volatile int64_t *flags;
    int32_t n;
    int32_t index[EDISON_MAX_WATCHED];
    int64_t job_id[EDISON_MAX_WATCHED];
};

bool edison_batch_cancelled(void *data) {
    const struct edison_watch *watch = data;
    for (int32_t i = 0; i < watch->n; i++) {
        if (watch->flags[watch->index[i]] >= watch->job_id[i]) {
            return true;
        }
    }
    return false;
}

int32_t edison_max_watched(void) {
    return EDISON_MAX_WATCHED;
}
