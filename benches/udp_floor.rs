//! The kernel's floor under the swarm benchmark's workload: what one core spends on nothing but
//! moving the datagrams, with no QUIC, no game and no snapshot.
//!
//! ```text
//! cargo bench --bench udp_floor                       # 1,000 players, sendmsg per datagram
//! cargo bench --bench udp_floor -- --players 2000 --mmsg --secs 10
//! ```
//!
//! A server thread pinned to core 0 owns one UDP socket. Every 1/30 s it sends each player one
//! datagram of `--down` bytes (the size of a tickshard snapshot datagram), one `sendmsg` each as
//! the shard does (or `sendmmsg` batches of 64 with `--mmsg`), and in between it drains
//! `recvmmsg` batches of 64 while it sleeps in `ppoll`, as the shard's receive pass does. A
//! client thread pinned to core 1 stands in for the swarm: players share sockets 256 to one,
//! as client-sim's do, each sending one datagram of `--up` bytes per tick. The figure is the
//! server thread's CPU time (user + system, `getrusage(RUSAGE_THREAD)`) over the measured
//! seconds, per player-tick: any server that sends one datagram each way per player-tick over
//! loopback on this machine spends at least this.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const PER_SOCKET: usize = 256;

struct Opts {
    players: usize,
    up: usize,
    down: usize,
    secs: u64,
    mmsg: bool,
    tick_rate: u32,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        players: 1000,
        up: 78,
        down: 158,
        secs: 10,
        mmsg: false,
        tick_rate: 30,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--players" => o.players = num("--players").max(1) as usize,
            "--up" => o.up = num("--up").clamp(1, 1400) as usize,
            "--down" => o.down = num("--down").clamp(1, 1400) as usize,
            "--secs" => o.secs = num("--secs").max(1),
            "--tick-rate" => o.tick_rate = num("--tick-rate").clamp(1, 240) as u32,
            "--mmsg" => o.mmsg = true,
            // `cargo bench` passes --bench; filters do not apply here.
            _ => {}
        }
    }
    o
}

fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; the casts write a sockaddr_in inside it.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let SocketAddr::V4(v4) = addr else {
            panic!("the floor bench runs on IPv4 loopback")
        };
        let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = v4.port().to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        (
            ss,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    }
}

/// Sends `payload` to each of `dests` (one per player), one system call per datagram or
/// `sendmmsg` batches of [`BATCH`].
fn send_all(
    fd: i32,
    payload: &[u8],
    dests: &[(libc::sockaddr_storage, libc::socklen_t)],
    mmsg: bool,
) {
    if !mmsg {
        for (ss, len) in dests {
            // SAFETY: payload and address outlive the call.
            unsafe {
                libc::sendto(
                    fd,
                    payload.as_ptr().cast(),
                    payload.len(),
                    0,
                    ss as *const _ as *const libc::sockaddr,
                    *len,
                );
            }
        }
        return;
    }
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    for chunk in dests.chunks(BATCH) {
        // SAFETY: every header points at the one iovec and at an address in `chunk`, all of
        // which outlive the call.
        unsafe {
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for (h, (ss, len)) in hdrs.iter_mut().zip(chunk) {
                h.msg_hdr.msg_name = ss as *const _ as *mut _;
                h.msg_hdr.msg_namelen = *len;
                h.msg_hdr.msg_iov = &mut iov;
                h.msg_hdr.msg_iovlen = 1;
            }
            let mut sent = 0;
            while sent < chunk.len() {
                let r = libc::sendmmsg(
                    fd,
                    hdrs[sent..].as_mut_ptr(),
                    (chunk.len() - sent) as u32,
                    0,
                );
                if r <= 0 {
                    break;
                }
                sent += r as usize;
            }
        }
    }
}

/// Drains every datagram waiting on `fd` with `recvmmsg`; returns how many there were.
fn drain(fd: i32, bufs: &mut [[u8; 1500]; BATCH]) -> usize {
    let mut total = 0;
    loop {
        // SAFETY: each header points at its own buffer, which outlives the call.
        let r = unsafe {
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for i in 0..BATCH {
                iovs[i].iov_base = bufs[i].as_mut_ptr().cast();
                iovs[i].iov_len = bufs[i].len();
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return total;
        }
        total += r as usize;
    }
}

/// Sleeps in `ppoll` until one of `fds` is readable or `until` passes.
fn wait(fds: &[i32], until: Instant) {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: left.as_secs() as libc::time_t,
        tv_nsec: left.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the pollfd array and timespec outlive the call.
    unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        );
    }
}

