//! Expressions over an event: handler filters and computed values, in CEL.
//!
//! [CEL](https://github.com/google/cel-spec) (the Common Expression Language of Kubernetes
//! admission rules and Envoy) is small, side-effect free and always terminates, so it is safe to
//! evaluate in the daemon for every event. The variables are the fields of the event
//! (`instance`, `old`, `sender`, `op`, `created`, `update_fields`, `actor`, …):
//!
//! ```
//! use post_save::testing::Expr;
//! let filter = Expr::compile(r#"instance.status == "paid" && instance.total > 100"#).unwrap();
//! # let _ = filter;
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::Value;

use crate::event::{EVENT_FIELDS, SaveEvent};

/// Whether an expression or a template may use `name`: a field of the event, or `event` for the
/// whole event.
pub(crate) fn is_event_variable(name: &str) -> bool {
    name == "event" || EVENT_FIELDS.contains(&name)
}

/// The names an expression or a template may use, for error messages.
pub(crate) fn event_variables() -> String {
    format!("{}, event", EVENT_FIELDS.join(", "))
}

/// A compiled CEL expression.
#[derive(Debug, Clone)]
pub struct Expr {
    source: String,
    program: Arc<Program>,
}

/// Why an expression could not be evaluated.
#[derive(Debug, thiserror::Error)]
#[error("`{source_text}`: {message}")]
pub struct ExprError {
    source_text: String,
    message: String,
}

impl Expr {
    /// Parses `source`; also rejects variables that are not fields of the event, so a typo in a
    /// filter fails at `config check` rather than on every event.
    pub fn compile(source: &str) -> Result<Expr, String> {
        // The CEL parser (antlr) panics on some truncated inputs instead of returning an error.
        let parsed = std::panic::catch_unwind(|| Program::compile(source))
            .map_err(|_| "invalid CEL expression: the parser gave up (is it complete?)".to_owned())?;
        let program = parsed.map_err(|e| format!("invalid CEL expression: {e}"))?;
        let refs = program.references();
        let mut unknown: Vec<&str> = refs.variables().into_iter().filter(|v| !is_event_variable(v)).collect();
        unknown.sort_unstable();
        unknown.dedup();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable(s) {}; an expression sees the event's fields: {}",
                unknown.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", "),
                event_variables()
            ));
        }
        Ok(Expr { source: source.to_owned(), program: Arc::new(program) })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression over `event`.
    pub fn eval(&self, event: &EventContext) -> Result<Value, ExprError> {
        let value = self.program.execute(&event.cel).map_err(|e| self.error(e.to_string()))?;
        Ok(cel_to_json(&value))
    }

    /// Evaluates a filter: it must yield a boolean.
    pub fn matches(&self, event: &EventContext) -> Result<bool, ExprError> {
        match self.program.execute(&event.cel).map_err(|e| self.error(e.to_string()))? {
            Cel::Bool(b) => Ok(b),
            other => Err(self.error(format!("a filter must be true or false, got {}", cel_to_json(&other)))),
        }
    }

    fn error(&self, message: String) -> ExprError {
        ExprError { source_text: self.source.clone(), message }
    }
}

/// An event prepared once for the expressions and templates evaluated over it.
pub struct EventContext {
    json: Value,
    cel: Context<'static>,
}

impl EventContext {
    /// Prepares `event`.
    pub fn new(event: &SaveEvent) -> Self {
        let json = serde_json::to_value(event).unwrap_or(Value::Null);
        let mut cel = Context::default();
        if let Value::Object(fields) = &json {
            for (k, v) in fields {
                cel.add_variable_from_value(k.clone(), json_to_cel(v));
            }
        }
        cel.add_variable_from_value("event", json_to_cel(&json));
        EventContext { json, cel }
    }

    /// The event as JSON (the object handlers receive).
    pub fn json(&self) -> &Value {
        &self.json
    }
}

/// JSON to CEL. Integers stay integers; numbers JSON cannot hold exactly arrive as strings
/// already (see `event::exact_numbers`), other numbers become doubles.
pub fn json_to_cel(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Cel::Int(i)
            } else if let Some(u) = n.as_u64() {
                Cel::UInt(u)
            } else {
                n.as_f64().map_or_else(|| Cel::String(Arc::new(n.to_string())), Cel::Float)
            }
        }
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(map) => {
            let m: HashMap<String, Cel> = map.iter().map(|(k, v)| (k.clone(), json_to_cel(v))).collect();
            Cel::from(m)
        }
    }
}

/// CEL to JSON (durations and timestamps as strings).
pub fn cel_to_json(value: &Cel) -> Value {
    match value {
        Cel::Null => Value::Null,
        Cel::Bool(b) => Value::Bool(*b),
        Cel::Int(i) => Value::from(*i),
        Cel::UInt(u) => Value::from(*u),
        Cel::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Cel::String(s) => Value::String(s.to_string()),
        Cel::List(items) => Value::Array(items.iter().map(cel_to_json).collect()),
        Cel::Map(m) => Value::Object(m.map.iter().map(|(k, v)| (key_text(k), cel_to_json(v))).collect()),
        Cel::Bytes(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        other => Value::String(format!("{other:?}")),
    }
}

fn key_text(key: &cel_interpreter::objects::Key) -> String {
    use cel_interpreter::objects::Key;
    match key {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> SaveEvent {
        serde_json::from_value(serde_json::json!({
            "id": 7, "signal": "post_save", "sender": "public.shop_order", "op": "insert",
            "created": true, "pk": {"id": 1},
            "instance": {"id": 1, "status": "paid", "total": 120, "big": "9007199254740993"},
            "old": null, "update_fields": null, "raw": false, "using": "shop", "txid": 5,
            "at": "2026-11-25T00:00:00Z",
            "actor": {"role": "app", "application_name": "psql", "client_addr": null, "pid": 1, "actor": null},
            "origin": null
        }))
        .unwrap()
    }

    #[test]
    fn filters_over_instance() {
        let ctx = EventContext::new(&event());
        assert!(Expr::compile(r#"instance.status == "paid" && instance.total > 100"#).unwrap().matches(&ctx).unwrap());
        assert!(!Expr::compile("instance.total > 200").unwrap().matches(&ctx).unwrap());
        assert!(Expr::compile(r#"created && sender == "public.shop_order""#).unwrap().matches(&ctx).unwrap());
    }

    #[test]
    fn values_keep_their_type() {
        let ctx = EventContext::new(&event());
        assert_eq!(Expr::compile("instance.id").unwrap().eval(&ctx).unwrap(), serde_json::json!(1));
        assert_eq!(Expr::compile("instance.big").unwrap().eval(&ctx).unwrap(), serde_json::json!("9007199254740993"));
    }

    #[test]
    fn unknown_variables_and_bad_syntax_fail_at_compile_time() {
        let e = Expr::compile("instanse.status == 1").unwrap_err();
        assert!(e.contains("`instanse`"), "{e}");
        assert!(Expr::compile("instance.status ==").is_err());
    }

    #[test]
    fn a_non_boolean_filter_is_an_error() {
        let ctx = EventContext::new(&event());
        let e = Expr::compile("instance.total").unwrap().matches(&ctx).unwrap_err();
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_match() {
        let ctx = EventContext::new(&event());
        assert!(Expr::compile("instance.nope == 1").unwrap().matches(&ctx).is_err());
    }
}
