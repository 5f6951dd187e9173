//! GRE over IPv4 carrying Ethernet (RFC 2784 with the RFC 2890 key), as kernel gretap puts
//! it on the wire.

use std::net::Ipv4Addr;

/// GRE protocol type for transparent Ethernet bridging.
pub const ETH_P_TEB: u16 = 0x6558;
pub const IPPROTO_GRE: i32 = 47;

const GRE_CSUM: u16 = 0x8000;
const GRE_ROUTING: u16 = 0x4000;
const GRE_KEY: u16 = 0x2000;
const GRE_SEQ: u16 = 0x1000;
const GRE_VERSION: u16 = 0x0007;

/// Bytes tenet puts before each Ethernet frame: flags (key present), protocol, key.
pub const TX_HEADER_LEN: usize = 8;
const ETH_HLEN: usize = 14;

/// Writes the 8-byte keyed GRE header for `key`.
#[inline]
pub fn write_header(buf: &mut [u8; TX_HEADER_LEN], key: u32) {
    buf[0..2].copy_from_slice(&GRE_KEY.to_be_bytes());
    buf[2..4].copy_from_slice(&ETH_P_TEB.to_be_bytes());
    buf[4..8].copy_from_slice(&key.to_be_bytes());
}

/// A received GRE packet, borrowed from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct GrePacket<'a> {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    /// The outer TOS byte (its ECN field goes to the inner packet on decapsulation).
    pub tos: u8,
    /// `None` when the key bit is clear.
    pub key: Option<u32>,
    /// The Ethernet frame (mutable: decapsulation may mark its ECN field).
    pub frame: &'a mut [u8],
}

/// Why a packet was dropped before demultiplexing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Too short for the headers it announces, or not IPv4/GRE at all.
    Truncated,
    /// GRE version other than 0, or the deprecated routing bit set (the kernel drops these).
    UnsupportedFlags,
    /// Not protocol 0x6558 (transparent Ethernet bridging).
    NotEthernet,
    /// The optional GRE checksum is present and wrong.
    BadChecksum,
}

/// Parses an IPv4 packet as a raw protocol-47 socket delivers it (IP header included).
pub fn parse(packet: &mut [u8]) -> Result<GrePacket<'_>, Malformed> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(Malformed::Truncated);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < 20 || total < ihl || total > packet.len() || packet[9] != IPPROTO_GRE as u8 {
        return Err(Malformed::Truncated);
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let gre = &packet[ihl..total];
    if gre.len() < 4 {
        return Err(Malformed::Truncated);
    }
    let flags = u16::from_be_bytes([gre[0], gre[1]]);
    if flags & (GRE_VERSION | GRE_ROUTING) != 0 {
        return Err(Malformed::UnsupportedFlags);
    }
    if u16::from_be_bytes([gre[2], gre[3]]) != ETH_P_TEB {
        return Err(Malformed::NotEthernet);
    }
    let mut off = 4;
    let csum = flags & GRE_CSUM != 0;
    if csum {
        off += 4;
    }
    let mut key = None;
    if flags & GRE_KEY != 0 {
        let k = gre.get(off..off + 4).ok_or(Malformed::Truncated)?;
        key = Some(u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
        off += 4;
    }
    if flags & GRE_SEQ != 0 {
        off += 4;
    }
    if gre.len() < off + ETH_HLEN {
        return Err(Malformed::Truncated);
    }
    if csum && checksum(gre) != 0 {
        return Err(Malformed::BadChecksum);
    }
    let tos = packet[1];
    Ok(GrePacket {
        source,
        destination,
        tos,
        key,
        frame: &mut packet[ihl + off..total],
    })
}

/// The Internet checksum (RFC 1071) folded to 16 bits; 0 over data that carries a valid one.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 47, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    fn frame() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(b"arp-ish payload");
        f
    }

    #[test]
    fn header_matches_kernel_gretap_layout() {
        let mut h = [0u8; TX_HEADER_LEN];
        write_header(&mut h, 4268);
        // key bit, TEB, key 4268 in network order (as `ip link ... ikey 4268` puts it).
        assert_eq!(h, [0x20, 0x00, 0x65, 0x58, 0x00, 0x00, 0x10, 0xac]);
    }

    #[test]
    fn round_trip() {
        let mut gre = [0u8; TX_HEADER_LEN].to_vec();
        write_header((&mut gre[..8]).try_into().unwrap(), 7);
        gre.extend_from_slice(&frame());
        let pkt = ipv4([10, 0, 0, 1], [10, 0, 0, 2], &gre);
        let mut pkt = pkt;
        let p = parse(&mut pkt).unwrap();
        assert_eq!(p.source, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.destination, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p.key, Some(7));
        assert_eq!(&*p.frame, frame().as_slice());
    }

    #[test]
    fn optional_fields_are_skipped_and_checksum_verified() {
        // checksum + key + sequence, as `ip link add ... csum seq` sends.
        let mut gre = vec![0xb0, 0x00, 0x65, 0x58, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1];
        gre.extend_from_slice(&frame());
        let c = checksum(&gre);
        gre[4..6].copy_from_slice(&c.to_be_bytes());
        let pkt = ipv4([1, 1, 1, 1], [2, 2, 2, 2], &gre);
        let mut pkt = pkt;
        let p = parse(&mut pkt).unwrap();
        assert_eq!((p.key, &*p.frame), (Some(9), frame().as_slice()));
        let mut bad = pkt.to_vec();
        *bad.last_mut().unwrap() ^= 0xff;
        assert_eq!(parse(&mut bad), Err(Malformed::BadChecksum));
    }

    #[test]
    fn rejects_what_the_kernel_rejects() {
        let keyless = [&[0u8, 0, 0x65, 0x58][..], &frame()].concat();
        let mut p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], &keyless);
        assert_eq!(parse(&mut p).unwrap().key, None);
        let v1 = [&[0u8, 1, 0x65, 0x58][..], &frame()].concat();
        assert_eq!(
            parse(&mut ipv4([1; 4], [2; 4], &v1)),
            Err(Malformed::UnsupportedFlags)
        );
        let ip = [&[0u8, 0, 0x08, 0x00][..], &frame()].concat();
        assert_eq!(
            parse(&mut ipv4([1; 4], [2; 4], &ip)),
            Err(Malformed::NotEthernet)
        );
        let short = [0x20u8, 0, 0x65, 0x58, 0, 0];
        assert_eq!(
            parse(&mut ipv4([1; 4], [2; 4], &short)),
            Err(Malformed::Truncated)
        );
        assert_eq!(parse(&mut [0x45; 10]), Err(Malformed::Truncated));
        let mut lying = ipv4([1; 4], [2; 4], &keyless);
        lying[2..4].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(parse(&mut lying), Err(Malformed::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&mut bytes);
        }
    }
}
