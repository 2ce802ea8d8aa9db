/* See vfu_io.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfu_fast.h"
#include "vfu_io.h"

enum { SENDING_PYTHON = 1, SENDING_C = 2 }; /* vfu_io.sending: whose message is half out */

_Static_assert(sizeof(pthread_mutex_t) <= sizeof(((struct vfu_io *)0)->lock), "mutex fits");
_Static_assert(sizeof(pthread_cond_t) <= sizeof(((struct vfu_io *)0)->cond), "cond fits");
_Static_assert(sizeof(pthread_t) <= sizeof(uint64_t), "pthread_t fits vfu_io.thread");

static pthread_mutex_t *lock_of(struct vfu_io *io) { return (pthread_mutex_t *)io->lock; }
static pthread_cond_t *cond_of(struct vfu_io *io) { return (pthread_cond_t *)io->cond; }

/* The lock, where a thread shares io (vfu_io_start to vfu_io_stop); none otherwise. */
static void hold(struct vfu_io *io)
{
	if (io->running)
		pthread_mutex_lock(lock_of(io));
}

static void let_go(struct vfu_io *io)
{
	if (io->running)
		pthread_mutex_unlock(lock_of(io));
}

static void signal_efd(int efd)
{
	const uint64_t one = 1;
	/* Only EAGAIN can fail (counter saturated): the reader wakes anyway. */
	(void)!write(efd, &one, sizeof(one));
}

/* The thread's reply waits for room: Python may go on meanwhile (swap the table, handle its
 * message), except send, which would split the reply on the wire (sending == 2). */
static int wait_writable(void *ctx)
{
	struct vfu_io *io = ctx;
	struct pollfd pfd[2] = { { .fd = io->f.sock, .events = POLLOUT },
				 { .fd = io->stop_efd, .events = POLLIN } };
	int r;

	io->sending = SENDING_C;
	pthread_mutex_unlock(lock_of(io));
	while ((r = poll(pfd, 2, -1)) < 0 && errno == EINTR)
		;
	pthread_mutex_lock(lock_of(io));
	io->sending = 0;
	return r < 0 || pfd[1].revents ? -1 : 0;
}

/*
 * Sleep until the client sends more, or Python stops us.  Where the process may run on
 * several CPUs (io->block_wait), in the socket's own wait: a blocking one-byte peek (the
 * socket is blocking while the thread runs, vfu_io_start), which the peer's send wakes
 * sooner than a poll() when the two sit on different CPUs; vfu_io_stop wakes it with
 * shutdown(SHUT_RD).  Pinned to one CPU (an EP-guest run), a poll() is the cheaper wait.
 * `make bench wake` measures both.  The message itself is read by vfu_fast_poll, which
 * finds EOF or an error there too.  0 to go on, -1 when stopping.
 */
static int wait_readable(struct vfu_io *io)
{
	struct pollfd pfd[2] = { { .fd = io->f.sock, .events = POLLIN },
				 { .fd = io->stop_efd, .events = POLLIN } };
	ssize_t r = -1;
	char byte;

	if (io->block_wait) {
		while ((r = recv(io->f.sock, &byte, 1, MSG_PEEK)) < 0 && errno == EINTR)
			;
		errno = r < 0 ? errno : 0;
	}
	if (!io->block_wait || (r < 0 && errno == EAGAIN)) {  /* or made non-blocking */
		while (poll(pfd, 2, -1) < 0 && errno == EINTR)
			;
		if (pfd[1].revents)
			return -1;
	}
	return __atomic_load_n(&io->stopping, __ATOMIC_ACQUIRE) ? -1 : 0;
}

/* Whether this process may run on more than one CPU. */
static int several_cpus(void)
{
	cpu_set_t cpus;

	return sched_getaffinity(0, sizeof(cpus), &cpus) != 0 || CPU_COUNT(&cpus) > 1;
}

