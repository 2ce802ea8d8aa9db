"""The EP side's NTB subsystem: ``struct ntb_dev`` and the clients that use one.

An NTB function (pci-epf-vntb) registers an :class:`~vfio_ep.ntb.core.NtbDev`, as the
kernel's "pci-vntb" driver registers the virtual NTB device on the EP; a client then binds
to it as ntb_transport, ntb_pingpong or ntb_tool would on the EP's Linux.  The clients
(:mod:`~vfio_ep.ntb.transport` with :mod:`~vfio_ep.ntb.netdev`, :mod:`~vfio_ep.ntb.pingpong`,
:mod:`~vfio_ep.ntb.tool`) use nothing but the NTB device's operations, so they speak the
same wire protocol as the kernel's to whatever RC driver sits across the bridge.
"""
