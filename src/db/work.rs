//! The daemon's working connection: ledger reads, acknowledgements, dead letters, the lease.
//!
//! Its hot statements are prepared once (a query by text would be parsed and planned on every
//! call), unless it goes through a transaction pooler (`database.listen_url` is set): a prepared
//! statement lives on one server connection, which such a pooler does not keep for a client
//! between transactions. Every statement is then sent with its parameter types, unnamed, in one
//! round trip. The other statements on this connection are always sent so: they run seldom, and
//! so save a round trip.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

/// A statement's parameter and its type, as `query_typed` takes them.
pub(crate) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// A connection and the statements prepared on it.
pub(crate) struct Work {
    pub client: Client,
    /// The hot statements by their text; `None` through a pooler.
    prepared: Option<Vec<(&'static str, Statement)>>,
}

impl Work {
    /// Prepares `hot` on `client`, unless it goes through a pooler (`pooled`).
    pub(crate) async fn new(client: Client, pooled: bool, hot: &[&'static str]) -> Result<Work, tokio_postgres::Error> {
        let prepared = if pooled {
            None
        } else {
            let mut prepared = Vec::with_capacity(hot.len());
            for text in hot {
                prepared.push((*text, client.prepare(text).await?));
            }
            Some(prepared)
        };
        Ok(Work { client, prepared })
    }

    /// The prepared statement of `text`, if it is one of the hot ones and they are prepared.
    fn statement(&self, text: &str) -> Option<&Statement> {
        let prepared = self.prepared.as_ref()?;
        prepared.iter().find(|(hot, _)| std::ptr::eq(*hot, text) || *hot == text).map(|(_, s)| s)
    }

    /// Runs `text` with `params`: prepared when it is hot, else by its text with the types.
    pub(crate) async fn query(&self, text: &str, params: &[Param<'_>]) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.statement(text) {
            Some(statement) => self.client.query(statement, &values(params)).await,
            None => self.client.query_typed(text, params).await,
        }
    }

    /// As [`Work::query`], for a statement that returns no rows: the rows it changed.
    pub(crate) async fn execute(&self, text: &str, params: &[Param<'_>]) -> Result<u64, tokio_postgres::Error> {
        match self.statement(text) {
            Some(statement) => self.client.execute(statement, &values(params)).await,
            None => self.client.execute_typed(text, params).await,
        }
    }
}

fn values<'a>(params: &[Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|(v, _)| *v).collect()
}
