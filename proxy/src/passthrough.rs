//! The byte pump of an established session: both directions driven by one task, no parsing
//! except the 5-byte headers of node messages, tracked so that the proxy can end a session
//! with its own error at a message boundary.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::{self, HEADER};

/// Size of each direction's buffer: a whole TLS record's worth of plaintext.
const BUF_SIZE: usize = 16 * 1024;
/// Spare buffers kept per thread; beyond it, buffers given back are freed.
const MAX_SPARE: usize = 64;

thread_local! {
    /// Buffers of this thread's sessions that are waiting for data: a session holds a buffer
    /// only while bytes are in flight, so idle sessions (most of them, behind application
    /// connection pools) cost no relay buffers at all.
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    SPARE.with_borrow_mut(Vec::pop).unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < MAX_SPARE {
            spare.push(buf);
        }
    });
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd<T> {
    /// The client closed its connection (after Terminate, or not).
    ClientClosed,
    /// The node closed its connection; everything it sent reached the client.
    NodeClosed,
    ClientError(io::Error),
    NodeError(io::Error),
    /// `stop` completed with `reason`. `at_boundary` is true when the client's stream ends on a
    /// whole message, so an error message can follow.
    Stopped {
        reason: T,
        at_boundary: bool,
    },
}

/// Message framing of the node-to-client stream: how far the current message still goes.
#[derive(Default)]
pub(crate) struct Frames {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Frames {
    pub(crate) fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (HEADER - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if let Some((_, len)) = protocol::header(&self.header[..self.header_len]) {
                self.body_left = (len.max(4) - 4) as usize;
                self.header_len = 0;
            }
        }
    }

    /// Bytes until the end of the current message (0 at a boundary).
    pub(crate) fn to_boundary(&self) -> usize {
        if self.body_left > 0 {
            self.body_left
        } else if self.header_len > 0 {
            HEADER - self.header_len
        } else {
            0
        }
    }
}

/// One direction: read into the buffer, write it all out, repeat.
struct Pump {
    /// Taken from the thread's spare buffers for a read, given back once a read finds nothing.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    eof: bool,
    need_flush: bool,
    frames: Option<Frames>,
    counter: IntCounter,
}

impl Pump {
    fn new(track_frames: bool, counter: IntCounter) -> Self {
        Self {
            buf: None,
            start: 0,
            end: 0,
            eof: false,
            need_flush: false,
            frames: track_frames.then(Frames::default),
            counter,
        }
    }

    /// Copies until EOF (Ok) or an error, tagged with the side that failed. With `to_boundary`,
    /// reads no further than the end of the current message and returns when it is reached.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        to_boundary: bool,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            while let Some(pending) = self.buf.as_deref().and_then(|b| b.get(self.start..self.end))
            {
                if pending.is_empty() {
                    break;
                }
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, pending)).map_err(Side::Writer)?;
                if n == 0 {
                    return Poll::Ready(Err(Side::Writer(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.need_flush = true;
            }
            let limit = match (&self.frames, to_boundary) {
                (Some(frames), true) => frames.to_boundary().min(BUF_SIZE),
                _ => BUF_SIZE,
            };
            if self.eof || limit == 0 {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Side::Writer)?;
                    self.need_flush = false;
                }
                if self.eof {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(Side::Writer)?;
                }
                return Poll::Ready(Ok(()));
            }
            let buf = self.buf.get_or_insert_with(take_buffer);
            let mut read_buf = ReadBuf::new(&mut buf[..limit]);
            match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                Poll::Ready(result) => result.map_err(Side::Reader)?,
                Poll::Pending => {
                    if let Some(buf) = self.buf.take() {
                        give_back(buf);
                    }
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Side::Writer)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
            let n = read_buf.filled().len();
            if n == 0 {
                self.eof = true;
                continue;
            }
            if let Some(frames) = &mut self.frames {
                frames.advance(&buf[..n]);
            }
            self.counter.inc_by(n as u64);
            self.start = 0;
            self.end = n;
        }
    }

    fn at_boundary(&self) -> bool {
        self.start == self.end && self.frames.as_ref().is_none_or(|f| f.to_boundary() == 0)
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(buf);
        }
    }
}

enum Side {
    Reader(io::Error),
    Writer(io::Error),
}

/// Relays between `client` and `node` until one side closes or fails, or `stop` completes.
/// On stop, the node-to-client stream is finished up to the current message boundary (for at
/// most `drain`), so the caller can send its own error message. `node_prefix` is what the node
/// sent before the relay started (already delivered), so that message framing starts right.
pub async fn relay<C, N, S, T>(
    client: &mut C,
    node: &mut N,
    stop: S,
    drain: Duration,
    node_prefix: impl AsRef<[u8]>,
    counters: (IntCounter, IntCounter),
) -> RelayEnd<T>
where
    C: AsyncRead + AsyncWrite + Unpin,
    N: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = T>,
{
    let (from_clients, to_clients) = counters;
    let mut up = Pump::new(false, from_clients);
    let mut down = Pump::new(true, to_clients);
    if let Some(frames) = &mut down.frames {
        frames.advance(node_prefix.as_ref());
    }
    // Freed now rather than held for the whole session.
    drop(node_prefix);
    let stop = pin!(stop);
    let mut stop = StopSignal::new(stop);
    let reason = poll_fn(|cx| {
        if let Poll::Ready(r) = down.poll_copy(cx, node, client, false) {
            return Poll::Ready(Err(match r {
                Ok(()) => RelayEnd::NodeClosed,
                Err(Side::Reader(e)) => RelayEnd::NodeError(e),
                Err(Side::Writer(e)) => RelayEnd::ClientError(e),
            }));
        }
        if let Poll::Ready(r) = up.poll_copy(cx, client, node, false) {
            return Poll::Ready(Err(match r {
                Ok(()) => RelayEnd::ClientClosed,
                Err(Side::Reader(e)) => RelayEnd::ClientError(e),
                Err(Side::Writer(e)) => RelayEnd::NodeError(e),
            }));
        }
        stop.poll(cx).map(Ok)
    })
    .await;
    let reason = match reason {
        Ok(reason) => reason,
        Err(end) => return end,
    };
    let finish = poll_fn(|cx| down.poll_copy(cx, node, client, true));
    let at_boundary =
        matches!(tokio::time::timeout(drain, finish).await, Ok(Ok(()))) && down.at_boundary();
    RelayEnd::Stopped { reason, at_boundary }
}

