//! The kernel support matrix: what the in-VM suite recorded on each kernel (one JSON object a
//! line: `section`, `item`, `result` = works | missing | fails | n/a, optional `note`),
//! rendered as one Markdown table with a column per kernel.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::kernel::Kernel;

#[derive(Debug, Clone)]
pub struct Record {
    section: String,
    item: String,
    result: String,
    note: Option<String>,
}

impl Record {
    pub fn failed(&self) -> bool {
        self.result == "fails"
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {}",
            self.item,
            self.note.as_deref().unwrap_or("no details")
        )
    }
}

/// Reads the records a guest wrote; a missing file (the suite never got to record) is empty.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not a JSON record: {line}", path.display()))?;
            let field = |k: &str| v[k].as_str().map(str::to_owned);
            Ok(Record {
                section: field("section").context("record without section")?,
                item: field("item").context("record without item")?,
                result: field("result").context("record without result")?,
                note: field("note"),
            })
        })
        .collect()
}

/// One table: sections in name order, rows in the order the suite recorded them.
pub fn render(runs: &[(Kernel, Vec<Record>)]) -> String {
    let mut sections: Vec<String> = Vec::new();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut cells: BTreeMap<(String, String, usize), String> = BTreeMap::new();
    for (column, (_, records)) in runs.iter().enumerate() {
        for r in records {
            if !sections.contains(&r.section) {
                sections.push(r.section.clone());
            }
            let row = (r.section.clone(), r.item.clone());
            if !rows.contains(&row) {
                rows.push(row);
            }
            cells.insert((r.section.clone(), r.item.clone(), column), cell(r));
        }
    }
    // The suite numbers its sections; tests run in name order, not section order.
    sections.sort();
    let mut s = String::new();
    s.push_str("| |");
    for (kernel, _) in runs {
        let _ = write!(s, " {} (`{}`) |", kernel.series.name(), kernel.release);
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(runs.len()));
    s.push('\n');
    for section in &sections {
        let _ = writeln!(s, "| **{section}** |{}", " |".repeat(runs.len()));
        for (_, item) in rows.iter().filter(|(sec, _)| sec == section) {
            let _ = write!(s, "| {item} |");
            for column in 0..runs.len() {
                let key = (section.clone(), item.clone(), column);
                let _ = write!(
                    s,
                    " {} |",
                    cells.get(&key).map_or("not run", String::as_str)
                );
            }
            s.push('\n');
        }
    }
    s.push_str("\nKernels: ");
    let packages: Vec<String> = runs
        .iter()
        .map(|(k, _)| format!("Debian `{}` {}", k.package, k.version))
        .collect();
    s.push_str(&packages.join(", "));
    s.push_str(".\n");
    s
}

fn cell(r: &Record) -> String {
    let word = match r.result.as_str() {
        "works" => "yes",
        "missing" => "no",
        "fails" => "**fails**",
        other => other,
    };
    // A `|` inside a note would end the cell.
    match &r.note {
        Some(note) => format!("{word}: {}", note.replace('|', "/")),
        None => word.to_owned(),
    }
}
