/* epbench: the in-guest half of `python -m vfio_ep.bench` (doorbell, trapped,
 * bars, idle, ep-guest).
 *
 *   epbench mmio N                 N timed 32-bit reads of ivshmem-plain's BAR0 register (an
 *                                  MMIO access QEMU serves in-process): the floor
 *   epbench doorbell N BDF         pci-epf-test at BDF, bound to vfio-pci (no-IOMMU): enable
 *                                  the doorbell, then N times: ring it, wait for MSI-X vector 0
 *                                  on an eventfd; also N timed reads of its STATUS register
 *                                  and N timed writes of its SIZE register (no side effect)
 *                                  and of COMMAND 0 (the function sees it, nothing to do)
 *   epbench ref N BDF              the C reference server's device (vfio_ep/bench/refserver.c)
 *                                  at BDF, bound to vfio-pci: N timed register reads, N
 *                                  register writes, N doorbell rings to MSI-X vector 0
 *   epbench bars N BDF             pci-epf-test at BDF, bound to vfio-pci: N timed 32-bit reads
 *                                  and N writes at the start of each BAR it has (BAR_TEST's
 *                                  accesses), through the BAR's mmap
 *   epbench idle SECONDS BDF [db]  set up as above, enable the doorbell only with "db", print
 *                                  "IDLE begin", sleep, print "IDLE end" (server CPU is sampled
 *                                  on the host between the two lines)
 *   epbench xfer read|write SIZE N DEV
 *                                  the RC's own driver, pci_endpoint_test, at DEV
 *                                  (/dev/pci-endpoint-test.0): one warm-up, then N timed
 *                                  PCITEST_READ or PCITEST_WRITE ioctls of SIZE bytes through the
 *                                  function's DMA, completion on MSI-X (the driver's buffer
 *                                  allocation, random fill and CRC32 are in each sample; the
 *                                  function's own dmesg line times the transfer alone).  The
 *                                  RC's READ is the function's COMMAND_WRITE, and vice versa
 *
 * Results are lines "RESULT <name> n=... median_ns=... p99_ns=... mean_ns=... min_ns=...
 * max_ns=... via=...".  Each sample is timed with rdtsc, which TCG serves without leaving
 * the translated code (a clock_gettime() may itself be an MMIO exit to the HPET), converted
 * to ns with a TSC rate calibrated against CLOCK_MONOTONIC over the whole run.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/pcitest.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

/* pci-epf-test registers (vfio_ep/epf/functions/pci_epf_test.py) */
#define REG_COMMAND 0x04
#define REG_STATUS 0x08
#define REG_SIZE 0x1c
#define REG_IRQ_TYPE 0x24
#define REG_IRQ_NUMBER 0x28
#define REG_DB_BAR 0x34
#define REG_DB_OFFSET 0x38
#define REG_DB_DATA 0x3c
#define CMD_ENABLE_DOORBELL (1u << 6)
#define CMD_DISABLE_DOORBELL (1u << 7)
#define STATUS_DOORBELL_SUCCESS (1u << 9)
#define STATUS_DOORBELL_ENABLE_SUCCESS (1u << 10)
#define STATUS_DOORBELL_DISABLE_SUCCESS (1u << 12)
#define IRQ_TYPE_MSIX 2 /* also PCITEST_IRQ_TYPE_MSIX, which older uapi headers lack */
/* The C reference device's registers (vfio_ep/bench/refserver.c) */
#define REF_SCRATCH 0x00
#define REF_DOORBELL 0x08
#define IRQ_TIMEOUT_MS 10000
#define WARMUP 20

