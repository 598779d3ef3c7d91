//! Edge-triggered readiness for the sockets of [`SmolNet`](crate::SmolNet), on Linux, and
//! the threads that wait for it.
//!
//! async-io registers a socket one-shot: every wait re-arms it with an `epoll_ctl`, and
//! dropping it removes it with another. A tunnel waits once per message and direction, so
//! that is a system call per message on top of the read and the write. Here a socket (a
//! stream, or a listener) is registered once, edge-triggered, in an epoll instance of the
//! process's own, and leaves it when its descriptor is closed, with no system call of its own.
//!
//! Who waits in that instance:
//! - The proxy's own threads ([`block_on`], which `bind` and the binary run on): they wait in
//!   `epoll_wait` themselves, one at a time, as async-io's `block_on` waits in its reactor, and
//!   fire the timers of [`Sleep`] (the driven `SmolNet`'s `sleep`). Each wait is one system
//!   call, where async-io's costs five more (its timerfd set and re-armed, its eventfd read
//!   and re-armed, this instance re-armed in it) and a second `epoll_wait` for this instance.
//! - Anywhere else (`serve` inside an application's executor): the instance is one source of
//!   async-io's reactor. When it has events, the waker async-io calls collects them
//!   (`epoll_wait` with no timeout) and wakes the streams' tasks on the thread that ran the
//!   reactor: no thread and no task of its own, whatever executor runs the proxy. While
//!   [`block_on`] threads run, they collect instead.
//!
//! A socket's readiness is a flag per direction, set by an event and cleared when an
//! operation finds nothing (`EAGAIN`), or when a read returns less than it asked for (the
//! socket's queue is empty, and anything that arrives later is a new edge). A counter per
//! direction, bumped by every event, keeps an event that lands during an operation from being
//! cleared with it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rustix::event::{epoll, Timespec};

/// The direction of a read ([`Source::poll_ready`]).
pub(crate) const READ: usize = 0;
/// The direction of a write ([`Source::poll_ready`]).
pub(crate) const WRITE: usize = 1;

/// Events collected by one `epoll_wait`; more are collected by the next.
const BATCH: usize = 256;

/// The longest a thread waits in `epoll_wait` before it looks at its timers again.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The key of the reactor's own eventfd, which wakes a thread blocked in `epoll_wait`.
const NOTIFY: u64 = u64::MAX;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One direction's readiness.
#[derive(Debug, Default)]
struct Direction {
    ready: bool,
    /// The peer has closed (or the socket failed): ready for good, as the next operation
    /// returns at once (an end of stream, an error), and no edge may come to say so again.
    /// A read that takes the last bytes before a FIN is short and must not clear this.
    closed: bool,
    /// (Reads.) The peer's FIN has come, with no error: once a read comes back short, the
    /// stream is at its end.
    fin: bool,
    /// (Reads.) A short read after the FIN had come: every later read returns 0 without asking
    /// the socket (where it would return 0 too, one system call later).
    at_end: bool,
    /// Bumped by every event for this direction.
    tick: u32,
    /// The task waiting for this direction.
    waker: Option<Waker>,
}

/// A socket (a TCP stream, or a listener) registered with the reactor.
#[derive(Debug)]
pub(crate) struct Source<S = TcpStream> {
    io: S,
    /// Its slot in the reactor's table, with the slot's generation in the upper half.
    key: u64,
    state: Mutex<[Direction; 2]>,
}

/// What an event does to a source, whatever its socket.
trait Ready: Send + Sync {
    /// Sets the directions `flags` makes ready and collects their wakers.
    fn ready(&self, flags: epoll::EventFlags, wakers: &mut Vec<Waker>);
}

impl<S: AsFd + Send + Sync + 'static> Source<S> {
    /// Registers `io` (non-blocking already). `readable` and `writable` say whether to try
    /// an operation before any event came: yes for an accepted stream, no for a connect still
    /// under way. (Registering reports what is ready already, so no is never wrong, only
    /// slower by one collection.)
    pub(crate) fn new(io: S, readable: bool, writable: bool) -> io::Result<Arc<Self>> {
        let reactor = reactor()?;
        let source = Arc::new_cyclic(|me: &Weak<Self>| Source {
            io,
            key: lock(&reactor.slots).insert(me.clone()),
            state: Mutex::new([
                Direction {
                    ready: readable,
                    ..Direction::default()
                },
                Direction {
                    ready: writable,
                    ..Direction::default()
                },
            ]),
        });
        use epoll::EventFlags as F;
        epoll::add(
            reactor.epoll.get_ref(),
            &source.io,
            epoll::EventData::new_u64(source.key),
            F::IN | F::OUT | F::RDHUP | F::ET,
        )?;
        Ok(source)
    }
}

