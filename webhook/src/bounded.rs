//! Cutting text that echoes a caller's input to a bounded length, so a hostile value
//! cannot make an answer, a log line or a status message as large as the request.

/// At most `max` bytes of `text`, cut on a character boundary, with what was cut said.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

/// Longest value of the caller's echoed in an error (a field's content).
pub const ECHO_MAX: usize = 128;
/// Longest message or warning in an AdmissionReview answer.
pub const MESSAGE_MAX: usize = 4096;
/// Most warnings in one answer.
pub const WARNINGS_MAX: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded(&"é".repeat(100), 11);
        assert!(cut.starts_with("ééééé…"), "{cut}");
        assert!(cut.ends_with("(190 bytes cut)"), "{cut}");
    }
}
