//! What "stop" means to every task the runtime starts.
//!
//! Each listener, reloader and the housekeeping task holds a [`Shutdown`]
//! receiver and ends once it turns true; [`Running::shutdown`](super::Running::shutdown)
//! turns the gateway's first and everyone else's after the gateway has
//! drained. `wait_for_signal` is what `serve` waits on before it does so.

/// A receiver that turns true once the system should stop (every reload task and listener ends on it).
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// Resolves once `rx` is (or turns) true, or its sender is gone.
pub(super) async fn stopped(rx: &mut Shutdown) {
    // The borrow `wait_for` returns is not `Send`; drop it before any await.
    let _ = rx.wait_for(|s| *s).await.map(drop);
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