impl<S> Source<S> {
    /// The socket.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// `Ready(tick)` when direction `dir` may be ready; otherwise the task waits for an event.
    /// An operation that then finds nothing hands the tick to [`clear`](Self::clear).
    pub(crate) fn poll_ready(&self, dir: usize, cx: &mut Context<'_>) -> Poll<u32> {
        self.poll_ready_fin(dir, cx).map(|(tick, _)| tick)
    }

    /// [`poll_ready`](Self::poll_ready), and whether the peer's FIN had come by then.
    fn poll_ready_fin(&self, dir: usize, cx: &mut Context<'_>) -> Poll<(u32, bool)> {
        let mut state = lock(&self.state);
        let d = &mut state[dir];
        if d.ready {
            return Poll::Ready((d.tick, d.fin));
        }
        match &d.waker {
            Some(w) if w.will_wake(cx.waker()) => Poll::Pending,
            _ => {
                // One task waits per direction; one that takes the slot from another (a clone
                // of the stream read from two tasks) wakes it, so it can check again rather
                // than wait for good, as async-io does.
                let before = d.waker.replace(cx.waker().clone());
                drop(state);
                if let Some(w) = before {
                    w.wake();
                }
                Poll::Pending
            }
        }
    }

    /// Whether an event said direction `dir` has failed or been hung up on (`EPOLLERR`,
    /// `EPOLLHUP`; for reads also `EPOLLRDHUP`). A connect whose socket became writable
    /// without this has succeeded, with no need to ask `SO_ERROR`.
    pub(crate) fn closed(&self, dir: usize) -> bool {
        lock(&self.state)[dir].closed
    }

    /// Marks direction `dir` not ready, unless an event came since `tick` was read.
    pub(crate) fn clear(&self, dir: usize, tick: u32) {
        let mut state = lock(&self.state);
        let d = &mut state[dir];
        if d.tick == tick && !d.closed {
            d.ready = false;
        }
    }

