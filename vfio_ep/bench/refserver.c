/* The C reference vfio-user server: the floor every trapped-access figure is reported against.
 *
 *   refserver SOCKET
 *
 * What a minimal device written in C costs QEMU and the guest: one thread, blocking reads, no
 * allocation on the data path, no work per access beyond copying the register.  It speaks
 * enough of the protocol for QEMU's vfio-user-pci to attach (VERSION, DEVICE_GET_INFO, region
 * and IRQ info, SET_IRQS, DMA_MAP/DMA_UNMAP acknowledged, region access with and without a
 * reply, WRITE_MULTI, DEVICE_RESET) and serves one device:
 *
 *   config space  4 KiB: REF_VENDOR:REF_DEVICE, an MSI-X capability with one vector
 *   BAR0          4 KiB, trapped: registers below MSIX_TABLE (a read returns what was last
 *                 written; a write to REG_DOORBELL raises MSI-X vector 0: the ring ->
 *                 interrupt floor), then the MSI-X table and PBA, which QEMU emulates.
 *                 The layout of pci-epf-test's register BAR.
 *   BAR2          4 KiB of RAM the guest maps directly (a memfd, as pci-epf-test's RAM BARs):
 *                 QEMU posts no write to a device with a mappable region, so this device's
 *                 register writes wait for their reply as pci-epf-test's do.
 *
 * Clients are served one after another.  Anything malformed closes the connection: this is a
 * benchmark baseline, not a device to expose.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "bench_sock.h"
#include "vfu_wire.h"

#define REF_VENDOR 0x1b36 /* Red Hat's QEMU range: a test device no guest driver claims */
#define REF_DEVICE 0x10f0
#define REG_DOORBELL 0x08
#define MSIX_TABLE 0x800
#define MSIX_PBA 0xc00

enum { REGION_BAR0 = 0, REGION_BAR2 = 2, REGION_CONFIG = 7, NUM_REGIONS = 9 };
enum { IRQ_INTX = 0, IRQ_MSIX = 2, NUM_IRQS = 5 };

#define DEVICE_FLAGS_RESET 0x1
#define DEVICE_FLAGS_PCI 0x2
#define REGION_RW 0x3 /* READ | WRITE */
#define REGION_MMAP 0x4
#define IRQ_INFO_EVENTFD 0x1
#define IRQ_INFO_MASKABLE 0x2
#define IRQ_INFO_AUTOMASKED 0x4
#define IRQ_SET_DATA_NONE 0x1
#define IRQ_SET_DATA_EVENTFD 0x4
#define IRQ_SET_ACTION_TRIGGER 0x20
#define MAX_FDS 16
#define MAX_XFER (1 << 20)
#define ACCESS sizeof(struct vfu_access)
#define MAX_MSG (VFU_HDR_SIZE + ACCESS + MAX_XFER)
#define REG_SIZE 4096
#define CONFIG_SIZE 4096
#define MSIX_CAP 0x40

static const char CAPS[] = "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,"
			   "\"pgsizes\":4096,\"max_dma_maps\":65535,\"write_multiple\":true}}";

static uint8_t config[CONFIG_SIZE], regs[REG_SIZE];
static uint8_t *bar2; /* the memfd's pages, shared with the guest */
static int bar2_fd = -1, msix_fd = -1;
static uint8_t msg[MAX_MSG], out[MAX_MSG];

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static void config_init(void)
{
	memset(config, 0, sizeof(config));
	put16(config + 0x00, REF_VENDOR);
	put16(config + 0x02, REF_DEVICE);
	put16(config + 0x06, 0x0010);          /* status: capability list */
	config[0x0b] = 0xff;                   /* class: unassigned */
	put32(config + 0x10, 0);               /* BAR0: 32-bit memory */
	put32(config + 0x18, 0);               /* BAR2: 32-bit memory */
	config[0x34] = MSIX_CAP;
	config[MSIX_CAP] = 0x11;               /* MSI-X, last capability */
	put16(config + MSIX_CAP + 2, 0);       /* table size 1 (N - 1), disabled */
	put32(config + MSIX_CAP + 4, MSIX_TABLE); /* BIR 0 */
	put32(config + MSIX_CAP + 8, MSIX_PBA);
	memset(regs, 0, sizeof(regs));
}

static int recv_all(int fd, void *p, size_t n)
{
	while (n) {
		ssize_t k = recv(fd, p, n, MSG_WAITALL);
		if (k <= 0)
			return -1;
		p = (char *)p + k;
		n -= (size_t)k;
	}
	return 0;
}

/* The header, and the fds that came with the message's first byte. */
static int recv_header(int fd, struct vfu_hdr *h, int *fds, int *nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
	} control;
	struct iovec iov = { h, VFU_HDR_SIZE };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			    .msg_controllen = sizeof(control.buf) };
	ssize_t k = recvmsg(fd, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
	*nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			memcpy(fds + *nfds, CMSG_DATA(c), (size_t)n * sizeof(int));
			*nfds += n;
		}
	if (k != VFU_HDR_SIZE) {
		for (int i = 0; i < *nfds; i++)
			close(fds[i]);
		return -1;
	}
	return 0;
}

