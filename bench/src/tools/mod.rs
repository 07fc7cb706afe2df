//! The external traffic tools the harness drives: how to call each one and how to read what
//! it prints. Parsers are pure functions over the tool's stdout, tested against outputs
//! recorded from the real tools (`bench/tests/fixtures/`).

pub mod iperf3;
pub mod qperf;
pub mod sockperf;

/// A tool's output that does not say what the parser needs; names the tool, what was missing
/// or wrong, and the start of the output so the cause is visible without the raw file.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {tool} output: {problem}; output starts {excerpt:?}")]
pub struct ParseError {
    pub tool: &'static str,
    pub problem: String,
    pub excerpt: String,
}

impl ParseError {
    pub(crate) fn new(tool: &'static str, problem: impl Into<String>, output: &str) -> Self {
        Self {
            tool,
            problem: problem.into(),
            excerpt: output.chars().take(300).collect(),
        }
    }
}

/// Parses a decimal number the way the tools print it: qperf groups thousands with commas
/// ("1,024"), sockperf pads with spaces.
pub(crate) fn number(text: &str) -> Option<f64> {
    let cleaned: String = text.trim().chars().filter(|&c| c != ',').collect();
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Removes ANSI colour sequences (`ESC [ ... m`), which sockperf puts around some lines.
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip "[", the parameters, and the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_with_grouping_and_padding() {
        assert_eq!(number(" 1,024 "), Some(1024.0));
        assert_eq!(number("3.52"), Some(3.52));
        assert_eq!(number("1,234,567.5"), Some(1_234_567.5));
        assert_eq!(number("abc"), None);
        assert_eq!(number("inf"), None);
    }

    #[test]
    fn ansi_colours_are_removed() {
        assert_eq!(
            strip_ansi("sockperf: \u{1b}[2;35m====> avg-rtt=6.6\u{1b}[0m done"),
            "sockperf: ====> avg-rtt=6.6 done"
        );
    }
}