struct ServerResult {
    cpu: Duration,
    ticks: u64,
    received: u64,
}

fn main() -> io::Result<()> {
    let o = parse_opts();
    let period = Duration::from_secs(1) / o.tick_rate;
    let server = UdpSocket::bind("127.0.0.1:0")?;
    server.set_nonblocking(true)?;
    let server_addr = server.local_addr()?;
    let mut clients = Vec::new();
    for _ in 0..o.players.div_ceil(PER_SOCKET) {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_nonblocking(true)?;
        clients.push(s);
    }
    for fd in std::iter::once(server.as_raw_fd()).chain(clients.iter().map(|s| s.as_raw_fd())) {
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let bytes: libc::c_int = 4 << 20;
            // SAFETY: the option value is a c_int that outlives the call.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &bytes as *const _ as *const _,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    let dests: Vec<_> = (0..o.players)
        .map(|i| sockaddr(clients[i / PER_SOCKET].local_addr().expect("bound")))
        .collect();
    let warmup = Duration::from_secs(2);
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + warmup;
    let end = measure_from + Duration::from_secs(o.secs);
    let stop = Arc::new(AtomicBool::new(false));

    let (down, mmsg) = (o.down, o.mmsg);
    let server_thread = std::thread::spawn(move || {
        pin(0);
        let fd = server.as_raw_fd();
        let payload = vec![0x5au8; down];
        let mut bufs = Box::new([[0u8; 1500]; BATCH]);
        let mut next = start;
        let mut cpu0 = None;
        let (mut ticks, mut received) = (0u64, 0u64);
        loop {
            wait(&[fd], next);
            let n = drain(fd, &mut bufs) as u64;
            let now = Instant::now();
            if now >= next {
                if next >= end {
                    break;
                }
                if next >= measure_from && cpu0.is_none() {
                    cpu0 = Some(thread_cpu());
                }
                send_all(fd, &payload, &dests, mmsg);
                if cpu0.is_some() {
                    ticks += 1;
                }
                next += period;
            }
            if cpu0.is_some() {
                received += n;
            }
        }
        ServerResult {
            cpu: thread_cpu() - cpu0.unwrap_or_default(),
            ticks,
            received,
        }
    });

    let (players, up) = (o.players, o.up);
    let client_stop = stop.clone();
    let client_thread = std::thread::spawn(move || {
        pin(1);
        let fds: Vec<i32> = clients.iter().map(|s| s.as_raw_fd()).collect();
        let payload = vec![0xa5u8; up];
        let dest = [sockaddr(server_addr)];
        let mut bufs = Box::new([[0u8; 1500]; BATCH]);
        let mut next = start + period / 2;
        let mut received = 0u64;
        while !client_stop.load(Ordering::Relaxed) {
            wait(&fds, next);
            for &fd in &fds {
                received += drain(fd, &mut bufs) as u64;
            }
            if Instant::now() >= next {
                for (i, &fd) in fds.iter().enumerate() {
                    let on_socket = (players - i * PER_SOCKET).min(PER_SOCKET);
                    let to: Vec<_> = std::iter::repeat_n(dest[0], on_socket).collect();
                    send_all(fd, &payload, &to, true);
                }
                next += period;
            }
        }
        received
    });

    let r = server_thread.join().expect("server thread");
    stop.store(true, Ordering::Relaxed);
    let client_received = client_thread.join().expect("client thread");
    let player_ticks = (r.ticks * o.players as u64).max(1);
    let us = r.cpu.as_secs_f64() * 1e6;
    println!(
        "udp floor: {} players, {} Hz, up {} B, down {} B, {} ({} s measured)",
        o.players,
        o.tick_rate,
        o.up,
        o.down,
        if o.mmsg {
            "sendmmsg"
        } else {
            "sendmsg per datagram"
        },
        o.secs
    );
    println!(
        "  server thread CPU {:.3} s: {:.2} µs per player-tick, {:.2} µs per datagram (in + out)",
        r.cpu.as_secs_f64(),
        us / player_ticks as f64,
        us / (player_ticks + r.received).max(1) as f64,
    );
    println!(
        "  datagrams in per player-tick {:.3}; the clients received {} in all",
        r.received as f64 / player_ticks as f64,
        client_received
    );
    Ok(())
}
