//! The network: sockets and kernel steering (this module), the connection IDs steering reads
//! ([`cid`]), and certificates and QUIC settings ([`tls`]).
//!
//! Sockets: one public UDP port shared by every shard, steered by connection ID.
//!
//! Each shard gets its own UDP socket bound to the same address with `SO_REUSEPORT`. A classic
//! BPF program attached with `SO_ATTACH_REUSEPORT_CBPF` picks the socket for each datagram: it
//! reads the byte of the destination connection ID that names the shard (short header: offset
//! 1; long header: offset 6, after flags, version and the DCID length) and returns it modulo
//! the number of shards. A client's first Initial carries a random DCID, so new connections
//! spread over shards; every later packet carries a connection ID the accepting shard issued
//! ([`crate::net::cid`]), so it reaches that shard even after the client's address changes.
//!
//! Where the kernel refuses the program, each shard binds its own port instead (base port
//! plus the shard number), and the server logs it.

pub mod cid;
pub mod tls;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use tracing::warn;

/// How datagrams reach their shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// One port; the kernel steers by connection ID.
    Bpf,
    /// One socket only (a single shard).
    Single,
    /// Fallback: shard `i` listens on base port + `i`.
    PortPerShard,
}

/// The shards' sockets, in shard order.
#[derive(Debug)]
pub struct ShardSockets {
    /// Socket of each shard, non-blocking.
    pub sockets: Vec<UdpSocket>,
    /// How datagrams are steered.
    pub steering: Steering,
}

impl ShardSockets {
    /// The address shard `i` listens on.
    pub fn local_addr(&self, i: usize) -> io::Result<SocketAddr> {
        self.sockets[i].local_addr()
    }
}

/// Bytes of receive and send buffer per socket: a burst of a few thousand packets.
const SOCKET_BUFFER: usize = 8 << 20;

/// Whether a shard socket joins the port's reuseport group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sharing {
    ReusePort,
    Exclusive,
}

fn shard_socket(addr: SocketAddr, sharing: Sharing) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if sharing == Sharing::ReusePort {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// The steering program for `shards` sockets.
pub fn steering_program(shards: u32) -> Vec<libc::sock_filter> {
    const LD_B_ABS: u16 = 0x10 | 0x20; // BPF_LD (0) | BPF_B | BPF_ABS
    const JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const MOD_K: u16 = 0x04 | 0x90; // BPF_ALU | BPF_MOD | BPF_K
    const RET_A: u16 = 0x06 | 0x10; // BPF_RET | BPF_A
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        ins(LD_B_ABS, 0, 0, 0),   // 0: A = first byte (header form)
        ins(JSET_K, 0, 2, 0x80),  // 1: long header? next : to 4
        ins(LD_B_ABS, 0, 0, 6),   // 2: long header: first DCID byte
        ins(JA, 0, 0, 1),         // 3: to 5
        ins(LD_B_ABS, 0, 0, 1),   // 4: short header: first DCID byte
        ins(MOD_K, 0, 0, shards), // 5: A %= shards
        ins(RET_A, 0, 0, 0),      // 6: socket index
    ]
}

/// Sets a socket option whose value is the plain-data `value`.
fn setsockopt<T>(
    fd: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised `T` for the duration of the call, and its size
    // is passed along; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn attach_steering(socket: &socket2::Socket, shards: u32) -> io::Result<()> {
    let program = steering_program(shards);
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut _,
    };
    // `prog` points into `program`, which outlives the call.
    setsockopt(
        socket,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &prog,
    )
}

/// Turns UDP generic receive offload on or off. quinn-udp turns it on; the shard's receive
/// loop reads one datagram per buffer.
pub fn set_udp_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    setsockopt(socket, libc::SOL_UDP, libc::UDP_GRO, &(on as libc::c_int))
}

