//! A link conditioner in user space: loss, latency, jitter, reordering and duplication for
//! one direction of one link. The kernel here has no `netem`, so the swarm and the test
//! harness impair traffic themselves, with the same seeded decisions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Impairment of one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Probability a datagram is lost.
    pub loss: f64,
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay, uniform in `0..jitter` (reorders datagrams closer than the jitter).
    pub jitter: Duration,
    /// Probability a datagram is held back by an extra 0..3 latencies (reordering).
    pub reorder: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
}

impl Link {
    /// No impairment at all.
    pub const PERFECT: Link = Link {
        loss: 0.0,
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        reorder: 0.0,
        duplicate: 0.0,
    };

    /// A named preset, one direction: `good` (20 ms ± 5, 0.2% loss), `average` (50 ms ± 12,
    /// 2% loss), `poor` (100 ms ± 25, 4% loss, 1% reordered). Round trips are twice these.
    /// The figures follow the presets game netcode libraries ship (naia's link conditioner).
    pub fn preset(name: &str) -> Option<Link> {
        let ms = Duration::from_millis;
        Some(match name {
            "perfect" => Link::PERFECT,
            "good" => Link {
                loss: 0.002,
                latency: ms(20),
                jitter: ms(5),
                ..Link::PERFECT
            },
            "average" => Link {
                loss: 0.02,
                latency: ms(50),
                jitter: ms(12),
                ..Link::PERFECT
            },
            "poor" => Link {
                loss: 0.04,
                latency: ms(100),
                jitter: ms(25),
                reorder: 0.01,
                duplicate: 0.0,
            },
            _ => return None,
        })
    }

    /// Whether datagrams pass untouched (no queueing needed).
    pub fn is_perfect(&self) -> bool {
        *self == Link::PERFECT
    }
}

/// Seeded decisions for one direction: what happens to each datagram.
pub struct Conditioner {
    link: Link,
    rng: ChaCha8Rng,
    /// Datagrams dropped so far.
    pub dropped: u64,
    /// Extra copies delivered so far.
    pub duplicated: u64,
}

impl Conditioner {
    /// A conditioner for `link` whose decisions follow `seed`.
    pub fn new(link: Link, seed: u64) -> Self {
        Conditioner {
            link,
            rng: ChaCha8Rng::seed_from_u64(seed),
            dropped: 0,
            duplicated: 0,
        }
    }

    /// The link.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Decides the fate of one datagram: the delay of each copy to deliver (none: lost).
    pub fn decide(&mut self, out: &mut Vec<Duration>) {
        out.clear();
        let l = self.link;
        if l.loss > 0.0 && self.rng.gen_bool(l.loss.min(1.0)) {
            self.dropped += 1;
            return;
        }
        let copies = if l.duplicate > 0.0 && self.rng.gen_bool(l.duplicate.min(1.0)) {
            2
        } else {
            1
        };
        self.duplicated += copies - 1;
        for _ in 0..copies {
            let mut delay = l.latency;
            if !l.jitter.is_zero() {
                delay += l.jitter.mul_f64(self.rng.gen::<f64>());
            }
            if l.reorder > 0.0 && self.rng.gen_bool(l.reorder.min(1.0)) {
                delay += l.latency.mul_f64(self.rng.gen_range(0.0..3.0));
            }
            out.push(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_delay_follow_the_link_and_replay() {
        let link = Link::preset("poor").unwrap();
        let run = |seed| {
            let mut c = Conditioner::new(link, seed);
            let mut out = Vec::new();
            let mut delays = Vec::new();
            for _ in 0..20_000 {
                c.decide(&mut out);
                delays.extend_from_slice(&out);
            }
            (c.dropped, delays)
        };
        let (dropped, delays) = run(3);
        let rate = dropped as f64 / 20_000.0;
        assert!((0.03..0.05).contains(&rate), "loss {rate}");
        assert!(delays.iter().all(|d| *d >= link.latency));
        assert!(
            delays.iter().any(|d| *d > link.latency + link.jitter),
            "some are reordered"
        );
        assert_eq!(run(3), (dropped, delays), "the same seed decides the same");
    }

    #[test]
    fn presets_exist_and_perfect_is_untouched() {
        for p in ["perfect", "good", "average", "poor"] {
            assert!(Link::preset(p).is_some());
        }
        assert!(Link::preset("lunar").is_none());
        let mut c = Conditioner::new(Link::PERFECT, 1);
        let mut out = Vec::new();
        c.decide(&mut out);
        assert_eq!(out, vec![Duration::ZERO]);
    }
}
