//! Path MTU: when a frame does not fit the path to the peer (the kernel refuses the outer
//! packet with EMSGSIZE, DF being set on every one), the tunnel answers its sender the way
//! kernel gretap with `pmtudisc` does — an inner IPv4 packet with DF gets an ICMP
//! "fragmentation needed", an inner IPv6 packet an ICMPv6 "packet too big", each carrying the
//! tunnel MTU (path MTU − 42). The reply is an Ethernet frame written into the tunnel's tap,
//! so the bridge delivers it to the sender like any frame from the remote side: it comes
//! from the MAC and IP address the oversized packet was sent to.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::offload::{fold, sum};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IP_DF: u16 = 0x4000;
const IP_OFFSET: u16 = 0x1fff;
/// How much of the offending IPv4 packet an ICMP error quotes at most (RFC 1812 4.3.2.3:
/// the reply stays within 576 bytes).
const ICMP_QUOTE_V4: usize = 576 - 20 - 8;
/// The smallest MTU IPv6 allows, which also bounds a packet-too-big message.
pub const IPV6_MIN_MTU: u32 = 1280;
/// Bytes of the offending frame the engine keeps to answer it: enough for every quote.
pub const QUOTE_ROOM: usize = ETH_HLEN + IPV6_MIN_MTU as usize;

/// The reply to a frame that does not fit a tunnel whose MTU is `mtu`, or `None` when the
/// frame gets none (not IP, IPv4 without DF, an ICMP error itself, a non-first fragment,
/// or IPv6 with an MTU below 1280 — the same cases in which the kernel sends none).
/// `frame` may be only the start of the frame: what it holds is what gets quoted.
pub fn too_big_reply(frame: &[u8], mtu: u32) -> Option<Vec<u8>> {
    if frame.len() < ETH_HLEN + 20 {
        return None;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frag_needed_v4(frame, mtu),
        ETH_P_IPV6 => packet_too_big_v6(frame, mtu),
        _ => None,
    }
}

/// Ethernet header of the reply: back to the sender, from where it sent the packet.
fn reply_ethernet(frame: &[u8], ethertype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_HLEN + 600);
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out
}

