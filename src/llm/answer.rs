//! Validation of a model's answer: exactly `n` usable paraphrases, or the reason it is not
//! usable (sent back to the model in the re-ask).

/// Longest accepted paraphrase, in words: the caption processor keeps 50 (SPEC section 3).
const MAX_WORDS: usize = 50;

/// Openings of chat filler rather than of a paraphrase (compared lowercase, on a word boundary).
const PREAMBLES: &[&str] = &[
    "here is",
    "here are",
    "here's",
    "sure",
    "certainly",
    "of course",
    "okay",
    "ok",
    "absolutely",
    "as an ai",
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "paraphrase",
    "paraphrases",
];

/// The paraphrases in `content`, trimmed, or why the answer is unusable.
pub fn parse_paraphrases(content: &str, caption: &str, n: usize) -> Result<Vec<String>, String> {
    let body = strip_fence(content.trim());
    if !(body.starts_with('[') && body.ends_with(']')) {
        return Err(if body.contains('[') {
            "it has text outside the JSON array".to_string()
        } else {
            "it is not a JSON array".to_string()
        });
    }
    let items: Vec<serde_json::Value> =
        serde_json::from_str(body).map_err(|e| format!("it is not valid JSON ({e})"))?;
    if items.len() != n {
        return Err(format!("it has {} paraphrases instead of {n}", items.len()));
    }
    let original = normalized(caption);
    let mut seen: Vec<String> = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for (k, item) in items.iter().enumerate() {
        let k = k + 1;
        let text = item
            .as_str()
            .ok_or_else(|| format!("item {k} is not a string"))?;
        let text = unquote(text.trim()).trim();
        if text.is_empty() {
            return Err(format!("paraphrase {k} is empty"));
        }
        if text.contains('\n') {
            return Err(format!("paraphrase {k} spans several lines"));
        }
        if let Some(why) = preamble(text) {
            return Err(format!("paraphrase {k} {why}"));
        }
        if text.split_whitespace().count() > MAX_WORDS {
            return Err(format!("paraphrase {k} is longer than {MAX_WORDS} words"));
        }
        let norm = normalized(text);
        if norm == original {
            return Err(format!("paraphrase {k} repeats the original caption"));
        }
        if seen.contains(&norm) {
            return Err(format!("paraphrase {k} repeats an earlier one"));
        }
        seen.push(norm);
        out.push(text.to_string());
    }
    Ok(out)
}

/// Removes a Markdown code fence (```` ```json … ``` ````) around the whole answer.
fn strip_fence(s: &str) -> &str {
    let Some(rest) = s.strip_prefix("```") else {
        return s;
    };
    let Some(rest) = rest.strip_suffix("```") else {
        return s;
    };
    // Drop the info string ("json") on the opening line.
    match rest.find('\n') {
        Some(nl) => rest[nl + 1..].trim(),
        None => rest.trim(),
    }
}

/// A paraphrase wrapped in its own quotes ("\"make it red\"") loses them.
fn unquote(s: &str) -> &str {
    for q in ['"', '\'', '“'] {
        let close = if q == '“' { '”' } else { q };
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(close) {
            return &s[q.len_utf8()..s.len() - close.len_utf8()];
        }
    }
    s
}

/// Why `text` reads as chat filler or a list label rather than a paraphrase, if it does.
fn preamble(text: &str) -> Option<&'static str> {
    if text.ends_with(':') {
        return Some("is an introduction (it ends with ':')");
    }
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 && matches!(text[digits..].chars().next(), Some('.' | ')' | ':')) {
        return Some("is numbered");
    }
    if ["- ", "* ", "• "].iter().any(|b| text.starts_with(b)) {
        return Some("is a list bullet");
    }
    let lower = text.to_lowercase();
    let hit = PREAMBLES.iter().any(|p| {
        lower.starts_with(p) && !lower[p.len()..].starts_with(|c: char| c.is_alphanumeric())
    });
    hit.then_some("is chat text, not a paraphrase")
}

/// Lowercase words of letters and digits: the identity used for "copy" and "repeat" checks.
fn normalized(s: &str) -> String {
    let cleaned: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: &str = "is red with long sleeves";

    fn ok(content: &str) -> Vec<String> {
        parse_paraphrases(content, CAP, 2).unwrap()
    }
    fn err(content: &str) -> String {
        parse_paraphrases(content, CAP, 2).unwrap_err()
    }

    #[test]
    fn accepts_plain_fenced_and_quoted_arrays() {
        let want = vec![
            "has long red sleeves".to_string(),
            "is a red long-sleeved one".into(),
        ];
        assert_eq!(
            ok(r#"["has long red sleeves", " is a red long-sleeved one "]"#),
            want
        );
        assert_eq!(
            ok("```json\n[\"has long red sleeves\",\"is a red long-sleeved one\"]\n```"),
            want
        );
        assert_eq!(
            ok(r#"["\"has long red sleeves\"", "is a red long-sleeved one"]"#),
            want
        );
        // A leading count is content, not a list label.
        assert_eq!(
            ok(r#"["2 long red sleeves", "red, long-sleeved"]"#).len(),
            2
        );
    }

    #[test]
    fn rejects_preamble_and_non_arrays() {
        assert!(err("Sure! Here you go:\n[\"a b\", \"c d\"]").contains("outside"));
        assert!(err("has long red sleeves\nis red").contains("not a JSON array"));
        assert!(err("[\"a\", \"b\"").contains("outside") || err("[\"a\", \"b\"").contains("JSON"));
        assert!(err(r#"["a", 3]"#).contains("not a string"));
        assert!(
            err(r#"["Here are the paraphrases:", "has long red sleeves"]"#)
                .contains("introduction")
        );
        assert!(err(r#"["Sure, has long red sleeves", "x y"]"#).contains("chat"));
        assert!(err(r#"["1. has long red sleeves", "2. red"]"#).contains("numbered"));
        assert!(err(r#"["- has long red sleeves", "red"]"#).contains("bullet"));
    }

    #[test]
    fn rejects_wrong_count_empty_copies_and_repeats() {
        assert!(err(r#"["a b", "c d", "e f"]"#).contains("3 paraphrases instead of 2"));
        assert!(err(r#"["a b"]"#).contains("1 paraphrases instead of 2"));
        assert!(err(r#"["a b", "  "]"#).contains("paraphrase 2 is empty"));
        assert!(err(r#"["Is red, with long sleeves!", "c d"]"#).contains("repeats the original"));
        assert!(err(r#"["c d", "C. D."]"#).contains("repeats an earlier"));
        assert!(err(r#"["a\nb", "c"]"#).contains("several lines"));
        let long = vec!["w"; 51].join(" ");
        assert!(err(&format!(r#"["{long}", "c"]"#)).contains("longer than 50"));
    }
}