static void die(const char *what)
{
	fprintf(stderr, "epbench: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* -- timing ------------------------------------------------------------------------------ */
struct clock {
	uint64_t tsc0, ns0;
};

static void clock_start(struct clock *c)
{
	c->ns0 = now_ns();
	c->tsc0 = __rdtsc();
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Convert TSC deltas to ns with the rate seen since clock_start, print the summary. */
static void report(const char *name, struct clock *c, uint64_t *t, int n, const char *via)
{
	double ns_per_tick = (double)(now_ns() - c->ns0) / (double)(__rdtsc() - c->tsc0);
	double sum = 0;
	for (int i = 0; i < n; i++)
		sum += t[i];
	qsort(t, n, sizeof(*t), cmp_u64);
	int p99 = (n * 99 + 99) / 100 - 1; /* nearest rank */
	printf("RESULT %s n=%d median_ns=%.0f p99_ns=%.0f mean_ns=%.0f min_ns=%.0f max_ns=%.0f "
	       "via=%s\n", name, n, t[n / 2] * ns_per_tick, t[p99] * ns_per_tick,
	       sum / n * ns_per_tick, t[0] * ns_per_tick, t[n - 1] * ns_per_tick, via);
	fflush(stdout);
}

/* -- ivshmem: the floor --------------------------------------------------------------------- */
static int read_hex(const char *dir, const char *file, unsigned long *out)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, file);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	int ok = fscanf(f, "%lx", out) == 1;
	fclose(f);
	return ok ? 0 : -1;
}

/* mmap resource<bar> of the first device with vendor:device; returns the BAR's first byte. */
static volatile uint32_t *map_sysfs_bar(unsigned vendor, unsigned device, int bar)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	if (!d)
		die("/sys/bus/pci/devices");
	struct dirent *e;
	while ((e = readdir(d))) {
		char dir[512];
		unsigned long v, dv;
		snprintf(dir, sizeof(dir), "/sys/bus/pci/devices/%s", e->d_name);
		if (read_hex(dir, "vendor", &v) || read_hex(dir, "device", &dv) || v != vendor ||
		    dv != device)
			continue;
		/* The mapping starts at the page holding the BAR: add the BAR's offset in it. */
		char path[600];
		snprintf(path, sizeof(path), "%s/resource", dir);
		FILE *f = fopen(path, "r");
		unsigned long long start = 0, end, flags;
		for (int i = 0; f && i <= bar; i++)
			if (fscanf(f, "%llx %llx %llx", &start, &end, &flags) != 3)
				die("resource");
		if (f)
			fclose(f);
		snprintf(path, sizeof(path), "%s/resource%d", dir, bar);
		int fd = open(path, O_RDWR | O_SYNC);
		if (fd < 0)
			die(path);
		long page = sysconf(_SC_PAGESIZE);
		uint8_t *p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED)
			die("mmap resource");
		closedir(d);
		return (volatile uint32_t *)(p + (start & (page - 1)));
	}
	errno = ENODEV;
	die("no ivshmem-plain device (1af4:1110)");
	return NULL;
}

static int cmd_mmio(int n)
{
	volatile uint32_t *regs = map_sysfs_bar(0x1af4, 0x1110, 0);
	uint64_t *t = calloc(n, sizeof(*t));
	uint32_t sink = 0;
	for (int i = 0; i < WARMUP; i++)
		sink += regs[0];
	struct clock c;
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		sink += regs[0]; /* IntrMask */
		t[i] = __rdtsc() - t0;
	}
	report("ivshmem-mmio-read", &c, t, n, "sysfs-mmap");
	return sink == 0xdeadbeef; /* keep the reads */
}

/* -- pci-epf-test through VFIO ------------------------------------------------------------- */
struct dev {
	int fd;
	struct vfio_region_info bar[VFIO_PCI_NUM_REGIONS];
	volatile uint8_t *map[VFIO_PCI_NUM_REGIONS];
	int efd;
};

static void vfio_open(struct dev *d, const char *bdf)
{
	char path[256], link[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t k = readlink(path, link, sizeof(link) - 1);
	if (k < 0)
		die("iommu_group (is the device bound to vfio-pci with no-IOMMU mode on?)");
	link[k] = 0;
	int container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0)
		die("/dev/vfio/vfio");
	snprintf(path, sizeof(path), "/dev/vfio/noiommu-%s", basename(link));
	int group = open(path, O_RDWR);
	if (group < 0)
		die(path);
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU))
		die("VFIO_SET_IOMMU(NOIOMMU)");
	d->fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (d->fd < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");
	memset(d->map, 0, sizeof(d->map));
	for (int i = 0; i <= VFIO_PCI_CONFIG_REGION_INDEX; i++) { /* not VGA: EINVAL here */
		d->bar[i] = (struct vfio_region_info){ .argsz = sizeof(d->bar[i]), .index = i };
		if (ioctl(d->fd, VFIO_DEVICE_GET_REGION_INFO, &d->bar[i]))
			die("VFIO_DEVICE_GET_REGION_INFO");
		if (i <= VFIO_PCI_BAR5_REGION_INDEX && d->bar[i].size &&
		    (d->bar[i].flags & VFIO_REGION_INFO_FLAG_MMAP)) {
			long page = sysconf(_SC_PAGESIZE);
			size_t len = (d->bar[i].size + page - 1) & ~(page - 1);
			void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd,
				       d->bar[i].offset);
			if (p != MAP_FAILED)
				d->map[i] = p;
		}
	}
}

