//! Shard figures: plain counters and HDR histograms, owned by one shard and never shared.
//!
//! Counters are plain `u64`s (one thread touches them); histograms record in microseconds
//! without allocating. Operators read them through the shard's status; tests read them
//! directly from the core.

use hdrhistogram::Histogram;
use std::time::Duration;

/// The numbered phases of a room tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// (1) Ingest: refill input budgets, measure input queues.
    Ingest = 0,
    /// (2) Apply inputs in sequence order.
    Apply = 1,
    /// (3) Simulate one step.
    Simulate = 2,
    /// (4) Build one snapshot per viewer.
    Snapshot = 3,
    /// (5) Flush: hand snapshots and events to connections and the mesh.
    Flush = 4,
}

/// Names of the phases, in order, for reports.
pub const PHASE_NAMES: [&str; 5] = ["ingest", "apply", "simulate", "snapshot", "flush"];

/// Tick health of one shard.
#[derive(Clone)]
pub struct TickStats {
    /// How late each room tick started after its deadline (µs).
    pub lateness_us: Histogram<u64>,
    /// Duration of each room tick (µs).
    pub duration_us: Histogram<u64>,
    /// Duration of each phase (µs), indexed by [`Phase`].
    pub phase_us: [Histogram<u64>; 5],
    /// Input commands waiting per seat at the ingest phase.
    pub input_queue_depth: Histogram<u64>,
    /// Ticks run.
    pub ticks: u64,
    /// Deadlines skipped because a tick started more than one period late.
    pub overruns: u64,
}

fn hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 2 significant figures (1% resolution). Shards copy these into their
    // report four times a second: at 2 figures each is ~18 KB, not ~140 KB, so the copy
    // costs microseconds on the tick task.
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds are valid")
}

impl Default for TickStats {
    fn default() -> Self {
        TickStats {
            lateness_us: hist(),
            duration_us: hist(),
            phase_us: [hist(), hist(), hist(), hist(), hist()],
            input_queue_depth: Histogram::new_with_bounds(1, 1024, 2)
                .expect("static histogram bounds are valid"),
            ticks: 0,
            overruns: 0,
        }
    }
}

/// Records a duration in a microsecond histogram, saturating at its upper bound.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros().min(u64::MAX as u128) as u64);
}

/// Counters of one shard.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// UDP datagrams received.
    pub udp_in: u64,
    /// UDP datagrams sent.
    pub udp_out: u64,
    /// UDP bytes received.
    pub udp_bytes_in: u64,
    /// UDP bytes sent.
    pub udp_bytes_out: u64,
    /// UDP sends that failed (buffer full or error).
    pub udp_send_errors: u64,
    /// Send system calls (`sendmmsg` batches): `udp_out / udp_send_calls` datagrams each.
    pub udp_send_calls: u64,
    /// Connections accepted.
    pub handshakes: u64,
    /// Connections refused because the shard was at its limit.
    pub refused_full: u64,
    /// New connections refused because their address held its share of sessions.
    pub refused_per_address: u64,
    /// New connections refused because the shard's handshake budget was spent.
    pub refused_handshakes: u64,
    /// Datagrams dropped at a first look because they cannot be QUIC for this shard
    /// (`shard::could_be_quic`), before quinn-proto parses them.
    pub not_quic: u64,
    /// New connections dropped because their address started too many handshakes a second.
    pub refused_handshake_rate: u64,
    /// QUIC Retry packets sent (address validation before a handshake is accepted).
    pub retries: u64,
    /// Connections refused (closed with DRAINING) because the process drains.
    pub refused_draining: u64,
    /// Sessions that completed hello.
    pub sessions: u64,
    /// Connections the server closed for bad input (any close code but normal end,
    /// shutdown, drain and kick).
    pub closed_for_bad_input: u64,
    /// QUIC datagrams from clients that failed verification.
    pub malformed_datagrams: u64,
    /// Control frames that failed verification or framing.
    pub malformed_frames: u64,
    /// Input datagrams from clients not in a room.
    pub input_not_in_room: u64,
    /// Input commands received and queued.
    pub inputs_received: u64,
    /// Input commands ignored as duplicates or older than what was applied.
    pub inputs_stale: u64,
    /// Input commands dropped because the seat's queue was full (flood or clock drift).
    pub inputs_dropped: u64,
    /// Input commands applied to games.
    pub inputs_applied: u64,
    /// Snapshot datagrams produced.
    pub snapshots: u64,
    /// Snapshot bytes produced.
    pub snapshot_bytes: u64,
    /// Entities that changed but did not fit their snapshot.
    pub snapshot_deferred: u64,
    /// Datagrams quinn refused to queue (too large or peer does not accept datagrams).
    pub datagram_send_errors: u64,
    /// Messages sent to other shards.
    pub mesh_out: u64,
    /// Messages received from other shards.
    pub mesh_in: u64,
    /// Messages for a peer shard dropped because too many waited for it (see
    /// `runtime::shard_loop::MAX_MESH_BACKLOG`).
    pub mesh_dropped: u64,
    /// Rooms created.
    pub rooms_created: u64,
    /// Rooms closed.
    pub rooms_closed: u64,
    /// Rooms ended because their game panicked.
    pub rooms_crashed: u64,
}

/// QUIC packet figures of a shard (its datagram counts are in [`Counters`]): quinn's per-connection statistics summed over its live
/// connections and those it has retired. Read a few times a second (reports, stats lines);
/// nothing is counted per packet for them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QuicStats {
    /// Packets sent that carried no ack-eliciting frame: acknowledgements alone. Estimated as
    /// packets sent minus ack-eliciting frames sent, so a packet that carried two such frames
    /// (a snapshot and a game event) hides one ACK-only packet: a lower bound, exact when every
    /// packet carries at most one.
    pub ack_only_out: u64,
    /// Packets received that carried no ack-eliciting frame (the same estimate).
    pub ack_only_in: u64,
    /// Packets quinn declared lost.
    pub lost_packets: u64,
}

impl QuicStats {
    /// Adds one connection's statistics.
    pub fn add(&mut self, s: &quinn_proto::ConnectionStats) {
        self.ack_only_out += s
            .udp_tx
            .datagrams
            .saturating_sub(ack_eliciting_frames(&s.frame_tx));
        self.ack_only_in += s
            .udp_rx
            .datagrams
            .saturating_sub(ack_eliciting_frames(&s.frame_rx));
        self.lost_packets += s.path.lost_packets;
    }
}

/// Frames that elicit an acknowledgement (every frame but ACK, PADDING and CONNECTION_CLOSE;
/// RFC 9002 §2), as quinn counts them.
fn ack_eliciting_frames(f: &quinn_proto::FrameStats) -> u64 {
    f.ack_frequency
        + f.crypto
        + f.data_blocked
        + f.datagram
        + f.handshake_done as u64
        + f.immediate_ack
        + f.max_data
        + f.max_stream_data
        + f.max_streams_bidi
        + f.max_streams_uni
        + f.new_connection_id
        + f.new_token
        + f.path_challenge
        + f.path_response
        + f.ping
        + f.reset_stream
        + f.retire_connection_id
        + f.stream_data_blocked
        + f.streams_blocked_bidi
        + f.streams_blocked_uni
        + f.stop_sending
        + f.stream
}
