//! SPEC section 3, the text processor (BLIP/LAVIS `BlipCaptionProcessor.pre_caption`).

/// Captions keep at most this many words (LAVIS's default `max_words`).
pub const MAX_WORDS: usize = 50;

/// The characters the processor turns into spaces.
const PUNCTUATION: &[char] = &['.', '!', '"', '(', ')', '*', '#', ':', ';', '~'];

/// Python's `str.isspace`, what `\s` matches in a `re` pattern: Rust's whitespace plus the
/// ASCII separators U+001C–U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Lowercases; each of `. ! " ( ) * # : ; ~` becomes a space; each run of two or more
/// whitespace characters becomes one space (a single tab or newline stays, as in Python);
/// trailing newlines and then surrounding spaces are stripped; words past [`MAX_WORDS`]
/// (split on single spaces) are dropped.
pub fn process_caption(caption: &str) -> String {
    let lowered: Vec<char> = caption
        .to_lowercase()
        .chars()
        .map(|c| if PUNCTUATION.contains(&c) { ' ' } else { c })
        .collect();
    let mut collapsed = String::with_capacity(lowered.len());
    let mut i = 0;
    while i < lowered.len() {
        let run = lowered[i..]
            .iter()
            .take_while(|&&c| is_python_space(c))
            .count();
        if run >= 2 {
            collapsed.push(' ');
            i += run;
        } else {
            collapsed.push(lowered[i]);
            i += 1;
        }
    }
    let stripped = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = stripped.split(' ').collect();
    if words.len() > MAX_WORDS {
        words[..MAX_WORDS].join(" ")
    } else {
        stripped.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_python_whitespace_rules() {
        // A single tab survives (only runs of two or more collapse); a run mixing kinds
        // collapses to one space; trailing newlines go before surrounding spaces.
        assert_eq!(process_caption("a\tb"), "a\tb");
        assert_eq!(process_caption("a \t\n b"), "a b");
        assert_eq!(process_caption(" x\n"), "x");
        assert_eq!(process_caption("x\u{1f}\u{1f}y"), "x y");
        assert_eq!(process_caption("Ünïcode ΣΑΣ"), "ünïcode σας");
        assert_eq!(process_caption("...!!!"), "");
    }

    #[test]
    fn keeps_fifty_words() {
        let long: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
        let out = process_caption(&long.join(" "));
        assert_eq!(out.split(' ').count(), MAX_WORDS);
        assert!(out.starts_with("w0 w1 ") && out.ends_with(" w49"));
    }
}
