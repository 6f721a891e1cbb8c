//! What the verbs print: with `--json`, the JSON (the controller's answer as it came,
//! or what the verb built), pretty and with its keys in order; otherwise tables and
//! sentences for people (`human` for durations and times, `table` for aligned columns).

pub mod human;
pub mod table;

use jitgate_proto::api;
use serde::Serialize;

use table::Table;

/// Prints `v` as JSON with `--json`, else calls `human`.
pub fn print(json: bool, v: &impl Serialize, human: impl FnOnce()) {
    if json {
        // Through a `Value`: keys in order, whatever the type declared.
        let text = serde_json::to_value(v)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_default();
        println!("{text}");
    } else {
        human();
    }
}

/// An optional text, `-` when absent.
pub fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

/// Numbers joined with commas (`22,3389`).
pub fn joined(items: &[impl ToString], sep: &str) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

/// A machine id in short (`prod/web-1`); another text as it is.
pub fn short_id(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() == 9 {
        format!("{}/{}", parts[4], parts[8])
    } else {
        id.to_owned()
    }
}

/// NSG rules as a table.
pub fn nsg_table(rules: &[api::NsgRule]) -> Table {
    let mut t = Table::new(&["PRIORITY", "NAME", "ACCESS", "PROTO", "SOURCE", "PORTS"]);
    for r in rules {
        t.row(vec![
            r.priority.to_string(),
            r.name.clone(),
            r.access.clone(),
            r.protocol.clone(),
            r.source_address_prefixes.join(","),
            r.destination_port_ranges.join(","),
        ]);
    }
    t
}
