# Helpers of vfio-ep's guest suites (sourced): TAP 13 lines, checks, polling, ping.
# The sourcing script sets TAP_PREFIX (what each test name starts with) and prints its plan.

N=0
ok() { N=$((N + 1)); echo "ok $N $TAP_PREFIX$1"; }
not_ok() { N=$((N + 1)); echo "not ok $N $TAP_PREFIX$1"; echo "# $2"; }
# check NAME REASON COMMAND...: one test, passed when COMMAND succeeds.
check() {
	name=$1; reason=$2; shift 2
	if "$@"; then ok "$name"; else not_ok "$name" "$reason"; fi
}
# need NAME REASON COMMAND...: a check the script's later tests cannot do without.  When it
# fails, TAP's "Bail out!" ends the script: the later tests are reported as not run at
# once, where each would wait out its own timeout first (minutes, in a guest pair).
need() {
	name=$1; reason=$2; shift 2
	if "$@"; then ok "$name"; return 0; fi
	not_ok "$name" "$reason"
	echo "Bail out! $TAP_PREFIX$name: $reason"
	exit 1
}
# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds.
wait_for() {
	tries=$(($1 * 10)); shift
	while [ $tries -gt 0 ]; do
		"$@" && return 0
		sleep 0.1
		tries=$((tries - 1))
	done
	return 1
}
# pings COUNT ADDRESS [PING OPTIONS]: true when ADDRESS answered COUNT echo requests.
# busybox ping gives the last reply only max(1 s, 2 x the slowest RTT) before it stops, and
# a TCG guest sharing two host cores can stall longer than that: one more request goes out,
# and only the first COUNT are judged, by sequence number.
pings() {
	count=$1; addr=$2; shift 2
	ping -c $((count + 1)) -W 5 "$@" "$addr" > /tmp/ping 2>&1
	missing=$(awk -v n="$count" '
		match($0, /seq=[0-9]+/) { got[substr($0, RSTART + 4, RLENGTH - 4)] = 1 }
		END { for (i = 0; i < n; i++) if (!(i in got)) printf " %d", i }' /tmp/ping)
	grep round-trip /tmp/ping | sed 's/^/# /'
	rtt_metrics "$count" < /tmp/ping
	if [ -n "$missing" ]; then
		echo "# no reply to seq$missing"
		grep -v "bytes from" /tmp/ping | sed 's/^/# /'
		netdev_stats
		return 1
	fi
	echo "# $count of $count answered by $addr"
}
# rtt_metrics COUNT < PING_OUTPUT: the round trips of sequence numbers below COUNT as a
# "# metrics:" line (the host's results take it into the next test's): the first apart (it
# pays ARP and cold paths), then min/avg/max/mdev of the others, mdev as iputils' ping
# computes it (busybox ping prints none; busybox awk has no sqrt: Newton's method).
rtt_metrics() {
	awk -v n="$1" '
		function root(x,  r, i) {
			if (x <= 0) return 0
			for (r = x + 1; i < 100; i++) r = (r + x / r) / 2
			return r
		}
		/seq=[0-9]+ .*time=[0-9.]+/ {
			split($0, w, "seq="); seq = w[2] + 0  # the number the field starts with
			split($0, w, "time="); t = w[2] + 0
			if (seq >= n) next
			if (seq == 0) { first = t; next }
			if (!k || t < lo) lo = t
			if (!k || t > hi) hi = t
			k++; sum += t; sq += t * t
		}
		END {
			if (first == "" && !k) exit
			line = "# metrics:"
			if (first != "") line = line sprintf(" rtt_first_ms=%.3f", first)
			if (k) {
				avg = sum / k
				line = line sprintf(" rtt_min_ms=%.3f rtt_avg_ms=%.3f rtt_max_ms=%.3f" \
					" rtt_mdev_ms=%.3f", lo, avg, hi, root(sq / k - avg * avg))
			}
			print line sprintf(" replies=%d", k + (first != ""))
		}'
}
# netdev_stats: eth0's non-zero counters and ntb_transport's queue statistics, as TAP
# diagnostics (for a failed network check: where did the packet go?).
netdev_stats() {
	for f in /sys/class/net/eth0/statistics/*; do
		v=$(cat "$f" 2>/dev/null)
		[ "${v:-0}" != 0 ] && echo "# eth0 ${f##*/} $v"
	done
	grep -E "^(Ip|Icmp|Udp):" /proc/net/snmp | sed 's/^/# snmp /'
	for f in /sys/kernel/debug/ntb_transport/*/qp*/stats; do
		[ -f "$f" ] && grep -iE "err|empty|full|pkts|index|link|db" "$f" | sed 's/^/# qp: /'
	done
}
# insmod as the guest's /sbin/insmod (the command line's NAME.dyndbg, as modprobe would add):
# busybox sh runs its own applet before looking at PATH.
insmod() { /sbin/insmod "$@"; }
# builtin_or_module NAME: a driver that is built in, or a module in /lib/modules to load
# (Linux 6.12's ntb_hw_epf can only be a module).
builtin_or_module() {
	[ -f "/lib/modules/$1.ko" ] && insmod "/lib/modules/$1.ko"
	return 0
}

# hex_of FILE: the number in FILE (ntb_tool's debugfs prints "%#llx": 0x1f, or 0), or failure
# (a read that failed, say): a non-number in $(( )) would end the whole script. One read():
# ntb_tool formats the value again on every read() call, so cat's second read can return the
# tail of a newer, longer value ("0" then "1000" after a doorbell came in: "0\n1000").
hex_of() {
	v=$(dd if="$1" bs=64 count=1 2>/dev/null)
	case "$v" in
	0x*) case "${v#0x}" in '' | *[!0-9a-fA-F]*) return 1 ;; esac ;;
	'' | 0?* | *[!0-9]*) return 1 ;;
	esac
	echo "$v"
}
