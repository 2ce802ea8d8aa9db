// SPDX-License-Identifier: GPL-2.0
/*
 * PCI endpoint controller driver for vfio-ep's emulated controller
 *
 * vfio-ep emulates an endpoint SoC's PCIe controller (inbound and outbound iATU, eDMA,
 * profiles of real boards) and serves it to this guest as a PCI function over vfio-user.
 * This driver registers it with the endpoint core, so the kernel's own endpoint functions
 * (pci-epf-test, pci-epf-vntb, pci-epf-ntb, nvmet-pci-epf) run on it while another guest is
 * the root complex.  The register interface is vfio-ep-epc.h.
 *
 * The EPC is created on a platform device named after the controller (vfio-ep tells the
 * name), so that a board's configfs script finds controllers/<name>, e.g. e65d0000.pcie-ep.
 * That device is also the DMA device of the functions (pci_epf_alloc_space(), the eDMA
 * channels' dmaengine device and dma_map_*()); its DMA addresses are guest physical
 * addresses, which the controller reaches as its SoC's RAM.
 *
 * A guest may hold several such controllers, all on one SoC bus (pci-ntb-howto.rst's
 * 2900000.pcie-ep and 2910000.pcie-ep): pci-epf-ntb backs one controller's BARs with the
 * other's outbound aperture, an address the first reaches over that bus.
 */

#include <linux/bitfield.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/dma/edma.h>
#include <linux/dmaengine.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/io-64-nonatomic-lo-hi.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/pci-epc.h>
#include <linux/pci-epf.h>
#include <linux/platform_device.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>

#include "dmaengine.h"		/* drivers/dma: the dma_cookie_* helpers */
#include "dw-edma-v0-regs.h"	/* drivers/dma/dw-edma: the eDMA's register layout */
#include "vfio-ep-epc.h"

#define VEPC_EDMA_MAX_CH	EDMA_V0_MAX_NR_CH
/* vfio-ep's eDMA: CH_CONTROL2 bit 0 makes SAR and DAR both local (a memcpy channel) */
#define VEPC_EDMA_CTRL2_LOCAL	BIT(0)
#define VEPC_EDMA_DOORBELL_STOP	BIT(31)
#define VEPC_EDMA_ABORT_SHIFT	16
/* Linked-list memory per dw-edma channel, as pcie-designware.c gives each (a page) */
#define VEPC_DW_EDMA_LL_SIZE	PAGE_SIZE

struct vepc;

/* One transfer: a list of segments run one after another on its channel. */
struct vepc_dma_seg {
	u64 sar;
	u64 dar;
	u32 size;
};

struct vepc_dma_desc {
	struct dma_async_tx_descriptor tx;
	struct list_head node;
	bool local;		/* both addresses on the EP side (a memcpy) */
	unsigned int nsegs;
	unsigned int next;	/* the segment to start next */
	struct vepc_dma_seg segs[] __counted_by(nsegs);
};

/*
 * A channel of the eDMA.  As slave channels (VEPC_DMA_SLAVE), write channels move EP memory
 * to RC addresses (MEM_TO_DEV), read channels RC to EP (DEV_TO_MEM); as memcpy channels,
 * either copies between two addresses of the SoC's bus (guest RAM, the outbound aperture).
 */
struct vepc_dma_chan {
	struct dma_chan chan;
	struct vepc *vepc;
	bool write;
	u8 id;
	spinlock_t lock;		/* the lists and active */
	struct list_head submitted;
	struct list_head issued;
	struct vepc_dma_desc *active;
	struct dma_slave_config config;
	dma_cookie_t failed;		/* the last transfer the eDMA aborted */
};

struct vepc {
	struct pci_dev *pdev;
	void __iomem *regs;
	void __iomem *edma;
	struct platform_device *plat;	/* the EPC's parent: controllers/<name> */
	struct pci_epc *epc;
	struct pci_epc_features features;
	phys_addr_t regs_phys;
	phys_addr_t ob_phys;
	resource_size_t ob_size;
	u64 ob_bus;
	u64 edma_bus;
	u8 edma_bar;
	unsigned int edma_channels;
	bool dma_slave;			/* VEPC_DMA_SLAVE: private slave channels */
	bool dw_edma;			/* VEPC_DMA_DW_EDMA: Linux's dw-edma drives the eDMA */
	struct mutex cmd_lock;		/* the command registers */
	struct work_struct event_work;
	struct dw_edma_chip edma_chip;	/* VEPC_DMA_DW_EDMA */
	struct dma_device dma;
	struct vepc_dma_chan chans[2 * VEPC_EDMA_MAX_CH];
	/*
	 * Each BAR as the function set it, as dw_pcie_ep_set_bar() keeps it
	 * (ep_func->epf_bar[]), with the size and flags it was set with: a function
	 * that sets a BAR again with the same pci_epf_bar changed in place
	 * (pci-epf-vntb's mw_set_trans) moves the translation, the BAR unchanged.
	 */
	struct pci_epf_bar *epf_bar[PCI_STD_NUM_BARS];
	u64 bar_size[PCI_STD_NUM_BARS];
	u64 bar_flags[PCI_STD_NUM_BARS];
	char name[VEPC_NAME_SIZE + 1];
	struct list_head node;		/* in vepc_list */
};

/* Every controller of this guest, for the addresses one hands another (vepc_bus_addr()). */
static LIST_HEAD(vepc_list);
static DEFINE_SPINLOCK(vepc_list_lock);

static u64 vepc_readq(struct vepc *vepc, unsigned int reg)
{
	return lo_hi_readq(vepc->regs + reg);
}

static void vepc_writeq(struct vepc *vepc, unsigned int reg, u64 val)
{
	lo_hi_writeq(val, vepc->regs + reg);
}

static bool vepc_in_aperture(struct vepc *vepc, phys_addr_t phys)
{
	return phys >= vepc->ob_phys && phys - vepc->ob_phys < vepc->ob_size;
}

