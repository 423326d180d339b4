//! `/metrics`: the shards' last reports in the OpenMetrics text format, through
//! prometheus-client.
//!
//! The shards do not count into Prometheus metrics themselves (that would put atomics on the
//! packet path): each publishes a [`ShardReport`] a few times a second, and a scrape encodes
//! the latest ones with a custom [`Collector`]: counters and gauges as constant values, the
//! tick histograms (HDR histograms in the shard) folded into the buckets below. The sample
//! names are the dashboard's (`deploy/`): `tickshard_ticks_total`,
//! `tickshard_tick_duration_seconds_bucket{shard,phase,le}`, and so on.

use crate::shard::operator::ShardReport;
use crate::shard::stats::PHASE_NAMES;
use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Bucket bounds (seconds) of the tick lateness and duration histograms.
pub const TIME_BUCKETS: [f64; 16] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];
/// Bucket bounds of the input queue depth histogram (commands).
pub const DEPTH_BUCKETS: [f64; 9] = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

/// The content type of [`render_metrics`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every metric of the process from the shards' latest reports.
pub fn render_metrics(
    reports: &[Option<Arc<ShardReport>>],
    uptime: Duration,
    draining: bool,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Reports {
        shards: reports.iter().flatten().cloned().collect(),
        uptime,
        draining,
    }));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// One scrape's view of the process.
struct Reports {
    shards: Vec<Arc<ShardReport>>,
    uptime: Duration,
    draining: bool,
}

