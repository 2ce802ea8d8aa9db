/* See vfu_fast.h.  Little-endian hosts only (x86-64, arm64), like QEMU's wire format. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfu_fast.h"
#include "vfu_wire.h"

#define NUM_BARS 6

/* The sizes the wire and Python rely on (vfio_ep/vfio_user/protocol.py checks its side
 * against these at import, through the extension). */
_Static_assert(sizeof(struct vfu_hdr) == VFU_HDR_SIZE, "vfio-user header is 16 bytes");
_Static_assert(sizeof(struct vfu_access) == 16, "REGION_READ/WRITE access is 16 bytes");
_Static_assert(sizeof(struct vfu_multi_entry) == 24, "a WRITE_MULTI entry is 24 bytes");
_Static_assert(VFU_MAX_MSG == VFU_HDR_SIZE + sizeof(struct vfu_access) + (1u << 20),
	       "the largest message: a REGION_WRITE of max_data_xfer_size (1 MiB)");
_Static_assert(VFU_HDR_SIZE + 8 + VFU_WRITE_MULTI_MAX * sizeof(struct vfu_multi_entry) <=
	       VFU_MAX_MSG, "a full REGION_WRITE_MULTI fits the buffer");

/* The window holding all of [off, off + count), or NULL.  The bounds are client-controlled
 * u64s: compared without forming off + count, which could wrap past 2^64. */
static const struct vfu_window *find(const struct vfu_fast *f, uint32_t bar, uint64_t off,
				     uint32_t count)
{
	for (int i = 0; i < f->nwindows; i++) {
		const struct vfu_window *w = &f->windows[i];
		if (w->bar == bar && off >= w->start && off < w->end && count <= w->end - off)
			return w;
	}
	return NULL;
}

/* Send every byte of the iovecs; while the socket buffer is full, wait as f says (the I/O
 * thread lets Python go on meanwhile), or poll for room. */
static int send_iov(struct vfu_fast *f, struct iovec *iov, int n)
{
	int copied = 0;
	while (n) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = n };
		ssize_t sent = sendmsg(f->sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -1;
			if (f->wait_writable) {
				/* The wait may let Python swap the table and unmap what a RAM
				 * window's reply points into: send the rest from a copy. */
				if (!copied) {
					size_t k = 0;
					for (int i = 0; i < n; i++) {
						memcpy(f->out + k, iov[i].iov_base, iov[i].iov_len);
						k += iov[i].iov_len;
					}
					iov[0] = (struct iovec){ f->out, k };
					n = 1;
					copied = 1;
				}
				if (f->wait_writable(f->wait_ctx))
					return -1;
			} else {
				struct pollfd pfd = { .fd = f->sock, .events = POLLOUT };
				poll(&pfd, 1, 1000);
			}
			continue;
		}
		while (n && (size_t)sent >= iov->iov_len) {
			sent -= iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (uint8_t *)iov->iov_base + sent;
			iov->iov_len -= sent;
		}
	}
	return 0;
}

/* A write the fast path may apply: RAM, or the doorbell register rung with its value.
 * Anything else in a doorbell window (other values, widths) is Python's to judge. */
static int fast_write_ok(const struct vfu_window *w, uint64_t off, const uint8_t *data,
			 uint32_t count)
{
	if (!w)
		return 0;
	if (w->kind == VFU_WINDOW_RAM)
		return 1;
	uint32_t value;
	if (w->kind != VFU_WINDOW_DOORBELL || count != 4 || off - w->start != w->db_offset)
		return 0;
	memcpy(&value, data, 4);
	return value == w->db_data;
}

/* A register access Python's handlers take (a write may then be acknowledged before they
 * run, a read answered through read_reg): it lies in a window, as a naturally aligned 1, 2,
 * 4 or 8-byte access (vfio_ep.pci.bar._check_mmio_size). */
static int register_access_ok(const struct vfu_window *w, uint64_t off, uint32_t count)
{
	return w && (count == 1 || count == 2 || count == 4 || count == 8) && off % count == 0;
}

static void apply_write(struct vfu_fast *f, const struct vfu_window *w, uint64_t off,
			const uint8_t *data, uint32_t count)
{
	if (w->kind == VFU_WINDOW_RAM) {
		memcpy(w->ram + (off - w->start), data, count);
		f->stats.fast_writes++;
		return;
	}
	__atomic_store_n(w->db_pending, 1, __ATOMIC_SEQ_CST); /* before the eventfd */
	uint64_t one = 1;
	/* Only EAGAIN can fail here (counter saturated): the doorbell is pending anyway. */
	(void)!write(w->efd, &one, sizeof(one));
	f->stats.doorbells++;
}

