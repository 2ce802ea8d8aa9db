# kselftest.sh VENDOR DEVICE ARGS...: pci_endpoint_test with ARGS, once its driver has the
# endpoint: built in, or loaded from /lib/modules (a --kernel tree with it =m).  When no
# driver binds, one line says which device and why instead of 23 failures.  With ARGS
# "--bound", that check alone (--ep-shell's RC guest, which then idles with the driver bound).
vendor=$1 device=$2
shift 2
[ -f /lib/modules/pci_endpoint_test.ko ] && /sbin/insmod /lib/modules/pci_endpoint_test.ko
if [ ! -e /dev/pci-endpoint-test.0 ]; then
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/vendor"):$(cat "$d/device")" = "$vendor:$device" ] || continue
		echo "vfio-ep: no driver bound to ${d##*/} [${vendor#0x}:${device#0x}]: is" \
			"CONFIG_PCI_ENDPOINT_TEST set, and are these IDs in its table?"
		exit 3
	done
	echo "vfio-ep: no PCI device ${vendor#0x}:${device#0x} in the guest"
	exit 3
fi
[ "$*" = --bound ] && exit
exec /pci_endpoint_test "$@"
