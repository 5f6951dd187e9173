//! Gratuitous ARP: announcing that an address now lives behind a link, so that the switch
//! and the neighbours on that segment learn it at once (a floating IP that moves).

use std::net::Ipv4Addr;
use std::path::Path;

use super::netns::run_in;
use super::{NetError, NetResult};

const ETH_P_ARP: u16 = 0x0806;

/// The frame: an ARP request for `ip` from `ip` (sender = target, RFC 5227's announcement),
/// broadcast.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends `count` gratuitous ARPs for `ip` out of link `ifindex` (MAC `mac`) in the namespace
/// at `netns`.
pub fn announce(
    netns: Option<&Path>,
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
    count: usize,
) -> NetResult<()> {
    let object = format!("gratuitous ARP for {ip} on link #{ifindex}");
    run_in(netns, move || {
        let err = |e: std::io::Error| NetError::new("send", object.clone(), e);
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let f = frame(mac, ip);
        for _ in 0..count.max(1) {
            // SAFETY: the buffer and address outlive the call; sizes are theirs.
            let sent = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if sent < 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_an_arp_announcement() {
        let f = frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &[192, 0, 2, 50], "sender");
        assert_eq!(&f[38..42], &[192, 0, 2, 50], "target = sender");
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