static bool vepc_in_regs(struct vepc *vepc, phys_addr_t phys)
{
	return phys >= vepc->regs_phys && phys - vepc->regs_phys < VEPC_REGS_SIZE;
}

/**
 * vepc_bus_addr() - the controller's (bus) address of a CPU physical address
 * @vepc: the controller
 * @phys: a CPU physical address
 *
 * The functions hand the controller CPU physical addresses: DMA addresses of guest RAM
 * (pci_epf_alloc_space(), dma_map_*()), outbound aperture addresses (pci_epc_mem_alloc_addr())
 * and the doorbell's address (the aux resource, which a function may align down to a BAR's
 * size before mapping it).  On the controller's SoC bus guest RAM keeps its addresses, the
 * aperture has its own, and the MMIO space around the eDMA block follows it linearly.  An
 * address in another controller's BARs is that controller's on the bus: pci-epf-ntb's
 * doorbell and memory window BARs translate to the peer controller's aperture.
 */
static u64 vepc_bus_addr(struct vepc *vepc, phys_addr_t phys)
{
	struct vepc *other;

	if (phys < VEPC_BUS_RAM_END)
		return phys;
	if (!vepc_in_aperture(vepc, phys) && !vepc_in_regs(vepc, phys)) {
		guard(spinlock_irqsave)(&vepc_list_lock);
		list_for_each_entry(other, &vepc_list, node) {
			if (vepc_in_aperture(other, phys) || vepc_in_regs(other, phys)) {
				vepc = other;
				break;
			}
		}
	}
	if (vepc_in_aperture(vepc, phys))
		return vepc->ob_bus + (phys - vepc->ob_phys);
	return vepc->edma_bus + (phys - (vepc->regs_phys + VEPC_EDMA_OFFSET));
}

/**
 * vepc_cmd() - run one controller command
 * @vepc: the controller
 * @func_no: function number
 * @vfunc_no: virtual function number
 * @op: VEPC_OP_*
 * @args: the op's arguments (VEPC_CMD_ARGS at most)
 * @nargs: how many
 * @result: where the op's result goes, or NULL
 *
 * The caller holds cmd_lock when it has written more registers for the op (SET_BAR's
 * pieces).  Returns 0 or the negative errno vfio-ep reports (-EINVAL for what the
 * controller refuses, -EBUSY for a change it cannot make once started, -ENOSPC/-ENOMEM when
 * its iATU is full).
 */
static int __vepc_cmd(struct vepc *vepc, u8 func_no, u8 vfunc_no, u32 op,
		      const u64 *args, unsigned int nargs, u64 *result)
{
	unsigned int i;
	int ret;

	lockdep_assert_held(&vepc->cmd_lock);
	writel(func_no | vfunc_no << 8, vepc->regs + VEPC_CMD_FUNC);
	for (i = 0; i < nargs; i++)
		vepc_writeq(vepc, VEPC_CMD_ARG + 8 * i, args[i]);
	writel(op, vepc->regs + VEPC_CMD);
	ret = (s32)readl(vepc->regs + VEPC_CMD_STATUS);
	if (!ret && result)
		*result = vepc_readq(vepc, VEPC_CMD_RESULT);
	return ret;
}

static int vepc_cmd(struct vepc *vepc, u8 func_no, u8 vfunc_no, u32 op,
		    const u64 *args, unsigned int nargs, u64 *result)
{
	guard(mutex)(&vepc->cmd_lock);
	return __vepc_cmd(vepc, func_no, vfunc_no, op, args, nargs, result);
}

/* -- pci_epc_ops ---------------------------------------------------------------------- */

static int vepc_write_header(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			     struct pci_epf_header *hdr)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	u64 args[2] = {
		(u64)hdr->vendorid | (u64)hdr->deviceid << 16 | (u64)hdr->revid << 32 |
		(u64)hdr->progif_code << 40 | (u64)hdr->subclass_code << 48 |
		(u64)hdr->baseclass_code << 56,
		(u64)hdr->cache_line_size | (u64)hdr->subsys_vendor_id << 8 |
		(u64)hdr->subsys_id << 24 | (u64)hdr->interrupt_pin << 40,
	};

	return vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_WRITE_HEADER, args, 2, NULL);
}

static int vepc_set_bar(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			struct pci_epf_bar *epf_bar)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	enum pci_barno bar = epf_bar->barno;
	u64 args[5] = { bar, epf_bar->flags, epf_bar->size,
			vepc_bus_addr(vepc, epf_bar->phys_addr), epf_bar->num_submap };
	unsigned int i;
	int ret;

	if (bar < BAR_0 || bar > BAR_5)
		return -EINVAL;
	if (epf_bar->num_submap > VEPC_SUBMAP_MAX)
		return -ENOSPC;
	if (vepc->epf_bar[bar] == epf_bar) {	/* changed in place: as DesignWare */
		args[1] = vepc->bar_flags[bar];
		args[2] = vepc->bar_size[bar];
	}

	guard(mutex)(&vepc->cmd_lock);
	for (i = 0; i < epf_bar->num_submap; i++) {
		unsigned int reg = VEPC_SUBMAP + i * VEPC_SUBMAP_STRIDE;

		vepc_writeq(vepc, reg, vepc_bus_addr(vepc, epf_bar->submap[i].phys_addr));
		vepc_writeq(vepc, reg + 8, epf_bar->submap[i].size);
	}
	ret = __vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_SET_BAR, args, 5, NULL);
	if (!ret) {
		vepc->epf_bar[bar] = epf_bar;
		vepc->bar_flags[bar] = args[1];
		vepc->bar_size[bar] = args[2];
	}
	return ret;
}

static void vepc_clear_bar(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			   struct pci_epf_bar *epf_bar)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	u64 bar = epf_bar->barno;
	int ret;

	ret = vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_CLEAR_BAR, &bar, 1, NULL);
	if (ret)
		dev_warn(&vepc->pdev->dev, "clear_bar BAR%llu: %d\n", bar, ret);
	if (bar < PCI_STD_NUM_BARS)
		vepc->epf_bar[bar] = NULL;
}

