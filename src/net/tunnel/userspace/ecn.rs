//! The outer header's TTL and ECN field, computed from the inner frame the way kernel gretap
//! does (`ttl inherit`, `tos 0`; RFC 6040 at the tunnel ends).
//!
//! * Encapsulation: the outer TTL is the inner IPv4 TTL / IPv6 hop limit (or a fixed TTL
//!   when one is configured; for non-IP frames the namespace's default TTL); the outer ECN
//!   field is the inner one, except that an inner CE becomes ECT(0) — the kernel's
//!   `INET_ECN_encapsulate`, so that a congestion mark is not counted twice on the way.
//! * Decapsulation (RFC 6040 section 4.2): an outer CE marks an ECN-capable inner packet CE;
//!   an outer CE over a not-ECT inner packet is dropped (and counted); an outer ECT(1) over an
//!   ECT(0) inner packet makes it ECT(1).

use super::offload::{fold, sum};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub const NOT_ECT: u8 = 0b00;
pub const ECT_1: u8 = 0b01;
pub const ECT_0: u8 = 0b10;
pub const CE: u8 = 0b11;
const ECN_MASK: u8 = 0b11;

/// The inner packet's network protocol, as far as TTL and ECN care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    V4,
    V6,
    Other,
}

fn inner(frame: &[u8]) -> Inner {
    if frame.len() < ETH_HLEN + 20 {
        return Inner::Other;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP if frame[ETH_HLEN] >> 4 == 4 => Inner::V4,
        ETH_P_IPV6 if frame.len() >= ETH_HLEN + 40 && frame[ETH_HLEN] >> 4 == 6 => Inner::V6,
        _ => Inner::Other,
    }
}

/// The inner packet's traffic-class byte (IPv4 TOS / IPv6 traffic class), if it is IP.
pub fn inner_dsfield(frame: &[u8]) -> Option<u8> {
    match inner(frame) {
        Inner::V4 => Some(frame[ETH_HLEN + 1]),
        Inner::V6 => Some((frame[ETH_HLEN] << 4) | (frame[ETH_HLEN + 1] >> 4)),
        Inner::Other => None,
    }
}

/// The inner IPv4 TTL / IPv6 hop limit, if the frame carries IP.
pub fn inner_ttl(frame: &[u8]) -> Option<u8> {
    match inner(frame) {
        Inner::V4 => Some(frame[ETH_HLEN + 8]),
        Inner::V6 => Some(frame[ETH_HLEN + 7]),
        Inner::Other => None,
    }
}

/// The outer TOS byte for `frame`: DSCP 0, ECN from the inner packet (CE → ECT(0)).
pub fn outer_tos(frame: &[u8]) -> u8 {
    match inner_dsfield(frame).map(|d| d & ECN_MASK) {
        Some(CE) => ECT_0,
        Some(ecn) => ecn,
        None => NOT_ECT,
    }
}

/// What decapsulation did to the inner packet's ECN field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decap {
    /// Delivered as it was.
    Unchanged,
    /// Delivered with its ECN field changed (CE or ECT(1)).
    Marked,
    /// Not ECN-capable inside but CE outside: the congestion mark cannot be passed on, so the
    /// packet is dropped, as RFC 6040 and the kernel do.
    Drop,
}

/// Applies the outer ECN field (`outer_tos`) to the inner packet of `frame` in place.
pub fn decapsulate(frame: &mut [u8], outer_tos: u8) -> Decap {
    let outer = outer_tos & ECN_MASK;
    let Some(dsfield) = inner_dsfield(frame) else {
        return Decap::Unchanged;
    };
    let inner = dsfield & ECN_MASK;
    let new = match (inner, outer) {
        (NOT_ECT, CE) => return Decap::Drop,
        (NOT_ECT, _) | (_, NOT_ECT) | (CE, _) => return Decap::Unchanged,
        (_, CE) => CE,
        (ECT_0, ECT_1) => ECT_1,
        _ => return Decap::Unchanged,
    };
    set_ecn(frame, new);
    Decap::Marked
}