/* serve()'s verdicts on the message in f->buf. */
enum { SERVE_IOERR = -1, SERVE_PYTHON = 0, SERVE_DONE = 1, SERVE_QUEUED = 2, SERVE_WAIT = 3 };

static int posted_pending(const struct vfu_fast *f)
{
	return f->posted_head != f->posted_tail;
}

/* Queue a BAR write for Python (the caller checked there is room). */
static void post(struct vfu_fast *f, uint16_t msg_id, const struct vfu_access *a,
		 const uint8_t *data)
{
	struct vfu_posted *e = &f->posted[f->posted_head % VFU_POSTED_MAX];
	e->offset = a->offset;
	e->region = a->region;
	e->count = a->count;
	e->msg_id = msg_id;
	memcpy(e->data, data, a->count);
	f->posted_head++;
	f->stats.posted++;
}

/* Serve the message in f->buf if it is a hot one.  While writes wait in f->posted, what C
 * would serve waits too (SERVE_WAIT; nothing passes a posted write), and what goes to
 * Python is handed over behind them (Python applies f->posted first). */
static int serve(struct vfu_fast *f)
{
	struct vfu_hdr *h = (struct vfu_hdr *)f->buf;
	uint8_t *body = f->buf + VFU_HDR_SIZE;
	uint32_t len = h->size - VFU_HDR_SIZE;

	if (f->nfds || (h->flags & VFU_FLAG_TYPE_MASK) != 0)
		return SERVE_PYTHON;
	if (h->command == VFU_CMD_REGION_READ || h->command == VFU_CMD_REGION_WRITE) {
		if (len < sizeof(struct vfu_access))
			return SERVE_PYTHON;
		struct vfu_access *a = (struct vfu_access *)body;
		if (a->region >= NUM_BARS || a->count == 0 || a->count > (1 << 20))
			return SERVE_PYTHON;
		const struct vfu_window *w = find(f, a->region, a->offset, a->count);
		if (h->command == VFU_CMD_REGION_READ) {
			int reg = w && w->kind == VFU_WINDOW_MMIO && w->read_handle && f->read_reg &&
				  register_access_ok(w, a->offset, a->count);
			if (!w || !(w->kind == VFU_WINDOW_RAM || reg) || len != sizeof(*a))
				return SERVE_PYTHON;
			if (posted_pending(f))
				return SERVE_WAIT;
			uint64_t value;
			if (reg && f->read_reg(w->read_handle, a->offset - w->start, a->count, &value))
				return SERVE_PYTHON;
			struct vfu_hdr rh = { h->msg_id, h->command, VFU_HDR_SIZE + sizeof(*a) + a->count,
					  VFU_FLAG_REPLY, 0 };
			struct iovec iov[3] = {
				{ &rh, VFU_HDR_SIZE }, { a, sizeof(*a) },
				{ reg ? (void *)&value : w->ram + (a->offset - w->start), a->count },
			};
			if (send_iov(f, iov, 3))
				return SERVE_IOERR;
			if (reg)
				f->stats.register_reads++;
			else
				f->stats.fast_reads++;
			return SERVE_DONE;
		}
		if (len != sizeof(*a) + a->count)
			return SERVE_PYTHON;
		int here = fast_write_ok(w, a->offset, body + sizeof(*a), a->count);
		int queue = !here && f->early_ack && register_access_ok(w, a->offset, a->count);
		if (!here && !queue)
			return SERVE_PYTHON; /* with its reply (an error one, if Python refuses it) */
		if (posted_pending(f) &&
		    (here || f->posted_head - f->posted_tail == VFU_POSTED_MAX))
			return SERVE_WAIT;
		if (here)
			apply_write(f, w, a->offset, body + sizeof(*a), a->count);
		else
			post(f, h->msg_id, a, body + sizeof(*a));
		if (!(h->flags & VFU_FLAG_NO_REPLY)) {
			/* A BAR write is posted on PCIe: acknowledged now, also when Python applies
			 * it (a watched register); its effect follows, and nothing after it in the
			 * stream is served before that. */
			struct vfu_hdr rh = { h->msg_id, h->command, VFU_HDR_SIZE + sizeof(*a), VFU_FLAG_REPLY, 0 };
			struct vfu_access ra = { a->offset, a->region, a->count };
			struct iovec iov[2] = { { &rh, VFU_HDR_SIZE }, { &ra, sizeof(ra) } };
			if (send_iov(f, iov, 2))
				return SERVE_IOERR;
			if (!here)
				f->stats.early_acks++;
		}
		return here ? SERVE_DONE : SERVE_QUEUED;
	}
	if (h->command == VFU_CMD_REGION_WRITE_MULTI && (h->flags & VFU_FLAG_NO_REPLY)) {
		if (len < 8)
			return SERVE_PYTHON;
		uint64_t cnt;
		memcpy(&cnt, body, 8);
		if (cnt > VFU_WRITE_MULTI_MAX || len != 8 + cnt * sizeof(struct vfu_multi_entry))
			return SERVE_PYTHON;
		struct vfu_multi_entry *e = (struct vfu_multi_entry *)(body + 8);
		for (uint64_t i = 0; i < cnt; i++) {
			if (e[i].region >= NUM_BARS || e[i].count < 1 || e[i].count > 8 ||
			    !fast_write_ok(find(f, e[i].region, e[i].offset, e[i].count),
					   e[i].offset, e[i].data, e[i].count))
				return SERVE_PYTHON;
		}
		if (posted_pending(f))
			return SERVE_WAIT;
		for (uint64_t i = 0; i < cnt; i++)
			apply_write(f, find(f, e[i].region, e[i].offset, e[i].count), e[i].offset,
				    e[i].data, e[i].count);
		return SERVE_DONE;
	}
	return SERVE_PYTHON;
}

