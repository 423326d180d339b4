//! Running [`Client`]s over real UDP sockets.

use crate::link::{Conditioner, Link};
use crate::{Client, ClientConfig, ConnectError};
use bytes::BytesMut;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// A held datagram: delivery time, arrival order, bytes, peer address.
type Held = Reverse<(Instant, u64, Vec<u8>, SocketAddr)>;

/// Datagrams held back by a link conditioner until their delivery time.
pub(crate) struct Delayed {
    pub(crate) conditioner: Conditioner,
    queue: BinaryHeap<Held>,
    seq: u64,
    delays: Vec<Duration>,
}

impl Delayed {
    pub(crate) fn new(link: Link, seed: u64) -> Self {
        Delayed {
            conditioner: Conditioner::new(link, seed),
            queue: BinaryHeap::new(),
            seq: 0,
            delays: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, now: Instant, data: &[u8], addr: SocketAddr) {
        self.conditioner.decide(&mut self.delays);
        for d in &self.delays {
            self.seq += 1;
            self.queue
                .push(Reverse((now + *d, self.seq, data.to_vec(), addr)));
        }
    }

    /// When the next held datagram is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, ..))| *at)
    }

    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Vec<u8>, SocketAddr)> {
        if self
            .queue
            .peek()
            .is_some_and(|Reverse((at, ..))| *at <= now)
        {
            self.queue.pop().map(|Reverse((_, _, d, a))| (d, a))
        } else {
            None
        }
    }
}

/// A [`Client`] with its own non-blocking UDP socket.
pub struct UdpClient {
    /// The protocol state.
    pub client: Client,
    socket: UdpSocket,
    buf: Vec<u8>,
    recv: Vec<u8>,
    /// Bytes received from the network.
    pub bytes_in: u64,
    /// Bytes sent to the network.
    pub bytes_out: u64,
    up: Option<Delayed>,
    down: Option<Delayed>,
}

/// Why a socket client failed.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// Connect error.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl UdpClient {
    /// Binds a socket on loopback (or the unspecified address for remote servers) and starts
    /// connecting.
    pub fn connect(
        server: SocketAddr,
        config: &ClientConfig,
        seed: Option<[u8; 32]>,
    ) -> Result<Self, DriveError> {
        let bind: SocketAddr = match (server.is_ipv6(), server.ip().is_loopback()) {
            (false, true) => "127.0.0.1:0".parse().expect("static"),
            (false, false) => "0.0.0.0:0".parse().expect("static"),
            (true, true) => "[::1]:0".parse().expect("static"),
            (true, false) => "[::]:0".parse().expect("static"),
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        let client = Client::connect(Instant::now(), config, server, seed)?;
        let mut c = UdpClient {
            client,
            socket,
            buf: Vec::with_capacity(2048),
            recv: vec![0; 65536],
            bytes_in: 0,
            bytes_out: 0,
            up: None,
            down: None,
        };
        c.flush()?;
        Ok(c)
    }

    /// Impairs this client's traffic: `up` for what it sends, `down` for what it receives.
    /// Decisions follow `seed`.
    pub fn set_link(&mut self, up: Link, down: Link, seed: u64) {
        self.up = (!up.is_perfect()).then(|| Delayed::new(up, seed ^ 0x5550));
        self.down = (!down.is_perfect()).then(|| Delayed::new(down, seed ^ 0xd0d0));
    }

    /// Datagrams the conditioner dropped: (upstream, downstream).
    pub fn link_dropped(&self) -> (u64, u64) {
        (
            self.up.as_ref().map_or(0, |d| d.conditioner.dropped),
            self.down.as_ref().map_or(0, |d| d.conditioner.dropped),
        )
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends everything the client has queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let now = Instant::now();
        while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
            let seg = t.segment_size.unwrap_or(t.size).max(1);
            for chunk in self.buf[..t.size].chunks(seg) {
                match &mut self.up {
                    Some(up) => up.push(now, chunk, t.destination),
                    None => {
                        self.bytes_out += chunk.len() as u64;
                        let _ = self.socket.send_to(chunk, t.destination);
                    }
                }
            }
        }
        if let Some(up) = &mut self.up {
            while let Some((data, to)) = up.pop_due(now) {
                self.bytes_out += data.len() as u64;
                let _ = self.socket.send_to(&data, to);
            }
        }
        Ok(())
    }

    /// Receives what is waiting, runs due timers and flushes. Does not block.
    pub fn poll_io(&mut self) -> io::Result<()> {
        loop {
            match self.socket.recv_from(&mut self.recv) {
                Ok((n, from)) => {
                    self.bytes_in += n as u64;
                    let now = Instant::now();
                    match &mut self.down {
                        Some(down) => down.push(now, &self.recv[..n], from),
                        None => {
                            self.client
                                .handle_datagram(now, from, BytesMut::from(&self.recv[..n]))
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
        if let Some(down) = &mut self.down {
            let now = Instant::now();
            while let Some((data, from)) = down.pop_due(now) {
                self.client
                    .handle_datagram(now, from, BytesMut::from(&data[..]));
            }
        }
        self.client.handle_timeout(Instant::now());
        self.flush()
    }

    /// Runs I/O for `d`, sleeping briefly between polls.
    pub fn run_for(&mut self, d: Duration) -> io::Result<()> {
        let end = Instant::now() + d;
        loop {
            self.poll_io()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            std::thread::sleep((end - now).min(Duration::from_millis(1)));
        }
    }
}
