//! Running [`Client`]s over real UDP sockets.

use crate::{Client, ClientConfig, ConnectError};
use bytes::BytesMut;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

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
        };
        c.flush()?;
        Ok(c)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends everything the client has queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let now = Instant::now();
        while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
            let data = &self.buf[..t.size];
            match t.segment_size {
                Some(seg) => {
                    for chunk in data.chunks(seg) {
                        self.bytes_out += chunk.len() as u64;
                        let _ = self.socket.send_to(chunk, t.destination);
                    }
                }
                None => {
                    self.bytes_out += data.len() as u64;
                    let _ = self.socket.send_to(data, t.destination);
                }
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
                    self.client.handle_datagram(
                        Instant::now(),
                        from,
                        BytesMut::from(&self.recv[..n]),
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
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
