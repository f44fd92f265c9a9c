//! Makes HTTP/2 requests from gRPC clients that put a unix socket path in `:authority`
//! acceptable to h2, by rewriting such an authority to `localhost` on the way in.
//!
//! grpc-core (Python `grpcio`, so the Python `spiffe` package), grpc-java and grpc-swift
//! send the socket path, often percent-encoded (`tmp%2Fsd%2Fapi.sock`, `/var/run/x.sock`),
//! as `:authority`. h2 refuses such a request with RST_STREAM(PROTOCOL_ERROR) and has no
//! option to relax that check (hyperium/h2#442, grpc/grpc#38142).
//!
//! [`AuthorityFix`] wraps an accepted server-side connection before hyper/h2 reads it. The
//! client→server byte stream is parsed just enough to find header blocks: the connection
//! preface and every frame other than HEADERS/CONTINUATION pass through unchanged (DATA is
//! streamed, never buffered whole); if the stream does not start with the HTTP/2 preface,
//! everything passes through untouched. Each complete header block is decoded with a
//! per-connection HPACK decoder (it sees every block, in order, so its dynamic table stays
//! in step with the client's encoder), every `:authority` that is not a valid
//! [`http::uri::Authority`] (or contains `/` or `%`) becomes `localhost`, and the list is
//! re-encoded, in order, as literals *without indexing* (RFC 7541 §6.2.2, plain strings).
//! So the server's HPACK decoder never needs a dynamic table entry: its table stays empty
//! and cannot fall out of step, whatever the client's encoder does. The block is sent as one
//! HEADERS frame (same flags minus PADDED, priority kept) plus CONTINUATION frames, none
//! larger than 16384 bytes, the smallest SETTINGS_MAX_FRAME_SIZE a peer may advertise.
//!
//! Server→client bytes pass through untouched. A malformed or oversized header block fails
//! the read with [`io::ErrorKind::InvalidData`], which closes the connection.
//!
//! Limits: the server must keep SETTINGS_HEADER_TABLE_SIZE at its default of 4096 (tonic
//! and hyper do by default); a client's table size update above that is refused, as h2
//! would refuse it. Memory per connection is bounded by one frame header, one received
//! header block ([`MAX_HEADER_BLOCK`]) and its re-encoding ([`MAX_HEADER_LIST`]).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;
/// The initial SETTINGS_MAX_FRAME_SIZE: a payload size every HTTP/2 peer accepts.
const MAX_OUT_FRAME: usize = 16_384;
/// The initial SETTINGS_HEADER_TABLE_SIZE, which h2 servers advertise unless configured.
const HPACK_TABLE_SIZE: usize = 4096;
/// Largest header block accepted from a client, as received (padding included).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list accepted from a client, counted as RFC 7541 §4.1 does
/// (name + value + 32 per field). Bounds the re-encoded block, since indexed references
/// can make a small block decode to a large list.
pub const MAX_HEADER_LIST: usize = 256 * 1024;
const AUTHORITY: &[u8] = b":authority";
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// Buffers that grew beyond this for a big header block are shrunk back afterwards.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Wraps the server side of an HTTP/2 connection and rewrites a unix-socket-path
/// `:authority` sent by the client to `localhost`; see the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    state: State,
    /// The header block being collected (HEADERS payload, then CONTINUATION payloads).
    block: Vec<u8>,
    /// The HEADERS frame that opened the block being collected, if any.
    open: Option<OpenBlock>,
    /// The re-encoded header block, before framing.
    encoded: Vec<u8>,
    /// Bytes ready for the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    decoder: Decoder<'static>,
}

enum State {
    /// Matching the connection preface; `got` bytes of it are in `buf`.
    Preface { buf: [u8; 24], got: usize },
    /// Reading a frame header.
    FrameHeader {
        buf: [u8; FRAME_HEADER_LEN],
        got: usize,
    },
    /// Passing the rest of a frame's payload through.
    Forward { remaining: usize },
    /// Reading a HEADERS or CONTINUATION payload into `block[..end]`, filled up to `filled`.
    Fragment {
        filled: usize,
        end: usize,
        first: bool,
        end_headers: bool,
    },
    /// Not HTTP/2: everything passes through.
    Passthrough,
    /// The client closed the connection.
    Done,
    /// The client sent something this adapter cannot handle; every read fails.
    Failed(io::ErrorKind, String),
}

impl State {
    fn frame_header() -> Self {
        State::FrameHeader {
            buf: [0; FRAME_HEADER_LEN],
            got: 0,
        }
    }
}

