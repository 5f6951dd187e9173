//! Segmentation and coalescing offloads for the tunnel taps.
//!
//! The taps are opened with a `virtio_net_hdr` in front of every frame and with TCP
//! segmentation offload on, so the kernel hands the engine whole 64 KB TCP super-frames
//! instead of 45 MTU-sized ones. The engine cuts them into MTU-sized segments itself (TSO) —
//! on the wire they are exactly what kernel gretap would send. In the other direction it
//! merges consecutive in-order segments of one TCP flow into one super-frame (GRO) and writes
//! that to the tap once. This is what virtio-net does between a guest and its host.

use std::ops::Range;

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_ECN: u8 = 0x80;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// Largest IPv4 datagram, which bounds a coalesced super-frame.
const MAX_IP_LEN: usize = 65535;

/// `struct virtio_net_hdr` (little-endian, as the tap uses it on this architecture).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    pub fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Adds `data` to a ones'-complement accumulator (RFC 1071), 32 bits at a time. `data` must
/// start at an even offset of the checksummed region.
#[inline]
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds an accumulator to 16 bits (not inverted).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn pseudo_v4(ip: &[u8], tcp_len: usize) -> u64 {
    sum(&ip[12..20], u64::from(IPPROTO_TCP) + tcp_len as u64)
}

