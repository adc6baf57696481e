//! The capture trigger function, kept in `sql/capture.sql`.

/// The SQL of this migration.
pub fn migration() -> String {
    include_str!("../sql/capture.sql").to_string()
}
