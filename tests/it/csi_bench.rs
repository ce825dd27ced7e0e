//! The CSI driver at scale, a benchmark (ignored by `cargo test`; `scripts/bench.sh` runs
//! it in release mode and prints its figures): 500 volumes of 2 resources over 50 service
//! accounts on one node. Figures only, no assertion on a speed: the driver's memory, the
//! upstream requests per token lifetime (the number of distinct keys), publish latency
//! when the key is cached, and how refreshes of keys fetched in the same second spread.

use crate::common::{eventually, now_secs};
use crate::csi_support::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const ACCOUNTS: usize = 50;
const PODS_PER_ACCOUNT: usize = 10;
/// Short enough to see every key refreshed within the run.
const TTL_SECS: u64 = 120;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh runs it"]
fn scale() {
    if !available() {
        return;
    }
    let accounts: Vec<(String, String)> = (0..ACCOUNTS)
        .map(|i| ("bench".to_string(), format!("sa-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = accounts
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let mut node = Node::new(&refs);
    node.emu.set_ttl(TTL_SECS);
    let k = node.start();
    let pid = node.driver.as_ref().map(|c| c.id()).unwrap_or(0);
    let rss_idle = status_field(pid, "VmRSS:");
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let started = Instant::now();
    // Which second (since the start) each key was first fetched in.
    let mut first_fetch: BTreeMap<u64, usize> = BTreeMap::new();
    for j in 0..PODS_PER_ACCOUNT {
        for (i, (ns, sa)) in accounts.iter().enumerate() {
            let pod = Pod::new(
                ns,
                &format!("p-{i}-{j}"),
                sa,
                APP_A,
                "management.azure.com,vault.azure.net",
            );
            let target = node.target(&pod.uid);
            let t = Instant::now();
            publish(&k, &pod, &format!("v-{i}-{j}"), &target).expect("publish");
            let took = ms(t.elapsed());
            if j == 0 {
                cold.push(took);
                *first_fetch.entry(started.elapsed().as_secs()).or_default() += 1;
            } else {
                warm.push(took);
            }
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let requests = node.emu.requests();
    let rss = status_field(pid, "VmRSS:");
    let threads = status_field(pid, "Threads:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // Every key's first refresh: the emulator's request count, sampled.
    let mut refresh_at: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seen = requests;
    let deadline = Duration::from_secs(TTL_SECS + 30);
    let _ = eventually(deadline, || {
        let now = node.emu.requests();
        if now > seen {
            *refresh_at.entry(started.elapsed().as_secs()).or_default() += now - seen;
            seen = now;
        }
        (now >= requests * 2).then_some(())
    });
    cold.sort_by(f64::total_cmp);
    warm.sort_by(f64::total_cmp);
    let most_first = first_fetch.values().max().copied().unwrap_or(0);
    let most_refresh = refresh_at.values().max().copied().unwrap_or(0);
    let span = match (refresh_at.keys().next(), refresh_at.keys().next_back()) {
        (Some(a), Some(b)) => b - a + 1,
        _ => 0,
    };
    println!("CSI-BENCH volumes {}", ACCOUNTS * PODS_PER_ACCOUNT);
    println!("CSI-BENCH keys {}", ACCOUNTS * 2);
    println!("CSI-BENCH publish_all_s {publish_secs:.1}");
    println!("CSI-BENCH upstream_requests_first_lifetime {requests}");
    println!("CSI-BENCH upstream_requests_refresh {}", seen - requests);
    println!(
        "CSI-BENCH publish_cached_ms_median {:.2}",
        quantile(&warm, 0.5)
    );
    println!(
        "CSI-BENCH publish_cached_ms_p99 {:.2}",
        quantile(&warm, 0.99)
    );
    println!(
        "CSI-BENCH publish_new_key_ms_median {:.2}",
        quantile(&cold, 0.5)
    );
    println!("CSI-BENCH rss_idle {rss_idle}");
    println!("CSI-BENCH rss_500_volumes {rss}");
    println!("CSI-BENCH threads {threads}");
    println!("CSI-BENCH open_fds {fds}");
    println!("CSI-BENCH first_fetches_most_in_one_second {most_first}");
    println!("CSI-BENCH refreshes_most_in_one_second {most_refresh}");
    println!("CSI-BENCH refreshes_spread_over_s {span}");
    let _ = now_secs();
}