static void *vfu_io_run(void *arg)
{
	struct vfu_io *io = arg;
	int waiting = 0; /* a message waits until Python has applied the queued writes */

	for (;;) {
		pthread_mutex_lock(lock_of(io));
		while ((io->handed || io->sending == SENDING_PYTHON ||
			(waiting && io->f.posted_head != io->f.posted_tail)) && !io->stopping)
			pthread_cond_wait(cond_of(io), lock_of(io));
		waiting = 0;
		if (io->stopping) {
			pthread_mutex_unlock(lock_of(io));
			return NULL;
		}
		int r = vfu_fast_poll(&io->f);
		if (r == VFU_WAIT || r == VFU_QUEUED) {
			waiting = r == VFU_WAIT;
			/* Python applies all that is queued when it looks, and looks again after
			 * (FastPath.posted_done): only a write into an empty queue needs the signal
			 * (one write(2) a message less in a stream of them). */
			int first = r == VFU_QUEUED && io->f.posted_head - io->f.posted_tail == 1;
			pthread_mutex_unlock(lock_of(io));
			if (first)
				signal_efd(io->notify_efd);
			continue;
		}
		if (r != VFU_AGAIN) {
			io->err = r == VFU_IOERR ? errno : 0;
			io->result = r;
			io->handed = 1;
		}
		pthread_mutex_unlock(lock_of(io));
		if (r != VFU_AGAIN) {
			signal_efd(io->notify_efd);
			continue;
		}
		if (wait_readable(io))
			return NULL;
	}
}

void vfu_io_init(struct vfu_io *io, int sock, uint8_t *buf, uint8_t *out, int notify_efd,
		 int stop_efd,
		 int (*read_reg)(void *handle, uint64_t offset, uint32_t count, uint64_t *value))
{
	memset(io, 0, sizeof(*io));
	io->f.read_reg = read_reg;
	io->f.sock = sock;
	io->f.buf = buf;
	io->f.out = out;
	io->notify_efd = notify_efd;
	io->stop_efd = stop_efd;
}

int vfu_io_start(struct vfu_io *io, struct vfu_window *windows, int n)
{
	io->handed = io->stopping = io->sending = 0;
	io->f.wait_writable = wait_writable;
	io->f.wait_ctx = io;
	io->f.windows = windows;
	io->f.nwindows = n;
	/* Recursive: Python may swap the table (vfu_io_set_windows) while it holds the thread
	 * still (vfu_io_lock); the thread itself never takes it twice. */
	pthread_mutexattr_t attr;
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
	int err = pthread_mutex_init(lock_of(io), &attr);
	pthread_mutexattr_destroy(&attr);
	if (err)
		return err;
	err = pthread_cond_init(cond_of(io), NULL);
	/* Blocking while the thread runs, where it waits so (wait_readable); Python drains an
	 * oversized message only while the thread is parked, and makes it non-blocking
	 * meanwhile. */
	io->sock_flags = fcntl(io->f.sock, F_GETFL);
	io->block_wait = io->sock_flags >= 0 && several_cpus();
	if (!err && io->block_wait)
		fcntl(io->f.sock, F_SETFL, io->sock_flags & ~O_NONBLOCK);
	if (!err)
		err = pthread_create((pthread_t *)&io->thread, NULL, vfu_io_run, io);
	if (err) {
		if (io->block_wait)
			fcntl(io->f.sock, F_SETFL, io->sock_flags);
		pthread_cond_destroy(cond_of(io));
		pthread_mutex_destroy(lock_of(io));
	} else {
		io->running = 1;
	}
	return err;
}

void vfu_io_allow_early_ack(struct vfu_io *io)
{
	hold(io);
	io->f.early_ack = 1;
	let_go(io);
}

int vfu_io_release(struct vfu_io *io, int close_fds)
{
	hold(io);
	int parked = !io->running || io->handed;
	if (parked) {
		for (int i = 0; close_fds && i < io->f.nfds; i++)
			close(io->f.fds[i]);
		io->f.have = 0;
		io->f.nfds = 0;
		io->f.fds_truncated = 0;
	}
	let_go(io);
	return parked ? 0 : -EBUSY;
}

void vfu_io_close(struct vfu_io *io)
{
	vfu_io_release(io, 1);
	if (io->notify_efd >= 0)
		close(io->notify_efd);
	if (io->stop_efd >= 0)
		close(io->stop_efd);
	io->notify_efd = io->stop_efd = -1;
}

int vfu_io_handed(struct vfu_io *io)
{
	pthread_mutex_lock(lock_of(io));
	int r = io->f.posted_head != io->f.posted_tail ? VFU_POSTED
		: io->handed ? io->result : -1;
	pthread_mutex_unlock(lock_of(io));
	return r;
}

