//! `tickshard ctl`: fleet tools over the admin HTTP endpoint of one or many servers.
//!
//! Requests go through ureq (blocking HTTP/1.1, bounded timeouts); on top of it, a status
//! table across targets, and drain. Unreachable targets show their error in the
//! table instead of failing the whole command.

use serde_json::Value;
use std::time::Duration;

/// Timeout of one request, from connecting to the end of the body.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response read.
const MAX_RESPONSE: u64 = 16 << 20;

/// Sends one request to `target` (`HOST:PORT`, optionally prefixed `http://`); returns the
/// status code and body, whatever the status.
pub fn request(
    target: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String), String> {
    let target = target
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(body.to_owned())
        .map_err(|e| format!("bad target {target}: {e}"))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.run(req).map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, text))
}

/// The error message of a JSON error body, or the body itself.
fn error_of(status: u16, body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    format!("HTTP {status}: {msg}")
}

/// One row of the status table.
fn status_row(target: &str, token: Option<&str>) -> Vec<String> {
    let fail = |e: String| vec![target.to_string(), e];
    let (status, body) = match request(target, "GET", "/status", token, "") {
        Ok(r) => r,
        Err(e) => return fail(format!("error: {e}")),
    };
    if status != 200 {
        return fail(format!("error: {}", error_of(status, &body)));
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return fail("error: status is not JSON".into());
    };
    let shards = v["shards"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| shards.iter().filter_map(|s| s[k].as_u64()).sum::<u64>();
    let p99 = shards
        .iter()
        .filter_map(|s| s["tick_p99_us"].as_u64())
        .max()
        .unwrap_or(0);
    vec![
        target.to_string(),
        shards.len().to_string(),
        sum("rooms").to_string(),
        sum("players").to_string(),
        format!("{p99}"),
        v["process"]["draining"]
            .as_bool()
            .unwrap_or(false)
            .to_string(),
    ]
}

/// Fetches `/status` from every target and renders one table.
pub fn status_table(targets: &[String], token: Option<&str>) -> String {
    let mut rows = vec![vec![
        "TARGET".to_string(),
        "SHARDS".into(),
        "ROOMS".into(),
        "PLAYERS".into(),
        "TICK_P99_US".into(),
        "DRAINING".into(),
    ]];
    rows.extend(targets.iter().map(|t| status_row(t, token)));
    let cols = 6;
    let mut width = vec![0; cols];
    for r in &rows {
        // An error row spans the remaining columns; it does not widen them.
        if r.len() == cols {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        } else {
            width[0] = width[0].max(r[0].len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if r.len() == cols {
                    format!("{c:<w$}", w = width[i])
                } else {
                    format!("{c:<w$}", w = if i == 0 { width[0] } else { 0 })
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Drains `target` (the process, or one shard).
pub fn drain(target: &str, shard: Option<usize>, token: Option<&str>) -> Result<String, String> {
    let path = match shard {
        Some(n) => format!("/shards/{n}/drain"),
        None => "/drain".to_string(),
    };
    let (status, body) = request(target, "POST", &path, token, "")?;
    if (200..300).contains(&status) {
        Ok(match shard {
            Some(n) => format!("{target}: shard {n} draining (no new rooms)"),
            None => format!("{target}: draining"),
        })
    } else {
        Err(format!("{target}: {}", error_of(status, &body)))
    }
}
