#!/bin/busybox sh
# Stage 1, in the initramfs: load the drivers for the shared root, put a tmpfs overlay on the
# host's read-only root, and switch to it. Any failure exits, which panics the kernel, which
# ends QEMU (-no-reboot) without an exit line: the host reports an infrastructure failure.
b=/bin/busybox
fail() {
	$b echo "quicklane-vm: stage 1: $*"
	exit 1
}
$b mkdir -p /proc /mnt/lower /mnt/rw /mnt/root
$b mount -t proc proc /proc || fail "mounting /proc"
$b mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
for m in $($b cat /modules/order); do
	$b insmod "/modules/$m" || fail "insmod $m"
done
# Bounded retry: the virtio device may still be probing when its driver's insmod returns.
tries=0
until $b mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \
	ql-root /mnt/lower; do
	tries=$((tries + 1))
	[ "$tries" -lt 20 ] || fail "mounting the host root over 9p"
	$b sleep 0.1
done
$b mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "mounting the overlay's tmpfs"
$b mkdir -p /mnt/rw/upper /mnt/rw/work
$b mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
	overlay /mnt/root || fail "mounting the overlay"
$b cp /stage2 /mnt/root/ql-vm-stage2 || fail "copying stage 2"
$b cp /job.sh /mnt/root/ql-vm-job.sh || fail "copying the job"
$b umount /proc
$b mount --move /dev /mnt/root/dev || fail "moving /dev"
# switch_root, not chroot: pid 1's root must be the new one for the kernel's on-demand
# module loading (veth, sch_fq, ...) to find modprobe and the modules.
exec $b switch_root /mnt/root /ql-vm-stage2
