#!/bin/sh
# vfio-ep's NTB pair suite: run in both guests of a pci-epf-ntb pair at once; TAP 13.
#
# Usage: ntb_pair.sh ROLE PHASE [BOOT]
#   ROLE is a or b (each guest knows only its own role: the other one is its peer).
#   PHASE is what both run: tool, pingpong, perf, netdev or rejoin (bench and ping: no
#   tests, numbers for the benchmarks; up: no tests, the NTB driver bound and the netdev
#   brought up at SELF_IP for someone's shell, BOUND_LINE printed once the driver is bound).
#   BOOT counts the boots of one host within a phase (rejoin: b leaves, b comes back as 2).
# The environment may say (the defaults are a pci-epf-ntb pair's: two RC guests):
#   NTB_ID      vendor:device of the NTB's PCI device (0x104c:0xb00d)
#   NTB_DRIVER  the driver that makes it an NTB device (ntb_hw_epf).  An EP guest's vNTB
#               is pci-epf-vntb's own virtual device, bound to pci-vntb from the start.
#   SELF_IP, PEER_IP  the netdev's addresses (a: 10.0.0.1, b: 10.0.0.2)
#   LABEL       what each test name starts with (the role, and the boot after the first)
#   NETDEV_MIB  the netdev phase's transfer (64)
#   MW_SIZE     the buffer behind our memory window (65536).  A BAR's translation
#               (vNTB's EP side) takes the BAR's size: a resizable one is 1 MiB at least.
#   DB_BITS     the doorbells both sides ring (all in ntb_tool's db_valid_mask).  vNTB's
#               sides count differently: its EP answers db_count - 2.
#   PERF_ORDER  log2 of what ntb_perf moves (22, 4 MiB)
#   PERF_LEAVE  how a leaves after its ntb_perf run: qemu (its QEMU goes, the default) or
#               driver (it unloads ntb_perf first, whose ntb_link_disable() takes the link
#               down: the kernel's pci-epf-ntb sees a host leave no other way)
# The bench "phase" is no test: both guests also have a virtio-net NIC joined to each other,
# and a measures ping and a TCP transfer over each (vfio_ep/bench/ntb_pair.py reads it).
# Both guests run the same clients against each other, in step: a barrier is a number
# written into the peer's last scratchpad and awaited in ours, so neither side runs ahead of
# what the other set up (scratchpads hold values: no ring can be lost to a clear).

ROLE=$1
PHASE=$2
BOOT=${3:-1}
MODULES=/lib/modules
NTB_ID=${NTB_ID:-0x104c:0xb00d}
NTB_DRIVER=${NTB_DRIVER:-ntb_hw_epf}
NETDEV_MIB=${NETDEV_MIB:-64}
if [ "$ROLE" = a ]; then PEER=b; SELF_IP=${SELF_IP:-10.0.0.1}; PEER_IP=${PEER_IP:-10.0.0.2}
else PEER=a; SELF_IP=${SELF_IP:-10.0.0.2}; PEER_IP=${PEER_IP:-10.0.0.1}; fi
if [ -z "$LABEL" ]; then
	LABEL=$ROLE
	[ "$BOOT" = 1 ] || LABEL=$ROLE$BOOT
fi
TAP_PREFIX=$LABEL.$PHASE.
. /tap_lib.sh

[ "$NTB_DRIVER" = ntb_hw_epf ] && builtin_or_module ntb_hw_epf
# pci_endpoint_test claims 104c:b00d too: hand the device to the NTB's driver.
DEV=
for d in /sys/bus/pci/devices/*; do
	[ "$(cat $d/vendor):$(cat $d/device)" = "$NTB_ID" ] && DEV=${d##*/}
done
bind_ntb_driver() {
	[ -n "$DEV" ] || return 1
	[ -e "/sys/bus/pci/drivers/$NTB_DRIVER/$DEV" ] && return 0
	echo "$NTB_DRIVER" > /sys/bus/pci/devices/$DEV/driver_override
	[ -e /sys/bus/pci/devices/$DEV/driver ] && echo $DEV > /sys/bus/pci/devices/$DEV/driver/unbind
	echo $DEV > /sys/bus/pci/drivers_probe
	[ -e "/sys/bus/pci/drivers/$NTB_DRIVER/$DEV" ]
}

