//! The database's types as the WAL capture needs them: how each column's values become the JSON
//! `row_to_json` writes ([`Shape`]: which type a domain stands for, what an array holds and how
//! its text separates elements, a composite's attributes), and which types were made after
//! `initdb`. Read once per session and again when a relation names a type not read yet: never
//! per row.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::pgoutput::{Relation, Shape};

/// The first OID of objects made after `initdb`: every type below it is built in.
pub(crate) const FIRST_NORMAL_OID: u32 = 16_384;

/// Kind, domain base, array element and delimiter of the types values can have.
const TYPES: &str = include_str!("../../../sql/wal_types.sql");
/// The attributes of the composites values can hold.
const COMPOSITES: &str = include_str!("../../../sql/wal_composites.sql");

/// How deep types may nest (a domain over an array of a composite…) before the rest is text:
/// PostgreSQL forbids a composite that contains itself, this only guards against a catalog
/// read mid-change.
const MAX_DEPTH: usize = 32;

/// The shapes of the database's types, as far as values are concerned.
#[derive(Default)]
pub(crate) struct UserTypes {
    /// Arrays, domains and composites (built-in or not): how their values become JSON.
    shapes: HashMap<u32, Shape>,
    /// Types made after `initdb` whose shape is complete (a composite only once its
    /// attributes were read).
    known: HashSet<u32>,
}

/// One `pg_type` row, as far as shapes go.
struct TypeRow {
    kind: u8,
    base: u32,
    element: u32,
    delimiter: char,
}

impl UserTypes {
    /// How the values of type `oid` (as a relation message names it) become JSON.
    pub(crate) fn shape(&self, oid: u32) -> Shape {
        self.shapes.get(&oid).cloned().unwrap_or_else(|| Shape::scalar(oid))
    }

    /// Whether `rel` has a column of a type made (or first used as a column) after the types
    /// were read.
    pub(crate) fn unknown_in(&self, rel: &Relation) -> bool {
        rel.columns.iter().any(|c| c.type_oid >= FIRST_NORMAL_OID && !self.known.contains(&c.type_oid))
    }

    /// Reads every type made after `initdb`, every array type, and the attributes of every
    /// composite a column, a domain or another composite uses (not every table's row type:
    /// a database of many tables would send all their columns).
    pub(crate) async fn load(client: &tokio_postgres::Client) -> Result<UserTypes, tokio_postgres::Error> {
        let rows = client.query(TYPES, &[]).await?;
        let oid = |v: i64| u32::try_from(v).unwrap_or(0);
        let types: HashMap<u32, TypeRow> = rows
            .iter()
            .map(|r| {
                let kind = r.get::<_, String>(1).bytes().next().unwrap_or(b'b');
                let delimiter = r.get::<_, String>(4).chars().next().unwrap_or(',');
                (oid(r.get(0)), TypeRow { kind, base: oid(r.get(2)), element: oid(r.get(3)), delimiter })
            })
            .collect();
        let rows = client.query(COMPOSITES, &[]).await?;
        let mut attributes: HashMap<u32, Vec<(String, u32)>> = HashMap::new();
        for r in &rows {
            attributes.entry(oid(r.get(0))).or_default().push((r.get(1), oid(r.get(2))));
        }
        Ok(UserTypes::build(&types, &attributes))
    }

    /// The shapes of `types`, each resolved through domains, arrays and composites.
    fn build(types: &HashMap<u32, TypeRow>, attributes: &HashMap<u32, Vec<(String, u32)>>) -> UserTypes {
        let mut resolver = Resolver { types, attributes, done: HashMap::new() };
        let mut user = UserTypes::default();
        for (&oid, row) in types {
            let (shape, complete) = resolver.resolve(oid, 0);
            if row.kind == b'd' || row.kind == b'c' || row.element != 0 {
                user.shapes.insert(oid, shape);
            }
            if complete && oid >= FIRST_NORMAL_OID {
                user.known.insert(oid);
            }
        }
        user
    }
}

/// Resolves shapes, each type once.
struct Resolver<'a> {
    types: &'a HashMap<u32, TypeRow>,
    attributes: &'a HashMap<u32, Vec<(String, u32)>>,
    /// Shape and whether it is complete, by type.
    done: HashMap<u32, (Shape, bool)>,
}