/* The outbound iATU maps whole granules (VEPC_OB_PAGE_SIZE, the pci_epc_mem page). */
static u64 vepc_align_addr(struct pci_epc *epc, u64 pci_addr, size_t *pci_size,
			   size_t *offset)
{
	size_t page = epc->mem->window.page_size;

	*offset = pci_addr & (page - 1);
	*pci_size = ALIGN(*offset + *pci_size, page);
	return pci_addr & ~(u64)(page - 1);
}

static int vepc_map_addr(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			 phys_addr_t addr, u64 pci_addr, size_t size)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	u64 args[3] = { vepc_bus_addr(vepc, addr), pci_addr, size };

	return vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_MAP_ADDR, args, 3, NULL);
}

static void vepc_unmap_addr(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			    phys_addr_t addr)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	u64 bus = vepc_bus_addr(vepc, addr);
	int ret;

	ret = vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_UNMAP_ADDR, &bus, 1, NULL);
	if (ret)
		dev_warn(&vepc->pdev->dev, "unmap_addr %#llx: %d\n", bus, ret);
}

static int vepc_set_msi(struct pci_epc *epc, u8 func_no, u8 vfunc_no, u8 nr_irqs)
{
	u64 nr = nr_irqs;

	return vepc_cmd(epc_get_drvdata(epc), func_no, vfunc_no, VEPC_OP_SET_MSI, &nr, 1,
			NULL);
}

static int vepc_get_count(struct pci_epc *epc, u8 func_no, u8 vfunc_no, u32 op)
{
	u64 vectors;
	int ret;

	ret = vepc_cmd(epc_get_drvdata(epc), func_no, vfunc_no, op, NULL, 0, &vectors);
	return ret ? ret : (int)vectors;
}

static int vepc_get_msi(struct pci_epc *epc, u8 func_no, u8 vfunc_no)
{
	return vepc_get_count(epc, func_no, vfunc_no, VEPC_OP_GET_MSI);
}

static int vepc_set_msix(struct pci_epc *epc, u8 func_no, u8 vfunc_no, u16 nr_irqs,
			 enum pci_barno bir, u32 offset)
{
	u64 args[3] = { nr_irqs, bir, offset };

	return vepc_cmd(epc_get_drvdata(epc), func_no, vfunc_no, VEPC_OP_SET_MSIX, args, 3,
			NULL);
}

static int vepc_get_msix(struct pci_epc *epc, u8 func_no, u8 vfunc_no)
{
	return vepc_get_count(epc, func_no, vfunc_no, VEPC_OP_GET_MSIX);
}

static int vepc_raise_irq(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			  unsigned int type, u16 interrupt_num)
{
	u64 args[2] = { type, interrupt_num };

	return vepc_cmd(epc_get_drvdata(epc), func_no, vfunc_no, VEPC_OP_RAISE_IRQ, args, 2,
			NULL);
}

static int vepc_map_msi_irq(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
			    phys_addr_t phys_addr, u8 interrupt_num, u32 entry_size,
			    u32 *msi_data, u32 *msi_addr_offset)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	u64 args[3] = { vepc_bus_addr(vepc, phys_addr), interrupt_num, entry_size };
	u64 result;
	int ret;

	ret = vepc_cmd(vepc, func_no, vfunc_no, VEPC_OP_MAP_MSI_IRQ, args, 3, &result);
	if (ret)
		return ret;
	*msi_data = lower_32_bits(result);
	*msi_addr_offset = upper_32_bits(result);
	return 0;
}

static int vepc_start(struct pci_epc *epc)
{
	return vepc_cmd(epc_get_drvdata(epc), 0, 0, VEPC_OP_START, NULL, 0, NULL);
}

static void vepc_stop(struct pci_epc *epc)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	int ret;

	ret = vepc_cmd(vepc, 0, 0, VEPC_OP_STOP, NULL, 0, NULL);
	if (ret)
		dev_warn(&vepc->pdev->dev, "stop: %d\n", ret);
}

static const struct pci_epc_features *
vepc_get_features(struct pci_epc *epc, u8 func_no, u8 vfunc_no)
{
	struct vepc *vepc = epc_get_drvdata(epc);

	return &vepc->features;
}

/*
 * The eDMA's interrupt-emulation doorbell, as pcie-designware-ep.c reports it: a write of 0
 * to its rd_int_status asserts an interrupt.  Under dw-edma (VEPC_DMA_DW_EDMA) that is the
 * eDMA's own, which dw-edma hands to the doorbell's virtual IRQ (chip->db_irq, at
 * chip->db_offset); otherwise VEPC_VEC_DOORBELL.  Pre-exposed in a BAR where the profile
 * reserves one for the eDMA block (RK3588's BAR4).
 */
static int vepc_get_aux_resources_count(struct pci_epc *epc, u8 func_no, u8 vfunc_no)
{
	struct vepc *vepc = epc_get_drvdata(epc);

	if (vepc->dw_edma)
		return vepc->edma_chip.db_offset == ~0 ? 0 : 1;
	return vepc->edma_channels ? 1 : 0;
}

static int vepc_get_aux_resources(struct pci_epc *epc, u8 func_no, u8 vfunc_no,
				  struct pci_epc_aux_resource *resources, int num_resources)
{
	struct vepc *vepc = epc_get_drvdata(epc);
	resource_size_t db = offsetof(struct dw_edma_v0_regs, rd_int_status);
	bool exposed = vepc->edma_bar != VEPC_NO_BAR;
	int irq = pci_irq_vector(vepc->pdev, VEPC_VEC_DOORBELL);

	if (!vepc_get_aux_resources_count(epc, func_no, vfunc_no))
		return 0;
	if (num_resources < 1)
		return -ENOSPC;
	if (vepc->dw_edma) {
		db = vepc->edma_chip.db_offset;
		irq = vepc->edma_chip.db_irq;
	}