pattern() { yes "vfio-ep ntb pair: a pattern from $1" | head -c 65536; }

# ntb_tool_up: two tests, the NTB driver bound and ntb_tool's link up; then T is ntb_tool's
# directory, SYNC the scratchpad barriers use.
ntb_tool_up() {
	need driver_bound "$NTB_DRIVER did not bind ${DEV:-the device $NTB_ID}" bind_ntb_driver
	insmod $MODULES/ntb_tool.ko
	T=/sys/kernel/debug/ntb_tool/$DEV
	echo Y > "$T/link"
	need link_up "peer0/link_event did not report the link up" link_is up 60
	SYNC=$(( $(ls -d "$T"/spad* | wc -l) - 1 ))
}
# link_is up|down SECONDS: wait until ntb_tool reports the peer's link so.
link_is() {
	want=Y; [ "$1" = up ] || want=N
	timeout $2 sh -c "echo $want > $T/peer0/link_event"
}
reached() { v=$(hex_of "$T/spad$SYNC") && [ $((v)) -ge $1 ]; }
# barrier N: tell the peer we reached step N, wait until it has too.
barrier() {
	echo "$1" > "$T/peer0/spad$SYNC"
	wait_for 60 reached $1
}
# spads_swap STEP: write ours into the peer's scratchpads 0-3 (peer0/spadN is its own spad
# N), meet the peer at barrier STEP, and check its writes into ours (STEP is in the values:
# a value left from an earlier step, or an earlier boot of the peer, does not pass).
spads_swap() {
	base=$([ "$ROLE" = a ] && echo $((0xa0000000)) || echo $((0xb0000000)))
	peer_base=$([ "$ROLE" = a ] && echo $((0xb0000000)) || echo $((0xa0000000)))
	for i in 0 1 2 3; do echo $((base + $1 * 16 + i)) > "$T/peer0/spad$i"; done
	barrier $1 || return 1
	for i in 0 1 2 3; do
		got=$(hex_of "$T/spad$i") || return 1
		got=$((got))
		[ $got = $((peer_base + $1 * 16 + i)) ] || { echo "# spad$i: $(cat $T/spad$i)"; return 1; }
	done
}

phase_tool() {
	echo "1..5"
	ntb_tool_up
	[ -n "$DB_BITS" ] || DB_BITS=$(awk -v m=$(($(hex_of "$T/db_valid_mask"))) \
		'BEGIN { while (m) { n++; m = int(m / 2) } print n }')
	has() { db=$(hex_of "$T/db") && [ $(( db & $1 )) != 0 ]; }
	# ring BIT: ring the peer's doorbell BIT, wait for the peer's ring of the same bit.
	ring() {
		echo "s $1" > "$T/peer_db"
		wait_for 30 has $1
		status=$?
		echo "c $1" > "$T/db"
		return $status
	}

	check spads_both_ways "the peer's scratchpad writes did not arrive" spads_swap 1

	# Every doorbell: ring it, and get the peer's ring of the same bit.
	db_ok=1
	b=0
	while [ $b -lt "$DB_BITS" ]; do
		ring $((1 << b)) || { db_ok=0; echo "# doorbell $b: no ring from the peer"; }
		b=$((b + 1))
	done
	check "doorbells_${DB_BITS}_both_ways" "doorbells were lost" [ $db_ok = 1 ]
	barrier 2

	# Memory windows: our buffer for the peer, then each writes its pattern into the other.
	echo "${MW_SIZE:-65536}" > "$T/peer0/mw_trans0"
	echo "0:65536" > "$T/peer0/peer_mw_trans0"
	barrier 3
	pattern $ROLE > /tmp/mine
	pattern $PEER > /tmp/theirs
	dd if=/tmp/mine of="$T/peer0/peer_mw0" bs=4096 count=16 2>/dev/null
	barrier 4
	dd if="$T/peer0/mw0" of=/tmp/got bs=4096 count=16 2>/dev/null
	check mw_both_ways "memory window data differs from the peer's pattern" \
		cmp -s /tmp/theirs /tmp/got
	barrier 5  # the peer has read its window: we may go
}

