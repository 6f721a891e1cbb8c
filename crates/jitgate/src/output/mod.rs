//! What the verbs print: `--json` (the server's JSON, pretty) or tables and sentences
//! for people (`human` for durations and times, `table` for aligned columns).

pub mod human;
pub mod table;

use serde_json::Value;

use table::Table;

pub fn print(json: bool, v: &Value, table: impl FnOnce(&Value)) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

pub fn items(v: &Value) -> &[Value] {
    v["value"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn short_id(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() == 9 {
        format!("{}/{}", parts[4], parts[8])
    } else {
        id.to_owned()
    }
}

/// NSG rules (native API JSON) as a table.
pub fn nsg_table(rules: &[Value]) -> Table {
    let join = |r: &Value, k: &str| {
        r[k].as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    let mut t = Table::new(&["PRIORITY", "NAME", "ACCESS", "PROTO", "SOURCE", "PORTS"]);
    for r in rules {
        t.row(vec![
            s(&r["priority"]),
            s(&r["name"]),
            s(&r["access"]),
            s(&r["protocol"]),
            join(r, "sourceAddressPrefixes"),
            join(r, "destinationPortRanges"),
        ]);
    }
    t
}