static uint32_t rd(struct dev *d, int bar, uint32_t off)
{
	uint32_t v;
	if (d->map[bar])
		return *(volatile uint32_t *)(d->map[bar] + off);
	if (pread(d->fd, &v, 4, d->bar[bar].offset + off) != 4)
		die("pread BAR");
	return v;
}

static void wr(struct dev *d, int bar, uint32_t off, uint32_t v)
{
	if (d->map[bar]) {
		*(volatile uint32_t *)(d->map[bar] + off) = v;
		return;
	}
	if (pwrite(d->fd, &v, 4, d->bar[bar].offset + off) != 4)
		die("pwrite BAR");
}

/* Bus master on, MSI-X vector 0 -> an eventfd. */
static void irq_setup(struct dev *d)
{
	off_t cfg = d->bar[VFIO_PCI_CONFIG_REGION_INDEX].offset;
	uint16_t cmd;
	if (pread(d->fd, &cmd, 2, cfg + 4) != 2)
		die("config read");
	cmd |= 0x6;
	if (pwrite(d->fd, &cmd, 2, cfg + 4) != 2)
		die("config write");
	d->efd = eventfd(0, EFD_CLOEXEC);
	if (d->efd < 0)
		die("eventfd");
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *s = (struct vfio_irq_set *)buf;
	*s = (struct vfio_irq_set){ .argsz = sizeof(buf), .index = VFIO_PCI_MSIX_IRQ_INDEX,
				    .flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
				    .start = 0, .count = 1 };
	memcpy(s->data, &d->efd, sizeof(int32_t));
	if (ioctl(d->fd, VFIO_DEVICE_SET_IRQS, s))
		die("VFIO_DEVICE_SET_IRQS (MSI-X)");
}

static void wait_irq(struct dev *d, const char *what)
{
	struct pollfd p = { .fd = d->efd, .events = POLLIN };
	uint64_t count;
	int r = poll(&p, 1, IRQ_TIMEOUT_MS);
	if (r == 0) {
		errno = ETIMEDOUT;
		die(what);
	}
	if (r < 0 || read(d->efd, &count, sizeof(count)) != sizeof(count))
		die(what);
}

/* Run COMMAND with completion on MSI-X vector 0 (IRQ_NUMBER is 1-based); returns STATUS. */
static uint32_t command(struct dev *d, uint32_t cmd)
{
	wr(d, 0, REG_STATUS, 0);
	wr(d, 0, REG_IRQ_TYPE, IRQ_TYPE_MSIX);
	wr(d, 0, REG_IRQ_NUMBER, 1);
	wr(d, 0, REG_COMMAND, cmd);
	wait_irq(d, "command completion interrupt");
	return rd(d, 0, REG_STATUS);
}

struct doorbell {
	int bar;
	uint32_t offset, data;
};

static struct doorbell enable_doorbell(struct dev *d)
{
	uint32_t status = command(d, CMD_ENABLE_DOORBELL);
	if (!(status & STATUS_DOORBELL_ENABLE_SUCCESS)) {
		fprintf(stderr, "epbench: ENABLE_DOORBELL failed, STATUS %#x\n", status);
		exit(1);
	}
	struct doorbell db = { rd(d, 0, REG_DB_BAR), rd(d, 0, REG_DB_OFFSET), rd(d, 0, REG_DB_DATA) };
	if (db.bar > VFIO_PCI_BAR5_REGION_INDEX) {
		fprintf(stderr, "epbench: DB_BAR %d\n", db.bar);
		exit(1);
	}
	printf("doorbell BAR%d+%#x data %#x (%s)\n", db.bar, db.offset, db.data,
	       d->map[db.bar] ? "mmap" : "pwrite");
	return db;
}

/* One ring: clear STATUS (posted, ahead of the ring on the same path), ring, wait for the
 * MSI-X; returns the ring-to-interrupt time in TSC ticks, and whether STATUS says the
 * doorbell handler ran. */
