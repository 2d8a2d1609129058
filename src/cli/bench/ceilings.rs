//! What the machine allows each phase, from the other phases of the same run: the bounds that
//! say whether a target is within reach here at all, beside the ratio measured.

use super::Row;

/// With the transport floor measured in the same run, the best ratio each token phase can
/// reach, by issue 7's own model: ratio = device time / (device time + per-request time), where
/// the device time per operation is 1/raw and the least per-request time is 1/floor (the front
/// answering nothing, load generator included), both measured with the machine to themselves.
/// A batch pays the request once for all its items (its body is larger than the floor's, so
/// this bound is generous to batches). The audited ceiling takes 1/null instead: the least a
/// request costs once it is authorized, policy-checked, logged and durably audited, which the
/// product requires of every key operation.
///
/// That model adds times, so it cannot see work overlapping: idle CPU in the raw windows
/// (SoftHSM's threads waiting on each other's locks) or a device computing beside the request
/// path (swtpm, its own process). The CPU bound counts only CPU: `cpus` busy all the time, each
/// request paying the raw call's CPU and the audited `null` request's CPU, daemon and load
/// generator. It needs the token's work on this machine's CPUs in the calling process, which
/// holds for SoftHSM (`in_process`), not for a TPM. A target above it is out of reach here
/// whatever the daemon does, unless a signing request could cost less CPU than the no-op
/// `null` request plus the raw call (`perf` found the daemon's token call within 2 % of the
/// raw one; BENCHMARKS.md, 2026-12-04).
pub fn add_ceilings(rows: &mut [Row], clients: usize, cpus: usize, in_process: bool) {
    let find = |phase: &str| rows.iter().find(|r| r.phase == phase);
    let floor = find("tls-floor").map(|r| r.daemon_ops_per_s);
    let null = find("null").map(|r| r.daemon_ops_per_s);
    let null_cpu_us = find("null")
        .filter(|_| in_process)
        .and_then(|r| Some(r.daemon_cpu_us_per_op? + r.client_cpu_us_per_op?));
    let ceiling = |raw: f64, batch: usize, front: f64| {
        let per_request = 1.0 / (front * batch as f64);
        (1.0 / raw) / (1.0 / raw + per_request)
    };
    for r in rows.iter_mut() {
        let Some(raw) = r.raw_ops_per_s.filter(|&raw| raw > 0.0) else {
            continue;
        };
        r.ceiling_ratio = floor.map(|f| ceiling(raw, r.batch, f));
        r.audited_ceiling_ratio = null.map(|n| ceiling(raw, r.batch, n));
        r.cpu_bound_ratio = null_cpu_us
            .zip(r.raw_cpu_us_per_op)
            .map(|(null_us, raw_us)| {
                let us_per_op = raw_us + null_us / r.batch as f64;
                cpus as f64 * 1e6 / us_per_op / raw
            });
        r.mean_ms_at_raw_rate = Some(1e3 * (clients * r.batch) as f64 / raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(phase: &str, batch: usize, raw: Option<(f64, f64)>, daemon: (f64, f64)) -> Row {
        Row {
            phase: phase.into(),
            key_type: None,
            batch,
            raw_ops_per_s: raw.map(|r| r.0),
            raw_cpu_us_per_op: raw.map(|r| r.1),
            daemon_ops_per_s: daemon.0,
            ratio: None,
            target_ratio: None,
            ceiling_ratio: None,
            audited_ceiling_ratio: None,
            cpu_bound_ratio: None,
            mean_ms_at_raw_rate: None,
            p50_ms: 0.0,
            p99_ms: 0.0,
            errors: 0,
            daemon_cpu_us_per_op: Some(daemon.1),
            daemon_cpu_us_by_thread: None,
            audit_commits: None,
            client_cpu_us_per_op: Some(daemon.1 / 2.0),
        }
    }

    /// The figures of a run on the development VM (rounded): a floor of 125k/s, an audited
    /// no-op request at 50k/s costing 20 us in the daemon and 10 in the load generator, and an
    /// ECDSA token at 40k/s costing 45 us of CPU a signature.
    fn run() -> Vec<Row> {
        vec![
            measured("tls-floor", 1, None, (125_000.0, 7.0)),
            measured("null", 1, None, (50_000.0, 20.0)),
            measured("ecdsa-sign", 1, Some((40_000.0, 45.0)), (20_000.0, 80.0)),
            measured("hmac-batch", 64, Some((80_000.0, 20.0)), (70_000.0, 23.0)),
        ]
    }

    #[test]
    fn ceilings_follow_the_model_and_the_cpu_bound_counts_cpu_only() {
        let mut rows = run();
        add_ceilings(&mut rows, 64, 2, true);
        let ecdsa = &rows[2];
        // 25 us of device time against 8 us of front, then 20 us of audited request.
        assert!((ecdsa.ceiling_ratio.unwrap() - 25.0 / 33.0).abs() < 1e-9);
        assert!((ecdsa.audited_ceiling_ratio.unwrap() - 25.0 / 45.0).abs() < 1e-9);
        // Two CPUs, 45 + 20 + 10 us a request: 26.7k/s at most, 0.67 of 40k/s.
        assert!((ecdsa.cpu_bound_ratio.unwrap() - 2e6 / 75.0 / 40_000.0).abs() < 1e-9);
        // 64 clients at 40k/s wait 1.6 ms on average.
        assert!((ecdsa.mean_ms_at_raw_rate.unwrap() - 1.6).abs() < 1e-9);
        // A batch of 64 pays one request for all its items.
        let batch = &rows[3];
        let per_item = 20.0 + 30.0 / 64.0;
        assert!((batch.cpu_bound_ratio.unwrap() - 2e6 / per_item / 80_000.0).abs() < 1e-9);
        assert!((batch.mean_ms_at_raw_rate.unwrap() - 1e3 * 64.0 * 64.0 / 80_000.0).abs() < 1e-9);
        // Phases without a raw side get none.
        assert!(rows[..2].iter().all(|r| r.ceiling_ratio.is_none()
            && r.cpu_bound_ratio.is_none()
            && r.mean_ms_at_raw_rate.is_none()));
    }

    #[test]
    fn a_device_working_elsewhere_gets_no_cpu_bound_and_a_missing_phase_no_ceiling() {
        let mut rows = run();
        add_ceilings(&mut rows, 64, 2, false);
        assert!(rows[2].cpu_bound_ratio.is_none());
        assert!(rows[2].audited_ceiling_ratio.is_some());

        let mut rows: Vec<Row> = run().into_iter().skip(1).collect();
        add_ceilings(&mut rows, 64, 2, true);
        assert!(rows[1].ceiling_ratio.is_none(), "no tls-floor in the run");
        assert!(rows[1].audited_ceiling_ratio.is_some());
    }
}
