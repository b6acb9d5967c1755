//! `voxgate deliver`: a bus delivery worker (see `bus::deliver`).

use std::path::PathBuf;

use axum::routing::get;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct DeliverArgs {
    /// TOML config file (its `[bus]` section is required); `VOXGATE_*` variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Partitions this worker owns: `all`, or a comma list such as `0,1,2,3`.
    #[arg(long, default_value = "all")]
    pub partitions: String,
    /// Serve Prometheus metrics and /livez on this address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

/// Parses `all` or `0,1,2` against the configured partition count.
pub fn parse_partitions(spec: &str, count: u32) -> anyhow::Result<Vec<u32>> {
    if spec == "all" {
        return Ok((0..count).collect());
    }
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let p: u32 = part
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--partitions: {part:?} is not a number"))?;
        anyhow::ensure!(
            p < count,
            "--partitions: {p} is out of range (bus.partitions = {count})"
        );
        if !out.contains(&p) {
            out.push(p);
        }
    }
    anyhow::ensure!(!out.is_empty(), "--partitions: no partition given");
    Ok(out)
}

pub async fn run(args: &DeliverArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Config::load(args.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        cfg.bus.url.is_some(),
        "bus.url is not set: `voxgate deliver` needs a NATS server"
    );
    let partitions = parse_partitions(&args.partitions, cfg.bus.partitions)?;
    if let Some(addr) = &args.metrics_listen {
        let handle = crate::metrics::install();
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let app = axum::Router::new()
            .route("/livez", get(|| async { "ok" }))
            .route(
                "/metrics",
                get(move || {
                    let handle = handle.clone();
                    async move { crate::metrics::render(&handle) }
                }),
            );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
    }
    crate::bus::deliver::run(cfg, partitions, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse_and_refuse_out_of_range() {
        assert_eq!(parse_partitions("all", 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_partitions("2,0,2", 3).unwrap(), vec![2, 0]);
        assert!(parse_partitions("3", 3).is_err());
        assert!(parse_partitions("x", 3).is_err());
        assert!(parse_partitions("", 3).is_err());
    }
}