impl Resolver<'_> {
    fn resolve(&mut self, oid: u32, depth: usize) -> (Shape, bool) {
        if let Some(done) = self.done.get(&oid) {
            return done.clone();
        }
        let resolved = match self.types.get(&oid) {
            _ if depth > MAX_DEPTH => (Shape::Text, false),
            None => (Shape::scalar(oid), oid < FIRST_NORMAL_OID),
            // row_to_json looks through a domain to its base type
            Some(t) if t.kind == b'd' => self.resolve(t.base, depth + 1),
            Some(t) if t.element != 0 => {
                // the element type's delimiter separates the array's elements
                let delimiter = self.types.get(&t.element).map_or(',', |e| e.delimiter);
                let (element, complete) = self.resolve(t.element, depth + 1);
                (Shape::Array { element: Arc::new(element), delimiter }, complete)
            }
            Some(t) if t.kind == b'c' => self.composite(oid, depth),
            // enums, ranges, multiranges, extension base types: their text
            Some(_) => (Shape::scalar(oid), true),
        };
        self.done.insert(oid, resolved.clone());
        resolved
    }

    /// A composite's shape; incomplete (its text) when its attributes were not read, as for a
    /// table's row type no column used when the types were read.
    fn composite(&mut self, oid: u32, depth: usize) -> (Shape, bool) {
        let Some(attributes) = self.attributes.get(&oid) else { return (Shape::Text, false) };
        let mut complete = true;
        let mut fields = Vec::with_capacity(attributes.len());
        for (name, type_oid) in attributes {
            let (shape, done) = self.resolve(*type_oid, depth + 1);
            complete &= done;
            fields.push((name.clone(), shape));
        }
        (Shape::Composite(Arc::from(fields)), complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: u8, base: u32, element: u32) -> TypeRow {
        TypeRow { kind, base, element, delimiter: ',' }
    }

    #[test]
    fn domains_arrays_and_composites_resolve_to_shapes() {
        let (int4, mood, posint, posints, intarr, intarrs, pair, pairs, pairdom, table) =
            (23, 16_400, 16_401, 16_402, 16_403, 16_404, 16_405, 16_406, 16_407, 16_408);
        let mut types = HashMap::new();
        types.insert(1007, row(b'b', 0, int4));
        types.insert(1020, row(b'b', 0, 603));
        types.insert(603, TypeRow { kind: b'b', base: 0, element: 0, delimiter: ';' });
        types.insert(mood, row(b'e', 0, 0));
        types.insert(16_410, row(b'b', 0, mood));
        types.insert(posint, row(b'd', int4, 0));
        types.insert(posints, row(b'b', 0, posint));
        types.insert(intarr, row(b'd', 1007, 0));
        types.insert(intarrs, row(b'b', 0, intarr));
        types.insert(pair, row(b'c', 0, 0));
        types.insert(pairs, row(b'b', 0, pair));
        types.insert(pairdom, row(b'd', pair, 0));
        types.insert(table, row(b'c', 0, 0));
        let attributes = HashMap::from([(pair, vec![("a".to_owned(), posint), ("m".to_owned(), 16_410)])]);
        let user = UserTypes::build(&types, &attributes);
        let array = |element: Shape, delimiter| Shape::Array { element: Arc::new(element), delimiter };
        let ints = array(Shape::Number, ',');
        let pair_shape = Shape::Composite(Arc::from(vec![
            ("a".to_owned(), Shape::Number),
            ("m".to_owned(), array(Shape::Text, ',')),
        ]));
        assert_eq!(user.shape(1007), ints);
        assert_eq!(user.shape(1020), array(Shape::Text, ';'), "box[] separates with ;");
        assert_eq!(user.shape(16_410), array(Shape::Text, ','), "an enum array");
        assert_eq!(user.shape(posint), Shape::Number);
        assert_eq!(user.shape(posints), ints);
        assert_eq!(user.shape(intarrs), array(ints.clone(), ','), "an array of a domain over int[]");
        assert_eq!(user.shape(pairdom), pair_shape, "a domain over a composite");
        assert_eq!(user.shape(pairs), array(pair_shape, ','));
        assert_eq!(user.shape(mood), Shape::Text);
        assert_eq!(user.shape(int4), Shape::Number, "built-in scalars need no row");
        for known in [mood, posint, posints, intarr, intarrs, pair, pairs, pairdom] {
            assert!(user.known.contains(&known), "{known} is known");
        }
        assert!(!user.known.contains(&table), "a row type whose attributes were not read is read again when used");
    }
}
