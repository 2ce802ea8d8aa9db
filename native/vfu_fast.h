/* vfio-ep fast path: the hot vfio-user messages handled without the interpreter.
 *
 * The Python server owns the dispatch table (struct vfu_window rows, the same
 * plain data as vfio_ep.pci.bar.WindowTable); the connection's I/O thread
 * (vfu_io.h) runs vfu_fast_poll(), which reads messages in order; REGION_READ/REGION_WRITE/REGION_WRITE_MULTI that
 * land entirely in RAM windows are served here, doorbell-window writes mark
 * the doorbell pending and signal its eventfd, register reads of an MMIO window
 * whose handler allows it are answered by calling it (read_reg); the first message that needs
 * anything else is handed back to Python, whole and with its fds, so the
 * order of the stream is kept.  Once `early_ack` is set, a BAR write Python
 * applies is acknowledged here first and queued for Python (`posted`), as PCIe
 * posts memory writes: further such writes join the queue, while nothing else
 * is served or handed over before Python has applied it (no read or write
 * passes a posted write).  Whether a write may be queued is judged by the
 * table as it is when it arrives: one that a queued write's effect (a BAR
 * moved) makes Python refuse is logged then, like any posted write's error.
 */
#pragma once
#include <stdint.h>

enum vfu_window_kind { VFU_WINDOW_RAM = 0, VFU_WINDOW_MMIO = 1, VFU_WINDOW_DOORBELL = 2 };

struct vfu_window {
	uint32_t bar;
	uint32_t kind;
	uint64_t start;          /* BAR offset, inclusive */
	uint64_t end;            /* BAR offset, exclusive */
	uint8_t *ram;            /* RAM: host address of BAR offset `start` */
	int32_t efd;             /* DOORBELL: eventfd to signal */
	uint32_t db_offset;      /* DOORBELL: offset of the doorbell register in the window */
	uint32_t db_data;        /* DOORBELL: the value that rings it */
	uint32_t *db_pending;    /* DOORBELL: set to 1 when rung */
	void *read_handle;       /* MMIO: non-NULL when its register reads may be answered
				  * by vfu_fast.read_reg in the I/O thread (passed back to it) */
};

#define VFU_MAX_FDS 16
#define VFU_MAX_MSG 1048608 /* header + access + max_data_xfer_size (vfu_fast.c checks) */
#define VFU_POSTED_MAX 64   /* writes queued for Python at most (then the stream waits) */

/* A BAR write for Python's register handlers, acknowledged and queued by the fast path. */
struct vfu_posted {
	uint64_t offset;
	uint32_t region;
	uint32_t count;          /* 1, 2, 4 or 8 (a naturally aligned register access) */
	uint8_t data[8];
	uint16_t msg_id;         /* the message's, for Python's log */
};

struct vfu_fast_stats {
	uint64_t fast_reads;
	uint64_t fast_writes;
	uint64_t doorbells;
	uint64_t to_python;
	uint64_t early_acks;     /* BAR writes for Python, acknowledged before it applied them */
	uint64_t posted;         /* BAR writes for Python queued (acknowledged or posted) */
	uint64_t register_reads; /* MMIO register reads answered through read_reg */
};

struct vfu_fast {
	int sock;
	struct vfu_window *windows;
	int nwindows;
	uint8_t *buf;            /* VFU_MAX_MSG bytes, owned by the caller */
	uint8_t *out;            /* VFU_MAX_MSG bytes too: a reply waiting for room, copied */
	int early_ack;           /* acknowledge BAR writes Python applies (set after VERSION) */
	uint32_t have;           /* bytes of the current message read so far */
	int fds[VFU_MAX_FDS];
	int nfds;
	int fds_truncated;
	/* BAR writes for Python in stream order: the fast path appends at posted_head, Python
	 * applies from posted_tail (both only count up; entry i is posted[i % VFU_POSTED_MAX]). */
	struct vfu_posted posted[VFU_POSTED_MAX];
	uint32_t posted_head;
	uint32_t posted_tail;
	struct vfu_fast_stats stats;
	/* Called while a reply waits for room in the socket buffer (NULL: poll for it); 0 to
	 * go on sending, else the reply is abandoned as an I/O error. */
	int (*wait_writable)(void *ctx);
	void *wait_ctx;
	/* A register read in an MMIO window with a read_handle: a naturally aligned 1-8 byte
	 * read at `offset` in the window, its value in *value; 0, or anything else to hand the
	 * message to Python after all.  NULL: every MMIO read goes to Python.  The I/O thread
	 * calls it under its lock (vfio_ep/vfio_user/fastpath.py: the handler's read, in
	 * Python, under the GIL). */
	int (*read_reg)(void *handle, uint64_t offset, uint32_t count, uint64_t *value);
};

/* Results of vfu_fast_poll() (Python reads them from the extension, never copies them). */
#define VFU_AGAIN 0      /* nothing complete to read: wait for the socket */
#define VFU_MESSAGE 1    /* buf holds one whole message (and fds) for Python */
#define VFU_EOF 2        /* peer closed at a message boundary */
#define VFU_BROKEN 3     /* stream cannot be trusted (bad size, EOF mid-message) */
#define VFU_IOERR 4      /* a socket error; errno says which */
#define VFU_OVERSIZED 5  /* buf holds the header of a message larger than VFU_MAX_MSG */
#define VFU_QUEUED 6     /* a BAR write for Python went into `posted`: tell Python */
#define VFU_WAIT 7       /* buf's message, one C serves, waits for `posted` to be applied
			  * (or, another queued write, for room): call again once it is */

int vfu_fast_poll(struct vfu_fast *f);
/* A doorbell's pending flag, read and cleared at once: the I/O thread may set it again any
 * time (then it signals the eventfd after), and a ring seen set is never lost. */
uint32_t vfu_take_pending(uint32_t *pending);
