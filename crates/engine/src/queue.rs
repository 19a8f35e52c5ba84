//! A member's queue of events: bounded, one receiver, senders that never wait.
//!
//! A channel hands every delivery to each member's queue, so this is on the path of
//! every message to every subscriber. One lock around a ring buffer and the receiver's
//! waker: a send takes the lock once and wakes the receiver only when it waits; a
//! receive pops under the same lock. (A general channel's semaphore and block list
//! cost several times that per delivery.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The queue holds its capacity: the receiver does not keep up.
    Full,
    /// The receiver is gone.
    Closed,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver's waker while it waits for an item.
    waiting: Option<Waker>,
    senders: usize,
    receiver: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves the queue itself consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues items for the [`Receiver`]; cheap to clone.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// Takes the items in the order they were sent.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue holding up to `capacity` items.
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            waiting: None,
            senders: 1,
            receiver: true,
        }),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    pub(crate) fn try_send(&self, item: T) -> Result<(), SendError> {
        let waiting = {
            let mut state = self.shared.state();
            if !state.receiver {
                return Err(SendError::Closed);
            }
            if state.items.len() >= self.shared.capacity {
                return Err(SendError::Full);
            }
            state.items.push_back(item);
            state.waiting.take()
        };
        // Woken outside the lock: the receiver takes it at once.
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.shared.state();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.state();
        if let Some(item) = Self::pop(&mut state) {
            return Poll::Ready(Some(item));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut state.waiting {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waiting => *waiting = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next item already queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        Self::pop(&mut self.shared.state())
    }

    fn pop(state: &mut State<T>) -> Option<T> {
        let item = state.items.pop_front();
        if item.is_none() && state.items.capacity() > 64 {
            // A burst is over: an idle member keeps a small buffer.
            state.items = VecDeque::new();
        }
        item
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.state();
            state.receiver = false;
            state.waiting = None;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock.
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_end_after_them() {
        let (tx, mut rx) = channel(3);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(SendError::Full));
        assert_eq!(rx.try_recv(), Some(1));
        tx.try_send(4).unwrap();
        let second = tx.clone();
        drop(tx);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(2));
        drop(second);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(3));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(4));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_leaving() {
        let (tx, mut rx) = channel::<u32>(8);
        let reader = tokio::spawn(async move {
            let first = poll_fn(|cx| rx.poll_recv(cx)).await;
            let end = poll_fn(|cx| rx.poll_recv(cx)).await;
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(7).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[test]
    fn a_send_to_a_dropped_receiver_says_closed() {
        let (tx, rx) = channel(2);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(SendError::Closed));
    }
}