fn frag_needed_v4(frame: &[u8], mtu: u32) -> Option<Vec<u8>> {
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & IP_DF == 0 || frag & IP_OFFSET != 0 {
        return None;
    }
    let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let destination = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if source.is_unspecified() || source.is_broadcast() || source.is_multicast() {
        return None;
    }
    // No error about an ICMP error (RFC 1122 3.2.2); echo and other queries do get one.
    if ip[9] == IPPROTO_ICMP && ip.get(ihl).is_some_and(|&t| !matches!(t, 0 | 8 | 13..=18)) {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let quote = &ip[..ip.len().min(total).min(ICMP_QUOTE_V4)];
    let mut out = reply_ethernet(frame, ETH_P_IP);
    let len = (20 + 8 + quote.len()) as u16;
    let mut header = [
        0x45,
        0xc0,
        0,
        0,
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    header[2..4].copy_from_slice(&len.to_be_bytes());
    header[12..16].copy_from_slice(&destination.octets());
    header[16..20].copy_from_slice(&source.octets());
    let c = !fold(sum(&header, 0));
    header[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&header);
    let icmp_start = out.len();
    let next_hop_mtu = mtu.min(u32::from(u16::MAX)) as u16;
    out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&next_hop_mtu.to_be_bytes());
    out.extend_from_slice(quote);
    let c = !fold(sum(&out[icmp_start..], 0));
    out[icmp_start + 2..icmp_start + 4].copy_from_slice(&c.to_be_bytes());
    Some(out)
}

fn packet_too_big_v6(frame: &[u8], mtu: u32) -> Option<Vec<u8>> {
    if mtu < IPV6_MIN_MTU || frame.len() < ETH_HLEN + 40 {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 6 {
        return None;
    }
    let addr = |at: usize| -> Ipv6Addr {
        let b: [u8; 16] = ip[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(b)
    };
    let (source, destination) = (addr(8), addr(24));
    if source.is_unspecified() || source.is_multicast() {
        return None;
    }
    // An ICMPv6 error message (types below 128) gets no error back (RFC 4443 2.4 e).
    if ip[6] == IPPROTO_ICMPV6 && ip.get(40).is_some_and(|&t| t < 128) {
        return None;
    }
    let total = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    // The whole reply stays within the minimum MTU: 40 + 8 + quote ≤ 1280.
    let quote = &ip[..ip.len().min(total).min(IPV6_MIN_MTU as usize - 48)];
    let payload_len = (8 + quote.len()) as u16;
    let mut out = reply_ethernet(frame, ETH_P_IPV6);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&[IPPROTO_ICMPV6, 64]);
    out.extend_from_slice(&destination.octets());
    out.extend_from_slice(&source.octets());
    let icmp_start = out.len();
    out.extend_from_slice(&[2, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quote);
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut acc = sum(&destination.octets(), 0);
    acc = sum(&source.octets(), acc);
    acc += u64::from(payload_len) + u64::from(IPPROTO_ICMPV6);
    let c = !fold(sum(&out[icmp_start..], acc));
    out[icmp_start + 2..icmp_start + 4].copy_from_slice(&c.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn v4(frag: u16, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = [&B[..], &A[..], &ETH_P_IP.to_be_bytes()].concat();
        let total = (20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 61, proto, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[10, 1, 0, 2, 10, 1, 0, 3]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }

    fn v6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = [&B[..], &A[..], &ETH_P_IPV6.to_be_bytes()].concat();
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[next, 64]);
        ip.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"fd00::3".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn ipv4_with_df_gets_fragmentation_needed_with_the_mtu() {
        let frame = v4(IP_DF, 6, &[0x55; 1400]);
        let r = too_big_reply(&frame, 1358).unwrap();
        // Back to A, from B's MAC and the address A was sending to.
        assert_eq!((&r[0..6], &r[6..12]), (&A[..], &B[..]));
        let ip = &r[ETH_HLEN..];
        assert_eq!(fold(sum(&ip[..20], 0)), 0xffff, "IP header checksum");
        assert_eq!(
            (&ip[12..16], &ip[16..20]),
            (&[10, 1, 0, 3][..], &[10, 1, 0, 2][..])
        );
        assert_eq!(ip[9], IPPROTO_ICMP);
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert!(ip.len() <= 576, "RFC 1812 limit");
        let icmp = &ip[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1358);
        assert_eq!(fold(sum(icmp, 0)), 0xffff, "ICMP checksum");
        assert_eq!(
            &icmp[8..28],
            &frame[ETH_HLEN..ETH_HLEN + 20],
            "quotes the header"
        );
    }

    #[test]
    fn no_reply_where_the_kernel_sends_none() {
        assert!(
            too_big_reply(&v4(0, 6, &[0; 1400]), 1358).is_none(),
            "no DF"
        );
        assert!(
            too_big_reply(&v4(IP_DF | 5, 6, &[0; 1400]), 1358).is_none(),
            "non-first fragment"
        );
        let error = [&[3u8, 1, 0, 0, 0, 0, 0, 0][..], &[0; 1400]].concat();
        assert!(
            too_big_reply(&v4(IP_DF, 1, &error), 1358).is_none(),
            "ICMP error"
        );
        let echo = [&[8u8, 0, 0, 0, 0, 0, 0, 0][..], &[0; 1400]].concat();
        assert!(too_big_reply(&v4(IP_DF, 1, &echo), 1358).is_some(), "echo");
        assert!(
            too_big_reply(&v6(17, &[0; 1400]), 1200).is_none(),
            "v6 < 1280"
        );
        let v6err = [&[1u8, 0, 0, 0, 0, 0, 0, 0][..], &[0; 1400]].concat();
        assert!(
            too_big_reply(&v6(58, &v6err), 1358).is_none(),
            "ICMPv6 error"
        );
        let mut arp = v4(IP_DF, 6, &[0; 100]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(too_big_reply(&arp, 1358).is_none(), "not IP");
        assert!(too_big_reply(&arp[..20], 1358).is_none(), "short");
    }

    #[test]
    fn ipv6_gets_packet_too_big_within_the_minimum_mtu() {
        let frame = v6(17, &[0x77; 1420]);
        let r = too_big_reply(&frame, 1358).unwrap();
        assert_eq!((&r[0..6], &r[6..12]), (&A[..], &B[..]));
        let ip = &r[ETH_HLEN..];
        assert!(ip.len() <= IPV6_MIN_MTU as usize);
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])) + 40,
            ip.len()
        );
        assert_eq!(
            &ip[8..24],
            &frame[ETH_HLEN + 24..ETH_HLEN + 40],
            "from the destination"
        );
        let icmp = &ip[40..];
        assert_eq!((icmp[0], icmp[1]), (2, 0));
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1358
        );
        let mut acc = sum(&ip[8..40], 0);
        acc += icmp.len() as u64 + u64::from(IPPROTO_ICMPV6);
        assert_eq!(fold(sum(icmp, acc)), 0xffff, "ICMPv6 checksum");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), mtu in 0u32..70000) {
            let _ = too_big_reply(&bytes, mtu);
        }
    }
}