fn ipv4_header_checksum(ip: &mut [u8]) {
    ip[10..12].fill(0);
    let c = !fold(sum(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Completes the checksum of a frame the kernel left CHECKSUM_PARTIAL: the field at
/// `start + offset` holds the pseudo-header sum; the sum from `start` to the end goes there.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start + offset;
    if start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let c = !fold(sum(&frame[start..], 0));
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Cuts one IPv4 TCP super-frame into MSS-sized segments.
#[derive(Debug)]
pub struct TcpSegmenter {
    l3: usize,
    l4: usize,
    hlen: usize,
    mss: usize,
    payload: usize,
    seq: u32,
    ip_id: u16,
    flags: u8,
}

impl TcpSegmenter {
    /// `None` when the frame is not a well-formed IPv4 TCP super-frame.
    pub fn new(frame: &[u8], hdr: &VnetHdr) -> Option<Self> {
        if frame.len() < ETH_HLEN + 40 || be16(frame, 12) != ETH_P_IP {
            return None;
        }
        let l3 = ETH_HLEN;
        let ihl = usize::from(frame[l3] & 0x0f) * 4;
        let l4 = l3 + ihl;
        if frame[l3] >> 4 != 4 || ihl < 20 || frame[l3 + 9] != IPPROTO_TCP || l4 + 20 > frame.len()
        {
            return None;
        }
        let hlen = l4 + usize::from(frame[l4 + 12] >> 4) * 4;
        let mss = usize::from(hdr.gso_size);
        if hlen > frame.len() || hlen < l4 + 20 || mss == 0 {
            return None;
        }
        Some(TcpSegmenter {
            l3,
            l4,
            hlen,
            mss,
            payload: frame.len() - hlen,
            seq: be32(frame, l4 + 4),
            ip_id: be16(frame, l3 + 4),
            flags: frame[l4 + 13],
        })
    }

    pub fn count(&self) -> usize {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Bytes of Ethernet + IP + TCP header in front of every segment.
    pub fn header_len(&self) -> usize {
        self.hlen
    }

    /// Writes segment `i`'s headers (with lengths, sequence number, flags and both
    /// checksums) into `out[..header_len()]` and returns the range of `frame` that is its
    /// payload.
    pub fn segment(&self, frame: &[u8], i: usize, out: &mut [u8]) -> Range<usize> {
        let start = self.hlen + i * self.mss;
        let end = (start + self.mss).min(frame.len());
        let seg = &mut out[..self.hlen];
        seg.copy_from_slice(&frame[..self.hlen]);
        let tcp_len = self.hlen - self.l4 + (end - start);
        let ip_len = (self.l4 - self.l3 + tcp_len) as u16;
        seg[self.l3 + 2..self.l3 + 4].copy_from_slice(&ip_len.to_be_bytes());
        let id = self.ip_id.wrapping_add(i as u16);
        seg[self.l3 + 4..self.l3 + 6].copy_from_slice(&id.to_be_bytes());
        ipv4_header_checksum(&mut seg[self.l3..self.l4]);
        let seq = self.seq.wrapping_add((i * self.mss) as u32);
        seg[self.l4 + 4..self.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = self.flags;
        if i + 1 < self.count() {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[self.l4 + 13] = flags;
        seg[self.l4 + 16..self.l4 + 18].fill(0);
        let acc = pseudo_v4(&seg[self.l3..self.l4], tcp_len);
        let acc = sum(&frame[start..end], sum(&seg[self.l4..self.hlen], acc));
        let c = !fold(acc);
        seg[self.l4 + 16..self.l4 + 18].copy_from_slice(&c.to_be_bytes());
        start..end
    }
}

/// What the coalescer needs to know about one received TCP/IPv4 segment.
#[derive(Debug, Clone, Copy)]
pub struct TcpSegment {
    l4: usize,
    hlen: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

/// Recognises a segment that may be merged: IPv4 without options or fragmentation, TCP with
/// ACK and data and no SYN/FIN/RST/URG/CWR, and a correct TCP checksum (a bad one is passed on
/// unmerged, for the receiving stack to drop).
pub fn mergeable_segment(frame: &[u8]) -> Option<TcpSegment> {
    if frame.len() < ETH_HLEN + 40 || be16(frame, 12) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] != 0x45 || ip[9] != IPPROTO_TCP || be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    let ip_len = usize::from(be16(ip, 2));
    if ip_len > ip.len() || ip_len < 40 {
        return None;
    }
    let l4 = ETH_HLEN + 20;
    let thl = usize::from(frame[l4 + 12] >> 4) * 4;
    let flags = frame[l4 + 13];
    if thl < 20 || 20 + thl >= ip_len {
        return None;
    }
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) != 0 {
        return None;
    }
    let tcp_len = ip_len - 20;
    let acc = sum(&frame[l4..l4 + tcp_len], pseudo_v4(ip, tcp_len));
    if fold(acc) != 0xffff {
        return None;
    }
    Some(TcpSegment {
        l4,
        hlen: l4 + thl,
        seq: be32(frame, l4 + 4),
        payload: tcp_len - thl,
        psh: flags & TCP_PSH != 0,
    })
}

/// A TCP or UDP/IPv4 frame whose checksum field holds only the pseudo-header sum: the
/// kernel that sent it left the checksum to the NIC (CHECKSUM_PARTIAL), and the underlay —
/// a veth — never computed it. Returns the vnet header that hands the same job to this
/// side's kernel, as virtio-net does; `None` when the checksum is not such a partial one.
pub fn partial_checksum(frame: &[u8]) -> Option<VnetHdr> {
    if frame.len() < ETH_HLEN + 28 || be16(frame, 12) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let offset = match ip[9] {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return None,
    };
    if ip[0] >> 4 != 4 || ihl < 20 || be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    let ip_len = usize::from(be16(ip, 2));
    if ip_len > ip.len() || ihl + offset + 2 > ip_len {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let partial = fold(sum(&ip[12..20], u64::from(ip[9]) + (ip_len - ihl) as u64));
    (be16(frame, l4 + offset) == partial).then_some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: l4 as u16,
        csum_offset: offset as u16,
    })
}

/// A TCP/IPv4 frame larger than the tap's `mtu` is a super-frame that a kernel sender kept
/// whole (an eBPF or kernel GRE peer over an underlay that never segments, such as a veth):
/// prepares it to be written as a GSO frame, which the kernel cuts to `mtu`. The TCP checksum
/// field gets the pseudo-header sum for the kernel to complete (a merged packet's own is not
/// valid for the whole). `None` for anything else.
pub fn oversized_tcp(frame: &mut [u8], mtu: usize) -> Option<VnetHdr> {
    if frame.len() <= ETH_HLEN + mtu || be16(frame, 12) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP || be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    let ip_len = usize::from(be16(ip, 2));
    let l4 = ETH_HLEN + ihl;
    if ip_len > ip.len() || frame.len() < l4 + 20 {
        return None;
    }
    let thl = usize::from(frame[l4 + 12] >> 4) * 4;
    if thl < 20 || ihl + thl >= ip_len || ihl + thl >= mtu {
        return None;
    }
    let tcp_len = ip_len - ihl;
    let partial = fold(pseudo_v4(&frame[ETH_HLEN..ETH_HLEN + ihl], tcp_len));
    frame[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
    let ecn = if frame[l4 + 13] & TCP_CWR != 0 {
        GSO_ECN
    } else {
        0
    };
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4 | ecn,
        hdr_len: (l4 + thl) as u16,
        gso_size: (mtu - ihl - thl) as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    })
}

/// Merges consecutive segments of one flow into a super-frame with a vnet header in front.
pub struct Coalescer {
    buf: Vec<u8>,
    len: usize,
    segments: usize,
    hlen: usize,
    l4: usize,
    mss: usize,
    next_seq: u32,
    /// A short or PSH segment ends the run.
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Coalescer {
            buf: vec![0; VNET_HDR_LEN + ETH_HLEN + MAX_IP_LEN],
            len: 0,
            segments: 0,
            hlen: 0,
            l4: 0,
            mss: 0,
            next_seq: 0,
            closed: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segments == 0
    }

    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Starts a new run with `frame` (the previous one must have been taken).
    pub fn start(&mut self, frame: &[u8], seg: &TcpSegment) {
        debug_assert!(self.is_empty());
        let end = seg.hlen + seg.payload;
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + end].copy_from_slice(&frame[..end]);
        self.len = end;
        self.segments = 1;
        self.hlen = seg.hlen;
        self.l4 = seg.l4;
        self.mss = seg.payload;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.closed = seg.psh;
    }

    /// Appends `frame` if it continues the run: same addresses, ports, ack, window and
    /// options, the next sequence number, no larger than the first segment.
    pub fn try_append(&mut self, frame: &[u8], seg: &TcpSegment) -> bool {
        if self.is_empty() || self.closed || seg.hlen != self.hlen || seg.seq != self.next_seq {
            return false;
        }
        if seg.payload > self.mss || self.len + seg.payload > ETH_HLEN + MAX_IP_LEN {
            return false;
        }
        let head = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.hlen];
        let ip = ETH_HLEN;
        let l4 = self.l4;
        // MACs and ethertype; TOS; TTL and protocol; addresses; ports; ack; flags (but PSH)
        // and window; options.
        let same = head[..ETH_HLEN] == frame[..ETH_HLEN]
            && head[ip + 1] == frame[ip + 1]
            && head[ip + 8..ip + 10] == frame[ip + 8..ip + 10]
            && head[ip + 12..ip + 20] == frame[ip + 12..ip + 20]
            && head[l4..l4 + 4] == frame[l4..l4 + 4]
            && head[l4 + 8..l4 + 12] == frame[l4 + 8..l4 + 12]
            && head[l4 + 12] == frame[l4 + 12]
            && head[l4 + 13] & !TCP_PSH == frame[l4 + 13] & !TCP_PSH
            && head[l4 + 14..l4 + 16] == frame[l4 + 14..l4 + 16]
            && head[l4 + 20..self.hlen] == frame[l4 + 20..self.hlen];
        if !same {
            return false;
        }
        let start = VNET_HDR_LEN + self.len;
        self.buf[start..start + seg.payload]
            .copy_from_slice(&frame[seg.hlen..seg.hlen + seg.payload]);
        self.len += seg.payload;
        self.segments += 1;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        if seg.psh {
            self.buf[VNET_HDR_LEN + l4 + 13] |= TCP_PSH;
        }
        self.closed = seg.psh || seg.payload < self.mss;
        true
    }

    /// Finishes the run and returns it as vnet header + frame, ready for one tap write.
    /// A single segment goes out unchanged; a merged one as a GSO frame whose TCP checksum
    /// the kernel completes (each merged segment's checksum was verified on the way in).
    pub fn take(&mut self) -> &[u8] {
        let mut hdr = VnetHdr::default();
        if self.segments > 1 {
            let f = &mut self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.len];
            let ip_len = (self.len - ETH_HLEN) as u16;
            f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&ip_len.to_be_bytes());
            ipv4_header_checksum(&mut f[ETH_HLEN..ETH_HLEN + 20]);
            let tcp_len = self.len - self.l4;
            let partial = fold(pseudo_v4(&f[ETH_HLEN..ETH_HLEN + 20], tcp_len));
            f[self.l4 + 16..self.l4 + 18].copy_from_slice(&partial.to_be_bytes());
            hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: self.hlen as u16,
                gso_size: self.mss as u16,
                csum_start: self.l4 as u16,
                csum_offset: 16,
            };
        }
        hdr.write(
            (&mut self.buf[..VNET_HDR_LEN])
                .try_into()
                .expect("10 bytes"),
        );
        let total = VNET_HDR_LEN + self.len;
        self.segments = 0;
        self.closed = true;
        &self.buf[..total]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP super-frame as the kernel hands it to a TSO tap: one header, a large
    /// payload, lengths of the whole, checksum left partial.
    fn super_frame(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let ip_len = (20 + 32 + payload.len()) as u16;
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 2, 10, 1, 0, 3,
        ];
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![
            0x9c, 0x40, 0x13, 0x89, 0, 0, 0x10, 0, 0, 0, 0, 7, 0x80, flags, 0x01, 0xf5, 0, 0, 0, 0,
        ];
        tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]); // NOP NOP timestamps
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn segment_then_coalesce_is_the_identity_with_valid_checksums() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let frame = super_frame(&payload, TCP_ACK | TCP_PSH);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1406,
            csum_start: 34,
            csum_offset: 16,
        };
        let seg = TcpSegmenter::new(&frame, &hdr).unwrap();
        assert_eq!((seg.count(), seg.header_len()), (8, 66));
        let mut co = Coalescer::new();
        let mut wire = Vec::new();
        for i in 0..seg.count() {
            let mut h = [0u8; 128];
            let r = seg.segment(&frame, i, &mut h);
            let mut pkt = h[..66].to_vec();
            pkt.extend_from_slice(&frame[r]);
            // Every segment is a valid packet on its own: IP and TCP checksums verify.
            assert_eq!(fold(sum(&pkt[14..34], 0)), 0xffff, "IP checksum of {i}");
            let info = mergeable_segment(&pkt).expect("valid TCP segment");
            assert_eq!(info.psh, i == 7, "PSH only on the last");
            if co.is_empty() {
                co.start(&pkt, &info);
            } else {
                assert!(co.try_append(&pkt, &info), "segment {i} continues the run");
            }
            wire.push(pkt);
        }
        assert_eq!(co.segments(), 8);
        let merged = co.take().to_vec();
        let vh = VnetHdr::parse(merged[..10].try_into().unwrap());
        assert_eq!(
            (vh.gso_type, vh.gso_size, vh.hdr_len, vh.csum_start),
            (GSO_TCPV4, 1406, 66, 34)
        );
        let body = &merged[10..];
        assert_eq!(body.len(), frame.len());
        assert_eq!(&body[66..], &payload[..], "payload in order");
        assert_eq!(
            u16::from_be_bytes([body[16], body[17]]) as usize,
            body.len() - 14
        );
        assert_eq!(body[47] & TCP_PSH, TCP_PSH);
        // A gap in sequence numbers is not merged.
        let mut co = Coalescer::new();
        let first = mergeable_segment(&wire[0]).unwrap();
        co.start(&wire[0], &first);
        assert!(!co.try_append(&wire[2], &mergeable_segment(&wire[2]).unwrap()));
        // Nor is a segment whose checksum is wrong.
        let mut bad = wire[1].clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(mergeable_segment(&bad).is_none());
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut f = super_frame(b"hello, world", TCP_ACK);
        let tcp_len = f.len() - 34;
        let partial = fold(pseudo_v4(&f[14..34], tcp_len));
        f[50..52].copy_from_slice(&partial.to_be_bytes());
        assert!(complete_checksum(&mut f, 34, 16));
        assert!(mergeable_segment(&f).is_some(), "checksum now verifies");
        assert!(!complete_checksum(&mut f, 1000, 16));
    }

    #[test]
    fn rejects_what_it_cannot_segment() {
        let hdr = VnetHdr {
            gso_size: 1000,
            ..VnetHdr::default()
        };
        assert!(TcpSegmenter::new(&[0u8; 20], &hdr).is_none());
        let mut v6 = super_frame(b"x", TCP_ACK);
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert!(TcpSegmenter::new(&v6, &hdr).is_none());
        let zero_mss = VnetHdr::default();
        assert!(TcpSegmenter::new(&super_frame(b"x", TCP_ACK), &zero_mss).is_none());
    }
}
