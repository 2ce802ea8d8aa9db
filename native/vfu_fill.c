/* See vfu_fill.h. */
#include <string.h>

#include "vfu_fill.h"

/* One splitmix64 step: a full-period 64-bit stream, each output well mixed. */
static inline uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

uint64_t vfu_fill_random(uint8_t *buf, uint64_t len, uint64_t state)
{
	uint64_t word;
	uint64_t i = 0;

	for (; i + sizeof(word) <= len; i += sizeof(word)) {
		word = splitmix64(&state);
		memcpy(buf + i, &word, sizeof(word));
	}
	if (i < len) {
		word = splitmix64(&state);
		memcpy(buf + i, &word, len - i);
	}
	return state;
}
