//! foobar-app on a real MariaDB (run by foobar-db) in a namespace of its own: the
//! API's answers and validation, and its behaviour while the database is away.

use std::time::{Duration, Instant};

use tests::{lab::wait_until, nodes::Sandbox};

const APP: &str = "http://127.0.0.1:8000";

fn stack(tag: &str) -> Sandbox {
    let mut s = Sandbox::new(tag);
    let password = s.write("app.password", "app-secret\n");
    let state = s.path("db");
    let db = format!(
        "name = \"db1\"\nserver_id = 1\nlisten = \"127.0.0.1:3306\"\nhttp = \"127.0.0.1:8306\"\nstate_dir = \"{}\"\n\
         [app]\ndatabase = \"foobar\"\nuser = \"foobar\"\npassword_file = \"{}\"\nallow_from = \"127.0.0.1\"\n",
        state.display(),
        password.display()
    );
    let db_config = s.write("db.toml", &db);
    s.start(
        "db",
        "foobar-db",
        &["run", "--config", db_config.to_str().unwrap()],
    );
    let app = format!(
        "listen = \"127.0.0.1:8000\"\nname = \"app1\"\n[database]\nwrite = \"127.0.0.1:3306\"\nuser = \"foobar\"\n\
         password_file = \"{}\"\nconnect_timeout_ms = 500\nquery_timeout_ms = 1000\n",
        password.display()
    );
    s.start_node("app", "foobar-app", &app, &format!("{APP}/healthz"));
    let started = Instant::now();
    while !healthy(&s) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the application never reached its database:\napp: {}\ndb: {}",
            s.log("app"),
            s.log("db")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

fn healthy(s: &Sandbox) -> bool {
    s.fetch(&[&format!("{APP}/healthz")]).0 == 200
}

fn post(s: &Sandbox, body: &str) -> (u16, String) {
    let (code, _, body) = s.fetch(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &format!("{APP}/api/posts"),
    ]);
    (code, body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn the_api_stores_lists_and_validates_posts() {
    let s = stack("app-api");
    let (code, body) = post(&s, r#"{"author":"ann","text":"first post"}"#);
    assert_eq!(code, 201, "{body}");
    let first = json(&body);
    let id = first["id"].as_u64().unwrap();
    assert_eq!(first["author"], "ann");
    let (code, headers, body) = s.fetch(&[&format!("{APP}/api/posts/{id}")]);
    assert_eq!((code, json(&body)), (200, first.clone()), "{headers}");
    assert!(
        headers.to_ascii_lowercase().contains("x-served-by: app1"),
        "{headers}"
    );

    // Parameterised: what looks like SQL is only text.
    let sneaky = r#"{"author":"x'); DROP TABLE posts; --","text":"ünïcødé ✓\nsecond line"}"#;
    let (code, body) = post(&s, sneaky);
    assert_eq!(code, 201, "{body}");
    assert_eq!(json(&body)["author"], "x'); DROP TABLE posts; --");
    for n in 0..3 {
        assert_eq!(
            post(&s, &format!(r#"{{"author":"bot","text":"n{n}"}}"#)).0,
            201
        );
    }
    // Newest first, paged by `before`.
    let page = json(&s.fetch(&[&format!("{APP}/api/posts?limit=2")]).2);
    let texts: Vec<&str> = page["posts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["n2", "n1"]);
    let next = page["next_before"].as_u64().unwrap();
    let page = json(
        &s.fetch(&[&format!("{APP}/api/posts?limit=10&before={next}")])
            .2,
    );
    assert_eq!(page["posts"].as_array().unwrap().len(), 3);
    assert!(page["next_before"].is_null());

    // Refusals: 400 with the field at fault, and nothing stored.
    let long = "x".repeat(2001);
    for (body, field) in [
        (r#"{"text":"no author"}"#.to_owned(), "author"),
        (r#"{"author":"ann"}"#.to_owned(), "text"),
        (r#"{"author":"","text":"x"}"#.to_owned(), "author"),
        (format!(r#"{{"author":"ann","text":"{long}"}}"#), "text"),
        (r#"{"author":"a\u0007b","text":"x"}"#.to_owned(), "author"),
        (r#"{"author":1,"text":"x"}"#.to_owned(), "author"),
        (
            r#"{"author":"a","text":"x","admin":true}"#.to_owned(),
            "admin",
        ),
        (r#"{"author":"a","#.to_owned(), "(body)"),
        ("[]".to_owned(), "(body)"),
    ] {
        let (code, answer) = post(&s, &body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert_eq!(json(&answer)["field"], field, "{body}: {answer}");
    }
    // Bytes that are not UTF-8 inside a string.
    let invalid = s.write("invalid.json", "");
    std::fs::write(&invalid, b"{\"author\":\"a\xff\",\"text\":\"x\"}").unwrap();
    let (code, _, answer) = s.fetch(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", invalid.display()),
        &format!("{APP}/api/posts"),
    ]);
    assert_eq!(code, 400, "{answer}");
    let (code, _, _) = s.fetch(&[
        "-H",
        "Content-Type: text/plain",
        "-d",
        "{}",
        &format!("{APP}/api/posts"),
    ]);
    assert_eq!(code, 415);
    let big = s.write(
        "big.json",
        &format!(r#"{{"author":"a","text":"{}"}}"#, "y".repeat(70_000)),
    );
    let (code, _, _) = s.fetch(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{APP}/api/posts"),
    ]);
    assert_eq!(code, 413);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("before=x", "before"),
        ("colour=red", "colour"),
    ] {
        let (code, _, answer) = s.fetch(&[&format!("{APP}/api/posts?{query}")]);
        assert_eq!(
            (code, json(&answer)["field"].as_str()),
            (400, Some(field)),
            "{query}"
        );
    }
    let (code, _, answer) = s.fetch(&[&format!("{APP}/api/posts/abc")]);
    assert_eq!((code, json(&answer)["field"].as_str()), (400, Some("id")));
    assert_eq!(s.fetch(&[&format!("{APP}/api/posts/999999")]).0, 404);
    let all = json(&s.fetch(&[&format!("{APP}/api/posts?limit=100")]).2);
    assert_eq!(
        all["posts"].as_array().unwrap().len(),
        5,
        "refusals stored nothing"
    );
}

#[test]
fn with_the_database_away_it_answers_503_at_once_and_recovers_by_itself() {
    let mut s = stack("app-db-away");
    assert_eq!(post(&s, r#"{"author":"ann","text":"before"}"#).0, 201);
    s.stop("db");
    wait_until(
        Duration::from_secs(5),
        "/healthz to report the database down",
        || !healthy(&s),
    );
    for _ in 0..5 {
        let started = Instant::now();
        let (code, body) = post(&s, r#"{"author":"ann","text":"during"}"#);
        assert_eq!(code, 503, "{body}");
        assert!(
            json(&body)["error"].as_str().unwrap().contains("database"),
            "{body}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        let (code, _, _) = s.fetch(&[&format!("{APP}/api/posts")]);
        assert_eq!(code, 503);
    }
    let health = json(&s.fetch(&[&format!("{APP}/healthz")]).2);
    assert_eq!(health["write"], false);

    let config = s.path("db.toml");
    s.start(
        "db",
        "foobar-db",
        &["run", "--config", config.to_str().unwrap()],
    );
    wait_until(
        Duration::from_secs(30),
        "the application to recover",
        || healthy(&s),
    );
    assert_eq!(post(&s, r#"{"author":"ann","text":"after"}"#).0, 201);
    let all = json(&s.fetch(&[&format!("{APP}/api/posts")]).2);
    let texts: Vec<&str> = all["posts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["after", "before"]);
    assert!(s.log("app").contains("database down"), "{}", s.log("app"));
}
