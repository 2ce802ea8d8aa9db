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

#define HDR 16
#define CHUNK (256 * 1024)
#define MAX_MSG (HDR + 16 + (1 << 20))
#define CMD_REGION_READ 9
#define FLAG_TYPE_MASK 0xf
#define FLAG_REPLY 0x1
#define FLAG_NO_REPLY 0x10

struct hdr {
	uint16_t msg_id;
	uint16_t command;
	uint32_t size;
	uint32_t flags;
	uint32_t error;
} __attribute__((packed));

static int send_all(int fd, const void *p, size_t n)
{
	while (n) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k <= 0)
			return -1;
		p = (const char *)p + k;
		n -= k;
	}
	return 0;
}

static int reply(int fd, const uint8_t *msg)
{
	struct hdr h;
	memcpy(&h, msg, HDR);
	uint32_t count = 0;
	if (h.command == CMD_REGION_READ && h.size >= HDR + 16)
		memcpy(&count, msg + HDR + 12, 4);
	if (count > (1 << 20))
		count = 0;
	static uint8_t out[MAX_MSG];
	struct hdr r = { h.msg_id, h.command, HDR + (count ? 16 + count : 0), FLAG_REPLY, 0 };
	memcpy(out, &r, HDR);
	if (count) {
		memcpy(out + HDR, msg + HDR, 16);
		memset(out + HDR + 16, 0, count);
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
		while (have - pos >= HDR) {
			struct hdr h;
			memcpy(&h, buf + pos, HDR);
			if (h.size < HDR || h.size > MAX_MSG)
				return;
			if (have - pos < h.size)
				break;
			if ((h.flags & FLAG_TYPE_MASK) == 0 && !(h.flags & FLAG_NO_REPLY) &&
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
