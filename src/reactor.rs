//! Edge-triggered readiness for the TCP streams of [`SmolNet`](crate::SmolNet), on Linux.
//!
//! async-io registers a socket one-shot: every wait re-arms it with an `epoll_ctl`, and
//! dropping it removes it with another. A tunnel waits once per message and direction, so
//! that is a system call per message on top of the read and the write. Here a stream is
//! registered once, edge-triggered, in an epoll instance of the process's own, and leaves it
//! when its descriptor is closed, with no system call of its own.
//!
//! That instance is itself one source of async-io's reactor. When it has events, the waker
//! async-io calls collects them (`epoll_wait` with no timeout) and wakes the tasks of the
//! streams that became ready, on the thread that ran the reactor, as async-io's own wakeups
//! are: no thread and no task of its own, whatever executor runs the proxy. Under load one
//! collection serves many streams; a lone stream pays one `epoll_wait` more per wakeup.
//!
//! A stream's readiness is a flag per direction, set by an event and cleared when an
//! operation finds nothing (`EAGAIN`), or when a read returns less than it asked for (the
//! socket's queue is empty, and anything that arrives later is a new edge). A counter per
//! direction, bumped by every event, keeps an event that lands during an operation from being
//! cleared with it.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

use rustix::event::{epoll, Timespec};

/// The direction of a read ([`Source::poll_ready`]).
pub(crate) const READ: usize = 0;
/// The direction of a write ([`Source::poll_ready`]).
pub(crate) const WRITE: usize = 1;

/// Events collected by one `epoll_wait`; more are collected by the next.
const BATCH: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

/// A TCP stream registered with the reactor.
#[derive(Debug)]
pub(crate) struct Source {
    stream: TcpStream,
    /// Its slot in the reactor's table, with the slot's generation in the upper half.
    key: u64,
    state: Mutex<[Direction; 2]>,
}

impl Source {
    /// Registers `stream` (non-blocking already). `readable` and `writable` say whether to try
    /// an operation before any event came: yes for an accepted stream, no for a connect still
    /// under way. (Registering reports what is ready already, so no is never wrong, only
    /// slower by one collection.)
    pub(crate) fn new(stream: TcpStream, readable: bool, writable: bool) -> io::Result<Arc<Self>> {
        let reactor = reactor()?;
        let source = Arc::new_cyclic(|me| Source {
            stream,
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
            &source.stream,
            epoll::EventData::new_u64(source.key),
            F::IN | F::OUT | F::RDHUP | F::ET,
        )?;
        Ok(source)
    }

    /// The socket.
    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.stream
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
        mut op: impl FnMut(&TcpStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            let Poll::Ready(tick) = self.poll_ready(dir, cx) else {
                return Poll::Pending;
            };
            match op(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(dir, tick),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return Poll::Ready(done),
            }
        }
    }

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
            match (&self.stream).read(buf) {
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

    /// Sets the directions `flags` makes ready and collects their wakers.
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

impl Drop for Source {
    fn drop(&mut self) {
        // The descriptor closes after this, which takes it out of the epoll instance; an event
        // already collected for it finds its slot gone or reused under a new generation.
        if let Ok(reactor) = reactor() {
            lock(&reactor.slots).remove(self.key);
        }
    }
}

/// The registered sources, by slot; a key is a slot and its generation.
#[derive(Debug, Default)]
struct Slots {
    entries: Vec<(u32, Weak<Source>)>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, source: Weak<Source>) -> u64 {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.entries.push((0, Weak::new()));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        entry.1 = source;
        (u64::from(entry.0) << 32) | u64::from(slot)
    }

    fn remove(&mut self, key: u64) {
        let slot = key as u32;
        if let Some(entry) = self.entries.get_mut(slot as usize) {
            if u64::from(entry.0) == key >> 32 {
                *entry = (entry.0.wrapping_add(1), Weak::new());
                self.free.push(slot);
            }
        }
    }

    fn get(&self, key: u64) -> Option<Arc<Source>> {
        let entry = self.entries.get(key as u32 as usize)?;
        (u64::from(entry.0) == key >> 32)
            .then(|| entry.1.upgrade())
            .flatten()
    }
}

/// The sources events are for, and the wakers to call: kept between collections.
type Scratch = (Vec<(Arc<Source>, epoll::EventFlags)>, Vec<Waker>);

std::thread_local! {
    /// The events one collection takes (per thread: an event holds a pointer, so not `Send`).
    static EVENTS: std::cell::RefCell<Vec<epoll::Event>> =
        std::cell::RefCell::new(Vec::with_capacity(BATCH));
}

struct Reactor {
    /// The epoll instance, as a source of async-io's reactor.
    epoll: smol::Async<OwnedFd>,
    slots: Mutex<Slots>,
    scratch: Mutex<Scratch>,
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
    /// `waker` when it has more.
    fn drive(&self) {
        let mut cx = Context::from_waker(&self.waker);
        loop {
            match self.epoll.poll_readable(&mut cx) {
                Poll::Ready(Ok(())) => self.collect(),
                Poll::Ready(Err(e)) => {
                    // Re-arming failed: nothing will wake the streams again.
                    crate::log::warn!("the stream reactor stopped: {e}");
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    /// Takes the events the instance has, and wakes the tasks they are for.
    fn collect(&self) {
        EVENTS.with(|events| {
            let mut events = events.borrow_mut();
            let mut scratch = lock(&self.scratch);
            let (sources, wakers) = &mut *scratch;
            loop {
                events.clear();
                let zero = Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let spare = rustix::buffer::spare_capacity(&mut *events);
                if epoll::wait(self.epoll.get_ref(), spare, Some(&zero)).is_err() {
                    return;
                }
                {
                    let slots = lock(&self.slots);
                    let found = events
                        .iter()
                        .filter_map(|e| Some((slots.get(e.data.u64())?, e.flags)));
                    sources.extend(found);
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
                    return;
                }
            }
        })
    }
}

/// Makes the process's reactor, if it is not made yet.
pub(crate) fn start() {
    let _ = reactor();
}

/// The process's reactor, made on first use.
fn reactor() -> io::Result<&'static Reactor> {
    static REACTOR: OnceLock<Reactor> = OnceLock::new();
    if let Some(r) = REACTOR.get() {
        return Ok(r);
    }
    let epoll = smol::Async::new(epoll::create(epoll::CreateFlags::CLOEXEC)?)?;
    let made = Reactor {
        epoll,
        slots: Mutex::default(),
        scratch: Mutex::default(),
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

    #[test]
    fn a_slot_freed_by_a_closed_stream_is_reused_under_a_new_generation() {
        let mut slots = Slots::default();
        let a = slots.insert(Weak::new());
        slots.remove(a);
        let b = slots.insert(Weak::new());
        assert_eq!(a as u32, b as u32, "the slot is reused");
        assert_ne!(a, b, "under a new generation");
        assert!(slots.get(a).is_none());
        // Removing by a stale key does not free the slot from under its new owner.
        slots.remove(a);
        assert!(slots.free.is_empty());
    }
}
