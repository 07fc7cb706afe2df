#!/bin/sh
# Stage 2, pid 1 on the host's root (read-only, tmpfs overlay): the mounts a node has, the
# booted kernel's modules where modprobe looks, then the job and its exit line. /tmp keeps the
# host's view (writable through the overlay): the workspace under test may live there.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
fail() {
	echo "quicklane-vm: stage 2: $*"
	exit 1
}
. /ql-vm-job.sh || fail "reading the job"
mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t tmpfs tmpfs /run || fail "mounting /run"
mount -t bpf bpf /sys/fs/bpf || fail "mounting bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mounting cgroup2"
mount -t debugfs debugfs /sys/kernel/debug || fail "mounting debugfs"
mkdir -p /run/ql-out /lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L ql-out /run/ql-out || fail "mounting the results share"
ln -sfn "$QL_MODULES" "/lib/modules/$(uname -r)" || fail "linking the modules"
ip link set lo up || fail "bringing lo up"
ql_job
code=$?
echo "QUICKLANE-VM-EXIT $QL_NONCE $code"
sync
# Immediate reset; QEMU runs with -no-reboot, so this ends it.
echo b >/proc/sysrq-trigger
