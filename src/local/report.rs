//! How the walk-through prints: numbered steps, indented details, one ✔ or ✘ outcome
//! line per step. Plain text, flushed line by line so a pipe sees progress.

use std::io::Write;

/// Mark of a passed step.
pub const PASS: &str = "✔";
/// Mark of a failed step.
pub const FAIL: &str = "✘";

pub struct Report {
    out: Box<dyn Write + Send>,
    total: usize,
}

impl Report {
    /// A report on stdout for a walk-through of `total` steps.
    pub fn stdout(total: usize) -> Self {
        Self::new(Box::new(std::io::stdout()), total)
    }

    pub fn new(out: Box<dyn Write + Send>, total: usize) -> Self {
        Self { out, total }
    }

    fn line(&mut self, text: &str) {
        // A closed pipe must not abort the demo halfway (cleanup still has to run).
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    pub fn title(&mut self, text: &str) {
        self.line(text);
    }

    /// The header of step `n`: `[n/total] title`.
    pub fn step(&mut self, n: usize, title: &str) {
        self.line("");
        let total = self.total;
        self.line(&format!("[{n}/{total}] {title}"));
    }

    /// A detail line (or several) under the current step.
    pub fn detail(&mut self, text: &str) {
        for l in text.lines() {
            self.line(&format!("      {l}"));
        }
    }

    /// A warning under the current step.
    pub fn warn(&mut self, text: &str) {
        self.line(&format!("    ! {text}"));
    }

    pub fn pass(&mut self, n: usize, summary: &str) {
        self.line(&format!("    {PASS} step {n}: {summary}"));
    }

    pub fn fail(&mut self, n: usize, message: &str) {
        let mut lines = message.lines();
        let first = lines.next().unwrap_or_default();
        self.line(&format!("    {FAIL} step {n}: {first}"));
        for l in lines {
            self.line(&format!("      {l}"));
        }
    }

    pub fn blank(&mut self) {
        self.line("");
    }
}