static int reply(int fd, const struct vfu_hdr *req, const void *payload, uint32_t len, int error)
{
	struct vfu_hdr *h = (struct vfu_hdr *)out;
	*h = (struct vfu_hdr){ req->msg_id, req->command, VFU_HDR_SIZE + len,
			   VFU_FLAG_REPLY | (error ? VFU_FLAG_ERROR : 0), (uint32_t)error };
	if (len && payload != out + VFU_HDR_SIZE)
		memcpy(out + VFU_HDR_SIZE, payload, len);
	return send_all(fd, out, VFU_HDR_SIZE + len);
}

/* A reply carrying `passed` (an fd) with its first byte. */
static int reply_fd(int fd, const struct vfu_hdr *req, uint32_t len, int passed)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl = { 0 };
	struct vfu_hdr *h = (struct vfu_hdr *)out;
	*h = (struct vfu_hdr){ req->msg_id, req->command, VFU_HDR_SIZE + len, VFU_FLAG_REPLY, 0 };
	struct iovec iov = { out, VFU_HDR_SIZE + len };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			    .msg_controllen = sizeof(ctl.buf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &passed, sizeof(int));
	ssize_t k = sendmsg(fd, &m, MSG_NOSIGNAL);
	if (k <= 0)
		return -1;
	return send_all(fd, out + k, VFU_HDR_SIZE + len - (size_t)k);
}

/* A region access: its bytes in this device, or NULL (out of range). */
static uint8_t *region_bytes(uint32_t region, uint64_t offset, uint32_t count)
{
	uint8_t *base = region == REGION_BAR0 ? regs : region == REGION_BAR2 ? bar2 :
			region == REGION_CONFIG ? config : NULL;
	size_t size = region == REGION_CONFIG ? CONFIG_SIZE : REG_SIZE;
	if (!base || offset > size || count > size - offset)
		return NULL;
	return base + offset;
}

static void region_write(uint32_t region, uint64_t offset, const uint8_t *data, uint32_t count)
{
	uint8_t *p = region_bytes(region, offset, count);
	if (!p)
		return;
	if (region == REGION_CONFIG) {
		/* Only the command register and MSI-X control change; QEMU emulates the rest. */
		for (uint32_t i = 0; i < count; i++) {
			uint64_t o = offset + i;
			if (o == 0x04 || o == 0x05 || o == MSIX_CAP + 3)
				config[o] = data[i];
		}
		return;
	}
	memcpy(p, data, count);
	if (region == REGION_BAR0 && offset == REG_DOORBELL && msix_fd >= 0) {
		uint64_t one = 1;
		if (write(msix_fd, &one, sizeof(one)) != sizeof(one))
			perror("refserver: MSI-X eventfd");
	}
}

static int set_irqs(const uint8_t *body, uint32_t len, int *fds, int nfds)
{
	uint32_t flags, index, start, count;
	if (len < 20)
		return EINVAL;
	memcpy(&flags, body + 4, 4);
	memcpy(&index, body + 8, 4);
	memcpy(&start, body + 12, 4);
	memcpy(&count, body + 16, 4);
	if (index != IRQ_MSIX || !(flags & IRQ_SET_ACTION_TRIGGER))
		return 0; /* INTx is not wired (pin 0); masking is QEMU's */
	if (start == 0 && count >= 1) {
		if (msix_fd >= 0)
			close(msix_fd);
		msix_fd = (flags & IRQ_SET_DATA_EVENTFD) && nfds ? fds[0] : -1;
		for (int i = 1; i < nfds; i++)
			close(fds[i]);
		return 0;
	}
	if ((flags & IRQ_SET_DATA_NONE) && count == 0 && msix_fd >= 0) {
		close(msix_fd);
		msix_fd = -1;
	}
	return 0;
}

