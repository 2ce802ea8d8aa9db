# ep_guest.sh NAMES SETUP [CMD [CUE]]: the EP guest of `vfio-ep run --ep-guest`.  Loads
# vfio-ep's EPC driver (controllers/NAME appears in configfs for each of NAMES, one word:
# pci-epf-ntb's two controllers are "PRIMARY SECONDARY") and the endpoint functions, runs the
# board's setup script SETUP as a board's shell would (from /sys/kernel/config/pci_ep, each
# line whatever becomes of the one before: a line the kernel refuses says so and the rest goes
# on; each line is echoed first, "vfio-ep: setup: LINE", so a complaint names its line),
# checks that it started the controllers, runs CMD (--ep-exec, or the EP side of a suite) if
# given and reports its exit status, then serves until the run stops this guest.
# With CUE, a serial port to the host (--ep-shell: the console is the user's terminal, so the
# host cannot read it), the guest says it is ready there too and waits for the host's one
# line, which comes once the RC guest's driver has the function (or says why not); it shows
# the line, runs CMD, and ends with CMD's exit status: the run ends with the shell.
names=$1 setup=$2 cmd=$3 cue=$4
ready="vfio-ep: EP guest ready"
cfs=/sys/kernel/config/pci_ep
# dw-edma first: the EPC driver hands the eDMA to it (dma_channels=dw-edma), so uses its symbols
[ -f /lib/modules/dw-edma.ko ] && insmod /lib/modules/dw-edma.ko
insmod /lib/modules/vfio-ep-epc.ko || { echo "vfio-ep: the EPC driver did not load"; exit 3; }
for m in pci-epf-test pci-epf-ntb pci-epf-vntb; do
	[ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
done
grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs none /sys/kernel/config
for name in $names; do
	if [ ! -d "$cfs/controllers/$name" ]; then
		echo "vfio-ep: no controllers/$name in configfs; there are:" \
			"$(ls $cfs/controllers)"
		exit 3
	fi
done
(cd $cfs && PS4='vfio-ep: setup: ' sh -x "$setup" 2>&1)
for name in $names; do
	if [ "$(cat "$cfs/controllers/$name/start")" != 1 ]; then
		echo "vfio-ep: the setup script did not start controllers/$name" \
			"(echo 1 > controllers/$name/start)"
		exit 3
	fi
done
echo "$ready"
if [ -n "$cue" ]; then
	exec 3<>"$cue"
	echo "$ready" >&3
	echo "vfio-ep: the RC guest boots; waiting for its driver to bind the function"
	read -r said <&3
	exec 3<&-
	echo "$said"
	sh -c "$cmd"
	exit
fi
if [ -n "$cmd" ]; then
	sh -c "$cmd"
	echo "vfio-ep: EP command exited $?"
fi
while :; do sleep 3600; done