/// Binds one socket per shard on `addr` (port 0 picks a free port) and sets up steering.
pub fn bind(addr: SocketAddr, shards: usize) -> io::Result<ShardSockets> {
    // SO_REUSEPORT would let a second server (same user) bind the same port and silently take
    // part of the traffic. A plain bind first fails if anything holds the port.
    let probe = UdpSocket::bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    let first = shard_socket(addr, Sharing::ReusePort)?;
    let addr = first.local_addr()?.as_socket().expect("inet socket");
    if shards == 1 {
        return Ok(ShardSockets {
            sockets: vec![first.into()],
            steering: Steering::Single,
        });
    }
    // Sockets join the reuseport group in bind order: index i is shard i.
    let mut sockets = vec![first];
    for _ in 1..shards {
        sockets.push(shard_socket(addr, Sharing::ReusePort)?);
    }
    match attach_steering(&sockets[0], shards as u32) {
        Ok(()) => Ok(ShardSockets {
            sockets: sockets.into_iter().map(Into::into).collect(),
            steering: Steering::Bpf,
        }),
        Err(e) => {
            warn!(error = %e, "kernel refused the reuseport steering program; falling back to one port per shard");
            drop(sockets);
            let mut out = Vec::with_capacity(shards);
            for i in 0..shards {
                let port = addr.port().checked_add(i as u16).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "base port + shard count exceeds 65535",
                    )
                })?;
                let mut a = addr;
                a.set_port(port);
                let s = shard_socket(a, Sharing::Exclusive)?;
                out.push(s.into());
            }
            Ok(ShardSockets {
                sockets: out,
                steering: Steering::PortPerShard,
            })
        }
    }
}

/// Datagrams a shard sends in one pass, given to the kernel with `sendmmsg` in batches of
/// [`SendBatch::BATCH`]: one system call per batch rather than one per datagram (at 1,000
/// players a tick is 1,000 snapshots). Each datagram keeps its own ECN codepoint and source
/// address (`IP_TOS`/`IPV6_TCLASS` and `IP_PKTINFO`/`IPV6_PKTINFO` control messages), as
/// quinn-udp would send it one at a time.
///
/// A datagram the kernel refuses (a full send buffer, an unroutable address) is dropped and
/// counted, and the rest of the batch goes on: QUIC recovers a lost datagram.
#[derive(Default)]
pub struct SendBatch {
    /// Payloads, back to back.
    data: Vec<u8>,
    queued: Vec<Queued>,
    // Rebuilt for each system call; kept to reuse their allocations.
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<Control>,
}

struct Queued {
    offset: usize,
    len: usize,
    to: socket2::SockAddr,
    /// Which message carries the ECN mark: `IP_TOS` (IPv4), `IPV6_TCLASS` (IPv6), or none
    /// (an IPv4 peer on a dual-stack socket: some kernels refuse either message there).
    ecn_level: Option<libc::c_int>,
    ecn: u8,
    src_ip: Option<std::net::IpAddr>,
}

/// Room for one datagram's control messages (TOS and PKTINFO), aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 96]);

/// What a [`SendBatch::flush`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams it refused (dropped).
    pub errors: u64,
    /// `sendmmsg` calls made.
    pub calls: u64,
}

impl Flushed {
    /// Adds what another flush did.
    pub fn add(&mut self, other: Flushed) {
        self.sent += other.sent;
        self.errors += other.errors;
        self.calls += other.calls;
    }
}

impl SendBatch {
    /// Datagrams per `sendmmsg` call.
    pub const BATCH: usize = 64;

    /// Queues a datagram; nothing is sent until [`SendBatch::flush`].
    pub fn push(
        &mut self,
        contents: &[u8],
        to: SocketAddr,
        ecn: Option<u8>,
        src_ip: Option<std::net::IpAddr>,
    ) {
        let ecn_level = match to.ip() {
            std::net::IpAddr::V4(_) => Some(libc::IPPROTO_IP),
            std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => None,
            std::net::IpAddr::V6(_) => Some(libc::IPPROTO_IPV6),
        };
        self.queued.push(Queued {
            offset: self.data.len(),
            len: contents.len(),
            to: to.into(),
            ecn_level,
            ecn: ecn.unwrap_or(0) & 0b11,
            src_ip,
        });
        self.data.extend_from_slice(contents);
    }