phase_pingpong() {
	echo "1..2"
	need driver_bound "$NTB_DRIVER did not bind ${DEV:-the device $NTB_ID}" bind_ntb_driver
	insmod $MODULES/ntb_pingpong.ko delay_ms=20
	C=/sys/kernel/debug/ntb_pingpong/$DEV/count
	counting() { [ "$(cat $C 2>/dev/null || echo 0)" -ge 20 ]; }
	wait_for 60 counting
	check pingpong_counts "count is $(cat $C 2>/dev/null) after 60 s, want >= 20" counting
	sleep 5  # keep answering while the peer counts up to its 20 too
}

# ntb_perf: a measures a -> b, b serves until a's QEMU is gone (which takes the link down
# for b: a pair never waits on a dead peer), or a unloads ntb_perf (PERF_LEAVE=driver).
# 4 MiB in 64 KiB chunks: the default 1 GiB would take TCG minutes.
PERF_ORDER=${PERF_ORDER:-22}
phase_perf() {
	echo "1..2"
	need driver_bound "$NTB_DRIVER did not bind ${DEV:-the device $NTB_ID}" bind_ntb_driver
	insmod $MODULES/ntb_perf.ko total_order=$PERF_ORDER chunk_order=16
	P=/sys/kernel/debug/ntb_perf/$DEV
	if [ "$ROLE" = a ]; then
		perf_run() {
			timeout 300 sh -c "echo 0 > $P/run" || return 1
			cat $P/run > /tmp/perf
			sed 's/^ */# /' /tmp/perf
			# its threads' "N: copied B bytes in U usecs, R MBytes/s" as the test's metrics
			awk '$2 == "copied" { b += $3; if ($6 > u) u = $6 }
				END { if (u) printf "# metrics: bytes=%d usecs=%d mbytes_s=%.3f\n", b, u, b / u }' /tmp/perf
			grep -q "copied $((1 << PERF_ORDER)) bytes" /tmp/perf
		}
		check perf_run "ntb_perf did not complete a run to the peer" perf_run
		if [ "${PERF_LEAVE:-qemu}" = driver ]; then rmmod ntb_perf; fi
	else
		peer_link() { grep -q "Link status: $1" $P/info; }
		wait_for 120 peer_link up
		check peer_left "ntb_perf still saw a's link after a's run (or never saw it)" \
			wait_for 300 peer_link down
	fi
}

# rejoin: b's QEMU goes away mid-session and b boots again; a sees the link go down (not
# hung) and come back, and both carry on.
phase_rejoin() {
	if [ "$LABEL" = a ]; then
		echo "1..6"
		ntb_tool_up
		check spads_both_ways "b's scratchpad writes did not arrive" spads_swap 1
		check peer_gone "the link stayed up after b's QEMU went away" link_is down 60
		check peer_back "the link did not come back with b" link_is up 180
		check spads_after_rejoin "b's scratchpad writes did not arrive" spads_swap 2
		barrier 3
	elif [ "$BOOT" = 1 ]; then
		echo "1..3"
		ntb_tool_up
		check spads_both_ways "a's scratchpad writes did not arrive" spads_swap 1
	else
		echo "1..3"
		ntb_tool_up
		check spads_after_rejoin "a's scratchpad writes did not arrive" spads_swap 2
		barrier 3
	fi
}

# hear PORT / tell PORT: a one-line message over the netdev, so one guest waits for the other.
hear() { timeout 300 nc -l -p $1 < /dev/null > /dev/null; }
tell() { wait_for 60 sh -c "echo x | timeout 30 nc $PEER_IP $1"; }

# ping_in_turn NAME COUNT INTERVAL PORT: a pings b (once b answers), then b pings a; never
# both at once.  busybox ping reads every ICMP message on a raw socket whose receive buffer
# (~14 KiB) holds one ntb_netdev skb (each is MTU-sized, ~64 KiB): an echo request from the
# peer queued there makes the socket drop the next reply, which the kernel did receive.
ping_in_turn() {
	if [ "$ROLE" = a ]; then
		wait_for 60 ping -c 1 -W 1 $PEER_IP > /dev/null  # until b has its address
		check $1 "ping to the peer lost packets" pings $2 $PEER_IP -i $3
		tell $4
		hear $(($4 + 1))
	else
		hear $4
		wait_for 60 ping -c 1 -W 1 $PEER_IP > /dev/null
		check $1 "ping to the peer lost packets" pings $2 $PEER_IP -i $3
		tell $(($4 + 1))
	fi
}