struct OpenBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; PRIORITY_LEN]>,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection: nothing may have been read from it yet.
    pub fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            inner,
            state: State::Preface {
                buf: [0; 24],
                got: 0,
            },
            block: Vec::new(),
            open: None,
            encoded: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            decoder,
        }
    }

    /// The wrapped connection (e.g. to read its peer credentials).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Copies pending output into `buf`; true if anything was copied.
    fn drain_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = self.out.get(self.out_pos..).unwrap_or_default();
        let n = pending.len().min(buf.remaining());
        if n == 0 {
            return false;
        }
        buf.put_slice(pending.get(..n).unwrap_or_default());
        self.out_pos += n;
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            shrink(&mut self.out);
        }
        true
    }

    fn fail(&mut self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.state = State::Failed(kind, msg.clone());
        self.block = Vec::new();
        self.encoded = Vec::new();
        io::Error::new(kind, msg)
    }

    fn invalid(&mut self, msg: &str) -> io::Error {
        self.fail(
            io::ErrorKind::InvalidData,
            format!("HTTP/2 authority fix: {msg}"),
        )
    }

    /// Acts on a complete frame header.
    fn on_frame_header(&mut self, header: [u8; FRAME_HEADER_LEN]) -> io::Result<()> {
        let [l0, l1, l2, ty, flags, s0, s1, s2, s3] = header;
        let len = (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2);
        let stream_id = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
        let end_headers = flags & FLAG_END_HEADERS != 0;
        if let Some(open) = &self.open {
            if ty != TYPE_CONTINUATION || stream_id != open.stream_id {
                return Err(self.invalid("header block interrupted by another frame"));
            }
            let start = self.block.len();
            let end = start.saturating_add(len);
            if end > MAX_HEADER_BLOCK {
                return Err(self.invalid("header block too large"));
            }
            self.block.resize(end, 0);
            self.state = State::Fragment {
                filled: start,
                end,
                first: false,
                end_headers,
            };
        } else if ty == TYPE_HEADERS {
            if len > MAX_HEADER_BLOCK {
                return Err(self.invalid("header block too large"));
            }
            self.open = Some(OpenBlock {
                stream_id,
                flags,
                priority: None,
            });
            self.block.clear();
            self.block.resize(len, 0);
            self.state = State::Fragment {
                filled: 0,
                end: len,
                first: true,
                end_headers,
            };
        } else {
            self.out.extend_from_slice(&header);
            self.state = State::Forward { remaining: len };
        }
        Ok(())
    }

    /// Removes the padding and priority fields from the HEADERS payload in `block`.
    fn strip_headers_frame(&mut self) -> io::Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Err(self.invalid("no open header block"));
        };
        let mut start = 0;
        let mut end = self.block.len();
        if open.flags & FLAG_PADDED != 0 {
            let pad = self.block.first().copied().map(usize::from);
            start = 1;
            end = match pad.and_then(|p| end.checked_sub(p)) {
                Some(e) => e,
                None => return Err(self.invalid("bad padding in HEADERS frame")),
            };
        }
        if open.flags & FLAG_PRIORITY != 0 {
            let fields = self
                .block
                .get(start..start + PRIORITY_LEN)
                .and_then(|p| <[u8; PRIORITY_LEN]>::try_from(p).ok());
            let Some(fields) = fields else {
                return Err(self.invalid("HEADERS frame too short for its priority fields"));
            };
            open.priority = Some(fields);
            start += PRIORITY_LEN;
        }
        if end < start {
            return Err(self.invalid("bad padding in HEADERS frame"));
        }
        self.block.truncate(end);
        self.block.drain(..start);
        Ok(())
    }

    /// Decodes the complete header block in `block`, re-encodes it with the authority
    /// fixed, and queues the resulting frames.
    fn rewrite_block(&mut self) -> io::Result<()> {
        let Some(open) = self.open.take() else {
            return Err(self.invalid("no open header block"));
        };
        let encoded = &mut self.encoded;
        encoded.clear();
        let mut list_size = 0usize;
        let result = self.decoder.decode_with_cb(&self.block, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size > MAX_HEADER_LIST {
                return;
            }
            let value: &[u8] = if *name == *AUTHORITY && !is_acceptable_authority(&value) {
                REPLACEMENT_AUTHORITY
            } else {
                &value
            };
            encode_literal(encoded, &name, value);
        });
        match result {
            // The decoder has applied everything by the time it reports this; h2 accepts
            // a block made only of table size updates, so this does too.
            Ok(()) | Err(DecoderError::SizeUpdateAtEnd) => {}
            Err(e) => return Err(self.invalid(&format!("HPACK decoding failed: {e}"))),
        }
        if list_size > MAX_HEADER_LIST {
            return Err(self.invalid("header list too large"));
        }
        emit_header_block(&mut self.out, &open, &self.encoded);
        self.block.clear();
        shrink(&mut self.block);
        self.encoded.clear();
        shrink(&mut self.encoded);
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AuthorityFix<S> {
    /// Reads more input for the preface, a frame header or a header block fragment and
    /// acts on it. `Ready(Ok)` means progress: the state changed or output was queued.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Preface { buf, got } => {
                let dst = buf.get_mut(*got..).unwrap_or_default();
                let n = ready!(poll_fill(&mut self.inner, cx, dst))?;
                let total = *got + n;
                let seen = buf.get(..total).unwrap_or_default();
                if n == 0 {
                    // Closed before a full preface: whatever came is not HTTP/2.
                    self.out.extend_from_slice(seen);
                    self.state = State::Done;
                } else if !PREFACE.starts_with(seen) {
                    self.out.extend_from_slice(seen);
                    self.state = State::Passthrough;
                } else if total == PREFACE.len() {
                    self.out.extend_from_slice(PREFACE);
                    self.state = State::frame_header();
                } else {
                    *got = total;
                }
            }
            State::FrameHeader { buf, got } => {
                let dst = buf.get_mut(*got..).unwrap_or_default();
                let n = ready!(poll_fill(&mut self.inner, cx, dst))?;
                if n == 0 {
                    if self.open.is_some() {
                        return Poll::Ready(Err(self.fail(
                            io::ErrorKind::UnexpectedEof,
                            "HTTP/2 authority fix: connection closed inside a header block".into(),
                        )));
                    }
                    // Pass a truncated frame header on; h2 reports it.
                    let seen = buf.get(..*got).unwrap_or_default();
                    self.out.extend_from_slice(seen);
                    self.state = State::Done;
                } else {
                    *got += n;
                    if *got == FRAME_HEADER_LEN {
                        let header = *buf;
                        self.on_frame_header(header)?;
                    }
                }
            }
            State::Fragment {
                filled,
                end,
                first,
                end_headers,
            } => {
                if filled < end {
                    let dst = self.block.get_mut(*filled..*end).unwrap_or_default();
                    let n = ready!(poll_fill(&mut self.inner, cx, dst))?;
                    if n == 0 {
                        return Poll::Ready(Err(self.fail(
                            io::ErrorKind::UnexpectedEof,
                            "HTTP/2 authority fix: connection closed inside a header block".into(),
                        )));
                    }
                    *filled += n;
                }
                if filled >= end {
                    let (first, end_headers) = (*first, *end_headers);
                    self.state = State::frame_header();
                    if first {
                        self.strip_headers_frame()?;
                    }
                    if end_headers {
                        self.rewrite_block()?;
                    }
                }
            }
            // poll_read handles these itself.
            State::Forward { .. } | State::Passthrough | State::Done | State::Failed(..) => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.drain_out(buf) {
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                State::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                State::Done => return Poll::Ready(Ok(())),
                State::Failed(kind, msg) => {
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
                }
                State::Forward { remaining: 0 } => this.state = State::frame_header(),
                State::Forward { remaining } => {
                    // Straight from the connection into the caller's buffer.
                    let want = (*remaining).min(buf.remaining());
                    let n = {
                        let dst = buf.initialize_unfilled_to(want);
                        ready!(poll_fill(&mut this.inner, cx, dst))?
                    };
                    if n == 0 {
                        // Closed inside a frame: pass the end on; h2 reports it.
                        this.state = State::Done;
                        return Poll::Ready(Ok(()));
                    }
                    buf.advance(n);
                    *remaining -= n;
                    if *remaining == 0 {
                        this.state = State::frame_header();
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Preface { .. } | State::FrameHeader { .. } | State::Fragment { .. } => {
                    ready!(this.poll_step(cx))?;
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: fmt::Debug> fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Reads into `dst` (never empty); `Ok(0)` is the end of the stream.
fn poll_fill<S: AsyncRead + Unpin>(
    inner: &mut S,
    cx: &mut Context<'_>,
    dst: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(dst);
    ready!(Pin::new(inner).poll_read(cx, &mut rb))?;
    Poll::Ready(Ok(rb.filled().len()))
}

fn shrink(v: &mut Vec<u8>) {
    if v.capacity() > KEEP_CAPACITY {
        v.shrink_to(KEEP_CAPACITY);
    }
}

/// Whether h2 accepts `value` as `:authority` (a socket path is not one).
fn is_acceptable_authority(value: &[u8]) -> bool {
    !value.contains(&b'/')
        && !value.contains(&b'%')
        && http::uri::Authority::try_from(value).is_ok()
}

/// RFC 7541 §5.1: an integer with an N-bit prefix; `first` holds the bits above the prefix.
fn encode_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// RFC 7541 §6.2.2: literal header field without indexing, new name, plain strings.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for s in [name, value] {
        encode_int(out, 0x00, 7, s.len());
        out.extend_from_slice(s);
    }
}

fn push_frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream_id: u32) {
    let [_, l0, l1, l2] = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&[l0, l1, l2, ty, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Frames `block` as one HEADERS frame plus CONTINUATION frames, none above
/// [`MAX_OUT_FRAME`], END_HEADERS on the last only.
fn emit_header_block(out: &mut Vec<u8>, open: &OpenBlock, block: &[u8]) {
    let priority_len = if open.priority.is_some() {
        PRIORITY_LEN
    } else {
        0
    };
    let first_len = block.len().min(MAX_OUT_FRAME - priority_len);
    let (first, mut rest) = block.split_at_checked(first_len).unwrap_or((block, &[]));
    let mut flags = open.flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    push_frame_header(
        out,
        priority_len + first.len(),
        TYPE_HEADERS,
        flags,
        open.stream_id,
    );
    if let Some(priority) = &open.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest
            .split_at_checked(rest.len().min(MAX_OUT_FRAME))
            .unwrap_or((rest, &[]));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, open.stream_id);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}