    /// Datagrams queued and not yet sent.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Whether a whole `sendmmsg` call's worth is queued: a sender that flushes then holds at
    /// most [`SendBatch::BATCH`] datagrams, however many a pass produces.
    pub fn is_full(&self) -> bool {
        self.queued.len() >= Self::BATCH
    }

    /// Sends every queued datagram on `socket` (non-blocking) and empties the batch.
    pub fn flush(&mut self, socket: &impl std::os::fd::AsRawFd) -> Flushed {
        let mut out = Flushed::default();
        let fd = socket.as_raw_fd();
        let mut start = 0;
        while start < self.queued.len() {
            let end = (start + Self::BATCH).min(self.queued.len());
            let n = end - start;
            self.prepare(start, end);
            let mut done = 0;
            while done < n {
                // SAFETY: each header points at an iovec, an address and a control buffer
                // owned by `self`, and at payload bytes in `self.data`; none of them is
                // touched until the call returns.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs[done..].as_mut_ptr(),
                        (n - done) as libc::c_uint,
                        0,
                    )
                };
                out.calls += 1;
                if r < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // The first datagram left in the batch was refused: drop it, go on.
                    out.errors += 1;
                    done += 1;
                } else {
                    out.sent += r as u64;
                    done += r as usize;
                }
            }
            start = end;
        }
        self.queued.clear();
        self.data.clear();
        out
    }

    /// Fills the system call's headers for `queued[start..end]`.
    fn prepare(&mut self, start: usize, end: usize) {
        let n = end - start;
        self.iovs.clear();
        self.hdrs.clear();
        self.ctrl.clear();
        self.ctrl.resize(n, Control([0; 96]));
        let base = self.data.as_mut_ptr();
        for q in &self.queued[start..end] {
            self.iovs.push(libc::iovec {
                // SAFETY: `offset + len` lies within `data`, which is not resized until the
                // batch is sent.
                iov_base: unsafe { base.add(q.offset) }.cast(),
                iov_len: q.len,
            });
        }
        for (k, q) in self.queued[start..end].iter().enumerate() {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = q.to.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = q.to.len();
            h.msg_hdr.msg_iov = &mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[k].0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = self.ctrl[k].0.len() as _;
            h.msg_hdr.msg_controllen = encode_control(&mut h.msg_hdr, q) as _;
            if h.msg_hdr.msg_controllen == 0 {
                h.msg_hdr.msg_control = std::ptr::null_mut();
            }
            self.hdrs.push(h);
        }
    }
}

/// Writes `q`'s control messages into the buffer `hdr` points at; returns the bytes used.
fn encode_control(hdr: &mut libc::msghdr, q: &Queued) -> usize {
    let mut used = 0;
    // SAFETY: `hdr.msg_control` points at a `Control` of `msg_controllen` bytes, aligned for
    // cmsghdr, that holds both messages below; CMSG_FIRSTHDR/NXTHDR stay within it and
    // return null when a message would not fit, which is checked.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        let mut put = |c: &mut *mut libc::cmsghdr, level, ty, data: &[u8]| {
            if c.is_null() {
                return;
            }
            (**c).cmsg_level = level;
            (**c).cmsg_type = ty;
            (**c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
            std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(*c), data.len());
            used += libc::CMSG_SPACE(data.len() as u32) as usize;
            *c = libc::CMSG_NXTHDR(hdr, *c);
        };
        let ecn = q.ecn as libc::c_int;
        match q.ecn_level {
            Some(libc::IPPROTO_IP) => {
                put(&mut c, libc::IPPROTO_IP, libc::IP_TOS, &ecn.to_ne_bytes())
            }
            Some(level) => put(&mut c, level, libc::IPV6_TCLASS, &ecn.to_ne_bytes()),
            None => {}
        }
        match q.src_ip {
            Some(std::net::IpAddr::V4(v4)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                put(&mut c, libc::IPPROTO_IP, libc::IP_PKTINFO, as_bytes(&info));
            }
            Some(std::net::IpAddr::V6(v6)) => {
                let info = libc::in6_pktinfo {
                    ipi6_ifindex: 0,
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                };
                put(
                    &mut c,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    as_bytes(&info),
                );
            }
            None => {}
        }
    }
    used
}

