//! Waiting for new data without polling.
//!
//! A [`Watch`] holds the partition's published high watermark. Blocking readers wait on a
//! condition variable; async readers (the broker) await a runtime-agnostic future built on
//! `std::task::Waker`, so the engine needs no async runtime. Publishing takes the waiter lock
//! only when someone is waiting (SeqCst on both sides, so a waiter that registers while a
//! publish runs either sees the new value or is woken), and signals the condition variable
//! only when a blocking reader waits on it: `Condvar::notify_all` is a futex system call
//! whether or not anyone waits, and an append that only wakes async readers (a broker's
//! subscriptions, on the appending runtime thread) must not pay one. Blocking readers count
//! themselves in `blocked` under the waiter lock, which the publisher holds while it reads
//! that count, so a reader either sees the new value before it waits or is signalled.
//!
//! A watch is closed with its partition ([`Watch::close`]): no value will come any more, so
//! every waiter, blocked or async, returns at once with the value as it is, and every later
//! wait too. The flag is set before the waiters are woken, and waiters check it where they
//! check the value (the async ones again under the waiter lock), so none misses it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub(crate) struct Watch {
    hwm: AtomicU64,
    waiting: AtomicUsize,
    wakers: Mutex<Vec<Waker>>,
    /// Blocking readers in [`Watch::wait_beyond`]; changed and read only under `wakers`' lock.
    blocked: AtomicUsize,
    cv: Condvar,
    /// Set by [`Watch::close`]; never cleared.
    closed: AtomicBool,
}

impl Watch {
    pub(crate) fn new(hwm: u64) -> Watch {
        Watch {
            hwm: AtomicU64::new(hwm),
            ..Watch::default()
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.hwm.load(Ordering::SeqCst)
    }

    /// Raises the high watermark to `hwm` (never lowers it) and wakes waiters.
    pub(crate) fn publish(&self, hwm: u64) {
        let prev = self.hwm.fetch_max(hwm, Ordering::SeqCst);
        if prev < hwm && self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake_all();
        }
    }

    /// Closes the watch: every waiter returns now, and every later wait at once.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Wakes everyone (a poisoned partition's durability waiters then see the poison).
    pub(crate) fn wake_all(&self) {
        let wakers = {
            let mut guard = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            // Under the lock: a blocking reader counted here is waiting on `cv` or has not yet
            // read the value (it reads it under this lock), so it is signalled or sees it.
            if self.blocked.load(Ordering::Relaxed) > 0 {
                self.cv.notify_all();
            }
            std::mem::take(&mut *guard)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Blocks until the high watermark exceeds `offset`, `timeout` passes or the watch is
    /// closed; returns it.
    pub(crate) fn wait_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut guard = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.blocked.fetch_add(1, Ordering::Relaxed);
        loop {
            let h = self.get();
            let now = Instant::now();
            if h > offset || now >= deadline || self.is_closed() {
                self.blocked.fetch_sub(1, Ordering::Relaxed);
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return h;
            }
            guard = self
                .cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One registration with a [`Watch`], for futures: resolves once the value exceeds an offset
/// or the watch is closed.
/// Counted as a waiter from its first pending poll until it is dropped.
#[derive(Debug)]
pub(crate) struct Waiter {
    watch: Arc<Watch>,
    offset: u64,
    registered: bool,
}

impl Waiter {
    pub(crate) fn new(watch: Arc<Watch>, offset: u64) -> Waiter {
        Waiter {
            watch,
            offset,
            registered: false,
        }
    }

    /// Ready with the value once it exceeds the offset or the watch is closed; otherwise
    /// registers `cx`'s waker.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<u64> {
        let h = self.watch.get();
        if h > self.offset || self.watch.is_closed() {
            return Poll::Ready(h);
        }
        let mut wakers = self.watch.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !self.registered {
            self.watch.waiting.fetch_add(1, Ordering::SeqCst);
            self.registered = true;
        }
        // Re-check under the lock: a publish or close between the first check and here would
        // otherwise be missed.
        let h = self.watch.get();
        if h > self.offset || self.watch.is_closed() {
            return Poll::Ready(h);
        }
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.registered {
            self.watch.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Future that resolves to the high watermark once it exceeds a given offset, or once the
/// partition is closed (with the high watermark as it is then: no data will come).
#[derive(Debug)]
pub struct DataAvailable(Waiter);

impl DataAvailable {
    pub(crate) fn new(watch: Arc<Watch>, offset: u64) -> DataAvailable {
        DataAvailable(Waiter::new(watch, offset))
    }
}

impl Future for DataAvailable {
    type Output = u64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        self.0.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn future_wakes_on_publish() {
        let w = Arc::new(Watch::new(5));
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut f = DataAvailable::new(w.clone(), 5);
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Pending);
        w.publish(5); // not beyond 5: no progress
        w.publish(7);
        assert!(flag.0.load(Ordering::SeqCst));
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(7));
    }

    /// A close wakes async and blocked waiters, and later waits return at once (a reader of
    /// a deleted topic's partition must not wait for data that will never come).
    #[test]
    fn close_wakes_every_waiter_and_later_waits_return_at_once() {
        let w = Arc::new(Watch::new(5));
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut f = DataAvailable::new(w.clone(), 5);
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Pending);
        let w2 = w.clone();
        let blocked = std::thread::spawn(move || {
            let t = Instant::now();
            (w2.wait_beyond(5, Duration::from_secs(60)), t.elapsed())
        });
        while w.blocked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        w.close();
        assert!(flag.0.load(Ordering::SeqCst), "the async waiter was woken");
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(5));
        let (h, took) = blocked.join().unwrap();
        assert_eq!(h, 5);
        assert!(took < Duration::from_secs(30), "{took:?}");
        let mut later = DataAvailable::new(w.clone(), 5);
        assert_eq!(Pin::new(&mut later).poll(&mut cx), Poll::Ready(5));
        assert_eq!(w.wait_beyond(5, Duration::from_secs(60)), 5);
    }

    #[test]
    fn blocking_wait_times_out_and_wakes() {
        let w = Arc::new(Watch::new(0));
        assert_eq!(w.wait_beyond(0, Duration::from_millis(10)), 0);
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wait_beyond(0, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        w.publish(3);
        assert_eq!(t.join().unwrap(), 3);
    }
}
