#!/bin/sh
# vfio-ep's NVMe suite, run in the RC guest against an EP guest's nvmet-pci-epf: TAP 13.
#
# Usage: nvme_suite.sh first|again [MIB]
#   first: the stock nvme driver binds the function; MIB MiB (64) of random data go to the
#          namespace and come back with the same md5, which is written past the data.
#   again: a new RC guest (the first one's QEMU gone: link down and PERST# for the EP, as
#          an RC's reboot on a board) finds the data there, its md5 the one written.
BOOT=$1
MIB=${2:-64}
TAP_PREFIX=nvme.$BOOT.
. /tap_lib.sh
DISK=/dev/nvme0n1
MARK_BLOCK=$((MIB * 256))  # 4 KiB blocks: the first one after the data

disk_up() { wait_for 60 [ -b $DISK ]; }
# timed VAR COMMAND...: run COMMAND, its wall time (s, from /proc/uptime) in VAR.
timed() {
	var=$1; shift
	t0=$(cut -d' ' -f1 /proc/uptime)
	"$@"; status=$?
	t1=$(cut -d' ' -f1 /proc/uptime)
	eval "$var=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
	return $status
}
mb_s() { awk -v m="$MIB" -v s="$1" 'BEGIN { printf "%.1f", (s > 0 ? m * 1.048576 / s : 0) }'; }
md5_of_disk() { dd if=$DISK bs=1M count=$MIB 2>/dev/null | md5sum | cut -c1-32; }

phase_first() {
	echo "1..4"
	disk_up; up=$?
	need bound "no $DISK: the nvme driver did not bind the function" [ $up = 0 ]
	model=$(sed 's/ *$//' /sys/class/nvme/nvme0/model)
	echo "# model $model, $(cat /sys/block/nvme0n1/size) sectors"
	check model "model '$model', want the subsystem's Linux-pci-epf" [ "$model" = Linux-pci-epf ]
	dd if=/dev/urandom of=/tmp/data bs=1M count=$MIB 2>/dev/null
	want=$(md5sum < /tmp/data | cut -c1-32)
	write() { dd if=/tmp/data of=$DISK bs=1M count=$MIB 2>/dev/null && sync; }
	timed WRITE_S write; wrote=$?
	echo "# metrics: write_s=$WRITE_S write_mb_s=$(mb_s $WRITE_S)"  # the next test's
	check "write_${MIB}mib" "writing the namespace failed" [ $wrote = 0 ]
	echo 3 > /proc/sys/vm/drop_caches
	timed READ_S md5_of_disk > /dev/null  # the read alone, then the md5 from the page cache
	got=$(md5_of_disk)
	echo "# metrics: read_s=$READ_S read_mb_s=$(mb_s $READ_S)"
	check "read_back_${MIB}mib" "md5 $got read back, $want written" [ "$got" = "$want" ]
	printf 'vfio-ep %s' "$want" | dd of=$DISK bs=4096 seek=$MARK_BLOCK conv=sync 2>/dev/null
	sync
}

phase_again() {
	echo "1..2"
	disk_up; up=$?
	need bound "no $DISK after the RC's reboot" [ $up = 0 ]
	mark=$(dd if=$DISK bs=4096 skip=$MARK_BLOCK count=1 2>/dev/null | head -c 40 | tr -d '\0')
	got=$(md5_of_disk)
	echo "# after the reboot: md5 $got; written before it: ${mark#vfio-ep }"
	check survives_reboot "the namespace lost its data over the RC's reboot" \
		[ "$mark" = "vfio-ep $got" ]
}

case "$BOOT" in
first) phase_first ;;
again) phase_again ;;
*) echo "Bail out! unknown boot $BOOT"; exit 2 ;;
esac