# transport_up: ntb_transport loaded, then TRANSPORT_LOADED, the line the launcher waits
# for in a's output before it boots b.  Two hosts that enable the link at once can lose it
# (Linux 7.3.4, ntb_transport.c): the first host's probe sees the link down and queues
# link_cleanup (:1006); the second host's LINK_UP raises the link interrupt, which queues
# link_work (:1004) behind it; link_cleanup then cancels that link_work (:976), and nothing
# queues it again.  The first host never writes its scratchpads: no carrier on either side.
TRANSPORT_LOADED="# ntb_transport loaded"
transport_up() { insmod $MODULES/ntb_transport.ko && echo "$TRANSPORT_LOADED"; }

netdev_up() {
	insmod $MODULES/ntb_netdev.ko
	wait_for 10 [ -d /sys/class/net/eth0 ] || return 1
	ip addr add $SELF_IP/24 dev eth0 && ip link set eth0 up
	# no carrier: ntb_transport's queue (its link state among them) says which side stopped
	wait_for 60 grep -q 1 /sys/class/net/eth0/carrier || { netdev_stats; return 1; }
}

phase_netdev() {
	echo "1..7"
	need driver_bound "$NTB_DRIVER did not bind ${DEV:-the device $NTB_ID}" bind_ntb_driver
	transport_up
	need netdev_link_up "eth0 (ntb_netdev) got no carrier" netdev_up
	ping_in_turn ping_100 100 0.02 5010

	# NETDEV_MIB from a to b; then a sends its checksum, which b compares with what it got.
	# (One direction at a time: nc copies stdin to the socket blocking, so two guests'
	# TCP stacks echoing a large stream at each other would fill every buffer and wait.)
	if [ "$ROLE" = b ]; then
		for f in recv want; do  # nc -e runs a program on the connection: one per file
			printf '#!/bin/sh\ncat > /tmp/%s\n' $f > /tmp/$f.sh
			chmod +x /tmp/$f.sh
		done
		timeout 900 nc -l -p 5001 -e /tmp/recv.sh
		timeout 120 nc -l -p 5002 -e /tmp/want.sh
		got=$(md5sum < /tmp/recv | cut -c1-32)
		echo "# received $(wc -c < /tmp/recv) bytes, md5 $got"
		check transfer_${NETDEV_MIB}mib "md5 $got, the sender's $(cat /tmp/want)" [ "$got" = "$(cat /tmp/want)" ]
	else
		dd if=/dev/urandom of=/tmp/data bs=1M count=$NETDEV_MIB 2>/dev/null
		start=$(date +%s)
		# until b listens: a refused connection ends nc at once, so try again
		wait_for 60 sh -c "timeout 900 nc $PEER_IP 5001 < /tmp/data"
		echo "# $NETDEV_MIB MiB sent in $(( $(date +%s) - start )) s"
		sum=$(md5sum < /tmp/data | cut -c1-32)
		check transfer_${NETDEV_MIB}mib "could not send the checksum" \
			wait_for 60 sh -c "echo $sum | timeout 60 nc $PEER_IP 5002"
	fi

	# a unbinds and rebinds its NTB driver (once b watches): both see the link go and come back.
	gone() { ! grep -q 1 /sys/class/net/eth0/carrier 2>/dev/null; }
	if [ "$ROLE" = a ]; then
		hear 5005
		echo $DEV > /sys/bus/pci/drivers/$NTB_DRIVER/unbind
		check link_down "eth0 still there after unbinding" wait_for 10 gone
		sleep 2
		echo $DEV > /sys/bus/pci/drivers/$NTB_DRIVER/bind
		rmmod ntb_netdev
		check relink_up "no carrier after rebinding" netdev_up
	else
		tell 5005
		check link_down "the carrier stayed on while the peer was unbound" wait_for 60 gone
		check relink_up "no carrier once the peer was back" \
			wait_for 120 grep -q 1 /sys/class/net/eth0/carrier
	fi
	ping_in_turn ping_after_relink 10 0.05 5012
	# Neither guest powers off (taking the link down) before the other is done.
	if [ "$ROLE" = a ]; then hear 5003; else tell 5003; fi
}

