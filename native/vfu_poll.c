/* See vfu_poll.h. */
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "vfu_poll.h"

#define NSEC_PER_SEC 1000000000ULL

_Static_assert(sizeof(pthread_t) <= sizeof(uint64_t), "pthread_t fits vfu_poller.thread");

static void *vfu_poller_run(void *arg)
{
	struct vfu_poller *p = arg;
	struct timespec period = {
		.tv_sec = p->interval_ns / NSEC_PER_SEC,
		.tv_nsec = p->interval_ns % NSEC_PER_SEC,
	};
	const uint64_t one = 1;

	while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
		nanosleep(&period, NULL);
		uint32_t *word = __atomic_load_n(&p->word, __ATOMIC_ACQUIRE);
		uint32_t count = __atomic_load_n(&p->count, __ATOMIC_RELAXED);
		uint32_t set = 0;

		for (uint32_t i = 0; i < count && !set; i++)
			set = __atomic_load_n(&word[i], __ATOMIC_RELAXED);
		if (set && write(p->efd, &one, sizeof(one)) < 0) {
			/* EAGAIN: the counter is full, Python has not caught up; it will. */
		}
	}
	return NULL;
}

int vfu_poller_start(struct vfu_poller *p)
{
	p->stop = 0;
	return pthread_create((pthread_t *)&p->thread, NULL, vfu_poller_run, p);
}

void vfu_poller_stop(struct vfu_poller *p)
{
	__atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
	pthread_join((pthread_t)p->thread, NULL);
}
