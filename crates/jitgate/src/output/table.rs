//! Aligned tables that fit the terminal.
//!
//! Columns are as wide as their widest cell and separated by two spaces. When the
//! table is wider than the terminal, the widest columns give way first (down to their
//! header's width, at least 6), and a cell cut short ends in `…`. Piped output (no
//! terminal, no `COLUMNS`) is never cut: scripts and `grep` see every character, though
//! they should prefer `--json`.

use std::io::IsTerminal;

pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    at_least: Vec<usize>,
}

/// The narrowest a column is cut to.
const MIN_WIDTH: usize = 6;
const GAP: &str = "  ";

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
            at_least: Vec::new(),
        }
    }

    /// Adds a row; an empty cell shows as `-`.
    pub fn row(&mut self, cells: Vec<String>) {
        let cells = cells
            .into_iter()
            .map(|c| if c.is_empty() { "-".to_owned() } else { c })
            .collect();
        self.rows.push(cells);
    }

    /// The table as text, at most `width` characters a line when given.
    pub fn render(&self, width: Option<usize>) -> String {
        self.render_with(&self.widths(width), true, width.is_some())
    }

    /// Each column's width: its widest cell (or `at_least`), shrunk to fit `width`.
    pub fn widths(&self, width: Option<usize>) -> Vec<usize> {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| len(h)).collect();
        for (i, w) in self.at_least.iter().enumerate().take(n) {
            widths[i] = widths[i].max(*w);
        }
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(len(c));
            }
        }
        if let Some(max) = width {
            let floor: Vec<usize> = self.headers.iter().map(|h| len(h).max(MIN_WIDTH)).collect();
            let total = |w: &[usize]| w.iter().sum::<usize>() + GAP.len() * n.saturating_sub(1);
            while total(&widths) > max {
                let widest = (0..n)
                    .filter(|&i| widths[i] > floor[i])
                    .max_by_key(|&i| (widths[i], i));
                match widest {
                    Some(i) => widths[i] -= 1,
                    None => break,
                }
            }
        }
        widths
    }

    /// Columns at least this wide (for rows that come later, as `audit --follow`'s).
    pub fn at_least(&mut self, widths: &[usize]) {
        self.at_least = widths.to_vec();
    }

    /// The rows (and the header line when `header`) laid out in `widths`; a cell wider
    /// than its column is cut when `cut`, else it pushes the rest of its line right.
    pub fn render_with(&self, widths: &[usize], header: bool, cut_cells: bool) -> String {
        let n = self.headers.len();
        let mut out = String::new();
        let head: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let lines = std::iter::once(&head).filter(|_| header).chain(&self.rows);
        for r in lines {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate().take(n) {
                let cell = r.get(i).map(String::as_str).unwrap_or("-");
                let cell = if cut_cells {
                    cut(cell, *w)
                } else {
                    cell.to_owned()
                };
                line.push_str(&cell);
                if i + 1 < n {
                    line.push_str(&" ".repeat(w.saturating_sub(len(&cell))));
                    line.push_str(GAP);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table to fit the terminal (or `COLUMNS`).
    pub fn print(&self) {
        print!("{}", self.render(terminal_width()));
    }
}

fn len(s: &str) -> usize {
    s.chars().count()
}

fn cut(s: &str, w: usize) -> String {
    if len(s) <= w {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(w.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `COLUMNS` when set, else the width of the terminal on standard output; `None` when
/// the output is not a terminal.
pub fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return Some(n);
    }
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&out)
        .ok()
        .map(|w| usize::from(w.ws_col))
        .filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::new(&["ID", "MACHINE", "STATUS"]);
        t.row(vec![
            "3f2a9c".into(),
            "prod/a-very-long-machine-name".into(),
            "Active".into(),
        ]);
        t.row(vec!["1".into(), "lab/db".into(), String::new()]);
        t
    }

    #[test]
    fn columns_align_to_the_widest_cell() {
        assert_eq!(
            table().render(None),
            "ID      MACHINE                        STATUS\n\
             3f2a9c  prod/a-very-long-machine-name  Active\n\
             1       lab/db                         -\n"
        );
    }

    #[test]
    fn a_narrow_terminal_cuts_the_widest_column() {
        let text = table().render(Some(30));
        for line in text.lines() {
            assert!(len(line) <= 30, "{line:?} is wider than 30");
        }
        assert!(text.contains("prod/a-very-l…  Active"), "{text}");
        assert!(text.contains("3f2a9c"), "{text}");
        // Too narrow for anything: columns stop at their floor instead of vanishing.
        let tiny = table().render(Some(5));
        assert!(tiny.lines().all(|l| l.contains("  ")), "{tiny}");
        assert!(tiny.starts_with("ID      MACHINE  STATUS\n"), "{tiny}");
    }
}