/// The relay's stop future, polled only after it asked to be. The relay wakes up for every
/// message while the stop future (two `Notified` futures) fires at most once; polling it at every
/// wake-up cost about 5% of the relay's instructions (benches/RESULTS.md). It is polled with a
/// waker of its own that records the wake-up and passes it on to the relay's task.
struct StopSignal<S> {
    future: Pin<S>,
    flag: Arc<WakeFlag>,
    waker: Waker,
    /// The relay task's waker last handed to `flag`.
    task: Option<Waker>,
}

struct WakeFlag {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<S> StopSignal<S>
where
    S: std::ops::DerefMut,
    S::Target: Future,
{
    fn new(future: Pin<S>) -> Self {
        let flag = Arc::new(WakeFlag { fired: AtomicBool::new(true), task: Mutex::default() });
        let waker = Waker::from(Arc::clone(&flag));
        Self { future, flag, waker, task: None }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<<S::Target as Future>::Output> {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self.flag.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
            self.task = Some(waker);
        }
        if !self.flag.fired.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        self.future.as_mut().poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_messages_split_anywhere() {
        // Two messages: 'Z' len 5 body 'I', then 'D' len 8 body 4 bytes.
        let stream = b"Z\0\0\0\x05ID\0\0\0\x08abcd";
        for split in 0..=stream.len() {
            let mut f = Frames::default();
            f.advance(&stream[..split]);
            let expect_boundary = split == 0 || split == 6 || split == stream.len();
            assert_eq!(f.to_boundary() == 0, expect_boundary, "split at {split}");
            f.advance(&stream[split..]);
            assert_eq!(f.to_boundary(), 0);
        }
    }

    /// The stop future is polled only when it wakes the relay: it must still end a relay that
    /// has been busy copying, and one that is idle.
    #[tokio::test]
    async fn stop_ends_a_busy_or_idle_relay() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for busy in [true, false] {
            let (mut client, mut client_end) = tokio::io::duplex(1024);
            let (mut node, mut node_end) = tokio::io::duplex(1024);
            let (fire, fired) = tokio::sync::oneshot::channel::<&str>();
            let counters = (IntCounter::new("a", "a").unwrap(), IntCounter::new("b", "b").unwrap());
            let relay = tokio::spawn(async move {
                let stop = async { fired.await.unwrap_or("dropped") };
                relay(&mut client, &mut node, stop, Duration::from_secs(1), b"", counters).await
            });
            if busy {
                let mut reply = [0; 6];
                for _ in 0..100 {
                    client_end.write_all(b"Q\0\0\0\x05x").await.unwrap();
                    let mut query = [0; 6];
                    node_end.read_exact(&mut query).await.unwrap();
                    node_end.write_all(b"Z\0\0\0\x05I").await.unwrap();
                    client_end.read_exact(&mut reply).await.unwrap();
                }
                assert_eq!(&reply, b"Z\0\0\0\x05I");
            }
            fire.send("moved").unwrap();
            let end = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
            assert!(
                matches!(end, RelayEnd::Stopped { reason: "moved", at_boundary: true }),
                "busy={busy}: {end:?}"
            );
        }
    }

    /// Between messages a pump holds no buffer: it went back to the thread's spares.
    #[tokio::test]
    async fn an_idle_pump_holds_no_buffer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut reader, mut reader_peer) = tokio::io::duplex(64 * 1024);
        let (mut writer, mut writer_peer) = tokio::io::duplex(64 * 1024);
        let mut pump = Pump::new(true, IntCounter::new("a", "a").unwrap());
        // A message bigger than one buffer, relayed whole in one poll.
        let mut message = vec![b'D'];
        message.extend_from_slice(&(4 + 40_000i32).to_be_bytes());
        message.extend_from_slice(&[b'x'; 40_000]);
        reader_peer.write_all(&message).await.unwrap();
        let polled =
            poll_fn(|cx| Poll::Ready(pump.poll_copy(cx, &mut reader, &mut writer, false))).await;
        assert!(polled.is_pending(), "waits for more");
        assert!(pump.buf.is_none(), "an idle pump gives its buffer back");
        assert!(pump.at_boundary());
        let mut received = vec![0; message.len()];
        writer_peer.read_exact(&mut received).await.unwrap();
        assert_eq!(received, message);
        assert_eq!(SPARE.with_borrow(Vec::len), 1, "one buffer served the whole message");
    }

    #[test]
    fn to_boundary_counts_remaining_bytes() {
        let mut f = Frames::default();
        f.advance(b"D\0\0");
        assert_eq!(f.to_boundary(), 2);
        f.advance(b"\0\x0a");
        assert_eq!(f.to_boundary(), 6);
        f.advance(b"abc");
        assert_eq!(f.to_boundary(), 3);
    }
}
