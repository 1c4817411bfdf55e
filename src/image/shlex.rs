//! Dockerfile word handling as `docker commit --change` applies it: splitting an instruction's
//! arguments into words (quotes and escapes kept, as moby's `parseWords`), and the word
//! processing of BuildKit's `shell.Lex` (quote removal, `\` escapes, `$VAR`, `${VAR}` and the
//! `:-` `-` `:+` `+` `:?` `?` modifiers) against the config's current `Env`.

/// Splits on unquoted whitespace; quotes and escapes stay in the words (they are removed later
/// by `process_word`), an empty quoted word (`""`) is kept.
pub fn split_words(rest: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut quote: Option<char> = None;
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            None if c.is_whitespace() => {
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    blank_ok = true;
                }
                word.push(c);
                if c == '\\' {
                    // An escaped character (even a quote or a space) belongs to the word.
                    match chars.next() {
                        Some(n) => word.push(n),
                        None => {
                            word.pop();
                        }
                    }
                }
            }
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                } else if c == '\\' && q != '\'' {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
        }
    }
    if blank_ok || !word.is_empty() {
        words.push(word);
    }
    words
}

/// The value of `name` in a `KEY=value` list (the last one wins, as Docker's env map does).
fn lookup<'e>(env: &'e [String], name: &str) -> Option<&'e str> {
    env.iter().rev().find_map(|e| {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        (k == name).then_some(v)
    })
}

/// One word after quote removal, escapes and variable expansion; Err is the reason.
pub fn process_word(word: &str, env: &[String]) -> Result<String, String> {
    let mut lex = Lex {
        chars: word.chars().collect(),
        pos: 0,
        env,
    };
    lex.process(None)
}

/// A word that may expand to several (EXPOSE): expansion, then a split on whitespace.
pub fn process_words(word: &str, env: &[String]) -> Result<Vec<String>, String> {
    Ok(process_word(word, env)?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

struct Lex<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a [String],
}

impl Lex<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += usize::from(c.is_some());
        c
    }

    /// Processes until the end, or until an unquoted `stop` (consumed).
    fn process(&mut self, stop: Option<char>) -> Result<String, String> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                '\\' => {
                    self.pos += 1;
                    if let Some(n) = self.next() {
                        out.push(n);
                    }
                }
                _ => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
        match stop {
            Some(s) => Err(format!("missing '{s}' in {:?}", self.text())),
            None => Ok(out),
        }
    }

    fn text(&self) -> String {
        self.chars.iter().collect()
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(format!("unmatched single quote in {:?}", self.text())),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(format!("unmatched double quote in {:?}", self.text())),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some('\\') => {
                    self.pos += 1;
                    // Only `"`, `$` and `\` are escapable inside double quotes; other
                    // backslashes stay as written.
                    match self.peek() {
                        Some(n @ ('"' | '$' | '\\')) => {
                            self.pos += 1;
                            out.push(n);
                        }
                        Some(_) => out.push('\\'),
                        None => {}
                    }
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_') {
            self.pos += 1;
            name.push(c);
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                self.braced()
            }
            Some(c) if c.is_alphanumeric() || c == '_' => {
                let name = self.name();
                Ok(lookup(self.env, &name).unwrap_or("").to_string())
            }
            _ => Ok("$".into()),
        }
    }

    /// `${name}` and `${name<modifier>word}`, after the `{`.
    fn braced(&mut self) -> Result<String, String> {
        let name = self.name();
        if name.is_empty() {
            return Err(format!("bad substitution in {:?}", self.text()));
        }
        let value = lookup(self.env, &name);
        let colon = self.peek() == Some(':');
        if colon {
            self.pos += 1;
        }
        let modifier = self.next();
        if modifier == Some('}') && !colon {
            return Ok(value.unwrap_or("").to_string());
        }
        let word = self.process(Some('}'))?;
        // With a colon, an empty value counts as unset.
        let set = value.filter(|v| !colon || !v.is_empty());
        match modifier {
            Some('-') => Ok(set.map(str::to_string).unwrap_or(word)),
            Some('+') => Ok(if set.is_some() { word } else { String::new() }),
            Some('?') => set
                .map(str::to_string)
                .ok_or_else(|| format!("{name}: {word}")),
            Some(m) => Err(format!(
                "unsupported modifier ({m}) in substitution {:?}",
                self.text()
            )),
            None => Err(format!("missing '}}' in {:?}", self.text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<String> {
        vec!["A=1".into(), "E=".into(), "PATH=/bin".into()]
    }

    fn w(s: &str) -> String {
        process_word(s, &env()).unwrap()
    }

    #[test]
    fn words_split_on_unquoted_space_and_keep_quotes() {
        assert_eq!(
            split_words(r#"a=1 b="x y" c='p q' d=e\ f "" "#),
            vec!["a=1", r#"b="x y""#, "c='p q'", r"d=e\ f", r#""""#]
        );
    }

    #[test]
    fn quotes_escapes_and_variables_follow_docker() {
        assert_eq!(w(r#""x y""#), "x y");
        assert_eq!(w(r"'$A \n'"), r"$A \n");
        assert_eq!(w(r#""\$A \" \q""#), r#"$A " \q"#);
        assert_eq!(w(r"e\ f\$A"), "e f$A");
        assert_eq!(w("$A/${PATH}:$NOPE."), "1//bin:.");
        assert_eq!(w("${E:-d} ${E-d} ${A:+y} ${NOPE+y} ${A}x"), "d  y  1x");
        assert_eq!(w("cost $ 5"), "cost $ 5");
    }

    #[test]
    fn required_variable_and_bad_syntax_are_errors() {
        assert_eq!(
            process_word("${NOPE:?must be set}", &env()).unwrap_err(),
            "NOPE: must be set"
        );
        assert!(process_word("${A", &env()).is_err());
        assert!(process_word("\"open", &env()).is_err());
        assert!(process_word("${A#x}", &env())
            .unwrap_err()
            .contains("unsupported modifier"));
    }
}
