#!/usr/bin/env bash
# Installs everything tenet needs to build, test and run its lab on Debian 12.
# Idempotent; run as root. See README.md.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages; tests need namespaces)" >&2
    exit 1
fi

packages=(
    protobuf-compiler libprotobuf-dev  # etcd-client's build script needs protoc + well-known protos
    etcd-server etcd-client            # the datastore (tests start their own etcd)
    iproute2                           # ip netns for the testbed
    iptables ipset conntrack nftables  # concentrator firewall (conntrack: floating-IP release; nft: floating-IP maps)
    dnsmasq-base                       # DHCP per tenant bridge
    udhcpc                             # DHCP client inside test workloads
    tcpdump strace iputils-ping iperf3 # traffic proofs and benchmarks
    bird2                              # routed mode: the BGP speaker tenet configures
    gobgpd                             # routed mode tests: an independent BGP peer (upstream router)
    systemd                            # systemd-analyze verify for the packaged units
    containernetworking-plugins        # CNI tests/bench: the reference bridge + host-local plugins
    golang-go golang-github-appc-cni-dev golang-github-containernetworking-plugins-dev  # cnitool's build
    docker.io busybox-static           # Docker driver test: a real dockerd, an image made from busybox
    clang libbpf-dev                   # the eBPF GRE datapath: build.rs compiles it (headers from libbpf-dev)
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A real kernel gretap for tests/qemu_gretap.rs: qemu (without its GUI recommendations) and
# Debian's cloud kernel, unpacked into /var/cache/tenet/guest-kernel.
if ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed"; then
    echo "setup.sh: installing qemu-system-x86"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
fi
"$(dirname "$0")/fetch-guest-kernel.sh"

# CI checks style: make sure the toolchain has its formatter and linter.
for component in rustfmt clippy; do
    cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done

# The Debian package (tests/packaging.rs, packaging/README.md) is built with cargo-deb.
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb

# CNI's reference client, built from Debian's source package (not packaged as a binary).
command -v cnitool >/dev/null || "$(dirname "$0")/build-cnitool.sh" /usr/local/bin/cnitool

for tool in etcd protoc ip cargo bird gobgpd cargo-deb systemd-analyze cnitool dockerd unshare nsenter clang qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "setup.sh: $tool not found after install" >&2; exit 1; }
done
echo "setup.sh: ready ($(etcd --version | head -1), $(protoc --version))"
