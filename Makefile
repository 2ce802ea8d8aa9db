# vfio-ep: a userspace PCIe endpoint for QEMU guests over vfio-user.
# Everything runs from a private virtualenv (.venv); the guest toolchain is cached
# under ~/.cache/vfio-ep (override with VFIO_EP_CACHE).

PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install provision demo test test-matrix unit lint bench fuzz container-test clean

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h) native/build.py
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Fetch QEMU, build the guest kernel and kselftest (cached; a cold run takes 6-8 minutes).
provision: $(STAMP)
	$(PYTHON) -m vfio_ep provision

# Boot a guest against a fresh vfio-ep and run the upstream pci_endpoint_test kselftest,
# then the NTB suite against pci-epf-vntb (ntb_hw_epf, ntb_tool, ntb_pingpong, ntb_netdev),
# then two guests joined by pci-epf-ntb, then the kselftest against Linux's own pci-epf-test
# in an EP guest, then the seeds' vNTB block with the kernel's vNTB on both sides.
demo: $(STAMP)
	$(PYTHON) -m vfio_ep run
	$(PYTHON) -m vfio_ep run --function pci-epf-vntb
	$(PYTHON) -m vfio_ep run --function pci-epf-ntb
	$(PYTHON) -m vfio_ep run --ep-guest
	$(PYTHON) -m vfio_ep run --ep-guest --configfs tests/data/seed-vntb-setup.sh --preset rcar-s4

# Everything: lint, unit tests, and the guest integration tests (real QEMU, real drivers).
test: $(STAMP) lint provision
	$(PYTHON) -m pytest -ra

# The suites on each kernel line (6.12, 7.2, 7.3): results/matrix.md (each line's kernel is
# built on first use, 4-8 minutes each).
test-matrix: $(STAMP)
	$(PYTHON) -m vfio_ep matrix

unit: $(STAMP)
	$(PYTHON) -m pytest -ra -m "not guest"

# ruff everywhere; mypy --strict on the package (pyproject.toml [tool.mypy]): the Protocols
# (Host, RcMemory, PciEpcOps, FastDoorbell, ...) are checked against what implements them.
lint: $(STAMP)
	$(VENV)/bin/ruff check vfio_ep tests native setup.py
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PYTHON) -m vfio_ep.bench

# The long fuzz run (make test runs a short one), about 40 minutes: 5000 hypothesis streams
# per path (~6 min each), then 10 minutes of libFuzzer + ASan on the C fast path (its corpus
# kept in build/fuzz-corpus) and 10 of atheris on the request handlers.  No per-test timeout.
fuzz: $(STAMP)
	VFIO_EP_FUZZ_EXAMPLES=5000 VFIO_EP_LIBFUZZER_SECONDS=600 VFIO_EP_ATHERIS_SECONDS=600 \
	VFIO_EP_FUZZ_CORPUS=$(CURDIR)/build/fuzz-corpus $(PYTHON) -m pytest -ra --timeout=0 \
	tests/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info vfio_ep/_native.c vfio_ep/_native*.so

# Build the podman image (Debian trixie, QEMU from trixie-backports) and run the guest suite in it.
container-test: $(STAMP)
	$(PYTHON) -m vfio_ep.guest.container test $(PYTEST_ARGS)
