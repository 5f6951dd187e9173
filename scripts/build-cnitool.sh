#!/usr/bin/env bash
# Builds `cnitool` (CNI's reference client; Debian ships its source, not the binary) from
# Debian's golang-github-appc-cni source package with Debian's Go, offline, GOPATH mode.
# The deb-src entry lives in a private apt directory, so the machine's apt sources are left
# as they were. Usage: build-cnitool.sh [DEST] (default /usr/local/bin/cnitool).
set -euo pipefail
dest=${1:-/usr/local/bin/cnitool}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/apt/lists/partial" "$work/src"
cat > "$work/apt/src.sources" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_private=(-o APT::Sandbox::User=root -o Dir::Etc::SourceList="$work/apt/src.sources" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache="")
apt-get "${apt_private[@]}" -qq update
(cd "$work/src" && apt-get "${apt_private[@]}" -qq source --download-only golang-github-appc-cni)
tar -xf "$work"/src/golang-github-appc-cni_*.orig.tar.* -C "$work/src"
tool=$(find "$work/src" -path '*/cnitool/cnitool.go' | head -1)
[ -n "$tool" ] || { echo "build-cnitool: cnitool.go not in the source package" >&2; exit 1; }

gopath="$work/gopath"
mkdir -p "$gopath/src/cnitool"
cp "$tool" "$gopath/src/cnitool/"
(cd "$gopath/src/cnitool" && GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOFLAGS= \
    GOCACHE="$work/gocache" go build -o "$dest" .)
echo "build-cnitool: $dest ($("$dest" 2>&1 | head -1 || true))"