	resources[0] = (struct pci_epc_aux_resource) {
		.type = PCI_EPC_AUX_DOORBELL_MMIO,
		.phys_addr = vepc->regs_phys + VEPC_EDMA_OFFSET + db,
		.size = sizeof(u32),
		.bar = exposed ? vepc->edma_bar : NO_BAR,
		.bar_offset = exposed ? db : 0,
		.u.db_mmio = {
			.irq = irq,
			.data = 0,	/* write 0 to assert */
		},
	};
	return 0;
}

static const struct pci_epc_ops vepc_ops = {
	.write_header			= vepc_write_header,
	.set_bar			= vepc_set_bar,
	.clear_bar			= vepc_clear_bar,
	.align_addr			= vepc_align_addr,
	.map_addr			= vepc_map_addr,
	.unmap_addr			= vepc_unmap_addr,
	.set_msi			= vepc_set_msi,
	.get_msi			= vepc_get_msi,
	.set_msix			= vepc_set_msix,
	.get_msix			= vepc_get_msix,
	.raise_irq			= vepc_raise_irq,
	.map_msi_irq			= vepc_map_msi_irq,
	.start				= vepc_start,
	.stop				= vepc_stop,
	.get_features			= vepc_get_features,
	.get_aux_resources_count	= vepc_get_aux_resources_count,
	.get_aux_resources		= vepc_get_aux_resources,
	.owner				= THIS_MODULE,
};

/* -- events: link and PERST# -------------------------------------------------------- */

/*
 * Whether a function's secondary interface is on this controller (pci-epf-ntb's).  The
 * core's notifiers (pci_epc_linkup() and the rest) walk epc->pci_epf as struct
 * pci_epf's list members, but pci_epc_add_epf() puts a secondary interface there by
 * its sec_epc_list, which the walk would take for another function and lock its mutex
 * at a wrong address.  Such a controller is told nothing, as J721E's, the one
 * pci-epf-ntb was written on, has no link or PERST# events to tell; the function does
 * not listen for them.  Read as a secondary entry, a primary one's sec_epc field falls
 * on its own id pointer, inside the same function: never this controller.
 */
static bool vepc_has_secondary(struct pci_epc *epc)
{
	struct list_head *node;

	guard(mutex)(&epc->list_lock);
	list_for_each(node, &epc->pci_epf) {
		if (container_of(node, struct pci_epf, sec_epc_list)->sec_epc == epc)
			return true;
	}
	return false;
}

static void vepc_event_work(struct work_struct *work)
{
	struct vepc *vepc = container_of(work, struct vepc, event_work);
	u32 event;

	while ((event = readl(vepc->regs + VEPC_EVENT)) != VEPC_EV_NONE) {
		if (vepc_has_secondary(vepc->epc)) {
			dev_info_once(&vepc->pdev->dev,
				      "a secondary interface is here: link and PERST# events not passed on (pci-epc-core.c walks it as a primary)\n");
			continue;
		}
		switch (event) {
		case VEPC_EV_LINK_UP:
			pci_epc_linkup(vepc->epc);
			break;
		case VEPC_EV_LINK_DOWN:
			pci_epc_linkdown(vepc->epc);
			break;
		case VEPC_EV_DEINIT:
			pci_epc_deinit_notify(vepc->epc);
			break;
		case VEPC_EV_INIT:
			pci_epc_init_notify(vepc->epc);
			break;
		default:
			dev_warn(&vepc->pdev->dev, "unknown event %u\n", event);
			break;
		}
	}
}

static irqreturn_t vepc_event_irq(int irq, void *data)
{
	struct vepc *vepc = data;

	schedule_work(&vepc->event_work);
	return IRQ_HANDLED;
}

/* -- the eDMA, as a dmaengine provider ------------------------------------------------- */

#define VEPC_EDMA_REG(field)	offsetof(struct dw_edma_v0_regs, field)
#define VEPC_EDMA_CH_REG(c, field)					\
	(VEPC_EDMA_REG(type.unroll.ch[0].wr.field) + vepc_edma_ch_base(c))
#define VEPC_EDMA_DIR_REG(c, wr_field, rd_field)			\
	((c)->write ? VEPC_EDMA_REG(wr_field) : VEPC_EDMA_REG(rd_field))

/* Where a channel's registers are relative to write channel 0's (unrolled map). */
static unsigned int vepc_edma_ch_base(struct vepc_dma_chan *c)
{
	return c->id * sizeof(struct dw_edma_v0_ch) +
	       (c->write ? 0 : offsetof(struct dw_edma_v0_ch, rd));
}

static struct vepc_dma_chan *to_vepc_chan(struct dma_chan *chan)
{
	return container_of(chan, struct vepc_dma_chan, chan);
}

static struct vepc_dma_desc *to_vepc_desc(struct dma_async_tx_descriptor *tx)
{
	return container_of(tx, struct vepc_dma_desc, tx);
}

static u32 vepc_chan_bits(struct vepc_dma_chan *c)
{
	return BIT(c->id) | BIT(c->id + VEPC_EDMA_ABORT_SHIFT);
}

/* Program the active descriptor's next segment and ring the channel's doorbell. */
static void vepc_dma_start_seg(struct vepc_dma_chan *c)
{
	struct vepc_dma_desc *d = c->active;
	struct vepc_dma_seg *s = &d->segs[d->next++];
	void __iomem *edma = c->vepc->edma;

	lockdep_assert_held(&c->lock);
	writel(vepc_chan_bits(c), edma + VEPC_EDMA_DIR_REG(c, wr_int_clear, rd_int_clear));
	writel(d->local ? VEPC_EDMA_CTRL2_LOCAL : 0, edma + VEPC_EDMA_CH_REG(c, ch_control2));
	writel(s->size, edma + VEPC_EDMA_CH_REG(c, transfer_size));
	writel(lower_32_bits(s->sar), edma + VEPC_EDMA_CH_REG(c, sar.lsb));
	writel(upper_32_bits(s->sar), edma + VEPC_EDMA_CH_REG(c, sar.msb));
	writel(lower_32_bits(s->dar), edma + VEPC_EDMA_CH_REG(c, dar.lsb));
	writel(upper_32_bits(s->dar), edma + VEPC_EDMA_CH_REG(c, dar.msb));
	writel(BIT(0), edma + VEPC_EDMA_DIR_REG(c, wr_engine_en, rd_engine_en));
	writel(c->id, edma + VEPC_EDMA_DIR_REG(c, wr_doorbell, rd_doorbell));
}

