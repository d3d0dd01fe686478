//! Token counting with OpenAI's `o200k_base` encoding (tiktoken-rs), used where the
//! upstream reports no usage: to size a hold from the request and to estimate the
//! output of a response cut short.

use std::sync::LazyLock;

use tiktoken_rs::CoreBPE;

/// The encoding's tables are built once, on first use (tens of milliseconds); `None`
/// only if the embedded vocabulary failed to load, in which case one token per byte is
/// counted, which never undercounts since every token covers at least one byte.
static O200K: LazyLock<Option<CoreBPE>> = LazyLock::new(|| tiktoken_rs::o200k_base().ok());

/// Tokens in `text` under `o200k_base` (special-token text is counted as ordinary text).
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match O200K.as_ref() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => text.len() as u64,
    }
}

/// Text waiting to be tokenized, counted in batches so that a long stream neither keeps
/// its whole output nor pays the tokenizer's fixed cost on every small delta.
#[derive(Debug, Default)]
pub(crate) struct TextCounter {
    pending: String,
    counted: u64,
}

impl TextCounter {
    /// Above this many bytes of pending text a batch is tokenized.
    const BATCH: usize = 4 * 1024;

    pub(crate) fn push(&mut self, text: &str) {
        self.pending.push_str(text);
        if self.pending.len() >= Self::BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.counted = self.counted.saturating_add(count_tokens(&self.pending));
        self.pending.clear();
        // A single huge delta must not pin its buffer for the rest of the stream.
        if self.pending.capacity() > 4 * Self::BATCH {
            self.pending.shrink_to(Self::BATCH);
        }
    }

    /// Everything pushed so far, counted.
    pub(crate) fn total(&mut self) -> u64 {
        self.flush();
        self.counted
    }
}
