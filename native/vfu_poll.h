/* vfio-ep poll doorbell: the word in EP RAM checked by a C thread, not by the event loop.
 *
 * The core's poll-mode doorbell has no interrupt: something must look at the word every
 * period.  Doing that in the server's event loop wakes the interpreter 1000 times a second
 * (~12% of a core); a thread that sleeps, loads one word and sleeps again costs a few
 * microseconds per period.  While the word is non-zero the thread signals `efd`; Python
 * reads and clears the word, checks the value and raises the doorbell's EP interrupt.
 */
#include <stdint.h>

/* The thread reads `word` and `stop` anew each period (atomic loads): Python may store them. */
struct vfu_poller {
	uint32_t *word;       /* the doorbell word; Python moves it when EP RAM pages move */
	uint64_t interval_ns;
	int efd;              /* eventfd signalled while *word != 0 */
	int stop;
	uint64_t thread;      /* a pthread_t */
};

/* Start polling; 0, or the errno pthread_create returned. */
int vfu_poller_start(struct vfu_poller *p);
/* Stop and join the thread: after it returns, `word` is never read again. */
void vfu_poller_stop(struct vfu_poller *p);