void vfu_io_posted_done(struct vfu_io *io, int n)
{
	hold(io);
	uint32_t queued = io->f.posted_head - io->f.posted_tail;
	io->f.posted_tail += n < 0 ? 0 : (uint32_t)n > queued ? queued : (uint32_t)n;
	let_go(io);
	if (io->running)
		pthread_cond_signal(cond_of(io));
}

void vfu_io_resume(struct vfu_io *io)
{
	pthread_mutex_lock(lock_of(io));
	io->handed = 0;
	pthread_mutex_unlock(lock_of(io));
	/* After the unlock: the thread, woken, does not block again on the lock still held
	 * (one futex wake instead of three; the thread rechecks `handed` under the lock). */
	pthread_cond_signal(cond_of(io));
}

void vfu_io_stop(struct vfu_io *io)
{
	pthread_mutex_lock(lock_of(io));
	__atomic_store_n(&io->stopping, 1, __ATOMIC_RELEASE);
	pthread_cond_signal(cond_of(io));
	pthread_mutex_unlock(lock_of(io));
	signal_efd(io->stop_efd);
	shutdown(io->f.sock, SHUT_RD);  /* wakes wait_readable: the connection is ending */
	pthread_join((pthread_t)io->thread, NULL);
	if (io->block_wait)
		fcntl(io->f.sock, F_SETFL, io->sock_flags);
	pthread_cond_destroy(cond_of(io));
	pthread_mutex_destroy(lock_of(io));
	io->running = 0;
}

void vfu_io_set_windows(struct vfu_io *io, struct vfu_window *windows, int n)
{
	pthread_mutex_lock(lock_of(io));
	io->f.windows = windows;
	io->f.nwindows = n;
	pthread_mutex_unlock(lock_of(io));
}

void vfu_io_lock(struct vfu_io *io)
{
	pthread_mutex_lock(lock_of(io));
}

void vfu_io_unlock(struct vfu_io *io)
{
	pthread_mutex_unlock(lock_of(io));
}

void vfu_io_abort(struct vfu_io *io)
{
	pthread_mutex_lock(lock_of(io));
	shutdown(io->f.sock, SHUT_RDWR);
	io->sending = 0;
	pthread_cond_signal(cond_of(io));
	pthread_mutex_unlock(lock_of(io));
}

int vfu_io_idle(struct vfu_io *io)
{
	/* Under the lock the thread is waiting for Python (a message handed over, writes
	 * queued), holds a message read but not yet served (f.have: one that waited behind
	 * queued writes), is about to read (the socket is readable) or is blocked in poll. */
	pthread_mutex_lock(lock_of(io));
	struct pollfd pfd = { .fd = io->f.sock, .events = POLLIN };
	int idle = !io->handed && !io->sending && io->f.posted_head == io->f.posted_tail &&
		   !io->f.have && poll(&pfd, 1, 0) == 0;
	pthread_mutex_unlock(lock_of(io));
	return idle;
}

int64_t vfu_io_send(struct vfu_io *io, const uint8_t *buf, uint32_t len, uint32_t sent, int fd)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	int64_t result;

	pthread_mutex_lock(lock_of(io));
	/* Not now: the thread's reply is half out, or (a caller that lost track) another
	 * message of Python's is. */
	if (io->sending == SENDING_C || (io->sending == SENDING_PYTHON && sent == 0)) {
		pthread_mutex_unlock(lock_of(io));
		return -EBUSY;
	}
	for (;;) {
		if (sent >= len) {
			result = len;
			break;
		}
		struct iovec iov = { (uint8_t *)buf + sent, len - sent };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		if (fd >= 0 && sent == 0) { /* the fd goes with the first byte */
			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = sizeof(ctl.buf);
			struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &fd, sizeof(int));
		}
		ssize_t k = sendmsg(io->f.sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (k >= 0) {
			sent += (uint32_t)k;
			continue;
		}
		if (errno == EINTR)
			continue;
		result = errno == EAGAIN ? (int64_t)sent : -(int64_t)errno;
		break;
	}
	io->sending = result >= 0 && result < len ? SENDING_PYTHON : 0;
	if (!io->sending)
		pthread_cond_signal(cond_of(io));
	pthread_mutex_unlock(lock_of(io));
	return result;
}
