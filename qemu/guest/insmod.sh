#!/bin/sh
# The guest's insmod: busybox's, plus what modprobe adds from the kernel command line for the
# module being loaded: NAME.dyndbg="QUERY" (run --dyndbg 'module NAME QUERY' puts it there),
# so a module's debug messages are on from its first line, init and probe included.
ko=$1
shift
name=$(basename "$ko" .ko | tr - _)
query=$(awk -v key="$name.dyndbg=" '{
	s = " " $0
	i = index(s, " " key)
	if (!i) exit
	s = substr(s, i + 1 + length(key))
	if (substr(s, 1, 1) == "\"") { s = substr(s, 2); print substr(s, 1, index(s, "\"") - 1) }
	else { split(s, w, " "); print w[1] }
}' /proc/cmdline)
# busybox joins the arguments with spaces: a query of several words goes quoted.
if [ -n "$query" ]; then
	exec /bin/busybox insmod "$ko" "$@" "dyndbg=\"$query\""
fi
exec /bin/busybox insmod "$ko" "$@"
