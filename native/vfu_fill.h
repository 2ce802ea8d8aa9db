/* vfio-ep bulk fill: pseudo-random bytes at memory speed.
 *
 * pci-epf-test's WRITE fills its buffer with get_random_bytes() and the guest checks the
 * data by CRC32: the bytes must be unpredictable enough to catch misplaced data, not secret.
 * The generator is splitmix64, seeded by the caller from the OS per command.
 */
#include <stdint.h>

/* Fill buf[0..len) from the stream at `state`; returns the state to continue it with. */
uint64_t vfu_fill_random(uint8_t *buf, uint64_t len, uint64_t state);