static void vepc_dma_start_next(struct vepc_dma_chan *c)
{
	lockdep_assert_held(&c->lock);
	if (c->active || list_empty(&c->issued))
		return;
	c->active = list_first_entry(&c->issued, struct vepc_dma_desc, node);
	list_del(&c->active->node);
	vepc_dma_start_seg(c);
}

static struct vepc_dma_desc *vepc_dma_alloc_desc(struct vepc_dma_chan *c,
						 unsigned int nsegs, unsigned long flags);

static struct dma_async_tx_descriptor *
vepc_dma_prep_slave_sg(struct dma_chan *chan, struct scatterlist *sgl, unsigned int sg_len,
		       enum dma_transfer_direction dir, unsigned long flags, void *context)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);
	u64 remote = dir == DMA_MEM_TO_DEV ? c->config.dst_addr : c->config.src_addr;
	struct vepc_dma_desc *d;
	struct scatterlist *sg;
	unsigned int i;

	if (dir != (c->write ? DMA_MEM_TO_DEV : DMA_DEV_TO_MEM) || !sg_len)
		return NULL;
	d = vepc_dma_alloc_desc(c, sg_len, flags);
	if (!d)
		return NULL;
	for_each_sg(sgl, sg, sg_len, i) {
		u64 local = vepc_bus_addr(c->vepc, sg_dma_address(sg));

		d->segs[i].size = sg_dma_len(sg);
		d->segs[i].sar = c->write ? local : remote;
		d->segs[i].dar = c->write ? remote : local;
		remote += sg_dma_len(sg);
	}
	return &d->tx;
}

static struct dma_async_tx_descriptor *
vepc_dma_prep_memcpy(struct dma_chan *chan, dma_addr_t dst, dma_addr_t src, size_t len,
		     unsigned long flags)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);
	struct vepc_dma_desc *d;

	if (!len || len > U32_MAX)
		return NULL;
	d = vepc_dma_alloc_desc(c, 1, flags);
	if (!d)
		return NULL;
	d->local = true;
	d->segs[0] = (struct vepc_dma_seg) {
		.sar = vepc_bus_addr(c->vepc, src),
		.dar = vepc_bus_addr(c->vepc, dst),
		.size = len,
	};
	return &d->tx;
}

static dma_cookie_t vepc_dma_tx_submit(struct dma_async_tx_descriptor *tx)
{
	struct vepc_dma_chan *c = to_vepc_chan(tx->chan);
	dma_cookie_t cookie;

	guard(spinlock_irqsave)(&c->lock);
	cookie = dma_cookie_assign(tx);
	list_add_tail(&to_vepc_desc(tx)->node, &c->submitted);
	return cookie;
}

static struct vepc_dma_desc *vepc_dma_alloc_desc(struct vepc_dma_chan *c,
						 unsigned int nsegs, unsigned long flags)
{
	struct vepc_dma_desc *d;

	d = kzalloc(struct_size(d, segs, nsegs), GFP_NOWAIT);
	if (!d)
		return NULL;
	d->nsegs = nsegs;
	dma_async_tx_descriptor_init(&d->tx, &c->chan);
	d->tx.flags = flags;
	d->tx.tx_submit = vepc_dma_tx_submit;
	return d;
}

static void vepc_dma_issue_pending(struct dma_chan *chan)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);

	guard(spinlock_irqsave)(&c->lock);
	list_splice_tail_init(&c->submitted, &c->issued);
	vepc_dma_start_next(c);
}

static enum dma_status vepc_dma_tx_status(struct dma_chan *chan, dma_cookie_t cookie,
					  struct dma_tx_state *state)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);
	enum dma_status status = dma_cookie_status(chan, cookie, state);

	/* A completed transfer the eDMA aborted is an error to whoever asks. */
	if (status == DMA_COMPLETE && cookie == READ_ONCE(c->failed))
		return DMA_ERROR;
	return status;
}

static int vepc_dma_config(struct dma_chan *chan, struct dma_slave_config *config)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);

	guard(spinlock_irqsave)(&c->lock);
	c->config = *config;
	return 0;
}

static void vepc_dma_free_list(struct list_head *list)
{
	struct vepc_dma_desc *d, *tmp;

	list_for_each_entry_safe(d, tmp, list, node) {
		list_del(&d->node);
		kfree(d);
	}
}

static int vepc_dma_terminate_all(struct dma_chan *chan)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);
	LIST_HEAD(gone);

	scoped_guard(spinlock_irqsave, &c->lock) {
		if (c->active) {
			writel(VEPC_EDMA_DOORBELL_STOP | c->id,
			       c->vepc->edma + VEPC_EDMA_DIR_REG(c, wr_doorbell, rd_doorbell));
			list_add(&c->active->node, &gone);
			c->active = NULL;
		}
		list_splice_tail_init(&c->submitted, &gone);
		list_splice_tail_init(&c->issued, &gone);
	}
	vepc_dma_free_list(&gone);
	return 0;
}

static void vepc_dma_synchronize(struct dma_chan *chan)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);

	synchronize_irq(pci_irq_vector(c->vepc->pdev, VEPC_VEC_EDMA));
}

static int vepc_dma_alloc_chan_resources(struct dma_chan *chan)
{
	dma_cookie_init(chan);
	return 0;
}

static void vepc_dma_free_chan_resources(struct dma_chan *chan)
{
	vepc_dma_terminate_all(chan);
}

static void vepc_dma_caps(struct dma_chan *chan, struct dma_slave_caps *caps)
{
	struct vepc_dma_chan *c = to_vepc_chan(chan);

	caps->directions = BIT(c->write ? DMA_MEM_TO_DEV : DMA_DEV_TO_MEM);
}

