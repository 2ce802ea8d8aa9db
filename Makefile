PYTHON ?= python3

.PHONY: provision demo

# Fetch QEMU, build the guest kernel and kselftest (cached under ~/.cache/vfio-ep).
provision:
	$(PYTHON) -m vfio_ep provision

# Boot a guest against a fresh vfio-ep and run the upstream pci_endpoint_test kselftest.
demo:
	$(PYTHON) -m vfio_ep run
