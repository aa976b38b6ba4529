//! The byte pump of an established session: both directions driven by one task, no parsing
//! except the 5-byte headers of node messages, tracked so that the proxy can end a session
//! with its own error at a message boundary.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of each direction's buffer.
const BUF_SIZE: usize = 4 * 1024;

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
struct Frames {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Frames {
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                let len = i32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                self.body_left = (len.max(4) - 4) as usize;
                self.header_len = 0;
            }
        }
    }

    /// Bytes until the end of the current message (0 at a boundary).
    fn to_boundary(&self) -> usize {
        if self.body_left > 0 {
            self.body_left
        } else if self.header_len > 0 {
            5 - self.header_len
        } else {
            0
        }
    }
}

/// One direction: read into the buffer, write it all out, repeat.
struct Pump {
    buf: Box<[u8]>,
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
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
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
            while self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                        .map_err(Side::Writer)?;
                if n == 0 {
                    return Poll::Ready(Err(Side::Writer(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.need_flush = true;
            }
            let limit = match (&self.frames, to_boundary) {
                (Some(frames), true) => frames.to_boundary().min(self.buf.len()),
                _ => self.buf.len(),
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
            let mut read_buf = ReadBuf::new(&mut self.buf[..limit]);
            match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                Poll::Ready(result) => result.map_err(Side::Reader)?,
                Poll::Pending => {
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
                frames.advance(&self.buf[..n]);
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
    node_prefix: &[u8],
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
        frames.advance(node_prefix);
    }
    let both = poll_fn(|cx| {
        if let Poll::Ready(r) = down.poll_copy(cx, node, client, false) {
            return Poll::Ready(match r {
                Ok(()) => RelayEnd::NodeClosed,
                Err(Side::Reader(e)) => RelayEnd::NodeError(e),
                Err(Side::Writer(e)) => RelayEnd::ClientError(e),
            });
        }
        if let Poll::Ready(r) = up.poll_copy(cx, client, node, false) {
            return Poll::Ready(match r {
                Ok(()) => RelayEnd::ClientClosed,
                Err(Side::Reader(e)) => RelayEnd::ClientError(e),
                Err(Side::Writer(e)) => RelayEnd::NodeError(e),
            });
        }
        Poll::Pending
    });
    let reason = tokio::select! {
        end = both => return end,
        reason = stop => reason,
    };
    let finish = poll_fn(|cx| down.poll_copy(cx, node, client, true));
    let at_boundary =
        matches!(tokio::time::timeout(drain, finish).await, Ok(Ok(()))) && down.at_boundary();
    RelayEnd::Stopped { reason, at_boundary }
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