static uint64_t ring(struct dev *d, const struct doorbell *db, int *ok)
{
	wr(d, 0, REG_STATUS, 0);
	uint64_t t0 = __rdtsc();
	wr(d, db->bar, db->offset, db->data);
	wait_irq(d, "doorbell interrupt");
	uint64_t dt = __rdtsc() - t0;
	*ok = !!(rd(d, 0, REG_STATUS) & STATUS_DOORBELL_SUCCESS);
	return dt;
}

/* N timed writes of a register (the value i, or `fixed` when >= 0): what the guest waits for
 * a write (QEMU decides whether it is posted); then a read as the fence, and a check. */
static void time_writes(struct dev *d, uint32_t reg, int64_t fixed, uint64_t *t, int n,
			const char *name)
{
	struct clock c;
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		wr(d, 0, reg, fixed >= 0 ? (uint32_t)fixed : (uint32_t)i);
		t[i] = __rdtsc() - t0;
	}
	if (rd(d, 0, reg) != (fixed >= 0 ? (uint32_t)fixed : (uint32_t)(n - 1))) {
		fprintf(stderr, "epbench: %s: the last write did not land\n", name);
		exit(1);
	}
	report(name, &c, t, n, d->map[0] ? "vfio-mmap" : "vfio-pwrite");
}

static int cmd_doorbell(int n, const char *bdf)
{
	struct dev d;
	vfio_open(&d, bdf);
	irq_setup(&d);
	struct doorbell db = enable_doorbell(&d);
	uint64_t *t = calloc(n, sizeof(*t));
	int ok, missed = 0;
	struct clock c;

	for (int i = 0; i < WARMUP; i++)
		ring(&d, &db, &ok);
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		t[i] = ring(&d, &db, &ok);
		missed += !ok;
	}
	report("doorbell-round-trip", &c, t, n, d.map[db.bar] ? "vfio-mmap" : "vfio-pwrite");

	/* A register read of the same function: one non-posted vfio-user round trip. */
	uint32_t sink = 0;
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		sink += rd(&d, 0, REG_STATUS);
		t[i] = __rdtsc() - t0;
	}
	report("epf-register-read", &c, t, n, d.map[0] ? "vfio-mmap" : "vfio-pread");
	time_writes(&d, REG_SIZE, -1, t, n, "epf-register-write");
	/* COMMAND 0: a write the function must see (a watched register), with nothing to do */
	time_writes(&d, REG_COMMAND, 0, t, n, "epf-command-write");

	uint32_t status = command(&d, CMD_DISABLE_DOORBELL);
	if (!(status & STATUS_DOORBELL_DISABLE_SUCCESS))
		fprintf(stderr, "epbench: DISABLE_DOORBELL failed, STATUS %#x\n", status);
	if (missed)
		fprintf(stderr, "epbench: %d rings without STATUS_DOORBELL_SUCCESS\n", missed);
	return missed ? 1 : (int)(sink & 0);
}

static int cmd_ref(int n, const char *bdf)
{
	struct dev d;
	vfio_open(&d, bdf);
	irq_setup(&d);
	uint64_t *t = calloc(n, sizeof(*t));
	uint32_t sink = 0;
	struct clock c;

	for (int i = 0; i < WARMUP; i++)
		sink += rd(&d, 0, REF_SCRATCH);
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		sink += rd(&d, 0, REF_SCRATCH);
		t[i] = __rdtsc() - t0;
	}
	report("ref-register-read", &c, t, n, d.map[0] ? "vfio-mmap" : "vfio-pread");
	time_writes(&d, REF_SCRATCH, -1, t, n, "ref-register-write");
	for (int i = 0; i < WARMUP; i++) {
		wr(&d, 0, REF_DOORBELL, 1);
		wait_irq(&d, "reference doorbell interrupt");
	}
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		wr(&d, 0, REF_DOORBELL, 1);
		wait_irq(&d, "reference doorbell interrupt");
		t[i] = __rdtsc() - t0;
	}
	report("ref-doorbell-round-trip", &c, t, n, d.map[0] ? "vfio-mmap" : "vfio-pwrite");
	return (int)(sink & 0);
}

