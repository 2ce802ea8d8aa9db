/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vfio-ep's endpoint controller, as the EP guest's CPU sees it: the register interface between
 * the EPC driver (vfio-ep-epc.c) and vfio-ep, which reads the plain "#define NAME NUMBER"
 * lines of this file (vfio_ep/epc/cpu_port.py).  One header, both sides.
 *
 * The device is a PCI function of the EP guest.  BAR0 holds the controller's registers, the
 * eDMA block and the MSI-X table; BAR2 (64-bit) is the outbound aperture that pci_epc_mem
 * hands out, where the CPU reaches RC memory through the outbound iATU.  Registers are 32-bit
 * little-endian unless named 64-bit (then two dwords, low first).
 *
 * Addresses given to the controller are bus addresses of the endpoint SoC: EP guest RAM at its
 * physical addresses (below VEPC_BUS_RAM_END), the eDMA block at VEPC_EDMA_BUS_ADDR, the
 * aperture at VEPC_OB_BUS_ADDR.  The driver turns CPU addresses inside its BARs into those.
 */
#ifndef VFIO_EP_EPC_H
#define VFIO_EP_EPC_H

#define VEPC_PCI_VENDOR_ID		0x1b36
#define VEPC_PCI_DEVICE_ID		0x10ee

#define VEPC_REGS_BAR			0
#define VEPC_REGS_SIZE			0x10000
#define VEPC_OB_BAR			2

/* Identification */
#define VEPC_MAGIC			0x000	/* reads VEPC_MAGIC_VALUE */
#define VEPC_MAGIC_VALUE		0x43504556	/* "VEPC" */
#define VEPC_VERSION			0x004	/* reads VEPC_VERSION_VALUE */
#define VEPC_VERSION_VALUE		1
#define VEPC_NAME			0x010	/* NUL-padded: configfs controllers/<name> */
#define VEPC_NAME_SIZE			32

/* struct pci_epc_features */
#define VEPC_FEATURES			0x040
#define VEPC_F_LINKUP_NOTIFIER		0x01
#define VEPC_F_DYNAMIC_INBOUND_MAPPING	0x02
#define VEPC_F_SUBRANGE_MAPPING		0x04
#define VEPC_F_MSI_CAPABLE		0x08
#define VEPC_F_MSIX_CAPABLE		0x10
#define VEPC_F_INTX_CAPABLE		0x20
#define VEPC_ALIGN			0x044	/* epc_features->align */
#define VEPC_BAR_DESC			0x080	/* one per BAR, VEPC_BAR_DESC_STRIDE apart: */
#define VEPC_BAR_DESC_STRIDE		0x10
#define VEPC_BAR_TYPE			0x0	/*  enum pci_epc_bar_type */
#define VEPC_BAR_ONLY_64BIT		0x4	/*  1: only a 64-bit BAR */
#define VEPC_BAR_FIXED_SIZE		0x8	/*  64-bit */

/* The SoC around the controller */
#define VEPC_BUS_RAM_END		0x80000000	/* EP guest RAM is below this bus address */
#define VEPC_OB_BUS_ADDR		0x0e0	/* 64-bit: bus address of the aperture */
#define VEPC_OB_PAGE_SIZE		0x0e8	/* outbound iATU granule (pci_epc_mem page) */
/*
 * How the eDMA's channels are offered to dmaengine clients (the controller's dma_channels):
 * MEMCPY, memcpy channels (pci-epf-test's generic path: its READ, WRITE and COPY); SLAVE,
 * private slave channels as dw-edma offers a DesignWare eDMA (what nvmet-pci-epf needs, and
 * pci-epf-test prefers: its COPY then fails, "DMA controller doesn't support MEMCPY", as on
 * those boards); DW_EDMA, Linux's own dw-edma driver on the eDMA block (linked-list mode,
 * its one interrupt on VEPC_VEC_EDMA, and its interrupt-emulation doorbell as the aux
 * resource, as pcie-designware-ep.c reports it).
 */
