//! Metering a streamed response frame by frame: a small Server-Sent Events parser
//! (WHATWG HTML §9.2, "Server-sent events": lines end in CRLF, LF or CR; `data:` lines
//! accumulate; a blank line dispatches the event; lines starting with `:` are comments)
//! that reads the upstream's usage and counts the output text, and that can remove the
//! usage-only chunk of an OpenAI Chat stream the client did not ask for.
//!
//! Memory per stream is bounded: the current partial line and event (each capped at
//! [`MAX_EVENT`]; a bigger event is passed through unparsed) and at most a few KiB of
//! output text waiting to be tokenized.

use bytes::Bytes;
use serde::Deserialize;

use super::tokens::TextCounter;
use super::wire::{AnthropicUsage, ChatUsage, ResponsesUsage, Text};
use super::{Meter, Usage};

/// The largest event (or line) parsed or held back; usage events are a few hundred
/// bytes, and a `response.completed` event repeats the whole output, so 1 MiB leaves
/// room for long answers while bounding what one stream can make tollgate keep.
pub const MAX_EVENT: usize = 1 << 20;

/// Buffers grown past this by one large event are shrunk back once it is done.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Of an event too big to parse, this many last bytes are kept: a Responses
/// `response.completed` event ends with the response's `usage`, so the usage of an
/// answer too long to parse whole can still be read.
const TAIL: usize = 4 * 1024;

/// Reads one upstream SSE body as it passes through. See the module docs.
#[derive(Debug)]
pub struct StreamMeter {
    meter: Meter,
    /// Remove the usage-only chunk (openai-chat, the client did not ask for usage).
    strip: bool,
    /// The current line's bytes seen in earlier frames.
    line: Vec<u8>,
    /// The current line outgrew [`MAX_EVENT`]: `line` keeps only its last bytes.
    line_oversize: bool,
    /// That oversize line is a `data` line.
    line_is_data: bool,
    /// `data` of the current event, lines joined by `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The current event outgrew [`MAX_EVENT`]: it is not parsed, only its last
    /// [`TAIL`] bytes of data are kept, in `data`.
    event_oversize: bool,
    /// The last frame ended in a CR that ended a line: a LF starting the next frame
    /// belongs to that line ending.
    skip_lf: bool,
    /// When that CR ended an event: whether the event was removed (so is its LF).
    lf_owner: Option<bool>,
    /// Stripping: the bytes of the current, incomplete event, not yet sent.
    held: Vec<u8>,
    /// Stripping: the current event outgrew [`MAX_EVENT`] and is sent as it comes.
    passthrough: bool,
    text: TextCounter,
    /// openai-chat and openai-responses: the last complete usage reported.
    reported: Option<Usage>,
    /// anthropic-messages: the running usage, complete once a `message_delta` carried
    /// `output_tokens`.
    anthropic: AnthropicUsage,
    anthropic_complete: bool,
}

impl StreamMeter {
    /// `strip_usage_chunk` only has an effect on `openai-chat` streams.
    pub fn new(meter: Meter, strip_usage_chunk: bool) -> StreamMeter {
        StreamMeter {
            meter,
            strip: strip_usage_chunk && meter == Meter::OpenAiChat,
            line: Vec::new(),
            line_oversize: false,
            line_is_data: false,
            data: Vec::new(),
            has_data: false,
            event_oversize: false,
            skip_lf: false,
            lf_owner: None,
            held: Vec::new(),
            passthrough: false,
            text: TextCounter::default(),
            reported: None,
            anthropic: AnthropicUsage::default(),
            anthropic_complete: false,
        }
    }