/// The bytes of a plain-data value.
fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `T` is a plain-data C struct (no padding read as anything but bytes the
    // kernel ignores); the slice covers exactly the value and lives as long as the borrow.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv_on(s: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        for _ in 0..100 {
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    #[test]
    fn a_port_in_use_is_refused() {
        let socks = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = socks.local_addr(0).unwrap();
        assert!(
            bind(addr, 2).is_err(),
            "a second server on the same port must fail"
        );
    }

    #[test]
    fn kernel_steers_by_connection_id_byte() {
        let socks = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert_eq!(
            socks.steering,
            Steering::Bpf,
            "this kernel should accept the program"
        );
        let to = socks.local_addr(0).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Short header (0x40) with DCID first byte 0 or 1; long header (0xc0) with byte 6.
        let cases: [(&[u8], usize); 4] = [
            (&[0x40, 0, 9, 9, 9, 9, 9, 9], 0),
            (&[0x40, 1, 9, 9, 9, 9, 9, 9], 1),
            (&[0xc0, 0, 0, 0, 1, 8, 1, 9, 9], 1),
            (&[0xc0, 0, 0, 0, 1, 8, 2, 9, 9], 0),
        ];
        for (pkt, shard) in cases {
            client.send_to(pkt, to).unwrap();
            let got = recv_on(&socks.sockets[shard]);
            assert_eq!(
                got.as_deref(),
                Some(pkt),
                "packet {pkt:?} should reach shard {shard}"
            );
        }
    }

    #[test]
    fn a_batch_arrives_whole_in_order_with_its_ecn_marks_and_skips_a_refused_datagram() {
        use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let state = UdpSocketState::new(UdpSockRef::from(&rx)).unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        let mut batch = SendBatch::default();
        let n = 2 * SendBatch::BATCH + 22;
        for k in 0..n {
            let payload = [k as u8; 40];
            if k == 70 {
                // Port 0 cannot be sent to: the kernel refuses this one datagram.
                batch.push(&payload, "127.0.0.1:0".parse().unwrap(), None, None);
            } else {
                let ecn = if k % 2 == 0 { Some(0b10) } else { None };
                batch.push(&payload[..1 + k % 40], to, ecn, Some(to.ip()));
            }
        }
        assert_eq!(batch.len(), n);
        let f = batch.flush(&tx);
        assert!(batch.is_empty());
        assert_eq!(f.sent, n as u64 - 1);
        assert_eq!(f.errors, 1);
        // Three batches; the second stops short at the refused datagram (one call), refuses
        // it (one call) and sends the rest (one call).
        assert_eq!(f.calls, 5, "{f:?}");
        let mut got = Vec::new();
        let mut storage = vec![0u8; 2048];
        for _ in 0..200 {
            let mut slices = [std::io::IoSliceMut::new(&mut storage)];
            let mut meta = [RecvMeta::default()];
            match state.recv(UdpSockRef::from(&rx), &mut slices, &mut meta) {
                Ok(_) => {
                    let m = &meta[0];
                    got.push((storage[0], m.len, m.ecn.map(|e| e as u8)));
                }
                Err(_) if got.len() == n - 1 => break,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        let want: Vec<_> = (0..n)
            .filter(|&k| k != 70)
            .map(|k| (k as u8, 1 + k % 40, (k % 2 == 0).then_some(0b10)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_ipv6_datagram_keeps_its_ecn_mark() {
        use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
        let Ok(rx) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let state = UdpSocketState::new(UdpSockRef::from(&rx)).unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let mut batch = SendBatch::default();
        batch.push(b"six", to, Some(0b10), Some(to.ip()));
        assert_eq!(batch.flush(&tx).sent, 1);
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut storage = [0u8; 64];
        let mut slices = [std::io::IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        state
            .recv(UdpSockRef::from(&rx), &mut slices, &mut meta)
            .unwrap();
        assert_eq!(meta[0].len, 3);
        assert_eq!(meta[0].ecn.map(|e| e as u8), Some(0b10));
    }
}
