/* libFuzzer target: the C fast path's framing, window look-up and serving, under ASan.
 *
 * The fuzzer's bytes are what a client writes on the socket.  They go through a socketpair
 * into vfu_fast_poll() with a window table like a served device's: an MMIO window (its
 * register reads answered by read_reg, which refuses some as a raising handler does), two
 * RAM windows over heap buffers of exactly their size (an access one byte outside is an
 * ASan report) and a doorbell window.  Messages handed to Python are dropped as Python's take()
 * would, queued writes applied as its posted_done() would; what C answers is drained.  Build and run: make fuzz (or tests/test_fuzz.py's
 * bounded run).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfu_fast.h"

#define RAM1_SIZE 0x2000
#define RAM2_SIZE 0x1000

static uint8_t *ram1, *ram2;
static uint32_t pending;
static int efd = -1;
static struct vfu_window windows[4];
static uint8_t buf[VFU_MAX_MSG];

/* struct vfu_fast.read_reg as Python's: the I/O thread passes a checked register access. */
static int read_reg(void *handle, uint64_t offset, uint32_t count, uint64_t *value)
{
	if (handle != windows || offset + count > 0x1000 || offset % count)
		abort();
	*value = offset * 0x0101010101010101ULL;
	return offset % 0x100 == 0x80; /* a handler raising: handed to Python */
}

static void setup(void)
{
	ram1 = malloc(RAM1_SIZE);
	ram2 = malloc(RAM2_SIZE);
	efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	windows[0] = (struct vfu_window){ .bar = 0, .kind = VFU_WINDOW_MMIO, .start = 0,
					  .end = 0x1000, .read_handle = windows };
	windows[1] = (struct vfu_window){ .bar = 1, .kind = VFU_WINDOW_RAM, .start = 0,
					  .end = RAM1_SIZE, .ram = NULL };
	windows[2] = (struct vfu_window){ .bar = 2, .kind = VFU_WINDOW_RAM, .start = 0x3000,
					  .end = 0x3000 + RAM2_SIZE, .ram = NULL };
	windows[3] = (struct vfu_window){ .bar = 2, .kind = VFU_WINDOW_DOORBELL, .start = 0,
					  .end = 0x1000, .efd = efd, .db_offset = 0x40,
					  .db_data = 0x1234, .db_pending = &pending };
	windows[1].ram = ram1;
	windows[2].ram = ram2;
}

static void drain(int sock)
{
	uint8_t sink[4096];
	while (recv(sock, sink, sizeof(sink), MSG_DONTWAIT) > 0)
		;
}

/* The queue's invariants: never over-full, a wait only behind queued writes, and every
 * entry a 1, 2, 4 or 8-byte write (its data fits the entry's 8 bytes). */
static void check_posted(const struct vfu_fast *f, int r)
{
	uint32_t n = f->posted_head - f->posted_tail;
	if (n > VFU_POSTED_MAX || (r == VFU_WAIT && !n))
		abort();
	for (uint32_t i = f->posted_tail; i != f->posted_head; i++) {
		uint32_t c = f->posted[i % VFU_POSTED_MAX].count;
		if (c != 1 && c != 2 && c != 4 && c != 8)
			abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!ram1)
		setup();
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		abort();
	size_t off = 0;
	if (!size)
		shutdown(sv[1], SHUT_WR);
	/* The first byte's bits: 1, as after VERSION (writes for Python acknowledged and
	 * queued); 2, Python slow to apply them (only once the stream waits, a message is
	 * handed over, or all is sent), so the queue fills and what C serves waits. */
	struct vfu_fast f = { .sock = sv[0], .windows = windows, .nwindows = 4, .buf = buf,
			      .early_ack = size && (data[0] & 1), .read_reg = read_reg };
	int slow = size && (data[0] & 2);
	for (int rounds = 0; rounds < 10000; rounds++) {
		if (off < size) {
			ssize_t n = send(sv[1], data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n > 0)
				off += n;
			if (off == size)
				shutdown(sv[1], SHUT_WR);
		}
		int r = vfu_fast_poll(&f);
		drain(sv[1]);
		check_posted(&f, r);
		if (r == VFU_WAIT || r == VFU_MESSAGE || (r == VFU_QUEUED && !slow) ||
		    (r == VFU_AGAIN && off == size))
			f.posted_tail = f.posted_head; /* what Python's posted_done() does */
		if (r == VFU_MESSAGE) { /* what Python's take() does */
			for (int i = 0; i < f.nfds; i++)
				close(f.fds[i]);
			f.have = f.nfds = f.fds_truncated = 0;
		} else if (r != VFU_AGAIN && r != VFU_QUEUED && r != VFU_WAIT) {
			break; /* EOF, a broken or oversized stream, a socket error: Python's */
		}
	}
	close(sv[0]);
	close(sv[1]);
	return 0;
}