    /// One frame of the upstream's body; returns the bytes to send to the client: the
    /// very same `Bytes` unless stripping, and then every complete event but the
    /// usage-only one (the current incomplete event is held back until it completes).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if chunk.is_empty() {
            return chunk;
        }
        if !self.strip {
            self.scan(&chunk, None);
            return chunk;
        }
        let mut out = Out { chunk: &chunk, vec: None, end: 0 };
        self.scan(&chunk, Some(&mut out));
        out.finish()
    }

    /// End of the upstream body: the bytes still held back (an event the upstream never
    /// ended). Its data is read for usage too, since an upstream that closes right after
    /// its last event has still reported it.
    pub fn finish(&mut self) -> Bytes {
        let line = std::mem::take(&mut self.line);
        let mut drop = false;
        if !line.is_empty() || self.line_oversize {
            self.end_line(&line);
        }
        if self.has_data {
            drop = self.dispatch() && !self.passthrough;
        }
        self.reset_event();
        self.skip_lf = false;
        self.lf_owner = None;
        self.passthrough = false;
        let held = std::mem::take(&mut self.held);
        if drop {
            Bytes::new()
        } else {
            Bytes::from(held)
        }
    }

    /// The complete usage the upstream reported so far.
    pub fn usage(&self) -> Option<Usage> {
        match self.meter {
            Meter::AnthropicMessages if self.anthropic_complete => self.anthropic.to_usage(),
            Meter::AnthropicMessages => None,
            _ => self.reported,
        }
    }

    /// Tokens of the output text delivered so far, counted with the tokenizer.
    pub fn output_tokens(&mut self) -> u64 {
        self.text.total()
    }

    /// Bytes held back right now (tests check the bound).
    #[cfg(test)]
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Runs the parser over `chunk`; when stripping, decides which of its bytes go out.
    fn scan(&mut self, chunk: &[u8], mut out: Option<&mut Out<'_>>) {
        let len = chunk.len();
        let mut i = 0;
        // Start of this frame's bytes neither sent nor held yet.
        let mut seg = 0;
        if std::mem::take(&mut self.skip_lf) {
            let owner = self.lf_owner.take();
            if chunk.first() == Some(&b'\n') {
                i = 1;
                if let Some(dropped) = owner {
                    seg = 1;
                    if let (false, Some(o)) = (dropped, out.as_deref_mut()) {
                        o.emit(0, 1);
                    }
                }
            }
        }
        while i < len {
            let Some(k) = chunk[i..].iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push_line(&chunk[i..]);
                break;
            };
            let term = i + k;
            let mut next = term + 1;
            if chunk[term] == b'\r' {
                if next == len {
                    self.skip_lf = true;
                } else if chunk[next] == b'\n' {
                    next += 1;
                }
            }
            let ended = if self.line.is_empty() {
                self.end_line(&chunk[i..term])
            } else {
                self.push_line(&chunk[i..term]);
                let line = std::mem::take(&mut self.line);
                let ended = self.end_line(&line);
                self.line = line;
                self.line.clear();
                shrink(&mut self.line);
                ended
            };
            if let (Some(drop), Some(o)) = (ended, out.as_deref_mut()) {
                let drop = drop && !self.passthrough;
                if drop {
                    self.held.clear();
                } else {
                    o.emit_held(&mut self.held);
                    o.emit(seg, next);
                }
                self.passthrough = false;
                shrink(&mut self.held);
                seg = next;
                if self.skip_lf {
                    self.lf_owner = Some(drop);
                }
            }
            i = next;
        }
        if let Some(o) = out {
            let rest = &chunk[seg..];
            if self.passthrough || self.held.len() + rest.len() > MAX_EVENT {
                o.emit_held(&mut self.held);
                o.emit(seg, len);
                self.passthrough = true;
            } else {
                self.held.extend_from_slice(rest);
            }
        }
    }

    fn push_line(&mut self, piece: &[u8]) {
        if !self.line_oversize && self.line.len() + piece.len() > MAX_EVENT {
            self.line_is_data = self.line.iter().chain(piece).take(4).eq(b"data");
            self.line_oversize = true;
        }
        if self.line_oversize {
            self.line.extend_from_slice(&piece[piece.len().saturating_sub(TAIL)..]);
            keep_tail(&mut self.line);
        } else {
            self.line.extend_from_slice(piece);
        }
    }

    /// One complete line; `Some(remove)` when it was the blank line ending an event.
    fn end_line(&mut self, line: &[u8]) -> Option<bool> {
        if std::mem::take(&mut self.line_oversize) {
            if std::mem::take(&mut self.line_is_data) {
                self.oversize_data(line);
            }
            return None;
        }
        if line.is_empty() {
            let drop = self.dispatch();
            self.reset_event();
            return Some(drop);
        }
        // Only `data` matters here: `event:` repeats the JSON's `type`, and `id:`,
        // `retry:` and comments (`:`) carry nothing metered.
        if let Some(rest) = line.strip_prefix(b"data") {
            let value = match rest {
                [] => Some(rest),
                [b':', b' ', v @ ..] | [b':', v @ ..] => Some(v),
                _ => None,
            };
            if let Some(v) = value {
                self.push_data(v);
            }
        }
        None
    }

    fn push_data(&mut self, v: &[u8]) {
        if self.event_oversize || self.data.len() + v.len() + 1 > MAX_EVENT {
            self.oversize_data(v);
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(v);
        self.has_data = true;
    }

    /// Data of an event too big to parse: only its tail is kept.
    fn oversize_data(&mut self, v: &[u8]) {
        self.event_oversize = true;
        self.has_data = true;
        self.data.push(b'\n');
        self.data.extend_from_slice(&v[v.len().saturating_sub(TAIL)..]);
        keep_tail(&mut self.data);
    }

    fn reset_event(&mut self) {
        self.data.clear();
        shrink(&mut self.data);
        self.has_data = false;
        self.event_oversize = false;
    }

    /// Reads the event just ended; `true` when it is the usage-only chunk to remove.
    fn dispatch(&mut self) -> bool {
        if !self.has_data {
            return false;
        }
        if self.event_oversize {
            if self.meter == Meter::OpenAiResponses {
                self.read_usage_tail();
            }
            return false;
        }
        let data = std::mem::take(&mut self.data);
        let drop = self.read_event(&data);
        self.data = data;
        drop
    }

    fn read_event(&mut self, data: &[u8]) -> bool {
        if data == b"[DONE]" {
            return false;
        }
        match self.meter {
            Meter::OpenAiChat => self.read_chat(data),
            Meter::OpenAiResponses => {
                self.read_responses(data);
                false
            }
            Meter::AnthropicMessages => {
                self.read_anthropic(data);
                false
            }
            Meter::OpenAiEmbeddings => false,
        }
    }

    fn read_chat(&mut self, data: &[u8]) -> bool {
        let Ok(chunk) = serde_json::from_slice::<ChatChunk<'_>>(data) else {
            return false;
        };
        for choice in chunk.choices.iter().flatten() {
            let Some(delta) = &choice.delta else { continue };
            for text in [&delta.content, &delta.reasoning_content, &delta.reasoning, &delta.refusal] {
                self.text.push(text.as_str());
            }
            for call in delta.tool_calls.iter().flatten() {
                if let Some(f) = &call.function {
                    self.text.push(f.name.as_str());
                    self.text.push(f.arguments.as_str());
                }
            }
        }
        let Some(usage) = chunk.usage else { return false };
        if let Some(usage) = usage.to_usage(true) {
            self.reported = Some(usage);
        }
        self.strip && chunk.choices.is_none_or(|c| c.is_empty())
    }

    fn read_responses(&mut self, data: &[u8]) {
        let Ok(event) = serde_json::from_slice::<ResponsesEvent<'_>>(data) else {
            return;
        };
        match event.kind.as_str() {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta"
            | "response.reasoning_text.delta"
            | "response.reasoning_summary_text.delta" => self.text.push(event.delta.as_str()),
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(usage) = event.response.and_then(|r| r.usage).and_then(|u| u.to_usage()) {
                    self.reported = Some(usage);
                }
            }
            _ => {}
        }
    }

    /// The last complete `"usage": {…}` object in the kept tail of an oversize event.
    /// Inside JSON strings quotes are escaped, so the pattern only matches a key.
    fn read_usage_tail(&mut self) {
        const KEY: &[u8] = b"\"usage\":";
        let Some(at) = self.data.windows(KEY.len()).rposition(|w| w == KEY) else { return };
        let rest = &self.data[at + KEY.len()..];
        if let Some(Ok(usage)) = serde_json::Deserializer::from_slice(rest).into_iter::<ResponsesUsage>().next() {
            if let Some(usage) = usage.to_usage() {
                self.reported = Some(usage);
            }
        }
    }

    fn read_anthropic(&mut self, data: &[u8]) {
        let Ok(event) = serde_json::from_slice::<AnthropicEvent<'_>>(data) else {
            return;
        };
        match event.kind.as_str() {
            "content_block_delta" => {
                if let Some(d) = &event.delta {
                    for text in [&d.text, &d.partial_json, &d.thinking] {
                        self.text.push(text.as_str());
                    }
                }
            }
            "message_start" => {
                if let Some(usage) = event.message.and_then(|m| m.usage) {
                    self.anthropic.merge(&usage);
                }
            }
            "message_delta" => {
                if let Some(usage) = event.usage {
                    self.anthropic.merge(&usage);
                    self.anthropic_complete |= usage.output_tokens.is_some();
                }
            }
            _ => {}
        }
    }
}

