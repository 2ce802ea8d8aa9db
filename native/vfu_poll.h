/* vfio-ep polled doorbells: words in EP RAM checked by a C thread, not by the event loop.
 *
 * A polled doorbell has no interrupt: something must look at its words every period (the
 * core's poll-mode doorbell, one word; pci-epf-vntb's polled doorbell BAR, a word per
 * slot).  Doing that in the server's event loop wakes the interpreter every period (~12% of
 * a core at 1 ms); a thread that sleeps, loads the words and sleeps again costs a few
 * microseconds per period.  While any word is non-zero the thread signals `efd`; Python
 * takes (reads and clears) the words and raises what they ring.
 */
#include <stdint.h>

/* The thread reads `word`, `count` and `stop` anew each period (atomic loads): Python may
 * store them. */
struct vfu_poller {
	uint32_t *word;       /* the first word; Python moves it when EP RAM pages move */
	uint32_t count;       /* words polled from `word` on (within one page of EP RAM) */
	uint64_t interval_ns;
	int efd;              /* eventfd signalled while a word is non-zero */
	int stop;
	uint64_t thread;      /* a pthread_t */
};

/* Start polling; 0, or the errno pthread_create returned. */
int vfu_poller_start(struct vfu_poller *p);
/* Stop and join the thread: after it returns, `word` is never read again. */
void vfu_poller_stop(struct vfu_poller *p);
