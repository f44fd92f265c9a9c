//! Makes HTTP/2 requests from gRPC clients that put a unix socket path in `:authority`
//! acceptable to h2, by rewriting such an authority to `localhost` on the way in.
//!
//! grpc-core (Python `grpcio`, so the Python `spiffe` package), grpc-java and grpc-swift
//! send the socket path, often percent-encoded (`tmp%2Fsd%2Fapi.sock`, `/var/run/x.sock`),
//! as `:authority`. h2 refuses such a request with RST_STREAM(PROTOCOL_ERROR) and has no
//! option to relax that check (hyperium/h2#442, grpc/grpc#38142).
//!
//! [`AuthorityRewriter`] wraps an accepted server-side connection before hyper/h2 reads it. The
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
//! The connection is read in chunks of up to [`READ_CHUNK`] bytes into an input buffer and
//! the parser runs over what is buffered, so a whole request usually costs one read on the
//! connection, not one per preface, frame header and payload. One call hands the caller as
//! many output bytes as are ready. A DATA payload too large for the buffer is read straight
//! into the caller's buffer.
//!
//! Server→client bytes pass through untouched. A malformed or oversized header block fails
//! the read with [`io::ErrorKind::InvalidData`], which closes the connection.
//!
//! Limits: the server must keep SETTINGS_HEADER_TABLE_SIZE at its default of 4096 (tonic
//! and hyper do by default); a client's table size update above that is refused, as h2
//! would refuse it. Memory per connection is bounded by one read chunk ([`READ_CHUNK`]),
//! one received header block ([`MAX_HEADER_BLOCK`]), a copy of it with Huffman strings
//! decoded (at most 8/5 of its size) and its re-encoding ([`MAX_HEADER_LIST`]).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
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
/// Size of the input buffer: the most read from the connection at once.
pub const READ_CHUNK: usize = 16 * 1024;
const AUTHORITY: &[u8] = b":authority";
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// Buffers that grew beyond this for a big header block are shrunk back afterwards.
const KEEP_CAPACITY: usize = 16 * 1024;
/// RFC 7541 Appendix B: the Huffman code length of each symbol, EOS (256) last. The code
/// is canonical (codes of each length assigned in symbol order), so this defines it.
const HUFFMAN_CODE_LENS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];
const HUFFMAN_MAX_LEN: usize = 30;
const HUFFMAN_EOS: u16 = 256;

/// Wraps the server side of an HTTP/2 connection and rewrites a unix-socket-path
/// `:authority` sent by the client to `localhost`; see the module documentation.
pub struct AuthorityRewriter<S> {
    inner: S,
    state: State,
    /// Bytes read from the connection, not yet parsed: `input[in_pos..in_end]`. Allocated
    /// (to [`READ_CHUNK`] bytes) on the first read.
    input: Vec<u8>,
    in_pos: usize,
    in_end: usize,
    /// The header block being collected (HEADERS payload, then CONTINUATION payloads).
    block: Vec<u8>,
    /// The HEADERS frame that opened the block being collected, if any.
    open: Option<OpenBlock>,
    /// The re-encoded header block, before framing.
    encoded: Vec<u8>,
    /// The received header block with its Huffman-coded strings decoded (see [`unhuffman`]).
    plain: Vec<u8>,
    /// Bytes ready for the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    decoder: Decoder<'static>,
}

enum State {
    /// Matching the connection preface.
    Preface,
    /// Reading a frame header.
    FrameHeader,
    /// Passing the rest of a frame's payload through.
    Forward { remaining: usize },
    /// Collecting a HEADERS or CONTINUATION payload into `block` until it is `end` bytes.
    Fragment {
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

/// What [`AuthorityRewriter::step`] did.
enum Step {
    /// Parsed something (state changed, output queued or copied): step again.
    Progress,
    /// The current state needs more input than is buffered.
    NeedInput,
}

struct OpenBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; PRIORITY_LEN]>,
}