/// Drops all but the last [`TAIL`] bytes, in amortized constant time per byte.
fn keep_tail(buf: &mut Vec<u8>) {
    if buf.len() > 2 * TAIL {
        buf.drain(..buf.len() - TAIL);
    }
}

fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        buf.shrink_to(KEEP_CAPACITY);
    }
}

/// The bytes of one frame going out: a zero-copy slice of the frame while they are
/// its contiguous prefix, copied once something is removed or held bytes come first.
struct Out<'c> {
    chunk: &'c Bytes,
    vec: Option<Vec<u8>>,
    end: usize,
}

impl Out<'_> {
    fn emit(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        match &mut self.vec {
            None if from == self.end => self.end = to,
            None => {
                let mut v = Vec::with_capacity(self.chunk.len());
                v.extend_from_slice(&self.chunk[..self.end]);
                v.extend_from_slice(&self.chunk[from..to]);
                self.vec = Some(v);
            }
            Some(v) => v.extend_from_slice(&self.chunk[from..to]),
        }
    }

    fn emit_held(&mut self, held: &mut Vec<u8>) {
        if held.is_empty() {
            return;
        }
        let (chunk, end) = (self.chunk, self.end);
        let v = self.vec.get_or_insert_with(|| {
            let mut v = Vec::with_capacity(held.len() + chunk.len());
            v.extend_from_slice(&chunk[..end]);
            v
        });
        v.extend_from_slice(held);
        held.clear();
    }

    fn finish(self) -> Bytes {
        match self.vec {
            Some(v) => Bytes::from(v),
            None if self.end == self.chunk.len() => self.chunk.clone(),
            None => self.chunk.slice(..self.end),
        }
    }
}

