#!/bin/sh
# /init of the vmigrate Linux guest: mount the basics, then run the workload
# with every vmigrate.KEY=VALUE word of the kernel command line as KEY=VALUE.
# vmigrate.shell=1 drops to a shell when the workload exits (else power off).
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

args=""
shell=0
for word in $(cat /proc/cmdline); do
    case "$word" in
        vmigrate.shell=*) shell="${word#vmigrate.shell=}" ;;
        vmigrate.*=*) args="$args ${word#vmigrate.}" ;;
    esac
done

echo "vmigrate-guest: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s, workload$args"
# shellcheck disable=SC2086 # word splitting of $args is intended
/bin/workload $args
echo "vmigrate-guest: workload exited with status $?"
if [ "$shell" = 1 ]; then
    exec setsid cttyhack sh
fi
poweroff -f