#define VEPC_DMA_CHANNELS		0x0ec
#define VEPC_DMA_MEMCPY			0
#define VEPC_DMA_SLAVE			1
#define VEPC_DMA_DW_EDMA		2
#define VEPC_EDMA_BUS_ADDR		0x0f0	/* 64-bit: bus address of the eDMA block */
#define VEPC_EDMA_CHANNELS		0x0f8	/* channels per direction; 0: no eDMA */
#define VEPC_EDMA_BAR			0x0fc	/* the BAR showing the eDMA, or VEPC_NO_BAR */
#define VEPC_NO_BAR			0xff

/*
 * pci_epc_ops, by command: write the function, the arguments (and for SET_BAR the pieces),
 * then the op to VEPC_CMD, which runs it; VEPC_CMD_STATUS then holds 0 or a negative errno,
 * VEPC_CMD_RESULT what the op returns.  Serialised by the driver.
 */
#define VEPC_CMD			0x100
#define VEPC_CMD_STATUS			0x104	/* s32 */
#define VEPC_CMD_RESULT			0x108	/* 64-bit */
#define VEPC_CMD_FUNC			0x110	/* func_no | vfunc_no << 8 */
#define VEPC_CMD_ARG			0x118	/* 64-bit arguments, 8 bytes apart */
#define VEPC_CMD_ARGS			6
#define VEPC_SUBMAP			0x200	/* set_bar pieces: bus address, size (64-bit) */
#define VEPC_SUBMAP_STRIDE		0x10
#define VEPC_SUBMAP_MAX			16

#define VEPC_OP_WRITE_HEADER		1	/* IDs and class, see vepc_write_header() */
#define VEPC_OP_SET_BAR			2	/* barno, flags, size, bus address, num_submap */
#define VEPC_OP_CLEAR_BAR		3	/* barno */
#define VEPC_OP_MAP_ADDR		4	/* bus address, pci_addr, size */
#define VEPC_OP_UNMAP_ADDR		5	/* bus address */
#define VEPC_OP_SET_MSI			6	/* nr_irqs */
#define VEPC_OP_GET_MSI			7	/* -> vectors the RC enabled */
#define VEPC_OP_SET_MSIX		8	/* nr_irqs, bar, offset */
#define VEPC_OP_GET_MSIX		9	/* -> vectors the RC enabled */
#define VEPC_OP_RAISE_IRQ		10	/* PCI_IRQ_INTX/MSI/MSIX, interrupt_num (1-based) */
/* MAP_MSI_IRQ: bus address, interrupt_num, entry_size -> msi_data | msi_addr_offset << 32 */
#define VEPC_OP_MAP_MSI_IRQ		11
#define VEPC_OP_START			12
#define VEPC_OP_STOP			13

/*
 * Events, oldest first: each read of VEPC_EVENT takes one (VEPC_EV_NONE: none left).  A
 * new one raises VEPC_VEC_EVENT.  VEPC_LINK reads 1 while an RC is attached.
 */
#define VEPC_EVENT			0x180
#define VEPC_LINK			0x184
#define VEPC_EV_NONE			0
#define VEPC_EV_LINK_UP			1	/* pci_epc_linkup() */
#define VEPC_EV_LINK_DOWN		2	/* pci_epc_linkdown() */
#define VEPC_EV_DEINIT			3	/* PERST# asserted: pci_epc_deinit_notify() */
#define VEPC_EV_INIT			4	/* PERST# deasserted: pci_epc_init_notify() */

/* The eDMA block: DesignWare eDMA v0, unrolled (vfio_ep/epc/edma.py) */
#define VEPC_EDMA_OFFSET		0x2000
#define VEPC_EDMA_SIZE			0x2000

/* MSI-X, in BAR0 */
#define VEPC_MSIX_TABLE			0x8000
#define VEPC_MSIX_PBA			0x9000
#define VEPC_VEC_EVENT			0	/* controller events */
#define VEPC_VEC_EDMA			1	/* eDMA done/abort (DW_EDMA: and emulation) */
#define VEPC_VEC_DOORBELL		2	/* the eDMA's interrupt-emulation doorbell */
#define VEPC_NR_VECTORS			3

#endif /* VFIO_EP_EPC_H */
