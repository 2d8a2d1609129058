//! The bench's tables: the phases side by side, then the daemon's CPU by thread and its audit
//! group commits for the phases that report them.

use super::{BenchArgs, Row};

pub fn print(rows: &[Row], args: &BenchArgs) {
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    out!(
        "{} clients over mTLS vs {} raw backend threads; {} s measured after {} s warm-up; {}-byte messages; batches of {}",
        args.clients, args.raw_threads, args.seconds, args.warmup, args.message_size, args.batch_size
    );
    out!(
        "| phase | raw ops/s | daemon ops/s | ratio (target) | ceiling: front / audited / CPU | p50 ms | p99 ms | mean ms at raw rate | errors | raw CPU us/op | daemon CPU us/op | client CPU us/op |"
    );
    out!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let ratio = match (r.ratio, r.target_ratio) {
            (Some(ratio), Some(t)) => format!("{ratio:.2} (>= {t:.2})"),
            _ => "-".into(),
        };
        let ceilings = match (r.ceiling_ratio, r.audited_ceiling_ratio, r.cpu_bound_ratio) {
            (None, None, None) => "-".into(),
            (front, audited, cpu) => {
                format!("{} / {} / {}", opt(front, 2), opt(audited, 2), opt(cpu, 2))
            }
        };
        out!(
            "| {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.phase,
            opt(r.raw_ops_per_s, 0),
            r.daemon_ops_per_s,
            ratio,
            ceilings,
            r.p50_ms,
            r.p99_ms,
            opt(r.mean_ms_at_raw_rate, 2),
            r.errors,
            opt(r.raw_cpu_us_per_op, 1),
            opt(r.daemon_cpu_us_per_op, 1),
            opt(r.client_cpu_us_per_op, 1)
        );
    }
    let split: Vec<_> = rows
        .iter()
        .filter_map(|r| Some((r, r.daemon_cpu_us_by_thread?)))
        .collect();
    if !split.is_empty() {
        out!();
        out!("Daemon CPU us/op by thread (the floor server's in tls-floor):");
        out!("| phase | async workers | device threads | audit writer | other |");
        out!("|---|---:|---:|---:|---:|");
        for (r, t) in split {
            out!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.phase,
                t.workers,
                t.device,
                t.audit,
                t.other
            );
        }
    }
    let commits: Vec<_> = rows
        .iter()
        .filter_map(|r| Some((r, r.audit_commits?)))
        .collect();
    if !commits.is_empty() {
        out!();
        out!("Audit group commits in the daemon windows (each request waits for its group to be held open, then written):");
        out!("| phase | commits/s | entries per commit | held open ms | write ms |");
        out!("|---|---:|---:|---:|---:|");
        for (r, c) in commits {
            out!(
                "| {} | {:.0} | {:.1} | {:.3} | {:.3} |",
                r.phase,
                c.per_s,
                c.entries_per_commit,
                c.open_ms,
                c.write_ms
            );
        }
    }
}