/* One request; -1 closes the connection. */
static int handle(int fd, const struct vfu_hdr *h, uint8_t *body, uint32_t len, int *fds, int nfds)
{
	uint8_t *p = out + VFU_HDR_SIZE;
	struct vfu_access a;
	if (h->command != VFU_CMD_DMA_MAP && h->command != VFU_CMD_DEVICE_SET_IRQS) {
		for (int i = 0; i < nfds; i++) /* fds nobody asked for */
			close(fds[i]);
		nfds = 0;
	}
	switch (h->command) {
	case VFU_CMD_VERSION:
		put16(p, 0);
		put16(p + 2, 0);
		memcpy(p + 4, CAPS, sizeof(CAPS)); /* with its NUL */
		return reply(fd, h, p, 4 + sizeof(CAPS), 0);
	case VFU_CMD_DMA_MAP:
		for (int i = 0; i < nfds; i++)
			close(fds[i]); /* this device never does DMA */
		return reply(fd, h, NULL, 0, 0);
	case VFU_CMD_DMA_UNMAP:
	case VFU_CMD_DEVICE_RESET:
		return reply(fd, h, NULL, 0, 0);
	case VFU_CMD_DEVICE_GET_INFO:
		put32(p, 16);
		put32(p + 4, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
		put32(p + 8, NUM_REGIONS);
		put32(p + 12, NUM_IRQS);
		return reply(fd, h, p, 16, 0);
	case VFU_CMD_DEVICE_GET_REGION_INFO: {
		if (len < 32)
			return reply(fd, h, NULL, 0, EINVAL);
		uint32_t index;
		memcpy(&index, body + 8, 4);
		uint64_t size = index == REGION_CONFIG ? CONFIG_SIZE :
				index == REGION_BAR0 || index == REGION_BAR2 ? REG_SIZE : 0;
		memset(p, 0, 32);
		put32(p, 32);
		put32(p + 4, !size ? 0 : index == REGION_BAR2 ? REGION_RW | REGION_MMAP : REGION_RW);
		put32(p + 8, index);
		memcpy(p + 16, &size, 8);
		if (index == REGION_BAR2)
			return reply_fd(fd, h, 32, bar2_fd); /* mapped from fd offset 0 */
		return reply(fd, h, p, 32, 0);
	}
	case VFU_CMD_DEVICE_GET_IRQ_INFO: {
		if (len < 16)
			return reply(fd, h, NULL, 0, EINVAL);
		uint32_t index;
		memcpy(&index, body + 8, 4);
		put32(p, 16);
		put32(p + 4, IRQ_INFO_EVENTFD |
			  (index == IRQ_INTX ? IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED : 0));
		put32(p + 8, index);
		put32(p + 12, index == IRQ_INTX || index == IRQ_MSIX);
		return reply(fd, h, p, 16, 0);
	}
	case VFU_CMD_DEVICE_SET_IRQS: {
		int err = set_irqs(body, len, fds, nfds);
		return reply(fd, h, NULL, 0, err);
	}
	case VFU_CMD_REGION_READ: {
		if (len != ACCESS)
			return -1;
		memcpy(&a, body, ACCESS);
		uint8_t *src = region_bytes(a.region, a.offset, a.count);
		if (!src)
			return reply(fd, h, NULL, 0, EINVAL);
		memcpy(p, &a, ACCESS);
		memcpy(p + ACCESS, src, a.count);
		return reply(fd, h, p, ACCESS + a.count, 0);
	}
	case VFU_CMD_REGION_WRITE:
		if (len < ACCESS)
			return -1;
		memcpy(&a, body, ACCESS);
		if (a.count != len - ACCESS)
			return -1;
		region_write(a.region, a.offset, body + ACCESS, a.count);
		return h->flags & VFU_FLAG_NO_REPLY ? 0 : reply(fd, h, NULL, 0, 0);
	case VFU_CMD_REGION_WRITE_MULTI: {
		uint64_t n;
		if (len < 8)
			return -1;
		memcpy(&n, body, 8);
		if (n > VFU_WRITE_MULTI_MAX || n > (len - 8) / sizeof(struct vfu_multi_entry))
			return -1;
		for (uint64_t i = 0; i < n; i++) {
			const uint8_t *e = body + 8 + i * sizeof(struct vfu_multi_entry);
			memcpy(&a, e, ACCESS);
			if (a.count <= 8)
				region_write(a.region, a.offset, e + ACCESS, a.count);
		}
		return h->flags & VFU_FLAG_NO_REPLY ? 0 : reply(fd, h, NULL, 0, 0);
	}
	default:
		return reply(fd, h, NULL, 0, ENOSYS);
	}
}

static void serve(int conn)
{
	struct vfu_hdr h;
	int fds[MAX_FDS], nfds;
	config_init();
	while (recv_header(conn, &h, fds, &nfds) == 0) {
		uint32_t len = h.size - VFU_HDR_SIZE;
		if (h.size < VFU_HDR_SIZE || len > sizeof(msg) || (len && recv_all(conn, msg, len)) ||
		    handle(conn, &h, msg, len, fds, nfds) < 0) {
			fprintf(stderr, "refserver: message %u (command %u, %u bytes) ends the "
				"connection\n", h.msg_id, h.command, h.size);
			break;
		}
	}
	if (msix_fd >= 0)
		close(msix_fd);
	msix_fd = -1;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
		return 2;
	}
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "refserver: socket path too long\n");
		return 2;
	}
	strcpy(addr.sun_path, argv[1]);
	bar2_fd = memfd_create("refserver-bar2", MFD_CLOEXEC);
	if (bar2_fd < 0 || ftruncate(bar2_fd, REG_SIZE) ||
	    (bar2 = mmap(NULL, REG_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, bar2_fd, 0)) ==
		    MAP_FAILED) {
		perror("refserver: BAR2 memfd");
		return 1;
	}
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	unlink(argv[1]);
	if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof(addr)) || listen(s, 1)) {
		perror("refserver: listen");
		return 1;
	}
	for (;;) {
		int conn = accept4(s, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR)
				continue;
			perror("refserver: accept");
			return 1;
		}
		serve(conn);
		close(conn);
	}
}
