//! The server's shutdown signal, cheap to wait on in every connection's loop.
//!
//! A connection races its work against shutdown on every wake-up. Polling a
//! `CancellationToken`'s future each time costs a lock and a waker comparison inside
//! `Notify`; [`Stopping`] registers with it once per task and afterwards checks one
//! atomic flag, set before the token is cancelled (whose wake-up then finds it set).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

#[derive(Debug, Clone, Default)]
pub(crate) struct Shutdown {
    token: CancellationToken,
    started: Arc<AtomicBool>,
}

impl Shutdown {
    /// Starts the shutdown: every [`Stopping`] completes.
    pub(crate) fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Completes once shutdown started.
    pub(crate) fn stopping(&self) -> Stopping<'_> {
        Stopping {
            shutdown: self,
            wait: None,
            registered: None,
        }
    }
}

/// See [`Shutdown::stopping`].
#[must_use = "futures do nothing unless polled"]
pub(crate) struct Stopping<'a> {
    shutdown: &'a Shutdown,
    wait: Option<Pin<Box<WaitForCancellationFuture<'a>>>>,
    /// The waker the token will wake; polls with the same one only check the flag.
    registered: Option<Waker>,
}

impl Future for Stopping<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.shutdown.started.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let token = &this.shutdown.token;
        let wait = this.wait.get_or_insert_with(|| Box::pin(token.cancelled()));
        if wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiting_task_is_woken_when_shutdown_starts() {
        let shutdown = Shutdown::default();
        let waiter = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let stopping = shutdown.stopping();
                tokio::pin!(stopping);
                // Polled many times with the same waker, as a connection loop does.
                let mut ticks = 0u32;
                loop {
                    tokio::select! {
                        () = &mut stopping => return ticks,
                        () = tokio::time::sleep(Duration::from_millis(5)) => ticks += 1,
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.start();
        let ticks = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the shutdown")
            .unwrap();
        assert!(
            ticks > 1,
            "the loop ran before the shutdown ({ticks} ticks)"
        );
        // Started already: completes at once.
        tokio::time::timeout(Duration::from_millis(100), shutdown.stopping())
            .await
            .unwrap();
    }
}
