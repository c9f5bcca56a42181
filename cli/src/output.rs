//! Where results go: human text, JSON, or nothing (`-q`).

use serde::Serialize;

/// How the user asked to see results.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    pub quiet: bool,
}

impl Output {
    pub fn new(json: bool, quiet: bool) -> Self {
        Output { json, quiet }
    }

    /// Prints `report` as JSON, or `human(report)` as text; nothing if quiet
    /// (JSON is printed even when quiet: scripts asked for it).
    pub fn emit<T: Serialize>(
        &self,
        report: &T,
        human: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut stdout, report)?;
            writeln!(stdout)?;
        } else if !self.quiet {
            write!(stdout, "{}", human(report))?;
        }
        stdout.flush()?;
        Ok(())
    }
}