/*
 * The channel's transfer ended (done or aborted): its next segment, or the descriptor's
 * completion and the next descriptor.  Returns the finished descriptor, its callback to be
 * run outside the lock, or NULL.
 */
static struct vepc_dma_desc *vepc_dma_chan_irq(struct vepc_dma_chan *c, bool ok)
{
	struct vepc_dma_desc *d;

	guard(spinlock_irqsave)(&c->lock);
	d = c->active;
	if (!d)
		return NULL;	/* terminated meanwhile */
	if (ok && d->next < d->nsegs) {
		vepc_dma_start_seg(c);
		return NULL;
	}
	c->active = NULL;
	if (!ok)
		WRITE_ONCE(c->failed, d->tx.cookie);
	dma_cookie_complete(&d->tx);
	vepc_dma_start_next(c);
	return d;
}

static void vepc_dma_finish(struct vepc_dma_desc *d, bool ok)
{
	struct dmaengine_result result = {
		.result = ok ? DMA_TRANS_NOERROR : DMA_TRANS_ABORTED,
	};

	dmaengine_desc_get_callback_invoke(&d->tx, &result);
	kfree(d);
}

/*
 * Each direction's INT_STATUS is read once, then split among its channels: every read is a
 * trapped access, a round trip to vfio-ep, on each transfer's completion.
 */
static irqreturn_t vepc_edma_irq(int irq, void *data)
{
	struct vepc *vepc = data;
	irqreturn_t handled = IRQ_NONE;
	unsigned int i;
	u32 status[2];

	status[0] = readl(vepc->edma + VEPC_EDMA_REG(rd_int_status));
	status[1] = readl(vepc->edma + VEPC_EDMA_REG(wr_int_status));
	for (i = 0; i < 2 * vepc->edma_channels; i++) {
		struct vepc_dma_chan *c = &vepc->chans[i];
		u32 bits = status[c->write] & vepc_chan_bits(c);
		struct vepc_dma_desc *d;

		if (!bits)
			continue;
		writel(bits, vepc->edma + VEPC_EDMA_DIR_REG(c, wr_int_clear, rd_int_clear));
		handled = IRQ_HANDLED;
		d = vepc_dma_chan_irq(c, !(bits & BIT(c->id + VEPC_EDMA_ABORT_SHIFT)));
		if (d)
			vepc_dma_finish(d, !(bits & BIT(c->id + VEPC_EDMA_ABORT_SHIFT)));
	}
	return handled;
}

static int vepc_dma_register(struct vepc *vepc)
{
	struct dma_device *dma = &vepc->dma;
	unsigned int i;

	dma->dev = &vepc->plat->dev;
	INIT_LIST_HEAD(&dma->channels);
	dma_cap_set(DMA_PRIVATE, dma->cap_mask);
	if (vepc->dma_slave) {
		dma_cap_set(DMA_SLAVE, dma->cap_mask);
		dma->directions = BIT(DMA_MEM_TO_DEV) | BIT(DMA_DEV_TO_MEM);
		dma->device_caps = vepc_dma_caps;
	} else {
		dma_cap_set(DMA_MEMCPY, dma->cap_mask);
		dma->directions = BIT(DMA_MEM_TO_MEM);
	}
	dma->src_addr_widths = BIT(DMA_SLAVE_BUSWIDTH_4_BYTES);
	dma->dst_addr_widths = BIT(DMA_SLAVE_BUSWIDTH_4_BYTES);
	dma->residue_granularity = DMA_RESIDUE_GRANULARITY_DESCRIPTOR;
	dma->device_alloc_chan_resources = vepc_dma_alloc_chan_resources;
	dma->device_free_chan_resources = vepc_dma_free_chan_resources;
	dma->device_prep_slave_sg = vepc_dma_prep_slave_sg;
	dma->device_prep_dma_memcpy = vepc_dma_prep_memcpy;
	dma->device_config = vepc_dma_config;
	dma->device_terminate_all = vepc_dma_terminate_all;
	dma->device_synchronize = vepc_dma_synchronize;
	dma->device_issue_pending = vepc_dma_issue_pending;
	dma->device_tx_status = vepc_dma_tx_status;

	for (i = 0; i < 2 * vepc->edma_channels; i++) {
		struct vepc_dma_chan *c = &vepc->chans[i];

		c->vepc = vepc;
		c->write = i < vepc->edma_channels;
		c->id = i % vepc->edma_channels;
		spin_lock_init(&c->lock);
		INIT_LIST_HEAD(&c->submitted);
		INIT_LIST_HEAD(&c->issued);
		c->chan.device = dma;
		list_add_tail(&c->chan.device_node, &dma->channels);
	}
	return dma_async_device_register(dma);
}

/* -- the eDMA, under Linux's dw-edma ---------------------------------------------------- */

static int vepc_dw_edma_irq_vector(struct device *dev, unsigned int nr)
{
	struct vepc *vepc = *(struct vepc **)dev_get_platdata(dev);

	return pci_irq_vector(vepc->pdev, VEPC_VEC_EDMA);
}

static const struct dw_edma_plat_ops vepc_dw_edma_ops = {
	.irq_vector = vepc_dw_edma_irq_vector,
};

static int vepc_dw_edma_ll(struct device *dev, struct dw_edma_region *ll)
{
	dma_addr_t paddr;

	ll->sz = VEPC_DW_EDMA_LL_SIZE;
	ll->vaddr.mem = dmam_alloc_coherent(dev, ll->sz, &paddr, GFP_KERNEL);
	if (!ll->vaddr.mem)
		return -ENOMEM;
	ll->paddr = paddr;
	return 0;
}

static void vepc_dw_edma_remove(void *data)
{
	dw_edma_remove(data);
}

/*
 * The eDMA as pcie-designware.c hands it to dw-edma on a SoC: local (the EP's CPU programs
 * it), unrolled registers, one interrupt for every channel, a page of linked-list memory per
 * channel in the SoC's RAM.  dw-edma then offers the channels (its dmaengine device is the
 * EPC's parent, as the functions' filters ask) and allocates the interrupt-emulation
 * doorbell's virtual IRQ.
 */
