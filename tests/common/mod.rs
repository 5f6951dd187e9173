//! Helpers shared by the traffic tests.
#![allow(dead_code)]

pub mod lab;
pub mod tls;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tenet::net::NetError;
use tenet::testbed::Workload;

/// FNV-1a over 64-bit words (the stream is always a whole number of words).
#[derive(Default)]
pub struct Digest {
    hash: u64,
    carry: Vec<u8>,
    pub len: u64,
}

impl Digest {
    pub fn new() -> Self {
        Digest {
            hash: 0xcbf2_9ce4_8422_2325,
            carry: Vec::new(),
            len: 0,
        }
    }
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.carry.is_empty() {
            let need = 8 - self.carry.len();
            let take = need.min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() == 8 {
                let w = u64::from_le_bytes(self.carry[..].try_into().unwrap());
                self.word(w);
                self.carry.clear();
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().unwrap()));
        }
        self.carry.extend_from_slice(words.remainder());
    }
    fn word(&mut self, w: u64) {
        self.hash = (self.hash ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    pub fn finish(&self) -> u64 {
        assert!(
            self.carry.is_empty(),
            "stream length is not a multiple of 8"
        );
        self.hash
    }
}

/// Sends `bytes` (a multiple of 8) of pseudo-random data over TCP from `from` to `to`;
/// returns the digests computed by the sender and by the receiver, and the bytes received.
pub fn tcp_transfer(from: &Workload, to: &Workload, bytes: u64) -> (u64, u64, u64) {
    let dst = to.ip;
    let listener = to
        .enter(move || {
            TcpListener::bind((dst, 5001)).map_err(|e| NetError::new("bind", "listener", e))
        })
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut d = Digest::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => d.update(&buf[..n]),
                Err(e) => panic!("receive failed after {} bytes: {e}", d.len),
            }
        }
        (d.finish(), d.len)
    });
    let mut stream = from
        .enter(move || {
            let s = TcpStream::connect_timeout(&(dst, 5001).into(), Duration::from_secs(10))
                .map_err(|e| NetError::new("connect", "transfer", e))?;
            Ok(s)
        })
        .unwrap();
    let mut d = Digest::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        for chunk in buf[..n].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        stream.write_all(&buf[..n]).unwrap();
        d.update(&buf[..n]);
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, len) = receiver.join().unwrap();
    (d.finish(), got, len)
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