impl fmt::Debug for Reports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reports")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;
/// A counter of a report, by its label value.
type ByLabel<'a> = &'a [(&'a str, fn(&ShardReport) -> u64)];

fn shard(r: &ShardReport) -> Labels {
    vec![("shard", r.shard.0.to_string())]
}

fn with(mut l: Labels, key: &'static str, value: &str) -> Labels {
    l.push((key, value.to_string()));
    l
}

/// The per-bucket counts of `h` (values scaled by `scale`) under `bounds`, then `+Inf`; and
/// the sum. The HDR histogram keeps no exact sum: the sum is its mean times its count. A
/// value recorded exactly on a bound counts under that bound.
fn buckets(h: &Histogram<u64>, bounds: &[f64], scale: f64) -> (Vec<(f64, u64)>, f64) {
    let mut counts: Vec<(f64, u64)> = bounds.iter().map(|&b| (b, 0)).collect();
    counts.push((f64::MAX, 0));
    for v in h.iter_recorded() {
        let value = h.lowest_equivalent(v.value_iterated_to()) as f64 * scale;
        let i = bounds
            .iter()
            .position(|&b| value <= b * (1.0 + 1e-9))
            .unwrap_or(bounds.len());
        counts[i].1 += v.count_at_value();
    }
    let sum = if h.is_empty() {
        0.0
    } else {
        h.mean() * h.len() as f64 * scale
    };
    (counts, sum)
}

impl Reports {
    fn histograms(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        series: impl Fn(&ShardReport) -> Vec<(Labels, &Histogram<u64>)>,
        bounds: &[f64],
        scale: f64,
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for r in &self.shards {
            for (labels, h) in series(r) {
                let (counts, sum) = buckets(h, bounds, scale);
                family.encode_family(&labels)?.encode_histogram::<Labels>(
                    sum,
                    h.len(),
                    &counts,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

/// A counter (`name` without `_total`: the encoder adds it) or a gauge with one value per
/// label set.
fn values(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let metric = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(metric)?,
            _ => ConstGauge::new(v).encode(metric)?,
        }
    }
    Ok(())
}

/// A gauge with one value and no labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Reports {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        let info = Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]);
        info.encode(e.encode_descriptor(
            "tickshard_build",
            "Build information.",
            None,
            MetricType::Info,
        )?)?;
        gauge(
            e,
            "tickshard_uptime_seconds",
            "Seconds since the process started.",
            self.uptime.as_secs_f64(),
        )?;
        gauge(
            e,
            "tickshard_draining",
            "1 while the process drains.",
            f64::from(u8::from(self.draining)),
        )?;
        self.histograms(
            e,
            "tickshard_tick_lateness_seconds",
            "How late each room tick started after its deadline.",
            |r| vec![(shard(r), &r.ticks.lateness_us)],
            &TIME_BUCKETS,
            1e-6,
        )?;
        self.histograms(
            e,
            "tickshard_tick_duration_seconds",
            "Duration of each room tick, in total and by phase.",
            |r| {
                let mut v = vec![(with(shard(r), "phase", "total"), &r.ticks.duration_us)];
                for (name, h) in PHASE_NAMES.iter().zip(&r.ticks.phase_us) {
                    v.push((with(shard(r), "phase", name), h));
                }
                v
            },
            &TIME_BUCKETS,
            1e-6,
        )?;
        self.histograms(
            e,
            "tickshard_input_queue_depth",
            "Input commands waiting per seat at the ingest phase.",
            |r| vec![(shard(r), &r.ticks.input_queue_depth)],
            &DEPTH_BUCKETS,
            1.0,
        )?;
        type Get = fn(&ShardReport) -> f64;
        let simple: [(&str, MetricType, &str, Get); 11] = [
            (
                "tickshard_tick_overruns",
                Counter,
                "Tick deadlines skipped.",
                |r| r.ticks.overruns as f64,
            ),
            ("tickshard_ticks", Counter, "Room ticks run.", |r| {
                r.ticks.ticks as f64
            }),
            ("tickshard_rooms", Gauge, "Rooms hosted.", |r| {
                r.rooms.len() as f64
            }),
            (
                "tickshard_players",
                Gauge,
                "Welcomed players connected.",
                |r| r.players as f64,
            ),
            (
                "tickshard_connections",
                Gauge,
                "Open QUIC connections.",
                |r| r.connections as f64,
            ),
            (
                "tickshard_handshakes",
                Counter,
                "Connections accepted.",
                |r| r.counters.handshakes as f64,
            ),
            (
                "tickshard_shard_draining",
                Gauge,
                "1 while the shard drains.",
                |r| f64::from(u8::from(r.drain.is_draining())),
            ),
            (
                "tickshard_shard_cpu_seconds",
                Counter,
                "CPU time of the shard thread.",
                |r| r.cpu_seconds,
            ),
            (
                "tickshard_retries",
                Counter,
                "QUIC Retry packets sent: clients asked to prove their address before a handshake.",
                |r| r.counters.retries as f64,
            ),
            (
                "tickshard_rooms_crashed",
                Counter,
                "Rooms ended because their game panicked (the shard and its other rooms go on).",
                |r| r.counters.rooms_crashed as f64,
            ),
            (
                "tickshard_udp_send_calls",
                Counter,
                "Send system calls; each gives the kernel a batch of datagrams.",
                |r| r.counters.udp_send_calls as f64,
            ),
        ];
        for (name, kind, help, get) in simple {
            values(
                e,
                name,
                help,
                kind,
                self.shards.iter().map(|r| (shard(r), get(r))),
            )?;
        }
        // Counters with one label: (name, help, label, (value, get) per label value).
        let labelled: [(&str, &str, &str, ByLabel<'_>); 4] = [
            (
                "tickshard_connections_refused",
                "Connections refused, by reason: the shard at its player limit, the process draining, the address at its share, the handshake budget spent, the address's handshake rate passed.",
                "reason",
                &[
                    ("full", |r| r.counters.refused_full),
                    ("draining", |r| r.counters.refused_draining),
                    ("per_address", |r| r.counters.refused_per_address),
                    ("handshake_budget", |r| r.counters.refused_handshakes),
                    ("handshake_rate", |r| r.counters.refused_handshake_rate),
                ],
            ),
            (
                "tickshard_datagrams",
                "UDP datagrams by direction.",
                "direction",
                &[
                    ("in", |r| r.counters.udp_in),
                    ("out", |r| r.counters.udp_out),
                ],
            ),
            (
                "tickshard_bytes",
                "UDP bytes by direction.",
                "direction",
                &[
                    ("in", |r| r.counters.udp_bytes_in),
                    ("out", |r| r.counters.udp_bytes_out),
                ],
            ),
            (
                "tickshard_drops",
                "Things dropped, by reason.",
                "reason",
                &[
                    ("not_quic", |r| r.counters.not_quic),
                    ("malformed_datagram", |r| r.counters.malformed_datagrams),
                    ("malformed_frame", |r| r.counters.malformed_frames),
                    ("input_not_in_room", |r| r.counters.input_not_in_room),
                    ("input_stale", |r| r.counters.inputs_stale),
                    ("input_queue_full", |r| r.counters.inputs_dropped),
                    ("udp_send_error", |r| r.counters.udp_send_errors),
                    ("datagram_send_error", |r| r.counters.datagram_send_errors),
                    ("snapshot_deferred", |r| r.counters.snapshot_deferred),
                    ("mesh_backlog_full", |r| r.counters.mesh_dropped),
                ],
            ),
        ];
        for (name, help, key, pairs) in labelled {
            let samples = self.shards.iter().flat_map(|r| {
                pairs
                    .iter()
                    .map(move |(v, get)| (with(shard(r), key, v), get(r) as f64))
            });
            values(e, name, help, Counter, samples)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hdr_values_fold_into_buckets_with_their_sum() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in [5u64, 20, 20, 700, 3_000, 2_000_000] {
            h.record(v).unwrap();
        }
        let (counts, sum) = buckets(&h, &[0.00001, 0.001, 0.01], 1e-6);
        assert_eq!(
            counts,
            vec![(0.00001, 1), (0.001, 3), (0.01, 1), (f64::MAX, 1)]
        );
        assert!((sum - 2.003745).abs() < 0.01, "{sum}");
        // A value on a bound counts under it.
        let (counts, _) = buckets(&h, &[0.00002], 1e-6);
        assert_eq!(counts, vec![(0.00002, 3), (f64::MAX, 3)]);
    }
}
