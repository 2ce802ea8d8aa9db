/* The dispatch benchmark's transport floor: a vfio-user "server" that does nothing.
 *
 *   sink SOCKET
 *
 * Accepts clients one after another, reads the byte stream in large chunks, walks the
 * message framing (the header's size field) and answers each request that wants a reply:
 * REGION_READ with zero data, anything else with a bare header.  What the real server does
 * on top of this (parse, dispatch, apply) is what the benchmark measures.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "bench_sock.h"
#include "vfu_wire.h"

#define CHUNK (256 * 1024)
#define MAX_MSG (VFU_HDR_SIZE + 16 + (1 << 20))

static int reply(int fd, const uint8_t *msg)
{
	struct vfu_hdr h;
	memcpy(&h, msg, VFU_HDR_SIZE);
	uint32_t count = 0;
	if (h.command == VFU_CMD_REGION_READ && h.size >= VFU_HDR_SIZE + 16)
		memcpy(&count, msg + VFU_HDR_SIZE + 12, 4);
	if (count > (1 << 20))
		count = 0;
	static uint8_t out[MAX_MSG];
	struct vfu_hdr r = { h.msg_id, h.command, VFU_HDR_SIZE + (count ? 16 + count : 0), VFU_FLAG_REPLY, 0 };
	memcpy(out, &r, VFU_HDR_SIZE);
	if (count) {
		memcpy(out + VFU_HDR_SIZE, msg + VFU_HDR_SIZE, 16);
		memset(out + VFU_HDR_SIZE + 16, 0, count);
	}
	return send_all(fd, out, r.size);
}

static void drain(int fd)
{
	static uint8_t buf[CHUNK + MAX_MSG];
	size_t have = 0;
	for (;;) {
		ssize_t k = read(fd, buf + have, sizeof(buf) - have);
		if (k <= 0)
			return;
		have += k;
		size_t pos = 0;
		while (have - pos >= VFU_HDR_SIZE) {
			struct vfu_hdr h;
			memcpy(&h, buf + pos, VFU_HDR_SIZE);
			if (h.size < VFU_HDR_SIZE || h.size > MAX_MSG)
				return;
			if (have - pos < h.size)
				break;
			if ((h.flags & VFU_FLAG_TYPE_MASK) == 0 && !(h.flags & VFU_FLAG_NO_REPLY) &&
			    reply(fd, buf + pos))
				return;
			pos += h.size;
		}
		memmove(buf, buf + pos, have - pos);
		have -= pos;
	}
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
		return 2;
	}
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strncpy(sa.sun_path, argv[1], sizeof(sa.sun_path) - 1);
	int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 4)) {
		perror(argv[1]);
		return 1;
	}
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0) {
			perror("accept");
			return 1;
		}
		drain(fd);
		close(fd);
	}
}