static int cmd_bars(int n, const char *bdf)
{
	struct dev d;
	vfio_open(&d, bdf);
	uint64_t *t = calloc(n, sizeof(*t));
	uint32_t sink = 0;
	char name[32];
	struct clock c;

	for (int bar = 0; bar <= VFIO_PCI_BAR5_REGION_INDEX; bar++) {
		if (!d.bar[bar].size)
			continue;
		uint32_t off = bar == 0 ? REG_SIZE : 0; /* BAR0: a register without side effects */
		for (int i = 0; i < WARMUP; i++)
			sink += rd(&d, bar, off);
		clock_start(&c);
		for (int i = 0; i < n; i++) {
			uint64_t t0 = __rdtsc();
			sink += rd(&d, bar, off);
			t[i] = __rdtsc() - t0;
		}
		snprintf(name, sizeof(name), "bar%d-read", bar);
		report(name, &c, t, n, d.map[bar] ? "vfio-mmap" : "vfio-pread");
		clock_start(&c);
		for (int i = 0; i < n; i++) {
			uint64_t t0 = __rdtsc();
			wr(&d, bar, off, (uint32_t)i);
			t[i] = __rdtsc() - t0;
		}
		snprintf(name, sizeof(name), "bar%d-write", bar);
		report(name, &c, t, n, d.map[bar] ? "vfio-mmap" : "vfio-pwrite");
	}
	return (int)(sink & 0);
}

static int cmd_idle(int seconds, const char *bdf, int with_doorbell)
{
	struct dev d;
	vfio_open(&d, bdf);
	irq_setup(&d);
	if (with_doorbell)
		enable_doorbell(&d);
	printf("IDLE begin\n");
	fflush(stdout);
	sleep(seconds);
	printf("IDLE end\n");
	fflush(stdout);
	if (with_doorbell && !(command(&d, CMD_DISABLE_DOORBELL) & STATUS_DOORBELL_DISABLE_SUCCESS))
		fprintf(stderr, "epbench: DISABLE_DOORBELL failed\n");
	return 0;
}

/* The ioctls pci_endpoint_test's kselftest issues, timed from the RC's userspace. */
static int cmd_xfer(const char *op, unsigned long size, int n, const char *dev)
{
	int write = !strcmp(op, "write");
	if (!write && strcmp(op, "read")) {
		fprintf(stderr, "epbench: xfer read|write, not %s\n", op);
		return 2;
	}
	int fd = open(dev, O_RDWR);
	if (fd < 0)
		die(dev);
	if (ioctl(fd, PCITEST_SET_IRQTYPE, IRQ_TYPE_MSIX) < 0)
		die("PCITEST_SET_IRQTYPE(MSI-X)");
	struct pci_endpoint_test_xfer_param param = { .size = size,
						      .flags = PCITEST_FLAGS_USE_DMA };
	unsigned long req = write ? PCITEST_WRITE : PCITEST_READ;
	uint64_t *t = calloc(n, sizeof(*t));
	struct clock c;
	if (ioctl(fd, req, &param) < 0) /* warm-up: first-touch faults on both sides */
		die(write ? "PCITEST_WRITE" : "PCITEST_READ");
	clock_start(&c);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = __rdtsc();
		if (ioctl(fd, req, &param) < 0)
			die(write ? "PCITEST_WRITE" : "PCITEST_READ");
		t[i] = __rdtsc() - t0;
	}
	report(write ? "pcitest-write-dma" : "pcitest-read-dma", &c, t, n, "pci_endpoint_test");
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[1], "mmio"))
		return cmd_mmio(atoi(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "doorbell"))
		return cmd_doorbell(atoi(argv[2]), argv[3]);
	if (argc == 4 && !strcmp(argv[1], "bars"))
		return cmd_bars(atoi(argv[2]), argv[3]);
	if (argc == 4 && !strcmp(argv[1], "ref"))
		return cmd_ref(atoi(argv[2]), argv[3]);
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "idle"))
		return cmd_idle(atoi(argv[2]), argv[3], argc == 5 && !strcmp(argv[4], "db"));
	if (argc == 6 && !strcmp(argv[1], "xfer"))
		return cmd_xfer(argv[2], strtoul(argv[3], NULL, 0), atoi(argv[4]), argv[5]);
	fprintf(stderr, "usage: %s mmio N | doorbell N BDF | ref N BDF | bars N BDF | "
		"idle SECONDS BDF [db] | xfer read|write SIZE N DEV\n", argv[0]);
	return 2;
}