fn set_ecn(frame: &mut [u8], ecn: u8) {
    match inner(frame) {
        Inner::V4 => {
            let ip = &mut frame[ETH_HLEN..];
            ip[1] = (ip[1] & !ECN_MASK) | ecn;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl >= 20 && ip.len() >= ihl {
                let header = &mut ip[..ihl];
                header[10..12].fill(0);
                let c = !fold(sum(header, 0));
                header[10..12].copy_from_slice(&c.to_be_bytes());
            }
        }
        // The ECN bits are the low two bits of the traffic class: bits 4-5 of byte 1.
        Inner::V6 => {
            let b = &mut frame[ETH_HLEN + 1];
            *b = (*b & !(ECN_MASK << 4)) | (ecn << 4);
        }
        Inner::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(tos: u8, ttl: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let mut ip = vec![0x45, tos, 0, 28, 0, 1, 0x40, 0, ttl, 17, 0, 0];
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let c = !fold(sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0; 8]);
        f
    }

    fn v6(tclass: u8, hops: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN];
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60 | (tclass >> 4);
        ip[1] = (tclass << 4) | 0x0a; // low nibble: flow label bits, must survive
        ip[6] = 17;
        ip[7] = hops;
        f.extend_from_slice(&ip);
        f
    }

    fn ipv4_checksum_ok(frame: &[u8]) -> bool {
        fold(sum(&frame[ETH_HLEN..ETH_HLEN + 20], 0)) == 0xffff
    }

    #[test]
    fn ttl_is_inherited_from_ipv4_and_ipv6() {
        assert_eq!(inner_ttl(&v4(0, 17)), Some(17));
        assert_eq!(inner_ttl(&v6(0, 3)), Some(3));
        let mut arp = v4(0, 17);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(inner_ttl(&arp), None);
        assert_eq!(inner_ttl(&[0u8; 20]), None);
    }

    #[test]
    fn encapsulation_copies_ecn_and_turns_ce_into_ect0() {
        for (ecn, outer) in [
            (NOT_ECT, NOT_ECT),
            (ECT_0, ECT_0),
            (ECT_1, ECT_1),
            (CE, ECT_0),
        ] {
            // DSCP 46 inside never reaches the outer header (gretap's `tos 0`).
            assert_eq!(outer_tos(&v4(46 << 2 | ecn, 64)), outer, "v4 ecn {ecn}");
            assert_eq!(outer_tos(&v6(46 << 2 | ecn, 64)), outer, "v6 ecn {ecn}");
        }
    }

    /// RFC 6040, Figure 4: the decapsulated ECN field for each inner × outer pair.
    #[test]
    fn decapsulation_follows_rfc_6040() {
        use Decap::*;
        let table = [
            // inner, outer, result, new inner ECN
            (NOT_ECT, NOT_ECT, Unchanged, NOT_ECT),
            (NOT_ECT, ECT_0, Unchanged, NOT_ECT),
            (NOT_ECT, ECT_1, Unchanged, NOT_ECT),
            (NOT_ECT, CE, Drop, NOT_ECT),
            (ECT_0, NOT_ECT, Unchanged, ECT_0),
            (ECT_0, ECT_0, Unchanged, ECT_0),
            (ECT_0, ECT_1, Marked, ECT_1),
            (ECT_0, CE, Marked, CE),
            (ECT_1, NOT_ECT, Unchanged, ECT_1),
            (ECT_1, ECT_0, Unchanged, ECT_1),
            (ECT_1, ECT_1, Unchanged, ECT_1),
            (ECT_1, CE, Marked, CE),
            (CE, NOT_ECT, Unchanged, CE),
            (CE, ECT_0, Unchanged, CE),
            (CE, ECT_1, Unchanged, CE),
            (CE, CE, Unchanged, CE),
        ];
        for (inner, outer, want, ecn) in table {
            let tos = 10 << 2 | inner;
            let mut f = v4(tos, 64);
            assert_eq!(
                decapsulate(&mut f, 0xb8 | outer),
                want,
                "v4 {inner}/{outer}"
            );
            assert_eq!(f[ETH_HLEN + 1], 10 << 2 | ecn, "v4 {inner}/{outer}");
            assert!(ipv4_checksum_ok(&f), "v4 {inner}/{outer}: header checksum");
            let mut f = v6(tos, 64);
            assert_eq!(decapsulate(&mut f, outer), want, "v6 {inner}/{outer}");
            assert_eq!(inner_dsfield(&f), Some(10 << 2 | ecn), "v6 {inner}/{outer}");
            assert_eq!(f[ETH_HLEN + 1] & 0x0f, 0x0a, "flow label kept");
        }
    }

    #[test]
    fn non_ip_frames_pass_untouched() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let before = arp.clone();
        assert_eq!(decapsulate(&mut arp, CE), Decap::Unchanged);
        assert_eq!(arp, before);
        assert_eq!(outer_tos(&arp), NOT_ECT);
    }
}
