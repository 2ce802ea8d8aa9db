#!/bin/sh
# vfio-ep's NTB suite, run in the guest (the RC) against pci-epf-vntb: TAP 13 on stdout.
#
# Usage: ntb_suite.sh PHASE DB_BITS SHARED
#   PHASE is what the EP side runs (its ntb_client): tool, pingpong or netdev.
#   DB_BITS is how many doorbells the EP answers (its db_count - 2).
#   SHARED is 1 when the EP's doorbells share one register (the embedded doorbell: any
#   ring raises every doorbell on the EP, so every bit comes back), else 0.
# The NTB clients are modules in /lib/modules, loaded one at a time, as each binds to the
# first NTB device it sees.

PHASE=$1
DB_BITS=$2
SHARED=$3
MODULES=/lib/modules
PEER=10.0.0.11
SELF=10.0.0.10/24
TAP_PREFIX=$PHASE.
. /tap_lib.sh
hex() { printf '%#x' "$1"; }

builtin_or_module ntb_hw_epf
DEV=$(ls /sys/bus/pci/drivers/ntb_hw_epf 2>/dev/null | grep : | head -n 1)

phase_tool() {
	echo "1..$((5 + DB_BITS))"
	T=/sys/kernel/debug/ntb_tool/$DEV
	need hw_epf_bound "no device bound to ntb_hw_epf" [ -n "$DEV" ]
	insmod $MODULES/ntb_tool.ko
	need tool_bound "ntb_tool made no $T" [ -d "$T" ]
	echo Y > "$T/link"
	need link_up "peer0/link_event did not report the link up" \
		timeout 10 sh -c "echo Y > $T/peer0/link_event"

	ALL=$(hex_of "$T/db_valid_mask")
	# ring BIT: ring our doorbell BIT, wait for the EP's answer on the same bit (with a
	# shared doorbell, on every bit), then clear what came back.
	ring() {
		want=$1
		[ "$SHARED" = 1 ] && want=$(( (1 << DB_BITS) - 1 ))
		echo "s $1" > "$T/peer_db"
		answered() { db=$(hex_of "$T/db") && [ $((db)) = $((want)) ]; }
		wait_for 10 answered
		status=$?
		[ $status = 0 ] || echo "# rang $1: db is $(cat "$T/db"), want $(hex $want)"
		echo "c $ALL" > "$T/db"
		return $status
	}

	# Scratchpads: ours into the EP's (peer0/spadN), the EP answers inverted in ours.
	spads_ok=1
	for i in 0 1 2 3; do echo $((0x5a5a0000 + i)) > "$T/peer0/spad$i"; done
	ring 1 || spads_ok=0
	for i in 0 1 2 3; do
		got=$(hex_of "$T/spad$i")
		want=$(hex $(( ~(0x5a5a0000 + i) & 0xffffffff )))
		[ "$got" = "$want" ] || { spads_ok=0; echo "# spad$i: $got, want $want"; }
	done
	check spads_both_ways "scratchpads not mirrored" [ $spads_ok = 1 ]

	# Every doorbell the EP has, rung and answered on the same bit.
	b=0
	while [ $b -lt "$DB_BITS" ]; do
		check "doorbell_$b" "no answer on doorbell bit $b" ring $((1 << b))
		b=$((b + 1))
	done

	# Memory windows: a pattern through the BAR into the EP, back into our buffer.
	echo 65536 > "$T/peer0/mw_trans0"
	echo "0:65536" > "$T/peer0/peer_mw_trans0"
	dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
	dd if=/tmp/pattern of="$T/peer0/peer_mw0" bs=4096 count=16 2>/dev/null
	ring 1
	dd if="$T/peer0/mw0" of=/tmp/back bs=4096 count=16 2>/dev/null
	check mw_both_ways "memory window data differs: $(md5sum /tmp/pattern /tmp/back | tr '\n' ' ')" \
		cmp -s /tmp/pattern /tmp/back
}

phase_pingpong() {
	echo "1..3"
	need hw_epf_bound "no device bound to ntb_hw_epf" [ -n "$DEV" ]
	insmod $MODULES/ntb_pingpong.ko delay_ms=20
	C=/sys/kernel/debug/ntb_pingpong/$DEV/count
	need pingpong_bound "ntb_pingpong made no $C" [ -f "$C" ]
	counting() { [ "$(cat $C)" -ge 20 ]; }
	wait_for 20 counting
	check pingpong_counts "count is $(cat $C 2>/dev/null) after 20 s, want >= 20" counting
}

netdev_up() {
	insmod $MODULES/ntb_netdev.ko
	wait_for 10 [ -d /sys/class/net/eth0 ] || return 1
	ip addr add $SELF dev eth0 && ip link set eth0 up
	# no carrier: ntb_transport's queue (its link state among them) says which side stopped
	wait_for 20 grep -q 1 /sys/class/net/eth0/carrier || { netdev_stats; return 1; }
}

phase_netdev() {
	echo "1..8"
	need hw_epf_bound "no device bound to ntb_hw_epf" [ -n "$DEV" ]
	insmod $MODULES/ntb_transport.ko
	need netdev_link_up "eth0 (ntb_netdev) got no carrier" netdev_up
	check ping_100 "ping lost packets" pings 100 $PEER -A

	dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
	timeout 300 nc $PEER 7 < /tmp/data > /tmp/echo
	sums=$(md5sum /tmp/data /tmp/echo | cut -d' ' -f1 | uniq | wc -l)
	echo "# 16 MiB echoed: $(wc -c < /tmp/echo) bytes back"
	check tcp_16mib_echo "the echo differs from what was sent" [ "$sums" = 1 ]

	echo "$DEV" > /sys/bus/pci/drivers/ntb_hw_epf/unbind
	gone() { [ ! -d /sys/class/net/eth0 ]; }
	check unbind_takes_link_down "eth0 still there after unbinding ntb_hw_epf" wait_for 10 gone
	echo "$DEV" > /sys/bus/pci/drivers/ntb_hw_epf/bind
	check rebind "ntb_hw_epf did not bind again" \
		wait_for 10 [ -e "/sys/bus/pci/drivers/ntb_hw_epf/$DEV" ]
	rmmod ntb_netdev
	check relink_up "no carrier after rebinding" netdev_up
	check ping_after_rebind "ping after rebinding lost packets" pings 10 $PEER -A
}

case "$PHASE" in
tool) phase_tool ;;
pingpong) phase_pingpong ;;
netdev) phase_netdev ;;
*) echo "Bail out! unknown phase $PHASE"; exit 2 ;;
esac
dmesg | grep -iE "ntb|epf" | tail -n 20 | sed 's/^/# dmesg: /'