static void drop_fds(struct vfu_fast *f)
{
	for (int i = 0; i < f->nfds; i++)
		close(f->fds[i]);
	f->nfds = 0;
}

/* Read more of the current message; 1 = complete, 0 = would block, else a VFU_* error. */
static int fill(struct vfu_fast *f)
{
	for (;;) {
		uint32_t want = VFU_HDR_SIZE;
		if (f->have >= VFU_HDR_SIZE) {
			want = ((struct vfu_hdr *)f->buf)->size;
			if (want < VFU_HDR_SIZE)
				return VFU_BROKEN;
			if (want > VFU_MAX_MSG) /* only the header is in: Python drains the rest */
				return VFU_OVERSIZED;
		}
		if (f->have == want)
			return 1;
		ssize_t n;
		if (f->have < VFU_HDR_SIZE) {
			/* fds arrive with the header bytes */
			union {
				struct cmsghdr align;
				char buf[CMSG_SPACE(sizeof(int) * VFU_MAX_FDS)];
			} ctl;
			struct iovec iov = { f->buf + f->have, VFU_HDR_SIZE - f->have };
			struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
					     .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf) };
			n = recvmsg(f->sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
			if (n > 0) {
				for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
					if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
						continue;
					int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
					int *in = (int *)CMSG_DATA(c);
					for (int j = 0; j < k; j++) {
						if (f->nfds < VFU_MAX_FDS)
							f->fds[f->nfds++] = in[j];
						else
							close(in[j]);
					}
				}
				if (mh.msg_flags & MSG_CTRUNC)
					f->fds_truncated = 1;
			}
		} else {
			n = recv(f->sock, f->buf + f->have, want - f->have, MSG_DONTWAIT);
		}
		if (n == 0)
			return f->have ? VFU_BROKEN : VFU_EOF;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 0;
			return VFU_IOERR;
		}
		f->have += n;
	}
}

uint32_t vfu_take_pending(uint32_t *pending)
{
	return __atomic_exchange_n(pending, 0, __ATOMIC_SEQ_CST);
}

int vfu_fast_poll(struct vfu_fast *f)
{
	/* Return now and then (the socket stays readable): the caller's lock is not held for
	 * more than this many messages at a time. */
	for (int budget = 256; budget; budget--) {
		int r = fill(f);
		if (r == 0)
			return VFU_AGAIN;
		if (r != 1)
			return r;
		r = serve(f);
		if (r == SERVE_IOERR)
			return VFU_IOERR;
		if (r == SERVE_WAIT)
			return VFU_WAIT; /* buf keeps the message: served by a later call */
		if (r == SERVE_PYTHON) {
			f->stats.to_python++;
			return VFU_MESSAGE; /* Python takes buf/fds, then resets have/nfds */
		}
		int replied = !(((struct vfu_hdr *)f->buf)->flags & VFU_FLAG_NO_REPLY);
		f->have = 0;
		drop_fds(f);
		if (r == SERVE_QUEUED)
			return VFU_QUEUED;
		/* A client waiting for this reply (QEMU, a vCPU's access) sends nothing more
		 * meanwhile: wait for the socket rather than try a read that finds nothing (one
		 * syscall less per round trip).  Posted writes come in bursts: read on. */
		if (replied)
			return VFU_AGAIN;
	}
	return VFU_AGAIN;
}
