/* vfio-ep I/O thread: one per connection, reading the socket without the interpreter.
 *
 * The fast path (vfu_fast.h) run by a C thread that blocks on the socket: hot messages are
 * served there and then, and Python never wakes for them.  The first message that needs
 * Python is handed over (notify_efd becomes readable) and the thread waits until Python has
 * handled it (vfu_io_resume), so the order of the stream is kept.  BAR writes for Python's
 * register handlers are acknowledged and queued instead (f.posted, which Python copies under
 * vfu_io_lock; notify_efd signalled for a write into an empty queue only, as Python applies
 * all that is queued and looks again after): the thread reads on, queueing more such
 * writes, and serves anything else only once Python has applied them (vfu_io_posted_done),
 * as PCIe orders posted writes.  The window table and the socket's send side are shared
 * with Python under one lock: Python swaps the table (vfu_io_set_windows) and sends its own
 * messages (vfu_io_send) through here without waiting for room in the socket: a client that
 * stops reading stalls only its own connection.
 */
#pragma once
#include <stdint.h>

#include "vfu_fast.h"

struct vfu_io {
	struct vfu_fast f;       /* the thread's message pump; f.sock is the connection */
	int notify_efd;          /* signalled when a message (or the stream's end) waits, or
				  * a write goes into an empty queue */
	int stop_efd;            /* signalled by vfu_io_stop */
	int handed;              /* 1 while Python has `result` (and f's message) to handle */
	int result;              /* vfu_fast_poll()'s result that was handed over */
	int err;                 /* errno with VFU_IOERR */
	int stopping;
	int running;             /* between vfu_io_start and vfu_io_stop: a thread shares io */
	int sending;             /* whose message is partly sent (1 Python's, 2 the thread's) */
	int sock_flags;          /* f.sock's file status flags before the thread started */
	int block_wait;          /* the thread waits in a blocking peek (f.sock blocking), not poll */
	uint64_t thread;         /* a pthread_t */
	uint64_t lock[8];        /* a pthread_mutex_t: the table, f's state, the send side */
	uint64_t cond[8];        /* a pthread_cond_t: `handed` cleared, or stopping */
};

/* Every field Python sets goes through these calls: once the thread runs, under its lock (or
 * while it is parked, which they check).
 *
 * Before the thread exists: the connection's socket, the two VFU_MAX_MSG buffers (the
 * caller's), the eventfds and f.read_reg (NULL: none); the rest zeroed. */
void vfu_io_init(struct vfu_io *io, int sock, uint8_t *buf, uint8_t *out, int notify_efd,
		 int stop_efd,
		 int (*read_reg)(void *handle, uint64_t offset, uint32_t count, uint64_t *value));
/* Start the thread serving from `windows`; 0, or an errno. */
int vfu_io_start(struct vfu_io *io, struct vfu_window *windows, int n);
/* From now on, acknowledge BAR writes Python applies before it has (f.early_ack). */
void vfu_io_allow_early_ack(struct vfu_io *io);
/* The handed-over message is done with: its fds were taken by the caller (or, `close_fds`,
 * are closed here) and f is emptied for the next one.  Only while the thread is parked (a
 * result handed over, or no thread): -EBUSY otherwise, and nothing changes. */
int vfu_io_release(struct vfu_io *io, int close_fds);
/* After vfu_io_stop, or when it never started: what a half-read message left (its fds) and
 * the two eventfds are closed; calling it again does nothing. */
void vfu_io_close(struct vfu_io *io);
#define VFU_POSTED 8 /* vfu_io_handed(): writes are queued, to apply before anything else */

/* What the thread handed over (a VFU_* result), VFU_POSTED while queued writes wait (they
 * come first), or -1 while it reads on. */
int vfu_io_handed(struct vfu_io *io);
/* Python has applied the `n` oldest queued writes: the thread may serve what waited (after
 * vfu_io_stop too, for the writes the thread left queued). */
void vfu_io_posted_done(struct vfu_io *io, int n);
/* Python has taken and handled the handed-over message: read on. */
void vfu_io_resume(struct vfu_io *io);
/* Stop and join the thread; afterwards nothing of `io` is touched by C. */
void vfu_io_stop(struct vfu_io *io);
/* Serve from this table from the next message on (the caller keeps it alive until the next
 * call, or vfu_io_stop). */
void vfu_io_set_windows(struct vfu_io *io, struct vfu_window *windows, int n);
/* Hold the thread still between two messages (or while its reply waits for room), until
 * vfu_io_unlock: memory its window table points into may move meanwhile, and the new table
 * be swapped in. */
void vfu_io_lock(struct vfu_io *io);
void vfu_io_unlock(struct vfu_io *io);
/* Cut the connection (a message of Python's was left half sent): both directions shut down,
 * so the thread sees the end of the stream and Python tears the connection down. */
void vfu_io_abort(struct vfu_io *io);
/* 1 when the thread has nothing to do: nothing handed over, nothing (not even EOF) unread on
 * the socket.  For callers that must know every message sent so far was handled. */
int vfu_io_idle(struct vfu_io *io);
/* Send what the socket takes now of a message of Python's, from byte `sent` on (`fd`, when
 * >= 0, goes with the first byte): the bytes sent so far, or -errno (-EBUSY: the thread's
 * own reply is half out, try again shortly).  Until the message is complete the thread sends
 * nothing of its own, so it stays whole on the wire; the caller waits for the socket to be
 * writable and calls again, without blocking anyone else. */
int64_t vfu_io_send(struct vfu_io *io, const uint8_t *buf, uint32_t len, uint32_t sent, int fd);