static int vepc_dw_edma_probe(struct vepc *vepc)
{
	struct dw_edma_chip *chip = &vepc->edma_chip;
	struct device *dev = &vepc->plat->dev;
	unsigned int i;
	int ret;

	chip->dev = dev;
	chip->ops = &vepc_dw_edma_ops;
	chip->flags = DW_EDMA_CHIP_LOCAL;
	chip->mf = EDMA_MF_EDMA_UNROLL;
	chip->nr_irqs = 1;
	chip->reg_base = vepc->edma;
	chip->ll_wr_cnt = vepc->edma_channels;
	chip->ll_rd_cnt = vepc->edma_channels;
	for (i = 0; i < vepc->edma_channels; i++) {
		ret = vepc_dw_edma_ll(dev, &chip->ll_region_wr[i]);
		if (!ret)
			ret = vepc_dw_edma_ll(dev, &chip->ll_region_rd[i]);
		if (ret)
			return ret;
	}
	ret = dw_edma_probe(chip);
	if (ret)
		return dev_err_probe(dev, ret, "dw-edma on the eDMA block\n");
	return devm_add_action_or_reset(dev, vepc_dw_edma_remove, chip);
}

/* -- probe ---------------------------------------------------------------------------- */

static void vepc_read_features(struct vepc *vepc)
{
	struct pci_epc_features *f = &vepc->features;
	u32 bits = readl(vepc->regs + VEPC_FEATURES);
	unsigned int bar;

	f->linkup_notifier = !!(bits & VEPC_F_LINKUP_NOTIFIER);
	f->dynamic_inbound_mapping = !!(bits & VEPC_F_DYNAMIC_INBOUND_MAPPING);
	f->subrange_mapping = !!(bits & VEPC_F_SUBRANGE_MAPPING);
	f->msi_capable = !!(bits & VEPC_F_MSI_CAPABLE);
	f->msix_capable = !!(bits & VEPC_F_MSIX_CAPABLE);
	f->intx_capable = !!(bits & VEPC_F_INTX_CAPABLE);
	f->align = readl(vepc->regs + VEPC_ALIGN);
	for (bar = 0; bar < PCI_STD_NUM_BARS; bar++) {
		unsigned int desc = VEPC_BAR_DESC + bar * VEPC_BAR_DESC_STRIDE;

		f->bar[bar].type = readl(vepc->regs + desc + VEPC_BAR_TYPE);
		f->bar[bar].only_64bit = readl(vepc->regs + desc + VEPC_BAR_ONLY_64BIT);
		f->bar[bar].fixed_size = vepc_readq(vepc, desc + VEPC_BAR_FIXED_SIZE);
	}
}

static int vepc_check_device(struct vepc *vepc)
{
	struct device *dev = &vepc->pdev->dev;
	u32 magic = readl(vepc->regs + VEPC_MAGIC);
	u32 version = readl(vepc->regs + VEPC_VERSION);
	unsigned int i;

	if (magic != VEPC_MAGIC_VALUE || version != VEPC_VERSION_VALUE) {
		dev_err(dev, "not a vfio-ep controller of version %d (magic %#x, version %u)\n",
			VEPC_VERSION_VALUE, magic, version);
		return -ENODEV;
	}
	for (i = 0; i < VEPC_NAME_SIZE; i++)
		vepc->name[i] = readb(vepc->regs + VEPC_NAME + i);
	if (!vepc->name[0]) {
		dev_err(dev, "the controller has no name\n");
		return -ENODEV;
	}
	vepc->edma_channels = readl(vepc->regs + VEPC_EDMA_CHANNELS);
	if (vepc->edma_channels > VEPC_EDMA_MAX_CH) {
		dev_err(dev, "%u eDMA channels, at most %d\n", vepc->edma_channels,
			VEPC_EDMA_MAX_CH);
		return -ENODEV;
	}
	vepc->edma_bar = readl(vepc->regs + VEPC_EDMA_BAR);
	vepc->dma_slave = readl(vepc->regs + VEPC_DMA_CHANNELS) == VEPC_DMA_SLAVE;
	vepc->dw_edma = readl(vepc->regs + VEPC_DMA_CHANNELS) == VEPC_DMA_DW_EDMA;
	vepc->edma_bus = vepc_readq(vepc, VEPC_EDMA_BUS_ADDR);
	vepc->ob_bus = vepc_readq(vepc, VEPC_OB_BUS_ADDR);
	return 0;
}

static int vepc_request_irqs(struct vepc *vepc)
{
	struct device *dev = &vepc->plat->dev;
	struct pci_dev *pdev = vepc->pdev;
	int ret;

	ret = devm_request_irq(dev, pci_irq_vector(pdev, VEPC_VEC_EVENT), vepc_event_irq, 0,
			       "vfio-ep-epc-event", vepc);
	if (ret)
		return ret;
	if (!vepc->edma_channels || vepc->dw_edma)	/* dw-edma requests its own */
		return 0;
	return devm_request_threaded_irq(dev, pci_irq_vector(pdev, VEPC_VEC_EDMA), NULL,
					 vepc_edma_irq, IRQF_ONESHOT, "vfio-ep-epc-edma", vepc);
}

static void vepc_cancel_events(void *data)
{
	struct vepc *vepc = data;

	cancel_work_sync(&vepc->event_work);
}

static void vepc_unregister_dma(void *data)
{
	dma_async_device_unregister(data);
}

/*
 * The controller itself: the platform device named after it (a board's controllers/<name>),
 * bound to this driver, as a SoC's EPC is.  It owns the EPC, the eDMA's dmaengine device and
 * the interrupts; the PCI function below only carries it.
 */