    /// Runs `op` once `dir` may be ready, again after each event while it finds nothing.
    pub(crate) fn poll_io<R>(
        &self,
        dir: usize,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&S) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            let Poll::Ready(tick) = self.poll_ready(dir, cx) else {
                return Poll::Pending;
            };
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(dir, tick),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl Source<TcpStream> {
    /// Reads into `buf`. A read that returns less than `buf` has emptied the socket's queue:
    /// the next one waits for an event instead of failing with `EAGAIN` first.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let Poll::Ready((tick, fin)) = self.poll_ready_fin(READ, cx) else {
                return Poll::Pending;
            };
            if fin && lock(&self.state)[READ].at_end {
                return Poll::Ready(Ok(0));
            }
            match (&self.io).read(buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() {
                        if fin {
                            // The FIN had come before this read, so every byte before it was
                            // queued, and this read took them all.
                            lock(&self.state)[READ].at_end = true;
                        } else {
                            // (Not at the end of the stream: that stays readable, with no edge
                            // to come.)
                            self.clear(READ, tick);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(READ, tick),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: Send + Sync> Ready for Source<S> {
    fn ready(&self, flags: epoll::EventFlags, wakers: &mut Vec<Waker>) {
        use epoll::EventFlags as F;
        let mut state = lock(&self.state);
        let dirs = [
            (READ, F::IN | F::PRI, F::RDHUP | F::HUP | F::ERR),
            (WRITE, F::OUT, F::HUP | F::ERR),
        ];
        for (dir, when, closed) in dirs {
            if flags.intersects(when | closed) {
                let d = &mut state[dir];
                d.closed |= flags.intersects(closed);
                d.fin |=
                    dir == READ && flags.intersects(F::RDHUP | F::HUP) && !flags.contains(F::ERR);
                d.ready = true;
                d.tick = d.tick.wrapping_add(1);
                wakers.extend(d.waker.take());
            }
        }
    }
}

impl<S> Drop for Source<S> {
    fn drop(&mut self) {
        // The descriptor closes after this, which takes it out of the epoll instance; an event
        // already collected for it finds its slot gone or reused under a new generation.
        if let Ok(reactor) = reactor() {
            lock(&reactor.slots).remove(self.key);
        }
    }
}

/// The registered sources, by slot; a key is a slot and its generation.
#[derive(Default)]
struct Slots {
    entries: Vec<(u32, Option<Weak<dyn Ready>>)>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, source: Weak<dyn Ready>) -> u64 {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        entry.1 = Some(source);
        (u64::from(entry.0) << 32) | u64::from(slot)
    }

    fn remove(&mut self, key: u64) {
        let slot = key as u32;
        if let Some(entry) = self.entries.get_mut(slot as usize) {
            if u64::from(entry.0) == key >> 32 {
                *entry = (entry.0.wrapping_add(1), None);
                self.free.push(slot);
            }
        }
    }

    fn get(&self, key: u64) -> Option<Arc<dyn Ready>> {
        let entry = self.entries.get(key as u32 as usize)?;
        if u64::from(entry.0) != key >> 32 {
            return None;
        }
        entry.1.as_ref()?.upgrade()
    }
}

/// The sources events are for, and the wakers to call: kept between collections.
type Scratch = (Vec<(Arc<dyn Ready>, epoll::EventFlags)>, Vec<Waker>);

std::thread_local! {
    /// The events one collection takes (per thread: an event holds a pointer, so not `Send`).
    static EVENTS: std::cell::RefCell<Vec<epoll::Event>> =
        std::cell::RefCell::new(Vec::with_capacity(BATCH));
}

/// The timers of [`Sleep`], by deadline.
#[derive(Default)]
struct Timers {
    wakers: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// While a thread is blocked in `epoll_wait`: until when (`None`: until an event). A timer
    /// due before that wakes it.
    blocked: Option<Option<Instant>>,
}

struct Reactor {
    /// The epoll instance, as a source of async-io's reactor.
    epoll: smol::Async<OwnedFd>,
    /// An eventfd in the instance: written to wake the thread blocked in it.
    notify: OwnedFd,
    /// Whether `notify` was written and not read yet (it is written once per wait at most).
    notified: AtomicBool,
    slots: Mutex<Slots>,
    scratch: Mutex<Scratch>,
    timers: Mutex<Timers>,
    /// Held by the one [`block_on`] thread that waits in `epoll_wait`.
    driving: Mutex<()>,
    /// The [`block_on`] threads running: while there are any, they collect the events, not
    /// async-io.
    drivers: AtomicUsize,
    /// [`block_on`] threads parked while another one drives.
    parked: Mutex<Vec<Arc<Parker>>>,
    /// Called by async-io when `epoll` is readable.
    waker: Waker,
}

/// The waker async-io calls when the epoll instance has events.
struct Collect;

impl Wake for Collect {
    fn wake(self: Arc<Self>) {
        if let Ok(reactor) = reactor() {
            reactor.drive();
        }
    }
}

impl Reactor {
    /// Collects events for as long as the instance has them, then asks async-io to call
    /// `waker` when it has more; unless [`block_on`] threads run, which collect them
    /// themselves (async-io is asked again when the last one returns).
    fn drive(&self) {
        let mut cx = Context::from_waker(&self.waker);
        while self.drivers.load(SeqCst) == 0 {
            match self.epoll.poll_readable(&mut cx) {
                Poll::Ready(Ok(())) => self.collect(Duration::ZERO, false),
                Poll::Ready(Err(e)) => {
                    // Re-arming failed: nothing will wake the streams again.
                    crate::log::warn!("the stream reactor stopped: {e}");
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    /// Waits up to `timeout` for events and wakes the tasks they are for (`blocking`:
    /// [`Timers::blocked`] was set for this wait); then takes whatever more the instance has
    /// without waiting, and fires the timers that are due.
    fn collect(&self, mut timeout: Duration, mut blocking: bool) {
        EVENTS.with(|events| {
            let mut events = events.borrow_mut();
            loop {
                events.clear();
                let spec = Timespec {
                    tv_sec: timeout.as_secs() as i64,
                    tv_nsec: timeout.subsec_nanos().into(),
                };
                let spare = rustix::buffer::spare_capacity(&mut *events);
                let waited = epoll::wait(self.epoll.get_ref(), spare, Some(&spec));
                if blocking {
                    lock(&self.timers).blocked = None;
                    blocking = false;
                }
                if waited.is_err() {
                    // (EINTR: a signal. Anything else: nothing to collect this time.)
                    break;
                }
                let mut scratch = lock(&self.scratch);
                let (sources, wakers) = &mut *scratch;
                {
                    let slots = lock(&self.slots);
                    for e in events.iter() {
                        let key = e.data.u64();
                        if key == NOTIFY {
                            let mut count = [0u8; 8];
                            let _ = rustix::io::read(&self.notify, &mut count);
                            self.notified.store(false, SeqCst);
                        } else if let Some(source) = slots.get(key) {
                            sources.push((source, e.flags));
                        }
                    }
                }
                for (source, flags) in sources.iter() {
                    source.ready(*flags, wakers);
                }
                // (Dropping a source takes the slots' lock, so this is after it is released.)
                sources.clear();
                for waker in wakers.drain(..) {
                    waker.wake();
                }
                if events.len() < BATCH {
                    break;
                }
                timeout = Duration::ZERO;
            }
        });
        self.fire_timers();
    }

    /// Wakes the tasks whose timers are due.
    fn fire_timers(&self) {
        let mut due = Vec::new();
        {
            let mut timers = lock(&self.timers);
            if timers.wakers.is_empty() {
                return;
            }
            let now = Instant::now();
            while let Some(entry) = timers.wakers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
        }
        for waker in due {
            waker.wake();
        }
    }

    /// Waits in `epoll_wait` until an event, the next timer or [`notify`](Self::notify),
    /// if `block`; otherwise only takes what is there already.
    fn turn(&self, block: bool) {
        if !block {
            return self.collect(Duration::ZERO, false);
        }
        let timeout = {
            let mut timers = lock(&self.timers);
            let next = timers.wakers.first_key_value().map(|(k, _)| k.0);
            timers.blocked = Some(next);
            // Rounded up to the millisecond, as epoll_wait may count: never early. At most a
            // minute (older kernels refuse waits of 25 days and more).
            let left = next.map_or(MAX_WAIT, |at| at.saturating_duration_since(Instant::now()));
            Duration::from_millis(left.min(MAX_WAIT).as_nanos().div_ceil(1_000_000) as u64)
        };
        self.collect(timeout, true);
    }

    /// Waits for work for a [`block_on`] thread: takes the events that came while its tasks
    /// ran, and if they woke none, polls for up to the thread's polling window
    /// ([`next_window`]), then sleeps in `epoll_wait` until an event, a timer or a wakeup.
    fn wait(&self, woken: &AtomicBool) {
        // Work already there is taken without waiting: the thread has not run out of work, so
        // this counts neither as a poll nor as a sleep. (A blocking `epoll_wait` returns at once
        // then; counted as a sleep, it made `slept` read high: 15% in the benchmark's TCP test,
        // 2.5-5x under the CLI test's load.)
        let had_work = woken.load(SeqCst);
        self.turn(false);
        let most = BUSY_POLL_NS.load(Relaxed);
        let window = if most == 0 { 0 } else { WINDOW.with(Cell::get) };
        if woken.load(SeqCst) {
            if !had_work && most > 0 && window == 0 {
                // Work that came while the tasks ran opens a closed window, as a sleep that
                // lasted no time would: work is coming soon.
                WINDOW.with(|w| w.set(next_window(0, 0, most)));
            }
            return;
        }
        if window > 0 {
            let start = Instant::now();
            let mut found = false;
            while !found && start.elapsed().as_nanos() < u128::from(window) {
                std::thread::yield_now();
                self.turn(false);
                found = woken.load(SeqCst);
            }
            POLLING_NS.fetch_add(nanos(start.elapsed()), Relaxed);
            if found {
                WAITS[POLLED].fetch_add(1, Relaxed);
                return;
            }
        }
        let slept_from = Instant::now();
        let block = !woken.load(SeqCst);
        if block {
            WAITS[SLEPT].fetch_add(1, Relaxed);
        }
        self.turn(block);
        if most > 0 {
            let slept = nanos(slept_from.elapsed());
            WINDOW.with(|w| w.set(next_window(window, slept, most)));
        }
    }

    /// Wakes the thread blocked in `epoll_wait`, if one is.
    fn notify(&self) {
        if !self.notified.swap(true, SeqCst) {
            let _ = rustix::io::write(&self.notify, &1u64.to_ne_bytes());
        }
    }
}

/// The most a [`block_on`] thread polls before it sleeps, in nanoseconds (0: never).
static BUSY_POLL_NS: AtomicU64 = AtomicU64::new(0);

/// Times [`block_on`] threads ran out of work, by how the next work found them: while they
/// polled ([`POLLED`]), or asleep in `epoll_wait` ([`SLEPT`]). For the metrics.
static WAITS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// [`WAITS`]' count of work found by polling.
const POLLED: usize = 0;
/// [`WAITS`]' count of sleeps.
const SLEPT: usize = 1;

/// How many times the proxy's threads ran out of work: (found the next by polling, slept).
pub(crate) fn waits() -> (u64, u64) {
    (WAITS[POLLED].load(Relaxed), WAITS[SLEPT].load(Relaxed))
}

/// Nanoseconds [`block_on`] threads have spent polling for work. For the metrics.
static POLLING_NS: AtomicU64 = AtomicU64::new(0);

/// How long the proxy's threads have spent polling for work (`busy_poll_us`): CPU time that
/// bought a quicker start on the next work rather than doing any, on a core of their own.
pub(crate) fn polling_time() -> Duration {
    Duration::from_nanos(POLLING_NS.load(Relaxed))
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// The window a polling window grows from: 10 µs, or the most if that is less.
const FIRST_WINDOW_NS: u64 = 10_000;

std::thread_local! {
    /// How long this thread polls before it next sleeps, in nanoseconds ([`next_window`]).
    static WINDOW: Cell<u64> = const { Cell::new(0) };
}

/// Makes [`block_on`] threads poll for events for up to `d` before they sleep in `epoll_wait`
/// (as HAProxy's `busy-polling`, but bounded and adaptive). A thread that sleeps takes an
/// interrupt and a wakeup to get going again, which a virtual machine makes slow (tens of
/// microseconds), and the peer that wakes it pays for that too. Each thread polls only while
/// its work comes back within `d` ([`next_window`]): an idle or lightly loaded proxy sleeps
/// at once. Zero is off, and is where it starts: the config's `busy_poll_us` (default 100)
/// sets it, the builders do not.
pub(crate) fn set_busy_poll(d: Duration) {
    BUSY_POLL_NS.store(nanos(d), Relaxed);
}

/// A thread's next polling window, after polling for `window` found nothing and the thread
/// then `slept` before work came; `most` is [`set_busy_poll`]'s. As KVM adapts how long a
/// virtual CPU polls before it halts: work that came within `most` of the sleep would have
/// been caught by a longer poll, so the window doubles (from [`FIRST_WINDOW_NS`], up to
/// `most`); work that took longer means polling only burns CPU, so the window halves, and
/// under the first window it is none. A poll that finds work keeps its window.
fn next_window(window: u64, slept: u64, most: u64) -> u64 {
    let first = FIRST_WINDOW_NS.min(most);
    if slept <= most {
        window.saturating_mul(2).clamp(first, most)
    } else if window / 2 < first {
        0
    } else {
        window / 2
    }
}

/// Makes the process's reactor, if it is not made yet.
pub(crate) fn start() -> io::Result<()> {
    reactor().map(drop)
}

/// The process's reactor, made on first use.
fn reactor() -> io::Result<&'static Reactor> {
    static REACTOR: OnceLock<Reactor> = OnceLock::new();
    if let Some(r) = REACTOR.get() {
        return Ok(r);
    }
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    use rustix::event::EventfdFlags;
    let notify = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    epoll::add(
        &epoll,
        &notify,
        epoll::EventData::new_u64(NOTIFY),
        epoll::EventFlags::IN,
    )?;
    let made = Reactor {
        epoll: smol::Async::new(epoll)?,
        notify,
        notified: AtomicBool::new(false),
        slots: Mutex::default(),
        scratch: Mutex::default(),
        timers: Mutex::default(),
        driving: Mutex::new(()),
        drivers: AtomicUsize::new(0),
        parked: Mutex::default(),
        waker: Waker::from(Arc::new(Collect)),
    };
    // Another thread may have made one meanwhile: then this one goes unused.
    let mut first = false;
    let reactor = REACTOR.get_or_init(|| {
        first = true;
        made
    });
    if first {
        reactor.drive();
    }
    Ok(reactor)
}

/// A timer of the reactor: completes at its deadline. Fired by [`block_on`] threads, so only
/// for tasks of an executor they run.
#[derive(Debug)]
pub(crate) struct Sleep {
    /// `None`: never (a duration too long to add to now).
    deadline: Option<Instant>,
    /// Its entry in the timers, once it has one.
    id: Option<u64>,
}

impl Sleep {
    /// A timer due `d` from now.
    pub(crate) fn new(d: Duration) -> Sleep {
        Sleep {
            deadline: Instant::now().checked_add(d),
            id: None,
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            self.cancel();
            return Poll::Ready(());
        }
        let Ok(reactor) = reactor() else {
            return Poll::Pending;
        };
        let mut timers = lock(&reactor.timers);
        if let Some(id) = self.id {
            if let Some(w) = timers.wakers.get_mut(&(deadline, id)) {
                if !w.will_wake(cx.waker()) {
                    w.clone_from(cx.waker());
                }
                return Poll::Pending;
            }
        }
        let id = timers.next_id;
        timers.next_id += 1;
        timers.wakers.insert((deadline, id), cx.waker().clone());
        self.id = Some(id);
        // A thread blocked until later than this deadline must wait again, for less.
        if timers
            .blocked
            .is_some_and(|until| until.is_none_or(|u| deadline < u))
        {
            timers.blocked = None;
            drop(timers);
            reactor.notify();
        }
        Poll::Pending
    }
}

impl Sleep {
    /// Takes the timer out of the reactor's, if it is there.
    fn cancel(&mut self) {
        if let (Some(id), Some(deadline)) = (self.id.take(), self.deadline) {
            if let Ok(reactor) = reactor() {
                lock(&reactor.timers).wakers.remove(&(deadline, id));
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.cancel();
    }
}

std::thread_local! {
    /// This thread holds [`Reactor::driving`].
    static DRIVING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` marked as the thread that holds [`Reactor::driving`].
fn driving(f: impl FnOnce()) {
    DRIVING.with(|d| d.set(true));
    f();
    DRIVING.with(|d| d.set(false));
}

/// How a [`block_on`] thread is woken: by an `unpark` while it is parked, by the reactor's
/// eventfd while it is blocked in `epoll_wait`.
struct Parker {
    thread: std::thread::Thread,
    woken: AtomicBool,
    /// It is blocked in `epoll_wait`.
    io_blocked: AtomicBool,
}

impl Wake for Parker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.woken.swap(true, SeqCst) {
            if self.io_blocked.load(SeqCst) {
                // Blocked in epoll_wait, unless this is that thread waking itself while it
                // hands out the events it took.
                if !DRIVING.with(Cell::get) {
                    if let Ok(reactor) = reactor() {
                        reactor.notify();
                    }
                }
            } else {
                self.thread.unpark();
            }
        }
    }
}

/// Runs `future` to completion on this thread, and meanwhile waits for the reactor's events
/// itself, in `epoll_wait`, rather than through async-io: that saves async-io's re-arming of
/// the instance, of its eventfd and of its timerfd (three `epoll_ctl` and a `timerfd_settime`
/// per wait) and the second `epoll_wait`. [`Sleep`] timers are fired here too.
///
/// Several threads may run it (one executor shared by them): one at a time waits in
/// `epoll_wait`, the others park until their futures are woken, as async-io's `block_on`
/// does. Other async-io sources (signals, timers of `smol::Timer`) go on being served by
/// async-io's own thread.
pub(crate) fn block_on<T>(future: impl Future<Output = T>) -> T {
    let Ok(reactor) = reactor() else {
        return smol::block_on(future);
    };
    reactor.drivers.fetch_add(1, SeqCst);
    struct Leave(&'static Reactor);
    impl Drop for Leave {
        fn drop(&mut self) {
            if self.0.drivers.fetch_sub(1, SeqCst) == 1 {
                // The last one: async-io collects the events again.
                self.0.drive();
            } else {
                // Another thread may be parked with nobody left to wait in epoll_wait.
                for parker in lock(&self.0.parked).iter() {
                    parker.thread.unpark();
                }
            }
        }
    }
    let _leave = Leave(reactor);
    let parker = Arc::new(Parker {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
        io_blocked: AtomicBool::new(false),
    });
    let waker = Waker::from(parker.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(t) = future.as_mut().poll(&mut cx) {
            return t;
        }
        let mut turned = false;
        while !parker.woken.swap(false, SeqCst) {
            match reactor.driving.try_lock() {
                Ok(_driving) => {
                    parker.io_blocked.store(true, SeqCst);
                    // (Woken between the check above and the flag: then not blocked.)
                    driving(|| reactor.wait(&parker.woken));
                    parker.io_blocked.store(false, SeqCst);
                    turned = true;
                }
                Err(_) => {
                    lock(&reactor.parked).push(parker.clone());
                    if !parker.woken.load(SeqCst) {
                        std::thread::park();
                    }
                    lock(&reactor.parked).retain(|p| !Arc::ptr_eq(p, &parker));
                }
            }
        }
        // Woken at once: still take the events that are there, so that a thread that always
        // has work does not leave the sockets unheard.
        if !turned {
            if let Ok(_driving) = reactor.driving.try_lock() {
                driving(|| reactor.turn(false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A connected pair: a plain blocking socket to write from, and a registered one.
    fn pair() -> (TcpStream, crate::SmolStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outside = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let inside = l.accept().unwrap().0;
        (outside, crate::SmolStream::try_from(inside).unwrap())
    }

    /// Reads once, or fails the test if nothing comes within 2 s (a lost wakeup).
    fn try_read(stream: &mut crate::SmolStream) -> io::Result<Vec<u8>> {
        use futures_lite::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let read = async { stream.read(&mut buf).await };
        let n = smol::block_on(futures_lite::future::or(
            async { Some(read.await) },
            async {
                smol::Timer::after(Duration::from_secs(2)).await;
                None
            },
        ))
        .expect("a read that never woke up")?;
        Ok(buf[..n].to_vec())
    }

    fn read(stream: &mut crate::SmolStream) -> Vec<u8> {
        try_read(stream).unwrap()
    }

    #[test]
    fn bytes_that_come_after_a_short_read_wake_the_reader() {
        let (mut outside, mut inside) = pair();
        for i in 0..200u32 {
            outside.write_all(&i.to_be_bytes()).unwrap();
            assert_eq!(read(&mut inside), i.to_be_bytes());
        }
    }

    #[test]
    fn the_end_after_the_last_bytes_is_seen_whether_the_fin_came_with_them_or_later() {
        // The last bytes and the FIN together: the short read that takes the bytes must not
        // leave the reader waiting for an edge that will not come.
        let (mut outside, mut inside) = pair();
        outside.write_all(b"last").unwrap();
        outside.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read(&mut inside), b"last");
        assert_eq!(read(&mut inside), b"");
        assert_eq!(read(&mut inside), b"");
        // Bytes, a pause, more bytes and the FIN: the second bytes are not taken for the end.
        let (mut outside, mut inside) = pair();
        outside.write_all(b"a").unwrap();
        assert_eq!(read(&mut inside), b"a");
        outside.write_all(b"b").unwrap();
        outside.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read(&mut inside), b"b");
        assert_eq!(read(&mut inside), b"");
    }

    #[test]
    fn a_reset_after_the_bytes_is_an_error_not_an_end() {
        let (outside, mut inside) = pair();
        (&outside).write_all(b"x").unwrap();
        // SO_LINGER 0: close sends a RST.
        rustix::net::sockopt::set_socket_linger(&outside, Some(Duration::ZERO)).unwrap();
        drop(outside);
        std::thread::sleep(Duration::from_millis(50));
        let got = try_read(&mut inside);
        assert!(
            got.is_err() || got.as_ref().is_ok_and(|b| b == b"x"),
            "{got:?}"
        );
        let again = try_read(&mut inside);
        assert!(again.is_err(), "a reset read as a clean end: {again:?}");
    }

    #[test]
    fn two_tasks_reading_clones_of_one_stream_both_get_their_bytes() {
        use futures_lite::AsyncReadExt;
        let (mut outside, inside) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            outside.write_all(b"1").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            outside.write_all(b"2").unwrap();
            outside
        });
        // Two tasks (two wakers) waiting on the same direction of one socket.
        let ex = smol::Executor::new();
        let reader = |mut s: crate::SmolStream| async move {
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map(|_| buf[0])
        };
        let a = ex.spawn(reader(inside.clone()));
        let b = ex.spawn(reader(inside));
        let both = ex.run(futures_lite::future::zip(a, b));
        let got = smol::block_on(futures_lite::future::or(
            async { Some(both.await) },
            async {
                smol::Timer::after(Duration::from_secs(2)).await;
                None
            },
        ));
        let (x, y) = got.expect("a reader left waiting");
        let mut got = [x.unwrap(), y.unwrap()];
        got.sort();
        assert_eq!(&got, b"12");
        drop(writer.join());
    }

    /// Runs `future` on `reactor::block_on`, failing the test if it takes 5 s (a lost wakeup:
    /// the thread would otherwise sleep out its whole minute in epoll_wait).
    fn drive<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(block_on(future)));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("block_on never woke up")
    }

    #[test]
    fn a_timer_fires_at_its_deadline_not_before() {
        for ms in [0u64, 1, 30] {
            let took = drive(async move {
                let start = Instant::now();
                Sleep::new(Duration::from_millis(ms)).await;
                start.elapsed()
            });
            assert!(
                took >= Duration::from_millis(ms),
                "{ms} ms fired after {took:?}"
            );
            assert!(
                took < Duration::from_millis(ms + 500),
                "{ms} ms fired after {took:?}"
            );
        }
        // The sooner of two fires first, and a dropped one is taken out of the table.
        let took = drive(async {
            let start = Instant::now();
            let later = Sleep::new(Duration::from_secs(3600));
            futures_lite::future::or(later, Sleep::new(Duration::from_millis(20))).await;
            start.elapsed()
        });
        assert!(took < Duration::from_millis(500), "{took:?}");
        let left = lock(&reactor().unwrap().timers)
            .wakers
            .keys()
            .filter(|(at, _)| *at > Instant::now() + Duration::from_secs(3000))
            .count();
        assert_eq!(left, 0, "a dropped timer stayed in the table");
    }

    #[test]
    fn a_thread_blocked_in_epoll_wait_is_woken_by_another_thread() {
        // A wakeup that is not an event of the instance: a channel sent to from a plain thread.
        let (tx, rx) = async_channel::bounded::<u8>(1);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            tx.send_blocking(7)
        });
        assert_eq!(drive(async move { rx.recv().await }), Ok(7));
        // A timer set from another thread, sooner than the one the blocked thread waits for.
        let (tx, rx) = async_channel::bounded::<Sleep>(1);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            tx.send_blocking(Sleep::new(Duration::from_millis(10)))
        });
        let ex = Arc::new(smol::Executor::new());
        let fired = Arc::new(AtomicBool::new(false));
        let (ex2, fired2) = (ex.clone(), fired.clone());
        drive(async move {
            // The long timer keeps the driving thread blocked; the short one, made elsewhere
            // and first polled by a task of the executor, must cut that wait short.
            let long = ex2.spawn(Sleep::new(Duration::from_secs(30)));
            let short = ex2.spawn(async move {
                rx.recv().await.unwrap().await;
                fired2.store(true, SeqCst);
            });
            ex2.run(short).await;
            drop(long);
        });
        assert!(fired.load(SeqCst));
        drop(ex);
    }

    #[test]
    fn threads_sharing_an_executor_take_turns_and_serve_every_stream() {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let ex = Arc::new(smol::Executor::new());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let helpers: Vec<_> = (0..2)
            .map(|_| {
                let (ex, stopped) = (ex.clone(), stopped.clone());
                std::thread::spawn(move || block_on(ex.run(stopped.recv())))
            })
            .collect();
        let ex2 = ex.clone();
        let served = drive(async move {
            let tasks: Vec<_> = (0..40u32)
                .map(|i| {
                    let (mut outside, mut inside) = pair();
                    ex2.spawn(async move {
                        for round in 0..20u32 {
                            let word = (i * 1000 + round).to_be_bytes();
                            outside.write_all(&word).unwrap();
                            let mut got = [0u8; 4];
                            inside.read_exact(&mut got).await.unwrap();
                            assert_eq!(got, word);
                            inside.write_all(&got).await.unwrap();
                            Sleep::new(Duration::from_millis(u64::from(round % 3))).await;
                        }
                        1
                    })
                })
                .collect();
            ex2.run(async {
                let mut served = 0;
                for task in tasks {
                    served += task.await;
                }
                served
            })
            .await
        });
        assert_eq!(served, 40);
        drop(stop);
        for helper in helpers {
            assert!(helper.join().is_ok());
        }
    }

    /// The CPU time this thread has used, in clock ticks (usually 10 ms).
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // The fields after the command's closing parenthesis; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[test]
    fn the_polling_window_grows_while_work_comes_soon_and_closes_when_it_does_not() {
        let (most, us) = (100_000, 1_000);
        // Work that came soon after the thread went to sleep: poll longer, from 10 µs up.
        assert_eq!(next_window(0, 5 * us, most), 10 * us);
        assert_eq!(next_window(10 * us, 5 * us, most), 20 * us);
        assert_eq!(
            next_window(80 * us, 100 * us, most),
            most,
            "never over the most"
        );
        assert_eq!(next_window(most, 1, most), most);
        // Work that took longer than the most: poll half as long, then not at all.
        assert_eq!(next_window(most, 101 * us, most), 50 * us);
        assert_eq!(next_window(20 * us, 10_000 * us, most), 10 * us);
        assert_eq!(next_window(10 * us, 10_000 * us, most), 0);
        assert_eq!(next_window(0, 10_000 * us, most), 0);
        // A most under 10 µs is where the window starts.
        assert_eq!(next_window(0, 1, 4 * us), 4 * us);
        assert_eq!(next_window(4 * us, 5 * us, 4 * us), 0);
    }

    #[test]
    fn busy_polling_serves_every_wakeup_and_stops_to_sleep() {
        set_busy_poll(Duration::from_millis(5));
        let (cpu, took) = drive(async {
            let before = thread_cpu_ticks();
            let start = Instant::now();
            // Timers, a socket and another thread's wakeup, each while the thread polls.
            Sleep::new(Duration::from_millis(300)).await;
            let (mut outside, mut inside) = pair();
            outside.write_all(b"x").unwrap();
            let mut byte = [0u8; 1];
            futures_lite::AsyncReadExt::read_exact(&mut inside, &mut byte)
                .await
                .unwrap();
            let (tx, rx) = async_channel::bounded::<()>(1);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                tx.send_blocking(())
            });
            rx.recv().await.unwrap();
            (thread_cpu_ticks() - before, start.elapsed())
        });
        set_busy_poll(Duration::ZERO);
        assert!(took >= Duration::from_millis(350), "{took:?}");
        // Polling all along would have taken the whole 350 ms (35 ticks) of CPU.
        assert!(
            cpu < 15,
            "{cpu} ticks of CPU in {took:?}: the polling did not stop"
        );
    }

    #[test]
    fn a_slot_freed_by_a_closed_stream_is_reused_under_a_new_generation() {
        let mut slots = Slots::default();
        let a = slots.insert(Weak::<Source>::new());
        slots.remove(a);
        let b = slots.insert(Weak::<Source>::new());
        assert_eq!(a as u32, b as u32, "the slot is reused");
        assert_ne!(a, b, "under a new generation");
        assert!(slots.get(a).is_none());
        // Removing by a stale key does not free the slot from under its new owner.
        slots.remove(a);
        assert!(slots.free.is_empty());
    }
}
