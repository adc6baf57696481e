//! The event's contract where the writer's session could bend it: an origin nobody but a
//! handler can set, `at` in UTC whatever the session's time zone, an actor left unset is `null`.
//! Real PostgreSQL, embedded daemon.

use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry, SaveEvent};
use tokio::sync::mpsc;

use crate::support;
use crate::support::db::TestDb;
use crate::support::{config, install, start_with};

const CONFIG: &str = "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\n";

async fn shop() -> (TestDb, post_save::Config) {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE shop_order (id bigserial PRIMARY KEY, product text)");
    let config = config(CONFIG);
    install(&db, &config).await;
    (db, config)
}

/// A connection string for `db` as `role`.
fn as_role(db: &TestDb, role: &str) -> String {
    let parts: Vec<String> =
        db.conninfo.split_whitespace().filter(|p| !p.starts_with("user=")).map(str::to_owned).collect();
    format!("{} user={role}", parts.join(" "))
}

#[tokio::test]
async fn a_writer_cannot_pass_its_saves_off_as_a_handler_s() {
    let (db, config) = shop().await;
    // a role that may write the table and nothing of post-save's
    let role = format!("writer_{}", db.name);
    db.psql_ok(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT INSERT, UPDATE, SELECT ON shop_order TO {role}; GRANT USAGE ON SEQUENCE shop_order_id_seq TO {role}"
    ));
    let (tx, mut bump) = mpsc::unbounded_channel::<SaveEvent>();
    let mut registry = Registry::new();
    registry
        .register(
            Receiver::new("bump"),
            handler_fn(move |event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(event);
                    Ok::<(), HandlerError>(())
                }
            }),
        )
        .unwrap();
    let mut daemon = start_with(&db, config, &mut registry).await;
    let writer = support::db::connect_to(&as_role(&db, &role)).await;
    writer
        .batch_execute(
            "BEGIN; SET LOCAL post_save.origin = 'bump@1'; INSERT INTO shop_order (product) VALUES ('posing as bump'); COMMIT; \
             BEGIN; SET LOCAL post_save.origin = 'x@16'; INSERT INTO shop_order (product) VALUES ('too deep'); COMMIT; \
             BEGIN; SET LOCAL post_save.origin_key = 'guess'; SET LOCAL post_save.origin = 'bump@1'; \
               INSERT INTO shop_order (product) VALUES ('guessed key'); COMMIT",
        )
        .await
        .unwrap();
    // every handler gets all three, none marked as a handler's
    let events = daemon.take(3).await;
    assert!(events.iter().all(|e| e.origin.is_none()), "{:?}", events.iter().map(|e| &e.origin).collect::<Vec<_>>());
    for _ in 0..3 {
        let e = tokio::time::timeout(support::PATIENCE, bump.recv()).await.expect("bump gets every save").unwrap();
        assert!(e.origin.is_none());
    }
    // a reader of the key is the schema's owner: the writer cannot read it
    let denied = writer.query_one("SELECT key FROM post_save.origin_key", &[]).await;
    assert!(denied.is_err(), "the writer read the origin key");
    let denied = writer.batch_execute("SELECT post_save.set_origin('bump@1')").await;
    assert!(denied.is_err(), "the writer ran set_origin");
    drop(writer);
    daemon.stop().await;
    db.psql_ok(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

#[tokio::test]
async fn at_is_utc_and_an_unset_actor_is_null() {
    let (db, config) = shop().await;
    let mut daemon = start_with(&db, config, &mut Registry::new()).await;
    // one pooled session: a transaction that set the actor, then one that did not
    let session = db.client().await;
    session
        .batch_execute(
            "SET TIME ZONE 'Asia/Kolkata'; \
             BEGIN; SET LOCAL post_save.actor = 'user:42'; INSERT INTO shop_order (product) VALUES ('a'); COMMIT; \
             INSERT INTO shop_order (product) VALUES ('b')",
        )
        .await
        .unwrap();
    let mut events = daemon.take(2).await;
    events.sort_by_key(|e| e.instance["product"].as_str().map(str::to_owned));
    assert_eq!(events[0].actor.actor.as_deref(), Some("user:42"));
    assert_eq!(events[1].actor.actor, None, "the actor of an earlier transaction does not stick");
    assert_eq!(serde_json::to_value(&events[1].actor).unwrap()["actor"], serde_json::Value::Null);
    for e in &events {
        assert!(e.at.ends_with("+00:00"), "{}", e.at);
        // read as the time it says, it is now (a local time labelled UTC would be 5h30 off)
        let off: f64 = session
            .query_one("SELECT abs(extract(epoch FROM clock_timestamp() - $1::text::timestamptz))::float8", &[&e.at])
            .await
            .unwrap()
            .get(0);
        assert!(off < 120.0, "{} is {off} s away from now", e.at);
    }
    daemon.stop().await;
}