static int vepc_plat_probe(struct platform_device *plat)
{
	struct device *dev = &plat->dev;
	struct vepc *vepc = *(struct vepc **)dev_get_platdata(dev);
	int ret;

	vepc->plat = plat;
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		return ret;
	if (vepc->edma_channels && vepc->dw_edma) {
		ret = vepc_dw_edma_probe(vepc);
		if (ret)
			return ret;
	} else if (vepc->edma_channels) {
		ret = vepc_dma_register(vepc);
		if (ret)
			return ret;
		ret = devm_add_action_or_reset(dev, vepc_unregister_dma, &vepc->dma);
		if (ret)
			return ret;
	}

	vepc->epc = devm_pci_epc_create(dev, &vepc_ops);
	if (IS_ERR(vepc->epc))
		return PTR_ERR(vepc->epc);
	epc_set_drvdata(vepc->epc, vepc);
	vepc->epc->max_functions = 1;
	ret = pci_epc_mem_init(vepc->epc, vepc->ob_phys, vepc->ob_size,
			       readl(vepc->regs + VEPC_OB_PAGE_SIZE));
	if (ret)
		return ret;

	/* Before the IRQs: devres frees them first, then no event work is left. */
	ret = devm_add_action(dev, vepc_cancel_events, vepc);
	if (ret)
		return ret;
	ret = vepc_request_irqs(vepc);
	if (ret)
		return ret;

	/* No PERST# to wait for here: the controller is ready to be programmed. */
	pci_epc_init_notify(vepc->epc);
	dev_info(dev, "endpoint controller: %u eDMA channels per direction (%s), aperture %pa+%pa\n",
		 vepc->edma_channels,
		 vepc->dw_edma ? "dw-edma" : vepc->dma_slave ? "slave" : "memcpy",
		 &vepc->ob_phys, &vepc->ob_size);
	return 0;
}

static void vepc_plat_remove(struct platform_device *plat)
{
	struct vepc *vepc = *(struct vepc **)dev_get_platdata(&plat->dev);

	pci_epc_mem_exit(vepc->epc);
}

static struct platform_driver vepc_plat_driver = {
	.driver.name	= "vfio-ep-epc",
	.probe		= vepc_plat_probe,
	.remove		= vepc_plat_remove,
};

static void vepc_unregister_plat(void *data)
{
	platform_device_unregister(data);
}

/* The controller's platform device, bound to vepc_plat_driver whatever its name. */
static int vepc_add_plat(struct vepc *vepc)
{
	struct device *dev = &vepc->pdev->dev;
	struct platform_device *plat;
	int ret;

	plat = platform_device_alloc(vepc->name, PLATFORM_DEVID_NONE);
	if (!plat)
		return -ENOMEM;
	plat->dev.parent = dev;
	ret = device_set_driver_override(&plat->dev, vepc_plat_driver.driver.name);
	if (!ret)
		ret = platform_device_add_data(plat, &vepc, sizeof(vepc));
	if (!ret)
		ret = platform_device_add(plat);
	if (ret) {
		platform_device_put(plat);
		return ret;
	}
	ret = devm_add_action_or_reset(dev, vepc_unregister_plat, plat);
	if (ret)
		return ret;
	if (!vepc->epc) {
		dev_err(dev, "controller %s did not probe\n", vepc->name);
		return -ENODEV;
	}
	return 0;
}

static void vepc_unlist(void *data)
{
	struct vepc *vepc = data;

	guard(spinlock_irqsave)(&vepc_list_lock);
	list_del(&vepc->node);
}

/* On the list while its BARs are what it read at probe; off it before it is freed. */
static int vepc_list_add(struct vepc *vepc)
{
	scoped_guard(spinlock_irqsave, &vepc_list_lock)
		list_add_tail(&vepc->node, &vepc_list);
	return devm_add_action_or_reset(&vepc->pdev->dev, vepc_unlist, vepc);
}

static int vepc_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct vepc *vepc;
	int ret;

	vepc = devm_kzalloc(dev, sizeof(*vepc), GFP_KERNEL);
	if (!vepc)
		return -ENOMEM;
	vepc->pdev = pdev;
	mutex_init(&vepc->cmd_lock);
	INIT_WORK(&vepc->event_work, vepc_event_work);
	pci_set_drvdata(pdev, vepc);

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	pci_set_master(pdev);	/* MSI-X messages are the device's memory writes */
	vepc->regs = pcim_iomap_region(pdev, VEPC_REGS_BAR, "vfio-ep-epc");
	if (IS_ERR(vepc->regs))
		return PTR_ERR(vepc->regs);
	vepc->edma = vepc->regs + VEPC_EDMA_OFFSET;
	vepc->regs_phys = pci_resource_start(pdev, VEPC_REGS_BAR);
	vepc->ob_phys = pci_resource_start(pdev, VEPC_OB_BAR);
	vepc->ob_size = pci_resource_len(pdev, VEPC_OB_BAR);
	ret = vepc_check_device(vepc);
	if (ret)
		return ret;
	ret = vepc_list_add(vepc);
	if (ret)
		return ret;
	vepc_read_features(vepc);
	ret = pci_alloc_irq_vectors(pdev, VEPC_NR_VECTORS, VEPC_NR_VECTORS, PCI_IRQ_MSIX);
	if (ret < 0)
		return ret;

	return vepc_add_plat(vepc);
}

static const struct pci_device_id vepc_ids[] = {
	{ PCI_DEVICE(VEPC_PCI_VENDOR_ID, VEPC_PCI_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vepc_ids);

static struct pci_driver vepc_driver = {
	.name		= "vfio-ep-epc",
	.id_table	= vepc_ids,
	.probe		= vepc_probe,
};

static int __init vepc_init(void)
{
	int ret;

	ret = platform_driver_register(&vepc_plat_driver);
	if (ret)
		return ret;
	ret = pci_register_driver(&vepc_driver);
	if (ret)
		platform_driver_unregister(&vepc_plat_driver);
	return ret;
}
module_init(vepc_init);

static void __exit vepc_exit(void)
{
	pci_unregister_driver(&vepc_driver);
	platform_driver_unregister(&vepc_plat_driver);
}
module_exit(vepc_exit);

MODULE_DESCRIPTION("PCI endpoint controller driver for vfio-ep's emulated controller");
MODULE_LICENSE("GPL");
