/* The vfio-user wire format in C, as QEMU (>= 10.1) lays it out; little-endian hosts only
 * (x86-64, arm64), like QEMU's wire.  Declared once for the fast path (vfu_fast.c) and the
 * benchmarks' C programs (vfio_ep/bench/sink.c, refserver.c); vfio_ep/vfio_user/protocol.py
 * is the Python side.
 */
#pragma once
#include <stdint.h>

enum vfu_command {
	VFU_CMD_VERSION = 1,
	VFU_CMD_DMA_MAP = 2,
	VFU_CMD_DMA_UNMAP = 3,
	VFU_CMD_DEVICE_GET_INFO = 4,
	VFU_CMD_DEVICE_GET_REGION_INFO = 5,
	VFU_CMD_DEVICE_GET_IRQ_INFO = 7,
	VFU_CMD_DEVICE_SET_IRQS = 8,
	VFU_CMD_REGION_READ = 9,
	VFU_CMD_REGION_WRITE = 10,
	VFU_CMD_DEVICE_RESET = 13,
	VFU_CMD_REGION_WRITE_MULTI = 15,
};

#define VFU_HDR_SIZE 16
#define VFU_FLAG_TYPE_MASK 0xf   /* the low nibble: request 0, reply 1 */
#define VFU_FLAG_REPLY 0x1
#define VFU_FLAG_NO_REPLY 0x10
#define VFU_FLAG_ERROR 0x20
#define VFU_WRITE_MULTI_MAX 200  /* entries in one REGION_WRITE_MULTI */

struct vfu_hdr {
	uint16_t msg_id;
	uint16_t command;
	uint32_t size;           /* the whole message, header included */
	uint32_t flags;
	uint32_t error;
} __attribute__((packed));

/* REGION_READ/REGION_WRITE payload (data follows a write, and a read's reply). */
struct vfu_access {
	uint64_t offset;
	uint32_t region;
	uint32_t count;
} __attribute__((packed));

struct vfu_multi_entry {
	uint64_t offset;
	uint32_t region;
	uint32_t count;
	uint8_t data[8];
} __attribute__((packed));
