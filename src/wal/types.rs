//! The database's own types as the WAL capture needs them: which type a domain stands for, and
//! which types were made after `initdb`.

use std::collections::{HashMap, HashSet};

use super::pgoutput::Relation;

/// The first OID of objects made after `initdb`: every type below it is built in.
pub(crate) const FIRST_NORMAL_OID: u32 = 16_384;

/// The database's own types as far as values are concerned: a domain's values are written as
/// its base type's (as `row_to_json` does), an array of a domain's as an array of the base type.
#[derive(Default)]
pub(crate) struct UserTypes {
    /// Domain (or array of a domain) → the built-in or other non-domain type it stands for.
    pub(crate) base: HashMap<u32, u32>,
    /// Types made after `initdb` that are not domains (enums, composites, ranges…): their text.
    pub(crate) other: HashSet<u32>,
}

impl UserTypes {
    pub(crate) fn base(&self, oid: u32) -> u32 {
        self.base.get(&oid).copied().unwrap_or(oid)
    }

    /// Whether `rel` has a column of a type made after the types were read.
    pub(crate) fn unknown_in(&self, rel: &Relation) -> bool {
        rel.columns.iter().any(|c| {
            c.type_oid >= FIRST_NORMAL_OID && !self.base.contains_key(&c.type_oid) && !self.other.contains(&c.type_oid)
        })
    }

    /// Reads every domain's base type (through domains over domains) and every other type made
    /// after `initdb`.
    pub(crate) async fn load(client: &tokio_postgres::Client) -> Result<UserTypes, tokio_postgres::Error> {
        let rows = client
            .query(
                "WITH RECURSIVE chain (domain, base) AS ( \
                     SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd' \
                     UNION ALL \
                     SELECT c.domain, t.typbasetype FROM chain c JOIN pg_type t ON t.oid = c.base \
                     WHERE t.typtype = 'd') \
                 SELECT c.domain::int8, c.base::int8 FROM chain c JOIN pg_type b ON b.oid = c.base \
                 WHERE b.typtype <> 'd' \
                 UNION ALL \
                 SELECT d.typarray::int8, b.typarray::int8 FROM chain c \
                 JOIN pg_type b ON b.oid = c.base AND b.typtype <> 'd' JOIN pg_type d ON d.oid = c.domain \
                 WHERE d.typarray <> 0 AND b.typarray <> 0",
                &[],
            )
            .await?;
        let oid = |v: i64| u32::try_from(v).unwrap_or(0);
        let base: HashMap<u32, u32> = rows.iter().map(|r| (oid(r.get(0)), oid(r.get(1)))).collect();
        let other = client
            .query("SELECT oid::int8 FROM pg_type WHERE oid >= 16384 AND typtype <> 'd'", &[])
            .await?
            .iter()
            .map(|r| oid(r.get(0)))
            .filter(|o| !base.contains_key(o))
            .collect();
        Ok(UserTypes { base, other })
    }
}