impl<S> AuthorityRewriter<S> {
    /// Wraps a freshly accepted connection: nothing may have been read from it yet.
    pub fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            inner,
            state: State::Preface,
            input: Vec::new(),
            in_pos: 0,
            in_end: 0,
            block: Vec::new(),
            open: None,
            encoded: Vec::new(),
            plain: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            decoder,
        }
    }

    /// The wrapped connection (e.g. to read its peer credentials).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The buffered, unparsed input.
    fn buffered(&self) -> &[u8] {
        self.input.get(self.in_pos..self.in_end).unwrap_or_default()
    }

    /// Marks `n` buffered bytes as parsed.
    fn consume(&mut self, n: usize) {
        self.in_pos = self.in_pos.saturating_add(n).min(self.in_end);
        if self.in_pos == self.in_end {
            self.in_pos = 0;
            self.in_end = 0;
        }
    }

    /// Copies up to `limit` buffered bytes into `buf`; returns how many.
    fn copy_input(&mut self, buf: &mut ReadBuf<'_>, limit: usize) -> usize {
        let avail = self.input.get(self.in_pos..self.in_end).unwrap_or_default();
        let n = avail.len().min(limit).min(buf.remaining());
        buf.put_slice(avail.get(..n).unwrap_or_default());
        self.consume(n);
        n
    }

    /// Copies pending output into `buf`.
    fn drain_out(&mut self, buf: &mut ReadBuf<'_>) {
        let pending = self.out.get(self.out_pos..).unwrap_or_default();
        let n = pending.len().min(buf.remaining());
        if n == 0 {
            return;
        }
        buf.put_slice(pending.get(..n).unwrap_or_default());
        self.out_pos += n;
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            shrink(&mut self.out);
        }
    }

    fn fail(&mut self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.state = State::Failed(kind, msg.clone());
        self.block = Vec::new();
        self.encoded = Vec::new();
        self.plain = Vec::new();
        self.input = Vec::new();
        self.in_pos = 0;
        self.in_end = 0;
        io::Error::new(kind, msg)
    }

    fn invalid(&mut self, msg: &str) -> io::Error {
        self.fail(
            io::ErrorKind::InvalidData,
            format!("HTTP/2 authority fix: {msg}"),
        )
    }

    fn closed_inside_block(&mut self) -> io::Error {
        self.fail(
            io::ErrorKind::UnexpectedEof,
            "HTTP/2 authority fix: connection closed inside a header block".into(),
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
            let end = self.block.len().saturating_add(len);
            if end > MAX_HEADER_BLOCK {
                return Err(self.invalid("header block too large"));
            }
            self.block.reserve(len);
            self.state = State::Fragment {
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
            self.block.reserve(len);
            self.state = State::Fragment {
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
        self.plain.clear();
        if let Err(e) = unhuffman(&self.block, &mut self.plain) {
            return Err(self.invalid(&format!("HPACK decoding failed: {e}")));
        }
        let encoded = &mut self.encoded;
        encoded.clear();
        let mut list_size = 0usize;
        let result = self.decoder.decode_with_cb(&self.plain, |name, value| {
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
        self.plain.clear();
        shrink(&mut self.plain);
        Ok(())
    }

    /// Parses buffered input in the preface, frame header, forward and fragment states;
    /// forwarded payload bytes go straight into `buf` (which has room).
    fn step(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<Step> {
        match self.state {
            State::Preface => {
                let seen = self.buffered();
                let n = seen.len().min(PREFACE.len());
                if seen.get(..n) != PREFACE.get(..n) {
                    // Not HTTP/2: the buffered bytes pass through as they are.
                    self.state = State::Passthrough;
                } else if n < PREFACE.len() {
                    return Ok(Step::NeedInput);
                } else {
                    self.out.extend_from_slice(PREFACE);
                    self.consume(PREFACE.len());
                    self.state = State::FrameHeader;
                }
            }
            State::FrameHeader => {
                let Some(header) = self.buffered().first_chunk::<FRAME_HEADER_LEN>().copied()
                else {
                    return Ok(Step::NeedInput);
                };
                self.consume(FRAME_HEADER_LEN);
                self.on_frame_header(header)?;
            }
            State::Forward { remaining: 0 } => self.state = State::FrameHeader,
            State::Forward { remaining } => {
                let n = self.copy_input(buf, remaining);
                if n == 0 {
                    return Ok(Step::NeedInput);
                }
                self.state = State::Forward {
                    remaining: remaining - n,
                };
            }
            State::Fragment {
                end,
                first,
                end_headers,
            } => {
                let need = end.saturating_sub(self.block.len());
                let avail = self.input.get(self.in_pos..self.in_end).unwrap_or_default();
                let n = need.min(avail.len());
                self.block
                    .extend_from_slice(avail.get(..n).unwrap_or_default());
                self.consume(n);
                if n < need {
                    return Ok(Step::NeedInput);
                }
                self.state = State::FrameHeader;
                if first {
                    self.strip_headers_frame()?;
                }
                if end_headers {
                    self.rewrite_block()?;
                }
            }
            // poll_read handles these itself.
            State::Passthrough | State::Done | State::Failed(..) => {}
        }
        Ok(Step::Progress)
    }

    /// The connection ended while the current state needed more input.
    fn on_eof(&mut self) -> io::Result<()> {
        match self.state {
            State::Preface => {
                // Closed before a full preface: whatever came is not HTTP/2.
                let seen = self.input.get(self.in_pos..self.in_end).unwrap_or_default();
                self.out.extend_from_slice(seen);
                self.consume(usize::MAX);
                self.state = State::Done;
            }
            State::FrameHeader => {
                if self.open.is_some() {
                    return Err(self.closed_inside_block());
                }
                // Pass a truncated frame header on; h2 reports it.
                let seen = self.input.get(self.in_pos..self.in_end).unwrap_or_default();
                self.out.extend_from_slice(seen);
                self.consume(usize::MAX);
                self.state = State::Done;
            }
            // Closed inside a frame: pass the end on; h2 reports it.
            State::Forward { .. } => self.state = State::Done,
            State::Fragment { .. } => return Err(self.closed_inside_block()),
            State::Passthrough | State::Done | State::Failed(..) => {}
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AuthorityRewriter<S> {
    /// Reads from the connection into the input buffer, after the bytes already there
    /// (moved to its start). `Ok(0)` is the end of the stream.
    fn poll_fill_input(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.in_pos > 0 {
            self.input.copy_within(self.in_pos..self.in_end, 0);
            self.in_end -= self.in_pos;
            self.in_pos = 0;
        }
        if self.input.len() < READ_CHUNK {
            self.input.resize(READ_CHUNK, 0);
        }
        let dst = self.input.get_mut(self.in_end..).unwrap_or_default();
        if dst.is_empty() {
            // Unreachable: a state needs at most 24 buffered bytes before it parses them.
            return Poll::Ready(Err(self.invalid("input buffer full")));
        }
        let n = ready!(poll_fill(&mut self.inner, cx, dst))?;
        self.in_end += n;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AuthorityRewriter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        loop {
            this.drain_out(buf);
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Output is handed over before the connection is read again or an error
            // reported (the error sticks, so the next call reports it).
            let progressed = buf.filled().len() > start;
            match &this.state {
                State::Passthrough => {
                    if this.copy_input(buf, usize::MAX) > 0 || progressed {
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                State::Done => return Poll::Ready(Ok(())),
                State::Failed(kind, msg) => {
                    if progressed {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
                }
                State::Preface
                | State::FrameHeader
                | State::Forward { .. }
                | State::Fragment { .. } => {}
            }
            match this.step(buf) {
                Ok(Step::Progress) => continue,
                Err(e) if !progressed => return Poll::Ready(Err(e)),
                Err(_) => return Poll::Ready(Ok(())),
                Ok(Step::NeedInput) => {}
            }
            if progressed {
                return Poll::Ready(Ok(()));
            }
            if let State::Forward { remaining } = this.state
                && remaining >= READ_CHUNK
                && this.buffered().is_empty()
            {
                // A large payload: straight from the connection into the caller's buffer.
                let want = remaining.min(buf.remaining());
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
                this.state = State::Forward {
                    remaining: remaining - n,
                };
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_fill_input(cx))? == 0 {
                this.on_eof()?;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AuthorityRewriter<S> {
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

impl<S: fmt::Debug> fmt::Debug for AuthorityRewriter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityRewriter")
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

/// Copies the header block `src` onto `dst` with every Huffman-coded string literal replaced
/// by the same string, plain. loona-hpack builds hash tables for every Huffman string it
/// decodes and walks them bit by bit, which made decoding a typical request cost hundreds
/// of microseconds; given plain strings it only copies. Field representations are parsed
/// as loona-hpack parses them; at anything it would reject (other than a bad Huffman
/// string, which is an error here) the rest of the block is copied unchanged, for it to
/// report.
fn unhuffman(src: &[u8], dst: &mut Vec<u8>) -> Result<(), &'static str> {
    dst.reserve(src.len());
    let mut scratch = Vec::new();
    let mut rest = src;
    while !rest.is_empty() {
        let start = dst.len();
        match unhuffman_field(rest, dst, &mut scratch)? {
            Some(used) => rest = rest.get(used..).unwrap_or_default(),
            None => {
                dst.truncate(start);
                dst.extend_from_slice(rest);
                break;
            }
        }
    }
    Ok(())
}

/// Copies one field representation from the start of `src` (see [`unhuffman`]); returns
/// the bytes it took, or `None` if it is malformed.
fn unhuffman_field(
    src: &[u8],
    dst: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<Option<usize>, &'static str> {
    let Some(&first) = src.first() else {
        return Ok(None);
    };
    let (prefix_bits, literal) = if first & 0x80 != 0 {
        (7, false) // indexed
    } else if first & 0x40 != 0 {
        (6, true) // literal with incremental indexing
    } else if first & 0x20 != 0 {
        (5, false) // dynamic table size update
    } else {
        (4, true) // literal without indexing or never indexed
    };
    let Some((index, mut used)) = decode_int(src, prefix_bits) else {
        return Ok(None);
    };
    dst.extend_from_slice(src.get(..used).unwrap_or_default());
    let strings = match (literal, index) {
        (false, _) => 0,
        (true, 0) => 2, // new name, value
        (true, _) => 1, // indexed name, value
    };
    for _ in 0..strings {
        let s = src.get(used..).unwrap_or_default();
        let Some(&first) = s.first() else {
            return Ok(None);
        };
        let Some((len, n)) = decode_int(s, 7) else {
            return Ok(None);
        };
        let Some(raw) = n.checked_add(len).and_then(|end| s.get(n..end)) else {
            return Ok(None);
        };
        if first & 0x80 != 0 {
            scratch.clear();
            huffman_decode(raw, scratch)?;
            encode_int(dst, 0x00, 7, scratch.len());
            dst.extend_from_slice(scratch);
        } else {
            dst.extend_from_slice(s.get(..n + len).unwrap_or_default());
        }
        used += n + len;
    }
    Ok(Some(used))
}

/// RFC 7541 §5.1, as loona-hpack decodes it (at most 4 octets after the prefix): the value
/// and the bytes used.
fn decode_int(buf: &[u8], prefix_bits: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*buf.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Decoding tables for the canonical HPACK Huffman code: the number of codes of each
/// length, and the symbols ordered by (code length, symbol).
struct HuffmanTable {
    counts: [u16; HUFFMAN_MAX_LEN + 1],
    symbols: [u16; 257],
}

fn huffman_table() -> &'static HuffmanTable {
    static TABLE: OnceLock<HuffmanTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = HuffmanTable {
            counts: [0; HUFFMAN_MAX_LEN + 1],
            symbols: [0; 257],
        };
        let mut slots = t.symbols.iter_mut();
        for len in 1..=HUFFMAN_MAX_LEN {
            for (symbol, &l) in (0u16..).zip(HUFFMAN_CODE_LENS.iter()) {
                if usize::from(l) == len {
                    if let Some(count) = t.counts.get_mut(len) {
                        *count += 1;
                    }
                    if let Some(slot) = slots.next() {
                        *slot = symbol;
                    }
                }
            }
        }
        t
    })
}

/// Decodes an HPACK Huffman-coded string (RFC 7541 §5.2) onto `out`, refusing what
/// loona-hpack refuses: EOS inside the string, padding longer than 7 bits, and padding
/// that is not the most significant bits of EOS (all ones).
fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let t = huffman_table();
    // Canonical decoding, one bit at a time: `code` holds the `len` bits read so far,
    // `first` the first code of that length, `index` the position of its symbol.
    let (mut code, mut first, mut index, mut len) = (0u32, 0u32, 0usize, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code |= u32::from((byte >> shift) & 1);
            len += 1;
            let count = t.counts.get(len).copied().map(u32::from);
            let Some(count) = count else {
                return Err("invalid Huffman code");
            };
            match code.checked_sub(first) {
                Some(offset) if offset < count => {
                    let symbol = t.symbols.get(index + offset as usize).copied();
                    match symbol {
                        Some(HUFFMAN_EOS) => return Err("EOS in Huffman string"),
                        Some(s) => out.push(s as u8),
                        None => return Err("invalid Huffman code"),
                    }
                    (code, first, index, len) = (0, 0, 0, 0);
                }
                _ => {
                    index += count as usize;
                    first = (first + count) << 1;
                    code <<= 1;
                }
            }
        }
    }
    // The unfinished code (shifted left once) is the padding.
    if len > 7 {
        return Err("Huffman padding too long");
    }
    if code >> 1 != (1u32 << len) - 1 {
        return Err("bad Huffman padding");
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    const END_STREAM: u8 = 0x1;
    const SOCKET_AUTHORITY: &str = "tmp%2Fsd%2Fapi.sock";
    const PATH_AUTHORITY: &str = "/var/run/x.sock";

    type Fields = Vec<(String, String)>;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn request(authority: &str) -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
            (
                "user-agent",
                "grpc-python/1.71.0 grpc-c/46.0.0 (linux; chttp2)",
            ),
        ])
    }

    /// `list` with every `:authority` replaced by `localhost`.
    fn fixed(list: &Fields) -> Fields {
        list.iter()
            .map(|(n, v)| {
                let v = if n == ":authority" { "localhost" } else { v };
                (n.clone(), v.to_string())
            })
            .collect()
    }

    fn frame(ty: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[ty, flags]);
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The preface and an empty SETTINGS frame, as every client starts.
    fn start() -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend(frame(SETTINGS, 0, 0, &[]));
        v
    }

    /// `block` as HEADERS (+ CONTINUATION) frames of at most `max` bytes each.
    fn headers_frames(stream_id: u32, flags: u8, block: &[u8], max: usize) -> Vec<u8> {
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(max).collect()
        };
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let eh = if last { FLAG_END_HEADERS } else { 0 };
            if i == 0 {
                out.extend(frame(TYPE_HEADERS, flags | eh, stream_id, chunk));
            } else {
                out.extend(frame(TYPE_CONTINUATION, eh, stream_id, chunk));
            }
        }
        out
    }

    fn loona_encode(enc: &mut Encoder<'_>, list: &Fields) -> Vec<u8> {
        enc.encode(list.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    // ---- An independent HPACK writer for inputs loona's encoder cannot make. ----

    fn int(out: &mut Vec<u8>, first: u8, prefix: u32, mut v: usize) {
        let max = (1 << prefix) - 1;
        if v < max {
            out.push(first | v as u8);
        } else {
            out.push(first | max as u8);
            v -= max;
            while v >= 128 {
                out.push((v % 128) as u8 | 128);
                v /= 128;
            }
            out.push(v as u8);
        }
    }

    /// RFC 7541 Appendix B code lengths; the code is canonical, so this defines it.
    const HUFFMAN_LENS: [u8; 256] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30,
        28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
        5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5,
        7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22,
        22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23,
        22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22,
        21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26,
        26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20,
        24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27,
        27, 28, 27, 27, 27, 27, 27, 26,
    ];

    fn huffman(s: &[u8]) -> Vec<u8> {
        let mut order: Vec<usize> = (0..256).collect();
        order.sort_by_key(|&c| (HUFFMAN_LENS[c], c));
        let mut codes = [0u64; 256];
        let (mut code, mut prev) = (0u64, HUFFMAN_LENS[order[0]]);
        for (i, &c) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (HUFFMAN_LENS[c] - prev);
            }
            prev = HUFFMAN_LENS[c];
            codes[c] = code;
        }
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &c in s {
            acc = (acc << HUFFMAN_LENS[c as usize]) | codes[c as usize];
            bits += u32::from(HUFFMAN_LENS[c as usize]);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    fn string(out: &mut Vec<u8>, s: &str, huff: bool) {
        if huff {
            let h = huffman(s.as_bytes());
            int(out, 0x80, 7, h.len());
            out.extend(h);
        } else {
            int(out, 0, 7, s.len());
            out.extend_from_slice(s.as_bytes());
        }
    }

    /// Literal with incremental indexing (0x40) or without (0x00) or never indexed (0x10),
    /// the name by static/dynamic index (`name_index` > 0) or literal.
    fn literal(
        out: &mut Vec<u8>,
        kind: u8,
        name_index: usize,
        name: &str,
        value: &str,
        huff: bool,
    ) {
        let prefix = if kind == 0x40 { 6 } else { 4 };
        int(out, kind, prefix, name_index);
        if name_index == 0 {
            string(out, name, huff);
        }
        string(out, value, huff);
    }

    fn indexed(out: &mut Vec<u8>, index: usize) {
        int(out, 0x80, 7, index);
    }

    #[test]
    fn test_huffman_matches_rfc7541_c4() {
        assert_eq!(
            huffman(b"www.example.com"),
            [
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
            ]
        );
        assert_eq!(huffman(b"no-cache"), [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]);
    }

    // ---- Output analysis. ----

    #[derive(Debug)]
    struct Frame {
        ty: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    /// Splits a client byte stream (after its preface) into frames.
    fn split_frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            assert!(bytes.len() >= 9, "truncated frame header");
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream_id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            frames.push(Frame {
                ty: bytes[3],
                flags: bytes[4],
                stream_id,
                payload: bytes[9..9 + len].to_vec(),
            });
            bytes = &bytes[9 + len..];
        }
        frames
    }

    #[derive(Debug, PartialEq)]
    struct Block {
        stream_id: u32,
        flags: u8,
        priority: Option<Vec<u8>>,
        fields: Fields,
    }

    /// Parses the adapter's output like h2 would, with a fresh decoder, and checks the
    /// header blocks are as the adapter promises: no padding, frames ≤ 16384 bytes,
    /// END_HEADERS on the last frame only.
    fn parse_output(out: &[u8]) -> (Vec<Block>, Vec<Frame>) {
        assert_eq!(&out[..24], PREFACE, "preface");
        let mut decoder = Decoder::new();
        let (mut blocks, mut others) = (Vec::new(), Vec::new());
        let mut frames = split_frames(&out[24..]).into_iter().peekable();
        while let Some(f) = frames.next() {
            if f.ty != TYPE_HEADERS {
                assert_ne!(f.ty, TYPE_CONTINUATION, "stray CONTINUATION");
                others.push(f);
                continue;
            }
            assert!(f.payload.len() <= MAX_OUT_FRAME, "HEADERS too large");
            assert_eq!(f.flags & FLAG_PADDED, 0, "output must not be padded");
            let (priority, mut block) = if f.flags & FLAG_PRIORITY != 0 {
                (Some(f.payload[..5].to_vec()), f.payload[5..].to_vec())
            } else {
                (None, f.payload.clone())
            };
            let mut done = f.flags & FLAG_END_HEADERS != 0;
            while !done {
                let c = frames.next().expect("CONTINUATION");
                assert_eq!(c.ty, TYPE_CONTINUATION);
                assert_eq!(c.stream_id, f.stream_id);
                assert!(c.payload.len() <= MAX_OUT_FRAME, "CONTINUATION too large");
                assert_eq!(c.flags & !FLAG_END_HEADERS, 0);
                done = c.flags & FLAG_END_HEADERS != 0;
                block.extend(c.payload);
            }
            // The adapter never indexes: the server's table must stay empty.
            assert!(
                block_is_literal_without_indexing(&block),
                "output must be literals without indexing"
            );
            let fields = decoder
                .decode(&block)
                .expect("output decodes")
                .into_iter()
                .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                .collect();
            blocks.push(Block {
                stream_id: f.stream_id,
                flags: f.flags & !FLAG_END_HEADERS,
                priority,
                fields,
            });
        }
        (blocks, others)
    }

    fn block_is_literal_without_indexing(mut b: &[u8]) -> bool {
        fn read_int(b: &mut &[u8], prefix: u32) -> usize {
            let max = (1usize << prefix) - 1;
            let mut v = (b[0] as usize) & max;
            *b = &b[1..];
            if v == max {
                let mut m = 0;
                loop {
                    let byte = b[0];
                    *b = &b[1..];
                    v += ((byte & 0x7f) as usize) << m;
                    m += 7;
                    if byte & 0x80 == 0 {
                        break;
                    }
                }
            }
            v
        }
        while !b.is_empty() {
            if b[0] != 0 {
                return false;
            }
            b = &b[1..];
            for _ in 0..2 {
                if b[0] & 0x80 != 0 {
                    return false; // Huffman
                }
                let len = read_int(&mut b, 7);
                b = &b[len..];
            }
        }
        true
    }

    // ---- Running the adapter. ----

    /// An in-memory connection that returns at most `chunk` bytes per read, and Pending
    /// (after waking) before every read when `pending` is set.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        pending: bool,
        flip: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.pending {
                self.flip = !self.flip;
                if self.flip {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let end = (self.pos + self.chunk.min(buf.remaining())).min(self.data.len());
            buf.put_slice(&self.data[self.pos..end]);
            self.pos = end;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn read_all<S: AsyncRead + AsyncWrite + Unpin>(
        mut fix: AuthorityRewriter<S>,
        outer_chunk: usize,
    ) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; outer_chunk];
        loop {
            let n = fix.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    async fn run_trickle(
        input: &[u8],
        inner_chunk: usize,
        outer_chunk: usize,
    ) -> io::Result<Vec<u8>> {
        let t = Trickle {
            data: input.to_vec(),
            pos: 0,
            chunk: inner_chunk,
            pending: true,
            flip: false,
        };
        read_all(AuthorityRewriter::new(t), outer_chunk).await
    }

    /// Through a real duplex pipe holding at most `inner_chunk` bytes.
    async fn run_duplex(
        input: &[u8],
        inner_chunk: usize,
        outer_chunk: usize,
    ) -> io::Result<Vec<u8>> {
        let (mut client, server) = duplex(inner_chunk);
        let data = input.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            client
        });
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            read_all(AuthorityRewriter::new(server), outer_chunk),
        )
        .await
        .expect("timed out");
        drop(writer);
        out
    }

    /// Runs `input` under several fragmentations; all must give the same output.
    async fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let reference = run_trickle(input, usize::MAX, 64 * 1024).await;
        for (inner, outer) in [(1, 1), (1, 4096), (7, 3), (4096, 1), (100_000, 13)] {
            let got = run_trickle(input, inner, outer).await;
            match (&reference, &got) {
                (Ok(a), Ok(b)) => assert!(a == b, "output differs at inner {inner}, outer {outer}"),
                (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
                _ => panic!("{reference:?} vs {got:?} at inner {inner}, outer {outer}"),
            }
        }
        for (inner, outer) in [(1, 8192), (64 * 1024, 1)] {
            let got = run_duplex(input, inner, outer).await;
            match (&reference, &got) {
                (Ok(a), Ok(b)) => assert!(a == b, "duplex output differs at {inner}/{outer}"),
                (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
                _ => panic!("{reference:?} vs {got:?} on duplex {inner}/{outer}"),
            }
        }
        reference
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 256) as u8).collect()
    }

    // ---- Tests. ----

    #[tokio::test]
    async fn test_rewrites_socket_path_authority_plain_and_huffman() {
        for (authority, huff) in [
            (SOCKET_AUTHORITY, false),
            (SOCKET_AUTHORITY, true),
            (PATH_AUTHORITY, false),
            (PATH_AUTHORITY, true),
        ] {
            let list = request(authority);
            let mut block = Vec::new();
            for (name, value) in &list {
                // New names, indexed so later requests could refer to them, as grpc-core does.
                literal(&mut block, 0x40, 0, name, value, huff);
            }
            let body = payload(20_000);
            let mut input = start();
            input.extend(headers_frames(1, 0, &block, 16_384));
            input.extend(frame(WINDOW_UPDATE, 0, 0, &1_000_000u32.to_be_bytes()));
            input.extend(frame(DATA, END_STREAM, 1, &body));

            let out = run(&input).await.unwrap();
            let (blocks, others) = parse_output(&out);
            assert_eq!(blocks.len(), 1);
            assert_eq!(blocks[0].fields, fixed(&list), "{authority} huffman={huff}");
            assert_eq!(blocks[0].stream_id, 1);
            assert_eq!(blocks[0].flags, 0);
            assert_eq!(others.len(), 3);
            assert_eq!((others[0].ty, others[0].payload.len()), (SETTINGS, 0));
            assert_eq!(others[1].ty, WINDOW_UPDATE);
            assert_eq!((others[2].ty, others[2].flags), (DATA, END_STREAM));
            assert!(others[2].payload == body, "DATA changed");
        }
    }

    #[tokio::test]
    async fn test_static_name_index_never_indexed_and_loona_encoder() {
        // `:authority` by static name index 1, in all three literal kinds.
        for kind in [0x00, 0x10, 0x40] {
            let mut block = Vec::new();
            indexed(&mut block, 3); // :method POST
            indexed(&mut block, 6); // :scheme http
            literal(&mut block, kind, 4, "", "/p", true); // :path
            literal(&mut block, kind, 1, "", SOCKET_AUTHORITY, true);
            let mut input = start();
            input.extend(headers_frames(3, END_STREAM, &block, 16_384));
            let (blocks, _) = parse_output(&run(&input).await.unwrap());
            assert_eq!(
                blocks[0].fields,
                fields(&[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/p"),
                    (":authority", "localhost")
                ])
            );
            assert_eq!(blocks[0].flags, END_STREAM);
        }
        // And a block from a complete, independent encoder.
        let list = request(PATH_AUTHORITY);
        let mut input = start();
        input.extend(headers_frames(
            1,
            0,
            &loona_encode(&mut Encoder::new(), &list),
            16_384,
        ));
        let (blocks, _) = parse_output(&run(&input).await.unwrap());
        assert_eq!(blocks[0].fields, fixed(&list));
    }

    #[tokio::test]
    async fn test_valid_authority_is_kept() {
        for authority in ["localhost:50051", "sigil-server", "localhost", "[::1]:8081"] {
            let list = request(authority);
            let mut input = start();
            input.extend(headers_frames(
                1,
                END_STREAM,
                &loona_encode(&mut Encoder::new(), &list),
                16_384,
            ));
            let (blocks, _) = parse_output(&run(&input).await.unwrap());
            assert_eq!(blocks[0].fields, list, "{authority}");
        }
    }

    #[tokio::test]
    async fn test_padded_priority_and_continuation() {
        let list = request(SOCKET_AUTHORITY);
        let block = loona_encode(&mut Encoder::new(), &list);
        let priority = [0x80, 0, 0, 0x11, 200]; // exclusive, depends on 17, weight 200
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(20);
        let mut headers_payload = vec![7u8]; // pad length
        headers_payload.extend_from_slice(&priority);
        headers_payload.extend_from_slice(a);
        headers_payload.extend_from_slice(&[0; 7]);
        let mut input = start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | END_STREAM,
            5,
            &headers_payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, b));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, c));
        input.extend(frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        let (blocks, others) = parse_output(&run(&input).await.unwrap());
        assert_eq!(
            blocks,
            vec![Block {
                stream_id: 5,
                flags: FLAG_PRIORITY | END_STREAM,
                priority: Some(priority.to_vec()),
                fields: fixed(&list),
            }]
        );
        assert_eq!(others[1].ty, PING);
        assert_eq!(others[1].payload, [1, 2, 3, 4, 5, 6, 7, 8]);

        // Padding alone, and padding filling the whole rest of the frame.
        let mut only_pad = vec![3u8];
        only_pad.extend_from_slice(&block);
        only_pad.extend_from_slice(&[0; 3]);
        let mut input = start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &only_pad,
        ));
        let (blocks, _) = parse_output(&run(&input).await.unwrap());
        assert_eq!(blocks[0].fields, fixed(&list));
        assert_eq!(blocks[0].flags, 0);
    }

    #[tokio::test]
    async fn test_large_block_is_split_at_16384() {
        let mut list = request(PATH_AUTHORITY);
        list.push(("x-big".into(), "b".repeat(40_000)));
        list.push(("x-after".into(), "tail".into()));
        let block = loona_encode(&mut Encoder::new(), &list);
        for priority in [false, true] {
            let mut input = start();
            if priority {
                let mut first = vec![0, 0, 0, 0, 15];
                first.extend_from_slice(&block[..1000]);
                input.extend(frame(TYPE_HEADERS, FLAG_PRIORITY, 1, &first));
                for (i, c) in block[1000..].chunks(16_384).enumerate() {
                    let last = 1000 + (i + 1) * 16_384 >= block.len();
                    let flags = if last { FLAG_END_HEADERS } else { 0 };
                    input.extend(frame(TYPE_CONTINUATION, flags, 1, c));
                }
            } else {
                input.extend(headers_frames(1, END_STREAM, &block, 16_384));
            }
            let out = run(&input).await.unwrap();
            let frames = split_frames(&out[24..]);
            let sizes: Vec<(u8, usize, u8)> = frames
                .iter()
                .map(|f| (f.ty, f.payload.len(), f.flags))
                .collect();
            let first_flags = if priority { FLAG_PRIORITY } else { END_STREAM };
            assert_eq!(sizes[1], (TYPE_HEADERS, 16_384, first_flags), "{sizes:?}");
            assert_eq!(sizes[2], (TYPE_CONTINUATION, 16_384, 0), "{sizes:?}");
            assert_eq!(sizes[3].0, TYPE_CONTINUATION, "{sizes:?}");
            assert_eq!(sizes[3].2, FLAG_END_HEADERS, "{sizes:?}");
            assert_eq!(sizes.len(), 4);
            let (blocks, _) = parse_output(&out);
            assert_eq!(blocks[0].fields, fixed(&list));
        }
    }

    #[tokio::test]
    async fn test_dynamic_table_across_requests() {
        // Requests 1 and 2 from one encoder: the second is mostly indexed references to
        // entries the first added, including the bad authority.
        let mut enc = Encoder::new();
        let first = request(SOCKET_AUTHORITY);
        let mut second = request(SOCKET_AUTHORITY);
        second[2].1 = "/SpiffeWorkloadAPI/FetchJWTSVID".into();
        let b1 = loona_encode(&mut enc, &first);
        let b2 = loona_encode(&mut enc, &second);
        assert!(
            b2.contains(&(0x80 | 62)) && b2.contains(&(0x80 | 63)),
            "second block should refer to the dynamic table: {b2:?}"
        );

        // Then Huffman literals indexed by hand, referred to by index, a table size update
        // that empties the table, and a fresh entry at index 62.
        let mut b3 = Vec::new();
        indexed(&mut b3, 3);
        literal(&mut b3, 0x40, 1, "", PATH_AUTHORITY, true); // becomes 62
        literal(&mut b3, 0x40, 0, "x-custom", "v1", true); // becomes 62, authority 63
        let mut b4 = Vec::new();
        indexed(&mut b4, 63);
        indexed(&mut b4, 62);
        let mut b5 = Vec::new();
        int(&mut b5, 0x20, 5, 0);
        int(&mut b5, 0x20, 5, 4096);
        literal(&mut b5, 0x40, 0, "x-new", "v2", false);
        indexed(&mut b5, 62);
        // Trailers with just a table size update (h2 accepts these).
        let mut b6 = Vec::new();
        int(&mut b6, 0x20, 5, 4096);

        let mut input = start();
        for (sid, b) in [(1, &b1), (3, &b2), (5, &b3), (7, &b4), (9, &b5), (9, &b6)] {
            input.extend(headers_frames(sid, END_STREAM, b, 16_384));
        }
        let (blocks, _) = parse_output(&run(&input).await.unwrap());
        let got: Vec<Fields> = blocks.into_iter().map(|b| b.fields).collect();
        assert_eq!(
            got,
            vec![
                fixed(&first),
                fixed(&second),
                fields(&[
                    (":method", "POST"),
                    (":authority", "localhost"),
                    ("x-custom", "v1")
                ]),
                fields(&[(":authority", "localhost"), ("x-custom", "v1")]),
                fields(&[("x-new", "v2"), ("x-new", "v2")]),
                vec![],
            ]
        );
    }

    #[tokio::test]
    async fn test_non_http2_passes_through_unchanged() {
        let inputs: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: /var/run/x.sock\r\n\r\n".to_vec(),
            b"PRI * HTTP/1.1\r\n".to_vec(),
            b"PRI * HT".to_vec(),
            PREFACE[..23].to_vec(),
            vec![],
            payload(20_000),
        ];
        for input in inputs {
            let out = run(&input).await.unwrap();
            assert!(out == input, "changed: {:?}", &input[..input.len().min(40)]);
        }
    }

    #[tokio::test]
    async fn test_other_frames_and_truncation_pass_through() {
        let mut input = start();
        input.extend(frame(DATA, 0, 1, &payload(20_000)));
        input.extend(frame(0xbe, 0xff, 0x8000_0003, b"unknown extension frame"));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"stray")); // h2's problem
        input.extend(frame(DATA, 0, 1, &[]));
        assert!(run(&input).await.unwrap() == input);
        // A connection closing mid-frame passes the truncated frame on.
        for cut in [input.len() - 3, 24 + 9 + 4, 24 + 9 + 9 + 500] {
            assert!(
                run(&input[..cut]).await.unwrap() == input[..cut],
                "cut {cut}"
            );
        }
    }

    /// Counts the reads on the connection.
    struct Counting {
        inner: Trickle,
        reads: usize,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn test_request_in_one_chunk_takes_one_read() {
        let list = request(SOCKET_AUTHORITY);
        let mut input = start();
        input.extend(frame(WINDOW_UPDATE, 0, 0, &1_000_000u32.to_be_bytes()));
        input.extend(headers_frames(
            1,
            0,
            &loona_encode(&mut Encoder::new(), &list),
            16_384,
        ));
        input.extend(frame(DATA, END_STREAM, 1, &payload(100)));
        let mut fix = AuthorityRewriter::new(Counting {
            inner: Trickle {
                data: input,
                pos: 0,
                chunk: usize::MAX,
                pending: false,
                flip: false,
            },
            reads: 0,
        });
        let mut buf = vec![0u8; 64 * 1024];
        let n = fix.read(&mut buf).await.unwrap();
        assert_eq!(fix.get_ref().reads, 1);
        // The whole rewritten request comes out of that one call.
        let (blocks, others) = parse_output(&buf[..n]);
        assert_eq!(blocks[0].fields, fixed(&list));
        assert_eq!(others.len(), 3);
        assert!(others[2].payload == payload(100));
        assert_eq!(fix.read(&mut buf).await.unwrap(), 0);
        assert_eq!(fix.get_ref().reads, 2);
    }

    async fn expect_invalid(input: &[u8], what: &str) {
        let err = run(input).await.expect_err(what);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
    }

    #[tokio::test]
    async fn test_malformed_input_is_invalid_data() {
        let good = loona_encode(&mut Encoder::new(), &request(SOCKET_AUTHORITY));
        let mut garbage = start();
        garbage.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ));
        expect_invalid(&garbage, "bad index").await;

        let mut bad_huffman = start();
        bad_huffman.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x00, 0x81, 0x00, 0x01, b'a'],
        ));
        expect_invalid(&bad_huffman, "bad huffman").await;

        let mut too_big_table = start();
        let mut b = Vec::new();
        int(&mut b, 0x20, 5, 8192);
        indexed(&mut b, 2);
        too_big_table.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
        expect_invalid(&too_big_table, "table size update above 4096").await;

        let mut interrupted = start();
        interrupted.extend(frame(TYPE_HEADERS, 0, 1, &good[..5]));
        interrupted.extend(frame(DATA, 0, 1, b"x"));
        expect_invalid(&interrupted, "interrupted block").await;

        let mut wrong_stream = start();
        wrong_stream.extend(frame(TYPE_HEADERS, 0, 1, &good[..5]));
        wrong_stream.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &good[5..]));
        expect_invalid(&wrong_stream, "CONTINUATION on another stream").await;

        for payload in [vec![], vec![9, 1, 2], vec![5, 0, 0, 0, 1]] {
            let mut bad_pad = start();
            let flags =
                FLAG_PADDED | FLAG_END_HEADERS | if payload.len() == 5 { FLAG_PRIORITY } else { 0 };
            bad_pad.extend(frame(TYPE_HEADERS, flags, 1, &payload));
            expect_invalid(&bad_pad, "padding longer than the frame").await;
        }
        let mut short_priority = start();
        short_priority.extend(frame(
            TYPE_HEADERS,
            FLAG_PRIORITY | FLAG_END_HEADERS,
            1,
            &[0, 0, 1],
        ));
        expect_invalid(&short_priority, "priority fields cut").await;

        let mut oversized = start();
        let chunk = vec![0u8; 16_384];
        oversized.extend(frame(TYPE_HEADERS, 0, 1, &chunk));
        for _ in 0..4 {
            oversized.extend(frame(TYPE_CONTINUATION, 0, 1, &chunk));
        }
        expect_invalid(&oversized, "block above 64 KiB").await;

        // 100 references to a 4 KB entry decode to ~400 KB: refused.
        let mut bomb = start();
        let mut b = Vec::new();
        literal(&mut b, 0x40, 0, "x", &"a".repeat(4000), false);
        for _ in 0..100 {
            indexed(&mut b, 62);
        }
        bomb.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
        expect_invalid(&bomb, "header list above the cap").await;

        // The error sticks, and a closed connection inside a block is an error too.
        let mut fix = AuthorityRewriter::new(Trickle {
            data: garbage,
            pos: 0,
            chunk: 1,
            pending: false,
            flip: false,
        });
        let mut buf = [0u8; 100];
        while fix.read(&mut buf).await.is_ok() {}
        assert_eq!(
            fix.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut cut = start();
        cut.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &good));
        cut.truncate(cut.len() - 3);
        assert_eq!(
            run(&cut).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// A tiny deterministic PRNG (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[tokio::test]
    async fn test_fuzz_never_panics() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut seed_block = Vec::new();
        for (n, v) in request(PATH_AUTHORITY) {
            literal(&mut seed_block, 0x40, 0, &n, &v, true);
        }
        for i in 0..1000 {
            let mut input = start();
            match i % 3 {
                // Random bytes after the preface.
                0 => input.extend((0..rng.below(300)).map(|_| rng.next() as u8)),
                // A HEADERS frame with a random block.
                1 => {
                    let b: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
                }
                // A valid Huffman block with a few bytes changed, sent twice.
                _ => {
                    let mut b = seed_block.clone();
                    for _ in 0..1 + rng.below(3) {
                        let at = rng.below(b.len());
                        b[at] = rng.next() as u8;
                    }
                    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
                    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &b));
                }
            }
            let t = Trickle {
                data: input,
                pos: 0,
                chunk: 1 + rng.below(20),
                pending: false,
                flip: false,
            };
            let _ = read_all(AuthorityRewriter::new(t), 1 + rng.below(50)).await;
        }
    }

    #[test]
    fn test_unhuffman_decodes_as_loona_does() {
        use loona_hpack::huffman::HuffmanDecoder;
        let mut rng = Rng(0x5eed_4321_0000_0002);
        // Huffman strings: valid ones (all symbols, all lengths), then damaged ones.
        let all: Vec<u8> = (0..=255).collect();
        let mut strings: Vec<Vec<u8>> = vec![vec![], huffman(&all), huffman(b"www.example.com")];
        for _ in 0..3000 {
            let text: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            let mut h = huffman(&text);
            match rng.below(3) {
                0 => {}
                1 if !h.is_empty() => {
                    let at = rng.below(h.len());
                    h[at] ^= 1 << rng.below(8);
                }
                _ => h.push(rng.next() as u8),
            }
            strings.push(h);
        }
        for _ in 0..1000 {
            strings.push((0..rng.below(12)).map(|_| rng.next() as u8).collect());
        }
        for _ in 0..100 {
            strings.push(vec![0xff; rng.below(6)]);
        }
        let (mut ok, mut bad) = (0, 0);
        for h in &strings {
            let mut mine = Vec::new();
            let got = huffman_decode(h, &mut mine);
            match HuffmanDecoder::new().decode(h) {
                Ok(want) => {
                    assert!(got.is_ok(), "{h:?}: {got:?}");
                    assert_eq!(mine, want, "{h:?}");
                    ok += 1;
                }
                Err(_) => {
                    assert!(got.is_err(), "{h:?}");
                    bad += 1;
                }
            }
        }
        assert!(ok > 1000 && bad > 1000, "{ok} {bad}");

        // Whole blocks: decoding the unhuffmanned block gives what decoding the block gives.
        let mut seed = Vec::new();
        for (n, v) in request(PATH_AUTHORITY) {
            literal(&mut seed, 0x40, 0, &n, &v, true);
        }
        literal(&mut seed, 0x10, 4, "", "/p", true);
        literal(&mut seed, 0x00, 0, "x", &"é".repeat(200), true);
        indexed(&mut seed, 62);
        for i in 0..3000 {
            let mut b = seed.clone();
            if i > 0 {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
                b.truncate(b.len() - rng.below(4));
            }
            let mut plain = Vec::new();
            let pre = unhuffman(&b, &mut plain);
            let mut d = Decoder::new();
            d.set_max_allowed_table_size(4096);
            let want = d.decode(&b);
            if pre.is_err() {
                assert!(want.is_err(), "{b:?}");
                continue;
            }
            assert!(block_has_no_huffman(&plain) || want.is_err(), "{b:?}");
            let mut d = Decoder::new();
            d.set_max_allowed_table_size(4096);
            match (want, d.decode(&plain)) {
                (Ok(x), Ok(y)) => assert_eq!(x, y),
                (Err(_), Err(_)) => {}
                (x, y) => panic!("{x:?} vs {y:?} for {b:?}"),
            }
        }
    }

    /// Whether a well-formed block has no Huffman-coded string.
    fn block_has_no_huffman(mut b: &[u8]) -> bool {
        while let Some(&first) = b.first() {
            let (prefix, literal) = match first {
                f if f & 0x80 != 0 => (7, false),
                f if f & 0x40 != 0 => (6, true),
                f if f & 0x20 != 0 => (5, false),
                _ => (4, true),
            };
            let Some((index, n)) = decode_int(b, prefix) else {
                return true;
            };
            b = &b[n..];
            let strings = if !literal {
                0
            } else if index == 0 {
                2
            } else {
                1
            };
            for _ in 0..strings {
                let Some(&f) = b.first() else { return true };
                if f & 0x80 != 0 {
                    return false;
                }
                let Some((len, n)) = decode_int(b, 7) else {
                    return true;
                };
                let Some(rest) = b.get(n + len..) else {
                    return true;
                };
                b = rest;
            }
        }
        true
    }

    #[test]
    fn test_authority_check_and_integer_encoding() {
        for ok in [
            "localhost",
            "localhost:50051",
            "sigil-server",
            "10.0.0.1:1",
            "[::1]:80",
        ] {
            assert!(is_acceptable_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            SOCKET_AUTHORITY,
            PATH_AUTHORITY,
            "",
            "a b",
            "x/y",
            "%2F",
            "unix:/tmp/s",
        ] {
            assert!(!is_acceptable_authority(bad.as_bytes()), "{bad}");
        }
        // RFC 7541 C.1.
        let mut out = Vec::new();
        encode_int(&mut out, 0, 5, 10);
        encode_int(&mut out, 0, 5, 1337);
        encode_int(&mut out, 0, 8, 42);
        assert_eq!(out, [10, 31, 154, 10, 42]);
    }

    #[tokio::test]
    async fn test_is_send_sync_unpin_and_exposes_the_connection() {
        fn check<T: Send + Sync + Unpin + 'static>() {}
        check::<AuthorityRewriter<tokio::net::UnixStream>>();
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let fix = AuthorityRewriter::new(a);
        assert!(fix.get_ref().peer_cred().is_ok());
        assert!(format!("{fix:?}").starts_with("AuthorityRewriter"));
    }

    // ---- End to end with the real h2 server. ----

    /// Writes `client_bytes`, drives an h2 server on the other end (through the adapter
    /// when `fix`), and returns what h2's `accept` yielded plus the server's frames on
    /// stream 1 (RST_STREAM, HEADERS) or GOAWAY.
    async fn h2_serve_raw(client_bytes: Vec<u8>, fix: bool) -> (Vec<String>, Vec<Frame>) {
        let (mut client, server) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            if fix {
                h2_accept_all(AuthorityRewriter::new(server)).await
            } else {
                h2_accept_all(server).await
            }
        });
        client.write_all(&client_bytes).await.unwrap();
        // Read the server's frames until it answers stream 1 one way or the other.
        let mut got = Vec::new();
        let mut answer = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "server closed");
                got.extend_from_slice(&buf[..n]);
                let mut complete = 0;
                let mut rest = &got[..];
                while rest.len() >= 9 {
                    let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                    if rest.len() < 9 + len {
                        break;
                    }
                    complete += 9 + len;
                    rest = &rest[9 + len..];
                }
                let frames = split_frames(&got[..complete]);
                if frames.iter().any(|f| {
                    (f.stream_id == 1 && matches!(f.ty, RST_STREAM | TYPE_HEADERS))
                        || f.ty == GOAWAY
                }) {
                    answer = frames
                        .into_iter()
                        .filter(|f| f.stream_id == 1 || f.ty == GOAWAY)
                        .collect();
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("no answer from h2");
        drop(client);
        let accepted = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server did not finish")
            .unwrap();
        (accepted, answer)
    }

    /// Accepts requests until the connection ends; answers each with 200 and returns
    /// "authority method path content-type te" per request, or "error: ..." per failure.
    async fn h2_accept_all<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Vec<String> {
        let mut seen = Vec::new();
        let mut conn = match h2::server::handshake(io).await {
            Ok(c) => c,
            Err(e) => return vec![format!("error: {e}")],
        };
        while let Some(r) = conn.accept().await {
            match r {
                Ok((req, mut respond)) => {
                    let h = req.headers();
                    seen.push(format!(
                        "{} {} {} {} {}",
                        req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
                        req.method(),
                        req.uri().path(),
                        h["content-type"].to_str().unwrap(),
                        h["te"].to_str().unwrap(),
                    ));
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    respond.send_response(resp, true).unwrap();
                }
                Err(e) => seen.push(format!("error: {e}")),
            }
        }
        seen
    }

    fn grpc_client_bytes(authority: &str, huff: bool) -> Vec<u8> {
        let list = fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        let mut block = Vec::new();
        for (n, v) in &list {
            literal(&mut block, 0x40, 0, n, v, huff);
        }
        let mut bytes = start();
        bytes.extend(headers_frames(1, END_STREAM, &block, 16_384));
        bytes
    }

    #[tokio::test]
    async fn test_h2_server_accepts_socket_authority_only_with_the_fix() {
        for authority in [SOCKET_AUTHORITY, PATH_AUTHORITY] {
            for huff in [false, true] {
                let bytes = grpc_client_bytes(authority, huff);

                let (accepted, answer) = h2_serve_raw(bytes.clone(), true).await;
                assert_eq!(
                    accepted,
                    ["localhost POST /SpiffeWorkloadAPI/FetchX509SVID application/grpc trailers"],
                    "{authority}"
                );
                assert_eq!(answer[0].ty, TYPE_HEADERS, "response, not {answer:?}");

                // The same bytes without the adapter: h2 refuses the request.
                let (accepted, answer) = h2_serve_raw(bytes, false).await;
                assert!(accepted.is_empty(), "{accepted:?}");
                assert_eq!(answer[0].ty, RST_STREAM, "{answer:?}");
                assert_eq!(answer[0].payload, 1u32.to_be_bytes(), "PROTOCOL_ERROR");
            }
        }
    }

    #[tokio::test]
    async fn test_h2_client_to_h2_server_through_the_fix() {
        // Real h2 on both ends (Huffman, indexing, flow control, SETTINGS/PING/WINDOW_UPDATE):
        // the adapter must not disturb a valid conversation.
        let (client_io, server_io): (DuplexStream, DuplexStream) = duplex(8192);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(AuthorityRewriter::new(server_io))
                .await
                .unwrap();
            let mut seen = Vec::new();
            while let Some(r) = conn.accept().await {
                let (req, mut respond) = r.unwrap();
                seen.push(req.uri().to_string());
                // Echo the body; the connection is driven by accept() meanwhile.
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut received = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        body.flow_control().release_capacity(chunk.len()).unwrap();
                        received.extend_from_slice(&chunk);
                    }
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(received.into(), true).unwrap();
                });
            }
            seen
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        let driver = tokio::spawn(conn);
        for i in 0..4usize {
            let req = http::Request::builder()
                .method("POST")
                .uri(format!(
                    "http://sigil-server:8081/SpiffeWorkloadAPI/Call{}",
                    i % 2
                ))
                .header("content-type", "application/grpc")
                .header("x-request", i.to_string())
                .body(())
                .unwrap();
            client = client.ready().await.unwrap();
            let (resp, mut send) = client.send_request(req, false).unwrap();
            let body = payload(50_000 + i);
            send.reserve_capacity(body.len());
            send.send_data(body.clone().into(), true).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut echoed = Vec::new();
            let mut rbody = resp.into_body();
            while let Some(chunk) = rbody.data().await {
                let chunk = chunk.unwrap();
                rbody.flow_control().release_capacity(chunk.len()).unwrap();
                echoed.extend_from_slice(&chunk);
            }
            assert!(echoed == body, "body {i} changed");
        }
        drop(client);
        let _ = driver.await;
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            (0..4)
                .map(|i| format!("http://sigil-server:8081/SpiffeWorkloadAPI/Call{}", i % 2))
                .collect::<Vec<_>>()
        );
    }
}
