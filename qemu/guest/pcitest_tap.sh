#!/bin/sh
# tools/pci/pcitest.sh's cases as TAP 13, for kernels without the pci_endpoint kselftest
# (before 6.14: Linux 6.12).  pcitest exits 0 when a case is OKAY.
#
# Usage: pcitest_tap.sh MSI MSIX
#   MSI, MSIX: the vectors the function advertises (pcitest.sh tries MSI-X up to 2048; the
#   ones past what the device has are not tests).  Read, write and copy run with and without
#   DMA (-d), as the kselftest's variants do.

MSI=$1
MSIX=$2
TAP_PREFIX=pcitest.
. /tap_lib.sh

SIZES="1 1024 1025 1024000 1024001"
echo "1..$((6 + 1 + MSI + MSIX + 3 * 5 + 3 * 2))"

# pcitest OPTIONS...: its verdict line as a diagnostic, its status as the test's.
pcitest() {
	out=$(/pcitest "$@" 2>&1)
	status=$?
	echo "# pcitest $*: $(echo "$out" | tr -s '\t ' ' ')"
	return $status
}

bar=0
while [ $bar -lt 6 ]; do
	check "BAR$bar" "BAR$bar NOT OKAY" pcitest -b $bar
	bar=$((bar + 1))
done

pcitest -i 0 > /dev/null
check LEGACY_IRQ "legacy IRQ NOT OKAY" pcitest -l

# vectors IRQ_TYPE NAME OPTION COUNT: pcitest -i IRQ_TYPE, then each vector 1..COUNT.
vectors() {
	pcitest -i $1 > /dev/null
	n=1
	while [ $n -le "$4" ]; do
		check "$2$n" "$2$n NOT OKAY" pcitest $3 $n
		n=$((n + 1))
	done
}
vectors 1 MSI -m "$MSI"
vectors 2 MSIX -x "$MSIX"

pcitest -i 1 > /dev/null
for op in READ:-r WRITE:-w COPY:-c; do
	for size in $SIZES; do
		check "${op%%:*}_$size" "${op%%:*} of $size bytes NOT OKAY" pcitest ${op#*:} -s $size
	done
done
for op in READ:-r WRITE:-w COPY:-c; do
	for size in 1024 1024001; do
		check "${op%%:*}_${size}_DMA" "DMA ${op%%:*} of $size bytes NOT OKAY" \
			pcitest ${op#*:} -d -s $size
	done
done
