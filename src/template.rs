//! Templates over an event (subjects, keys, routing keys, task arguments, mail subjects and
//! bodies), in Jinja syntax with [minijinja]: `shop.{{ sender }}.{{ op }}`,
//! `New order for {{ instance.product }}`.
//!
//! One engine for every handler kind. A template is compiled when the config is read, so a
//! syntax error or a name that is not a field of the event fails `config check`; a field
//! missing from one event (`instance.nope`) is an error at render time, never an empty string.

use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior, Value as Jinja};
use serde_json::Value;

use crate::expr::{EventContext, event_variables, is_event_variable};

const NAME: &str = "t";

/// A compiled template.
#[derive(Clone)]
pub struct Template {
    source: String,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Template").field(&self.source).finish()
    }
}

/// A template that could not be rendered for an event.
#[derive(Debug, thiserror::Error)]
#[error("template `{source_text}`: {message}")]
pub struct RenderError {
    source_text: String,
    message: String,
}

impl Template {
    /// Compiles `source`. Names other than the event's fields are rejected.
    pub fn compile(source: &str) -> Result<Template, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Values go out as they are: no HTML escaping of subjects, keys or mail bodies.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| describe(&e))?;
        let tmpl = env.get_template(NAME).map_err(|e| describe(&e))?;
        let mut unknown: Vec<String> =
            tmpl.undeclared_variables(false).into_iter().filter(|v| !is_event_variable(v)).collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable(s) {}; a template sees the event's fields: {}",
                unknown.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", "),
                event_variables()
            ));
        }
        Ok(Template { source: source.to_owned(), env: Arc::new(env) })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template for one event.
    pub fn render(&self, event: &EventContext) -> Result<String, RenderError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| self.error(&e))?;
        let mut ctx = std::collections::BTreeMap::new();
        if let Value::Object(fields) = event.json() {
            for (k, v) in fields {
                ctx.insert(k.clone(), json_to_jinja(v));
            }
        }
        ctx.insert("event".to_owned(), json_to_jinja(event.json()));
        tmpl.render(ctx).map_err(|e| self.error(&e))
    }

    fn error(&self, e: &minijinja::Error) -> RenderError {
        RenderError { source_text: self.source.clone(), message: describe(e) }
    }
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{} ({detail})", e.kind()),
        None => e.to_string(),
    }
}

/// JSON to a template value, numbers kept exact (serde_json's `arbitrary_precision` is on, so
/// numbers are converted here rather than through serde).
pub fn json_to_jinja(value: &Value) -> Jinja {
    match value {
        Value::Null => Jinja::from(()),
        Value::Bool(b) => Jinja::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Jinja::from(i)
            } else if let Some(u) = n.as_u64() {
                Jinja::from(u)
            } else {
                n.as_f64().map_or_else(|| Jinja::from(n.to_string()), Jinja::from)
            }
        }
        Value::String(s) => Jinja::from(s.as_str()),
        Value::Array(items) => Jinja::from(items.iter().map(json_to_jinja).collect::<Vec<_>>()),
        Value::Object(map) => Jinja::from_iter(map.iter().map(|(k, v)| (k.clone(), json_to_jinja(v)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SaveEvent;

    fn ctx() -> EventContext {
        let event: SaveEvent = serde_json::from_value(serde_json::json!({
            "id": 7, "signal": "post_save", "sender": "public.shop_order", "op": "insert",
            "created": true, "pk": {"id": 1},
            "instance": {"id": 1, "product": "widget <b>", "price": 12.5},
            "old": null, "update_fields": null, "raw": false, "using": "shop", "txid": 5,
            "at": "2026-11-25T00:00:00Z",
            "actor": {"role": "app", "application_name": "psql", "client_addr": null, "pid": 1, "actor": null},
            "origin": null
        }))
        .unwrap();
        EventContext::new(&event)
    }

    #[test]
    fn renders_event_fields_without_escaping() {
        let t = Template::compile("shop.{{ sender }}.{{ op }}: {{ instance.product }} {{ instance.price }}").unwrap();
        assert_eq!(t.render(&ctx()).unwrap(), "shop.public.shop_order.insert: widget <b> 12.5");
        let t = Template::compile("{{ event | tojson }}").unwrap();
        assert!(t.render(&ctx()).unwrap().contains("\"sender\":\"public.shop_order\""));
    }

    #[test]
    fn unknown_names_fail_at_compile_time_and_missing_fields_at_render_time() {
        let e = Template::compile("{{ instanse.id }}").unwrap_err();
        assert!(e.contains("`instanse`"), "{e}");
        assert!(Template::compile("{{ instance.id ").is_err());
        let t = Template::compile("{{ instance.nope }}").unwrap();
        assert!(t.render(&ctx()).is_err());
    }
}
