/* The wake benchmark's program: how fast a thread waiting on a UNIX stream socket answers a
 * peer, by the way it waits, as the connection's I/O thread (native/vfu_io.c) could.
 *
 *   wake MODE SERVER_CPU CLIENT_CPU N
 *
 * MODE: poll (poll() for input, then a non-blocking read), peek (the socket made blocking
 * only around a blocking one-byte MSG_PEEK, then the non-blocking read), blocking-peek (a
 * blocking socket: a blocking one-byte MSG_PEEK, then the non-blocking read, as
 * native/vfu_io.c waits), blocking (a blocking socket and read, as the C reference server
 * does).  The client, pinned to CLIENT_CPU, sends 16 bytes and waits for
 * the 16-byte answer N times; prints the round trips' median and 90th percentile in us.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 16

enum mode { POLL, PEEK, BLOCKING_PEEK, BLOCKING };

static int sv[2];
static enum mode mode;
static int server_cpu, rounds;

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("sched_setaffinity");
		exit(2);
	}
}

static void *server(void *arg)
{
	int fd = sv[1], fl = fcntl(fd, F_GETFL);
	char buf[MSG];

	(void)arg;
	pin(server_cpu);
	fcntl(fd, F_SETFL, mode >= BLOCKING_PEEK ? fl & ~O_NONBLOCK : fl | O_NONBLOCK);
	for (int i = 0; i < rounds; i++) {
		if (mode == POLL) {
			struct pollfd p = { .fd = fd, .events = POLLIN };

			poll(&p, 1, -1);
		} else if (mode == PEEK) {
			fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
			recv(fd, buf, 1, MSG_PEEK);
			fcntl(fd, F_SETFL, fl | O_NONBLOCK);
		} else if (mode == BLOCKING_PEEK) {
			recv(fd, buf, 1, MSG_PEEK);
		}
		if (recv(fd, buf, MSG, mode == BLOCKING ? MSG_WAITALL : MSG_DONTWAIT) != MSG ||
		    send(fd, buf, MSG, 0) != MSG) {
			perror("server");
			exit(2);
		}
	}
	return NULL;
}

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	static const char *const names[] = { "poll", "peek", "blocking-peek", "blocking" };
	char buf[MSG] = { 0 };
	pthread_t thread;
	double *us;

	if (argc != 5) {
		fprintf(stderr, "usage: wake poll|peek|blocking-peek|blocking SERVER_CPU CLIENT_CPU N\n");
		return 2;
	}
	for (mode = POLL; mode <= BLOCKING && strcmp(argv[1], names[mode]); mode++)
		;
	server_cpu = atoi(argv[2]);
	rounds = atoi(argv[4]);
	us = calloc(rounds, sizeof(*us));
	if (mode > BLOCKING || rounds < 1 || !us ||
	    socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pthread_create(&thread, NULL, server, NULL))
		return 2;
	pin(atoi(argv[3]));
	for (int i = 0; i < rounds; i++) {
		struct timespec t0, t1;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (send(sv[0], buf, MSG, 0) != MSG || recv(sv[0], buf, MSG, MSG_WAITALL) != MSG)
			return 2;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		us[i] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
	}
	pthread_join(thread, NULL);
	qsort(us, rounds, sizeof(*us), by_value);
	printf("%.2f %.2f\n", us[rounds / 2], us[rounds * 9 / 10]);
	return 0;
}
