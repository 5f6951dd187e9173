#!/usr/bin/env bash
# Fetches a Linux kernel that has ip_gre, for tests/qemu_gretap.rs: Debian's cloud kernel
# image and the modules the guest loads (virtio-net, gre, ip_tunnel, ip_gre), unpacked from
# the package with dpkg -x — never installed into /boot. Idempotent.
# Usage: fetch-guest-kernel.sh [DIR]   (default /var/cache/tenet/guest-kernel)
set -euo pipefail

dir=${1:-/var/cache/tenet/guest-kernel}
modules=(virtio_ring virtio failover net_failover virtio_net virtio_pci_modern_dev
         virtio_pci_legacy_dev virtio_pci ip_tunnel gre ip_gre)

if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules/ip_gre.ko" ]; then
    exit 0
fi
latest() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
}
pkg=$(latest)
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(latest)
fi
if [ -z "$pkg" ]; then
    echo "fetch-guest-kernel.sh: no linux-image-cloud-amd64 in the package lists (apt-get update?)" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
(cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1)
dpkg -x "$tmp"/*.deb "$tmp/root"
mkdir -p "$dir/modules"
cp "$tmp"/root/boot/vmlinuz-* "$dir/vmlinuz"
for m in "${modules[@]}"; do
    f=$(find "$tmp/root/lib/modules" -name "$m.ko" | head -1)
    if [ -z "$f" ]; then
        echo "fetch-guest-kernel.sh: $pkg has no $m.ko" >&2
        exit 1
    fi
    cp "$f" "$dir/modules/"
done
printf '%s\n' "${modules[@]}" > "$dir/modules/load-order"
echo "$pkg" > "$dir/package"
echo "fetch-guest-kernel.sh: $pkg in $dir"