// === wire shapes of the streamed events ===

#[derive(Deserialize)]
struct ChatChunk<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<ChatDelta<'a>>,
}

#[derive(Deserialize)]
struct ChatDelta<'a> {
    #[serde(borrow, default)]
    content: Text<'a>,
    #[serde(borrow, default)]
    reasoning_content: Text<'a>,
    #[serde(borrow, default)]
    reasoning: Text<'a>,
    #[serde(borrow, default)]
    refusal: Text<'a>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Text<'a>,
    #[serde(borrow, default)]
    arguments: Text<'a>,
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Text<'a>,
    #[serde(borrow, default)]
    delta: Text<'a>,
    #[serde(default)]
    response: Option<ResponseObject>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    usage: Option<ResponsesUsage>,
}

#[derive(Deserialize)]
struct AnthropicEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Text<'a>,
    #[serde(borrow, default)]
    delta: Option<AnthropicDelta<'a>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default)]
    message: Option<AnthropicMessage>,
}

#[derive(Deserialize)]
struct AnthropicDelta<'a> {
    #[serde(borrow, default)]
    text: Text<'a>,
    #[serde(borrow, default)]
    partial_json: Text<'a>,
    #[serde(borrow, default)]
    thinking: Text<'a>,
}

#[derive(Deserialize)]
struct AnthropicMessage {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}
