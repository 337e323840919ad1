//! README.md documents the failure table; it must be the code's table, row for row.
use ccgw_callcontrol::api::status::markdown_table;

#[test]
fn readme_failure_table_matches_the_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- failure-table:start -->")
        .expect("start marker")
        + "<!-- failure-table:start -->".len();
    let end = readme
        .find("<!-- failure-table:end -->")
        .expect("end marker");
    let documented = readme[start..end].trim();
    let code = markdown_table();
    assert_eq!(
        documented,
        code.trim(),
        "README.md's table is out of date; replace it with:\n{code}"
    );
}
