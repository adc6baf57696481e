//! Operator commands: `doctor`. Tables on a terminal, tab-separated lines in a pipe, `--json`
//! for scripts.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};

use post_save::doctor::{self, Check};

use crate::cli::{EXIT_DRIFT, Global, load_config, pg_config};

/// `post-save doctor`: exit 0 when every check is ok, 1 when any found a problem.
pub async fn doctor(global: &Global, json: bool) -> Result<u8> {
    let config = load_config(global)?;
    let pg = pg_config(global, &config)?;
    let checks = doctor::run(&pg, &config).await;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&checks).context("encoding JSON")?)?;
    } else if std::io::stdout().is_terminal() {
        writeln!(out, "{}", checks_table(&checks))?;
    } else {
        writeln!(out, "verdict\tcheck\tdetail\tfix")?;
        for c in &checks {
            writeln!(out, "{}\t{}\t{}\t{}", c.verdict.as_str(), c.name, c.detail, c.fix.as_deref().unwrap_or(""))?;
        }
    }
    Ok(if doctor::problems(&checks) { EXIT_DRIFT } else { 0 })
}

fn checks_table(checks: &[Check]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    table.set_header(["", "check", "detail", "fix"]);
    for c in checks {
        table.add_row([c.verdict.as_str(), c.name, &c.detail, c.fix.as_deref().unwrap_or("")]);
    }
    table
}
