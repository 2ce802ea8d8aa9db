"""``make bench``: the issue-6 benchmarks, each reported as a ratio to a baseline measured in
the same run (the machine is shared, so absolute numbers only mean something side by side).

- ``dispatch``: posted REGION_WRITE rate, C fast path vs Python path vs a raw socket sink
- ``doorbell``: in-guest doorbell round trip per backend vs an in-QEMU MMIO read
- ``trapped``: register reads, writes and a doorbell ring from the guest, vs a C reference
  vfio-user server's device in the same guest (C fast path and Python path)
- ``bars``: BAR_TEST's accesses per pci-epf-test BAR from the guest, vs an in-QEMU MMIO read
- ``transfer``: pci-epf-test READ/WRITE/COPY throughput vs a host memcpy
- ``idle``: server CPU with a doorbell enabled, per backend, vs no doorbell
- ``ntb``: vNTB ping round trip over ntb_netdev per doorbell backend, vs the MSI doorbell
- ``ntb-pair``: two guests over pci-epf-ntb (ping, TCP, ntb_perf) vs virtio-net between the
  same guests, and vs a host memcpy
- ``scale``: a trapped register read with 1, 4 and 16 devices in one process, and with 2048
  MSI-X vectors, vs one device
- ``ep-guest``: Linux's own pci-epf-test in an EP guest (``run --ep-guest``): the doorbell
  round trip vs the Python function's, each BAR's accesses vs ivshmem, a DMA READ and WRITE
  vs a host memcpy
- ``ep-vntb``: the vNTB ping with the kernel's vNTB on both sides (an EP guest), polled
  vs the embedded doorbell
- ``ep-nvme``: nvmet-pci-epf in an EP guest as the RC's NVMe drive, sequential write and
  read vs QEMU's emulated nvme in the same RC guest
- ``wake``: the I/O thread's wait for the client (poll, a blocking peek, a blocking read),
  on one CPU and across CPUs, vs poll
"""

NAMES = ("dispatch", "doorbell", "trapped", "bars", "transfer", "idle", "ntb", "ntb-pair", "scale",
         "ep-guest", "ep-vntb", "ep-nvme", "wake")
