#!/bin/sh
# Stage 2 of the veilnet VM (runs as PID 1 on the overlay of the host's root): a minimal boot, the
# modules the command needs, the command, its exit status on the results share, power off.
R=/mnt/vm-results
fail() { echo "veilnet-vm: $*" | tee -a "$R/output.log" > /dev/console; echo 97 > "$R/exit-status"; sync; echo o > /proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc 2>>"$R/output.log" || echo "proc mount failed" >> "$R/output.log"
mount -t sysfs sysfs /sys 2>>"$R/output.log"
mount -t devtmpfs devtmpfs /dev 2>>"$R/output.log"
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp stays the overlay of the host's (writes go to the tmpfs upper layer): a checkout under /tmp, where a
# fresh clone often lives, must stay visible to the command.
mkdir -p /dev/pts /dev/shm /run/netns /run/lock
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount --make-rshared /
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
rm -f /var/run 2>/dev/null; ln -sfn /run /var/run
hostname veilnet-vm
ip link set lo up
echo 1 > /proc/sys/kernel/sysrq
for m in $(cat "$R/modules"); do
    modprobe "$m" || fail "module $m could not be loaded (kernel $(uname -r))"
done
: > "$R/booted"
echo "veilnet-vm: kernel $(uname -r), $(nproc) CPUs, modules: $(tr '\n' ' ' < "$R/modules")" >> "$R/output.log"
# a snapshot of the guest every 30 s (load, memory, the tmpfs upper layer, the busiest processes): when the
# harness kills a guest that did not finish, it prints the last one, which tells a hung process from a starved
# or out-of-memory guest
( while sleep 30; do
    { date -u; cat /proc/loadavg; free -m | sed -n 2p; df -m / | tail -1
      ps -eo pid,stat,etime,time,args --sort=-time | head -10 | cut -c1-220; } > "$R/heartbeat.tmp" 2>&1
    mv "$R/heartbeat.tmp" "$R/heartbeat.log"
  done ) < /dev/null > /dev/null 2>&1 &
sh "$R/command.sh" >> "$R/output.log" 2>&1 < /dev/null
status=$?
echo "$status" > "$R/exit-status"
sync
echo o > /proc/sysrq-trigger
sleep 30
