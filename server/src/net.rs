//! Sockets: one public UDP port shared by every shard, steered by connection ID.
//!
//! Each shard gets its own UDP socket bound to the same address with `SO_REUSEPORT`. A classic
//! BPF program attached with `SO_ATTACH_REUSEPORT_CBPF` picks the socket for each datagram: it
//! reads the byte of the destination connection ID that names the shard (short header: offset
//! 1; long header: offset 6, after flags, version and the DCID length) and returns it modulo
//! the number of shards. A client's first Initial carries a random DCID, so new connections
//! spread over shards; every later packet carries a connection ID the accepting shard issued
//! ([`crate::cid`]), so it reaches that shard even after the client's address changes.
//!
//! Where the kernel refuses the program, each shard binds its own port instead (base port
//! plus the shard number), and the server logs it.

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
}
