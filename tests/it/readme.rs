//! README.md documents the failure table and every flag; each must be the code's, row for row.
use ccgw_callcontrol::{api::status::markdown_table, config::markdown_flags_table};

/// The README's text between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn readme_section(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start_marker = format!("<!-- {name}:start -->");
    let start = readme.find(&start_marker).expect("start marker") + start_marker.len();
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .expect("end marker");
    readme[start..end].trim().to_owned()
}

#[test]
fn readme_failure_table_matches_the_code() {
    let code = markdown_table();
    assert_eq!(
        readme_section("failure-table"),
        code.trim(),
        "README.md's failure table is out of date; replace it with:\n{code}"
    );
}

#[test]
fn readme_flags_table_matches_the_code() {
    let code = markdown_flags_table();
    assert_eq!(
        readme_section("flags-table"),
        code.trim(),
        "README.md's flags table is out of date; replace it with:\n{code}"
    );
}
