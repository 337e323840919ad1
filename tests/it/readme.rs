//! The documentation holds the code's own tables, row for row (docs/api.md the failure table,
//! docs/operating.md every flag), and its relative links lead to a file and heading that exist.
use crate::common;

use std::path::{Path, PathBuf};

use ccgw_callcontrol::{api::status::markdown_table, config::markdown_flags_table};
use common::{markdown_anchors, markdown_prose};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The text of `file` (from the repository's root) between `<!-- NAME:start -->` and
/// `<!-- NAME:end -->`.
fn generated_section(file: &str, name: &str) -> String {
    let text = std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
    let start_marker = format!("<!-- {name}:start -->");
    let start = text
        .find(&start_marker)
        .unwrap_or_else(|| panic!("{file} has no {start_marker}"))
        + start_marker.len();
    let end = text
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("{file} has no end marker of {name}"));
    text[start..end].trim().to_owned()
}

#[test]
fn the_failure_table_matches_the_code() {
    let code = markdown_table();
    assert_eq!(
        generated_section("docs/api.md", "failure-table"),
        code.trim(),
        "docs/api.md's failure table is out of date; replace it with:\n{code}"
    );
}

#[test]
fn the_flags_table_matches_the_code() {
    let code = markdown_flags_table();
    assert_eq!(
        generated_section("docs/operating.md", "flags-table"),
        code.trim(),
        "docs/operating.md's flags table is out of date; replace it with:\n{code}"
    );
}

/// The Markdown documents a reader moves between: README.md, BENCHMARKS.md and docs/*.md.
fn documents() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut documents = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            documents.push(path);
        }
    }
    documents
}

/// The targets of a document's inline links (`[text](target)`, the text perhaps over several
/// lines), with the line each target is on; code (fenced blocks and `spans`) holds no links.
fn link_targets(markdown: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    let mut code_span: Option<usize> = None;
    for (number, line) in markdown_prose(markdown) {
        if line.trim().is_empty() {
            // A code span ends with its paragraph: an unmatched backtick is only a backtick.
            code_span = None;
        }
        let mut rest = line;
        while !rest.is_empty() {
            let ticks = rest.chars().take_while(|&c| c == '`').count();
            if ticks > 0 {
                code_span = match code_span {
                    None => Some(ticks),
                    Some(open) if open == ticks => None,
                    still => still,
                };
                rest = &rest[ticks..];
                continue;
            }
            if code_span.is_none() {
                if let Some(link) = rest.strip_prefix("](") {
                    let end = link.find(')').unwrap_or(link.len());
                    targets.push((number, link[..end].to_owned()));
                    rest = &link[end..];
                    continue;
                }
            }
            let next = rest.chars().next().unwrap().len_utf8();
            rest = &rest[next..];
        }
    }
    targets
}

/// Every relative link of the documents leads to a file that exists and, with a `#anchor`, to
/// a heading of that file (GitHub's anchors); links with a scheme are not followed.
#[test]
fn every_relative_link_of_the_documentation_leads_somewhere() {
    let mut broken = Vec::new();
    for document in documents() {
        let text = std::fs::read_to_string(&document).unwrap();
        let name = document.strip_prefix(ROOT).unwrap().display().to_string();
        for (line, target) in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if file.is_empty() {
                document.clone()
            } else {
                document.parent().unwrap().join(file)
            };
            if !linked.exists() {
                broken.push(format!("{name}:{line}: {target}: no such file"));
            } else if !anchor.is_empty() {
                let headings = std::fs::read_to_string(&linked).unwrap();
                if !markdown_anchors(&headings).iter().any(|a| a == anchor) {
                    broken.push(format!("{name}:{line}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The link reader finds links whose text runs over lines, and none in code.
#[test]
fn links_are_read_outside_code_only() {
    let markdown = "see [the\nfailure table](docs/api.md#failures), `[not](a.md)` and\n\
                    ```\n[nor](b.md)\n```\n[x](#y)";
    assert_eq!(
        link_targets(markdown),
        [(2, "docs/api.md#failures".to_owned()), (6, "#y".to_owned())]
    );
    assert_eq!(
        markdown_anchors("# A b\n```\n# not\n```\n## A b\n### `C`: d!"),
        ["a-b", "a-b-1", "c-d"]
    );
}
