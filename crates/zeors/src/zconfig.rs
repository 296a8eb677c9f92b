//! A reader for ZConfig files, the format of `runzeo`'s `zeo.conf`.
//!
//! ZConfig is line based: `key value` pairs, nested `<type name>` … `</type>` sections,
//! `#` comments, `%define NAME value` with `$NAME`/`${NAME}` substitution (`$$` is a
//! literal dollar), `%include path` and `%import package`. Keys and section types are
//! case-insensitive. This module only builds the tree; what the keys mean is decided in
//! [`crate::config`], which reports unknown keys and sections with their line numbers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A `<type name>` section (the file itself is the root section, type `""`).
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub kind: String,
    pub name: Option<String>,
    pub line: usize,
    pub file: PathBuf,
    /// `(key in lower case, value, line)` in file order; a key may repeat.
    pub keys: Vec<(String, String, usize)>,
    pub sections: Vec<Section>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl Section {
    /// The values of a key, in order.
    pub fn values<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Iterator<Item = &'a (String, String, usize)> + 'a {
        self.keys.iter().filter(move |(k, _, _)| k == key)
    }

    /// The last value of a key (ZConfig takes the last for single-valued keys).
    pub fn value(&self, key: &str) -> Option<&(String, String, usize)> {
        self.keys.iter().rev().find(|(k, _, _)| k == key)
    }
}

/// Parses a file, following `%include`.
pub fn parse_file(path: &Path) -> Result<(Section, Vec<String>), ParseError> {
    let mut parser = Parser {
        defines: HashMap::new(),
        warnings: Vec::new(),
        depth: 0,
    };
    let mut root = Section {
        file: path.to_path_buf(),
        ..Default::default()
    };
    let mut stack: Vec<Section> = Vec::new();
    parser.parse_into(path, &mut root, &mut stack)?;
    if let Some(open) = stack.last() {
        return Err(ParseError {
            file: path.display().to_string(),
            line: open.line,
            message: format!("section <{}> is never closed", open.kind),
        });
    }
    Ok((root, parser.warnings))
}

/// Parses text (for tests); `%include` is resolved relative to the working directory.
#[cfg(test)]
pub fn parse_str(text: &str, name: &str) -> Result<(Section, Vec<String>), ParseError> {
    let mut parser = Parser {
        defines: HashMap::new(),
        warnings: Vec::new(),
        depth: 0,
    };
    let mut root = Section {
        file: PathBuf::from(name),
        ..Default::default()
    };
    let mut stack = Vec::new();
    parser.parse_text(text, Path::new(name), &mut root, &mut stack)?;
    if let Some(open) = stack.last() {
        return Err(ParseError {
            file: name.into(),
            line: open.line,
            message: format!("section <{}> is never closed", open.kind),
        });
    }
    Ok((root, parser.warnings))
}

struct Parser {
    defines: HashMap<String, String>,
    warnings: Vec<String>,
    depth: usize,
}