# bench: ntb_netdev against virtio-net between the same guests.  The virtio NIC (eth0 at
# boot) becomes vnet0, so ntb_netdev's interface is eth0 as in the other phases.  a pings
# b over each, then sends BENCH_BYTES over TCP on each; b times each transfer from the
# connection to the sender's EOF (what a sender's nc sees ends when its socket buffer has it).
BENCH_BYTES=$((16 << 20))
phase_bench() {
	ip link set eth0 name vnet0 && ip addr add ${SELF_IP%.*}.$((${SELF_IP##*.} + 100))/24 dev vnet0
	ip link set vnet0 up
	bind_ntb_driver && transport_up && netdev_up || exit 1
	VNET_PEER=${PEER_IP%.*}.$((${PEER_IP##*.} + 100))
	if [ "$ROLE" = a ]; then
		wait_for 60 ping -c 1 -W 1 $PEER_IP > /dev/null
		wait_for 60 ping -c 1 -W 1 $VNET_PEER > /dev/null
		for net in ntb:$PEER_IP virtio:$VNET_PEER; do
			ping -c 10 -i 0.05 ${net#*:} > /dev/null
			ping -c ${BENCH_PINGS:-200} -i 0.05 -W 5 ${net#*:} | sed "s/^/${net%%:*} ping: /"
		done
		for net in $PEER_IP:5001 $VNET_PEER:5002; do
			wait_for 60 sh -c "head -c $BENCH_BYTES /dev/zero | nc ${net%:*} ${net#*:}" || exit 1
		done
	else
		cat > /tmp/sink.sh <<-'EOF'
		#!/bin/sh
		start=$(cut -d' ' -f1 /proc/uptime)
		n=$(wc -c)
		end=$(cut -d' ' -f1 /proc/uptime)
		echo "$1 transfer: $n bytes in $(awk "BEGIN { print $end - $start }") s" > /dev/console
		EOF
		chmod +x /tmp/sink.sh
		timeout 600 nc -l -p 5001 -e /tmp/sink.sh ntb  # nc -e: the sink reads the connection
		timeout 600 nc -l -p 5002 -e /tmp/sink.sh virtio
	fi
}

# ping: no test (vfio_ep/bench/ep_vntb.py reads it): the netdev up, a pings b BENCH_PINGS
# times after 10 warm-up pings ("ntb ping: " lines), b answers until a says it is done.
phase_ping() {
	bind_ntb_driver && transport_up && netdev_up || exit 1
	if [ "$ROLE" = a ]; then
		wait_for 60 ping -c 1 -W 1 $PEER_IP > /dev/null || exit 1
		ping -c 10 -i 0.05 $PEER_IP > /dev/null
		ping -c ${BENCH_PINGS:-200} -i 0.05 -W 5 $PEER_IP | sed "s/^/ntb ping: /"
		tell 5003
	else
		hear 5003
	fi
}

phase_up() {
	bind_ntb_driver || { echo "vfio-ep: $NTB_DRIVER did not bind $NTB_ID"; exit 3; }
	[ -n "$BOUND_LINE" ] && echo "$BOUND_LINE$NTB_DRIVER $DEV, ntb_netdev at $SELF_IP"
	insmod $MODULES/ntb_transport.ko && netdev_up
}

case "$PHASE" in
up) phase_up; exit ;;
tool) phase_tool ;;
pingpong) phase_pingpong ;;
perf) phase_perf ;;
netdev) phase_netdev ;;
rejoin) phase_rejoin ;;
bench) phase_bench ;;
ping) phase_ping ;;
*) echo "Bail out! unknown phase $PHASE"; exit 2 ;;
esac
dmesg | grep -iE "ntb|epf" | tail -n 15 | sed 's/^/# dmesg: /'
