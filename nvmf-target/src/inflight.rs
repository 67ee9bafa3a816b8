//! The commands a connection has in flight, in reusable slots.
//!
//! [`Inflight::start`] polls a command's future once, right away, with the waker of the slot it
//! occupies: a bdev that completes without waiting (RAM, null) finishes in the same pass of the
//! connection loop that read the command, and its response joins the same `writev` as the others
//! of that pass. A future that has to wait stays in its slot; its waker records the slot as ready
//! and wakes the connection task, and [`Inflight::next`] polls exactly the slots that were woken.
//!
//! Unlike a `FuturesUnordered`, which allocates a task node for every future pushed, slots and
//! their wakers are allocated once (up to the queue depth) and reused with [`Pin::set`], so
//! starting a command allocates nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// What the slot wakers share with the owner.
#[derive(Debug, Default)]
struct Shared {
    /// Slots whose future asked to be polled again.
    ready: Mutex<Vec<usize>>,
    /// The task that owns the slots.
    task: AtomicWaker,
}

/// The waker of one slot.
#[derive(Debug)]
struct SlotWake {
    index: usize,
    shared: Arc<Shared>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.ready.lock().unwrap_or_else(PoisonError::into_inner).push(self.index);
        self.shared.task.wake();
    }
}

struct Slot<F> {
    /// The future, `None` once it has completed.
    fut: Pin<Box<Option<F>>>,
    waker: Waker,
    busy: bool,
}

/// A set of futures of one type, each polled only when started and when woken.
pub struct Inflight<F: Future> {
    slots: Vec<Slot<F>>,
    free: Vec<usize>,
    shared: Arc<Shared>,
    running: usize,
    /// Ready list taken out of the lock for polling.
    woken: Vec<usize>,
}

impl<F: Future> std::fmt::Debug for Inflight<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight").field("slots", &self.slots.len()).field("running", &self.running).finish()
    }
}

impl<F: Future> Default for Inflight<F> {
    fn default() -> Self {
        Inflight { slots: Vec::new(), free: Vec::new(), shared: Arc::default(), running: 0, woken: Vec::new() }
    }
}

/// Polls the future in `slot` with the slot's waker; drops it once complete.
fn poll_slot<F: Future>(slot: &mut Slot<F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(&slot.waker);
    let Some(fut) = slot.fut.as_mut().as_pin_mut() else { return Poll::Pending };
    let r = fut.poll(&mut cx);
    if r.is_ready() {
        slot.fut.set(None);
    }
    r
}

impl<F: Future> Inflight<F> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Futures started and not yet complete.
    pub fn running(&self) -> usize {
        self.running
    }

    fn free_slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        let index = self.slots.len();
        let waker = Waker::from(Arc::new(SlotWake { index, shared: self.shared.clone() }));
        self.slots.push(Slot { fut: Box::pin(None), waker, busy: false });
        index
    }

    /// Starts `fut` and polls it once. Returns its output if it completed right away; otherwise
    /// it stays in flight and [`Inflight::next`] yields its output later.
    pub fn start(&mut self, fut: F) -> Option<F::Output> {
        self.start_with(|| fut)
    }

    /// [`Inflight::start`] with the future made by `make`, which lets the compiler build it in
    /// its slot instead of moving it there (command futures are a few hundred bytes).
    pub fn start_with(&mut self, make: impl FnOnce() -> F) -> Option<F::Output> {
        let i = self.free_slot();
        let slot = self.slots.get_mut(i)?;
        slot.fut.set(Some(make()));
        match poll_slot(slot) {
            Poll::Ready(out) => {
                self.free.push(i);
                Some(out)
            }
            Poll::Pending => {
                slot.busy = true;
                self.running += 1;
                None
            }
        }
    }

    /// Polls the woken futures; ready when at least one completed (outputs appended to `out`).
    pub fn poll_woken(&mut self, cx: &mut Context<'_>, out: &mut Vec<F::Output>) -> Poll<()> {
        // Register before taking the list, so a wake-up after the take is not lost.
        self.shared.task.register(cx.waker());
        std::mem::swap(&mut self.woken, &mut self.shared.ready.lock().unwrap_or_else(PoisonError::into_inner));
        let before = out.len();
        let Inflight { slots, free, running, woken, .. } = self;
        for i in woken.drain(..) {
            let Some(slot) = slots.get_mut(i).filter(|s| s.busy) else { continue };
            if let Poll::Ready(o) = poll_slot(slot) {
                slot.busy = false;
                *running -= 1;
                free.push(i);
                out.push(o);
            }
        }
        if out.len() > before {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until at least one future in flight completes; appends the outputs to `out`.
    pub async fn next(&mut self, out: &mut Vec<F::Output>) {
        std::future::poll_fn(|cx| self.poll_woken(cx, out)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn ready_futures_complete_inline_and_waiting_ones_when_woken() {
        let mut set = Inflight::new();
        assert_eq!(set.start(Box::pin(async { 1 }) as Pin<Box<dyn Future<Output = i32> + Send>>), Some(1));
        let (tx1, rx1) = oneshot::channel::<i32>();
        let (tx2, rx2) = oneshot::channel::<i32>();
        assert_eq!(set.start(Box::pin(async move { rx1.await.unwrap_or(-1) })), None);
        assert_eq!(set.start(Box::pin(async move { rx2.await.unwrap_or(-1) })), None);
        assert_eq!(set.running(), 2);
        tx2.send(20).unwrap();
        let mut out = Vec::new();
        set.next(&mut out).await;
        assert_eq!(out, vec![20]);
        // The freed slot is reused, and a ready future again completes inline.
        assert_eq!(set.start(Box::pin(async { 3 })), Some(3));
        assert_eq!(set.slots.len(), 2);
        tx1.send(10).unwrap();
        out.clear();
        set.next(&mut out).await;
        assert_eq!(out, vec![10]);
        assert_eq!(set.running(), 0);
    }
}