impl Parser {
    fn parse_into(
        &mut self,
        path: &Path,
        root: &mut Section,
        stack: &mut Vec<Section>,
    ) -> Result<(), ParseError> {
        let text = std::fs::read_to_string(path).map_err(|e| ParseError {
            file: path.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        self.parse_text(&text, path, root, stack)
    }

    fn parse_text(
        &mut self,
        text: &str,
        path: &Path,
        root: &mut Section,
        stack: &mut Vec<Section>,
    ) -> Result<(), ParseError> {
        let err = |line: usize, message: String| ParseError {
            file: path.display().to_string(),
            line,
            message,
        };
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(directive) = line.strip_prefix('%') {
                let (word, rest) = split_word(directive);
                match word.to_ascii_lowercase().as_str() {
                    "define" => {
                        let (name, value) = split_word(rest);
                        if name.is_empty() {
                            return Err(err(line_no, "%define needs a name".into()));
                        }
                        let value = self.substitute(value, line_no, path)?;
                        self.defines.insert(name.to_ascii_lowercase(), value);
                    }
                    // zc.zrs's `<zrs>` section is built in.
                    "import" if rest.trim() == "zc.zrs" => {}
                    // `%import relstorage` declares the <relstorage> section, which zeors
                    // implements itself: nothing to say about it.
                    "import" if rest.trim() == "relstorage" => {}
                    "import" => self.warnings.push(format!(
                        "{}:{line_no}: %import {rest} ignored (zeors has no Python packages to import)",
                        path.display()
                    )),
                    "include" => {
                        if self.depth > 10 {
                            return Err(err(line_no, "%include nested too deeply".into()));
                        }
                        let target = self.substitute(rest, line_no, path)?;
                        let target = path.parent().unwrap_or(Path::new(".")).join(target);
                        self.depth += 1;
                        let current = stack.pop();
                        match current {
                            Some(mut s) => {
                                self.parse_into(&target, &mut s, stack)?;
                                stack.push(s);
                            }
                            None => self.parse_into(&target, root, stack)?,
                        }
                        self.depth -= 1;
                    }
                    other => return Err(err(line_no, format!("unknown directive %{other}"))),
                }
                continue;
            }
            if let Some(tag) = line.strip_prefix("</") {
                let kind = tag
                    .strip_suffix('>')
                    .ok_or_else(|| err(line_no, "malformed section end".into()))?;
                let kind = kind.trim().to_ascii_lowercase();
                let section = stack
                    .pop()
                    .ok_or_else(|| err(line_no, format!("</{kind}> without a section to close")))?;
                if section.kind != kind {
                    return Err(err(
                        line_no,
                        format!(
                            "</{kind}> closes <{}> opened at line {}",
                            section.kind, section.line
                        ),
                    ));
                }
                match stack.last_mut() {
                    Some(parent) => parent.sections.push(section),
                    None => root.sections.push(section),
                }
                continue;
            }
            if let Some(tag) = line.strip_prefix('<') {
                let (inner, empty) = match tag.strip_suffix("/>") {
                    Some(t) => (t, true),
                    None => (
                        tag.strip_suffix('>')
                            .ok_or_else(|| err(line_no, "malformed section start".into()))?,
                        false,
                    ),
                };
                let (kind, name) = split_word(inner.trim());
                let name = if name.is_empty() {
                    None
                } else {
                    Some(self.substitute(name, line_no, path)?)
                };
                let section = Section {
                    kind: kind.to_ascii_lowercase(),
                    name,
                    line: line_no,
                    file: path.to_path_buf(),
                    ..Default::default()
                };
                if empty {
                    match stack.last_mut() {
                        Some(parent) => parent.sections.push(section),
                        None => root.sections.push(section),
                    }
                } else {
                    stack.push(section);
                }
                continue;
            }
            let (key, value) = split_word(line);
            let value = self.substitute(value, line_no, path)?;
            let entry = (key.to_ascii_lowercase(), value, line_no);
            match stack.last_mut() {
                Some(s) => s.keys.push(entry),
                None => root.keys.push(entry),
            }
        }
        Ok(())
    }

    /// Replaces `$name` and `${name}` by their `%define`d values; `$$` is a dollar sign.
    fn substitute(&self, s: &str, line: usize, path: &Path) -> Result<String, ParseError> {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            let name: String = match chars.peek() {
                Some('$') => {
                    chars.next();
                    out.push('$');
                    continue;
                }
                Some('{') => {
                    chars.next();
                    let mut n = String::new();
                    for c in chars.by_ref() {
                        if c == '}' {
                            break;
                        }
                        n.push(c);
                    }
                    n
                }
                _ => {
                    let mut n = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            n.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    n
                }
            };
            match self.defines.get(&name.to_ascii_lowercase()) {
                Some(v) => out.push_str(v),
                None => {
                    return Err(ParseError {
                        file: path.display().to_string(),
                        line,
                        message: format!(
                            "undefined name ${name} (use %define {name} ... before it)"
                        ),
                    })
                }
            }
        }
        Ok(out)
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_defines_and_comments() {
        let text = "%define INSTANCE /srv/zope\n%import ZEO\n# comment\n<zeo>\n  address 8100\n  Address 127.0.0.1:8101\n</zeo>\n<filestorage main>\n  path $INSTANCE/var/Data.fs\n  blob-dir ${INSTANCE}/blobs\n</filestorage>\n";
        let (root, warnings) = parse_str(text, "zeo.conf").unwrap();
        assert_eq!(warnings.len(), 1);
        assert_eq!(root.sections.len(), 2);
        let zeo = &root.sections[0];
        assert_eq!(zeo.kind, "zeo");
        assert_eq!(
            zeo.values("address")
                .map(|v| v.1.as_str())
                .collect::<Vec<_>>(),
            ["8100", "127.0.0.1:8101"]
        );
        let fs = &root.sections[1];
        assert_eq!(fs.name.as_deref(), Some("main"));
        assert_eq!(fs.value("path").unwrap().1, "/srv/zope/var/Data.fs");
        assert_eq!(fs.value("blob-dir").unwrap().1, "/srv/zope/blobs");
        assert_eq!(fs.value("path").unwrap().2, 9);
    }

    #[test]
    fn reports_errors_with_line_numbers() {
        let e = parse_str("<zeo>\n address 1\n</filestorage>\n", "x.conf").unwrap_err();
        assert_eq!(e.line, 3);
        let e = parse_str("<zeo>\n address $NOPE\n</zeo>\n", "x.conf").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("NOPE"));
        let e = parse_str("<zeo>\n", "x.conf").unwrap_err();
        assert!(e.message.contains("never closed"));
    }

    #[test]
    fn dollar_dollar_is_literal() {
        let (root, _) = parse_str("key a$$b\n", "x").unwrap();
        assert_eq!(root.value("key").unwrap().1, "a$b");
    }
}
