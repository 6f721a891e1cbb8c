//! The small SQL interface the store's logic is written against, so that it is written
//! once for every engine: statements with `?N` placeholders, parameters and columns of
//! four kinds (null, 64-bit integer, text, bytes), rows read by position.
//!
//! The SQL is the common subset of SQLite and PostgreSQL; the few places where the two
//! differ ask [`Db::dialect`]. Every engine caches its prepared statements by text.

use jitgate_store::{Result, StoreError};

/// Which SQL engine a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter's value, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// What can be bound to a placeholder.
pub trait ToParam {
    fn param(&self) -> Param<'_>;
}

impl ToParam for i64 {
    fn param(&self) -> Param<'_> {
        Param::Int(*self)
    }
}

impl ToParam for bool {
    fn param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

impl ToParam for str {
    fn param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for String {
    fn param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for [u8] {
    fn param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl ToParam for Vec<u8> {
    fn param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl<T: ToParam + ?Sized> ToParam for &T {
    fn param(&self) -> Param<'_> {
        (**self).param()
    }
}

impl<T: ToParam> ToParam for Option<T> {
    fn param(&self) -> Param<'_> {
        match self {
            Some(v) => v.param(),
            None => Param::Null,
        }
    }
}

/// A column's value, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<Param<'_>> for Value {
    fn from(p: Param<'_>) -> Self {
        match p {
            Param::Null => Value::Null,
            Param::Int(i) => Value::Int(i),
            Param::Text(t) => Value::Text(t.to_owned()),
            Param::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl ToParam for Value {
    fn param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Int(i) => Param::Int(*i),
            Value::Text(t) => Param::Text(t),
            Value::Blob(b) => Param::Blob(b),
        }
    }
}

impl FromValue for Value {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        Ok(v)
    }
}

/// What a column can be read as.
pub trait FromValue: Sized {
    fn from_value(v: Value) -> std::result::Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        match v {
            Value::Int(i) => Ok(i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

impl FromValue for bool {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        i64::from_value(v).map(|i| i != 0)
    }
}

impl FromValue for String {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: Value) -> std::result::Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row; each column is taken once, by position.
#[derive(Debug)]
pub struct Row {
    cols: Vec<Value>,
}

impl Row {
    pub fn new(cols: Vec<Value>) -> Self {
        Row { cols }
    }

    /// Takes column `i` (0-based) as a `T`.
    pub fn get<T: FromValue>(&mut self, i: usize) -> Result<T> {
        let v = self
            .cols
            .get_mut(i)
            .map(|c| std::mem::replace(c, Value::Null))
            .ok_or_else(|| StoreError::Db(format!("no column {i} in the row")))?;
        T::from_value(v).map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
    }
}

/// One connection (or one open transaction on it). Statements run one at a time;
/// transactions are begun and ended with plain SQL through [`Db::batch`].
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs one statement; returns the rows it changed.
    fn execute(&self, sql: &str, params: &[&dyn ToParam]) -> Result<u64>;
    /// Runs one query, calling `each` for every row in order.
    fn each(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        each: &mut dyn FnMut(&mut Row) -> Result<()>,
    ) -> Result<()>;
    /// Runs statements without parameters (`BEGIN`, DDL, `SAVEPOINT`).
    fn batch(&self, sql: &str) -> Result<()>;
    /// Runs a statement whose result nobody reads. An engine may hold it and send it
    /// with the next round trip (its error then surfaces there, or at [`Db::flush`]);
    /// the order of statements is kept.
    fn defer(&self, sql: &str, params: &[&dyn ToParam]) -> Result<()> {
        self.execute(sql, params).map(|_| ())
    }
    /// [`Db::batch`], deferred like [`Db::defer`].
    fn defer_batch(&self, sql: &str) -> Result<()> {
        self.batch(sql)
    }
    /// Sends what was deferred and waits for it.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// False once the connection is known to be lost (it is then replaced).
    fn healthy(&self) -> bool {
        true
    }
}

impl dyn Db + '_ {
    /// The first row, if any, mapped by `f`.
    pub fn one<T>(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        f: impl FnOnce(&mut Row) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut f = Some(f);
        let mut out = None;
        self.each(sql, params, &mut |r| {
            if let Some(f) = f.take() {
                out = Some(f(r)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Every row, mapped by `f`.
    pub fn all<T>(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        mut f: impl FnMut(&mut Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.each(sql, params, &mut |r| {
            out.push(f(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The one row a query always returns (an aggregate), mapped by `f`.
    pub fn row<T>(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        f: impl FnOnce(&mut Row) -> Result<T>,
    ) -> Result<T> {
        self.one(sql, params, f)?
            .ok_or_else(|| StoreError::Db(format!("no row from: {}", sql.trim())))
    }

    /// Ends the open transaction with `r`: COMMIT after a success, ROLLBACK after an
    /// error (which is the one returned).
    pub fn end<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Whether the query returns a row.
    pub fn exists(&self, sql: &str, params: &[&dyn ToParam]) -> Result<bool> {
        Ok(self.one(sql, params, |_| Ok(()))?.is_some())
    }
}

/// `sql` with SQLite's placeholders (`?N`, and `?` numbered in order) written as
/// PostgreSQL's `$N`. Quoted strings and identifiers are left as they are.
pub fn to_dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 1u32;
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    next = digits.parse::<u32>().map_or(next, |n| n + 1);
                    out.push_str(&digits);
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_dollars_outside_quotes() {
        assert_eq!(
            to_dollar_placeholders("SELECT a FROM t WHERE b = ?1 AND c = ?2 OR d = ?1"),
            "SELECT a FROM t WHERE b = $1 AND c = $2 OR d = $1"
        );
        assert_eq!(
            to_dollar_placeholders("INSERT INTO t VALUES (?, ?, '?', \"q?\")"),
            "INSERT INTO t VALUES ($1, $2, '?', \"q?\")"
        );
        assert_eq!(to_dollar_placeholders("x < ?12"), "x < $12");
    }

    #[test]
    fn columns_are_taken_with_their_type_checked() {
        let mut r = Row::new(vec![
            Value::Int(7),
            Value::Text("a".into()),
            Value::Null,
            Value::Blob(vec![1]),
        ]);
        assert_eq!(r.get::<i64>(0).unwrap(), 7);
        assert_eq!(r.get::<String>(1).unwrap(), "a");
        assert_eq!(r.get::<Option<String>>(2).unwrap(), None);
        assert_eq!(r.get::<Vec<u8>>(3).unwrap(), vec![1]);
        assert!(matches!(
            Row::new(vec![Value::Text("x".into())]).get::<i64>(0),
            Err(StoreError::Corrupt(_))
        ));
        assert!(Row::new(vec![]).get::<i64>(0).is_err());
    }
}
