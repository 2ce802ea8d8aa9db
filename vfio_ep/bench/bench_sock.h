/* What the benchmarks' C servers (sink.c, refserver.c) share besides the wire format. */
#pragma once
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Send all of p[0..n) on a blocking socket; -1 when the peer is gone. */
static inline int send_all(int fd, const void *p, size_t n)
{
	while (n) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k <= 0)
			return -1;
		p = (const char *)p + k;
		n -= (size_t)k;
	}
	return 0;
}
