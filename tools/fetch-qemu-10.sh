#!/usr/bin/env bash
# Unpack QEMU 10.0 from Debian's bookworm-backports into a private prefix, beside (never over)
# the system's QEMU, and write a wrapper that runs it with its own modules and firmware.
#
#   tools/fetch-qemu-10.sh DIR    ->  DIR/qemu-system-x86_64 (the wrapper), DIR/root (the prefix)
#
# apt runs privately under DIR (tools/private-apt.sh): the system's apt configuration is not
# changed.
# Libraries QEMU 10.0 links against all come from bookworm; any missing are installed.
set -euo pipefail

QEMU_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1
SEABIOS_VERSION=1.16.3-2~bpo12+1
PACKAGES=(qemu-system-x86="$QEMU_VERSION" qemu-system-common="$QEMU_VERSION"
          qemu-system-data="$QEMU_VERSION" seabios="$SEABIOS_VERSION")

dir=${1:?usage: $0 DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
apt_dir=$dir/apt
rm -rf "$apt_dir" "$dir/root" "$dir/debs"
mkdir -p "$dir/debs" "$dir/root"
. "$(dirname "$0")/private-apt.sh"
private_apt "$apt_dir"
(cd "$dir/debs" && apt-get "${APT_OPTS[@]}" download "${PACKAGES[@]}")
for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir/root"
done

# Everything the packages depend on, except each other, from the system's own suites.
needed=$(for deb in "$dir"/debs/*.deb; do dpkg-deb -f "$deb" Depends; echo; done |
         tr ',' '\n' | sed 's/|.*//; s/(.*//; s/[[:space:]]//g' |
         grep -vxE 'qemu-system-(x86|common|data)|seabios|' | sort -u)
missing=$(for p in $needed; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "installing from bookworm:" $missing
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

modules=$dir/root/usr/lib/x86_64-linux-gnu/qemu
unresolved=$(ldd "$dir/root/usr/bin/qemu-system-x86_64" "$modules"/*.so | grep 'not found' || true)
if [ -n "$unresolved" ]; then
    echo "QEMU 10.0 needs libraries that are not installed:" >&2
    echo "$unresolved" >&2
    exit 1
fi

# -L paths are searched in order before the built-in ones (which hold 7.2's firmware).
cat > "$dir/qemu-system-x86_64.tmp" <<'WRAPPER'
#!/bin/sh
# QEMU 10.0 from bookworm-backports, unpacked beside this script by tools/fetch-qemu-10.sh.
root=$(dirname "$(readlink -f "$0")")/root
QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu exec "$root/usr/bin/qemu-system-x86_64" \
    -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
WRAPPER
chmod +x "$dir/qemu-system-x86_64.tmp"
mv "$dir/qemu-system-x86_64.tmp" "$dir/qemu-system-x86_64"
rm -rf "$dir/debs" "$apt_dir"
"$dir/qemu-system-x86_64" --version | head -1
