//! Process signals: SIGINT (Ctrl-C) and, on Unix, SIGTERM (what orchestrators send to drain)
//! both mean "stop taking work, flush, exit".

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Resolves at the first SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let kind = tokio::signal::unix::SignalKind::terminate();
        let Ok(mut term) = tokio::signal::unix::signal(kind) else {
            // No SIGTERM handler (not expected on Unix): Ctrl-C still stops.
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A token cancelled at the first signal, which is logged with `message`.
pub fn on_signal(message: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        info!("{message}");
        cancel.cancel();
    });
    token
}
