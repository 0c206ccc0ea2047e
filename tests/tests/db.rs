//! The replicated database tier in the stack lab, on real MariaDB: server1's node
//! the first primary, server2's its semi-synchronous replica, the application
//! reaching them through the balancer's full-NAT write and read VIPs. Writes
//! replicate, reads come from the replica, a client reads its own writes, a crashed
//! primary loses no acknowledged write and comes back as a replica, and when the
//! primary had fallen back to asynchronous replication the pair says so, does not
//! promote by itself, and refuses the old primary's diverged data.

use std::{path::Path, time::Duration};

use serde_json::Value;
use tests::{
    e2e::one_at_a_time,
    lab::{Lab, LabSpec, web_addr},
    process::wait_until,
    stack::SITE,
};

/// A stack lab with its balancer running and the site ready.
fn stack_lab(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::stack_for_test(tag));
    lab.start_agent();
    lab.wait_for_backends_up();
    lab
}

fn agent(lab: &Lab, i: usize, path: &str) -> (u16, String) {
    lab.db_agent(i, path)
}

fn status(lab: &Lab, i: usize) -> Value {
    serde_json::from_str(&agent(lab, i, "/status").1).unwrap_or(Value::Null)
}

fn wait_role(lab: &Lab, i: usize, role: &str, limit: Duration) {
    let started = std::time::Instant::now();
    while !lab.db_role_is(i, role) {
        assert!(
            started.elapsed() < limit,
            "db{} not {role} within {limit:?}: {}\n{}",
            i + 1,
            status(lab, i),
            {
                let log = lab.log(&lab.server_name(i), "db");
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(25)..].join("\n")
            }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sql(lab: &Lab, i: usize, query: &str) -> String {
    lab.db_sql(i, query).unwrap_or_else(|e| panic!("{e}"))
}

/// Posts `text` through the site; its id if acknowledged.
fn post(lab: &Lab, text: &str, cookies: Option<&Path>) -> Option<u64> {
    let jar = cookies.map(|p| p.display().to_string());
    let extra: Vec<&str> = match &jar {
        Some(jar) => vec!["-c", jar, "-b", jar],
        None => vec![],
    };
    let body = lab.post_through_site(text, &extra).ok()?;
    serde_json::from_str::<Value>(&body).ok()?["id"].as_u64()
}

/// `GET /api/posts/{id}` through the site: the HTTP status.
fn read(lab: &Lab, id: u64, cookies: Option<&Path>) -> String {
    let jar = cookies.map(|p| p.display().to_string());
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    if let Some(jar) = &jar {
        args.extend(["-b", jar]);
    }
    let url = format!("https://{SITE}/api/posts/{id}");
    args.push(&url);
    String::from_utf8_lossy(&lab.site_curl(&args).stdout).into_owned()
}

/// A counter summed over both application nodes' `/metrics`.
fn app_counter(lab: &Lab, line_start: &str) -> f64 {
    (0..2)
        .map(|i| {
            let out = lab
                .lb()
                .command("curl")
                .args(["-s", "-m", "2"])
                .arg(format!("http://{}:8000/metrics", web_addr(i)))
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with(line_start))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

/// Packets the balancer sent to `vip`'s backend on server `i`.
fn vip_packets(lab: &Lab, vip: &str, i: usize) -> u64 {
    let status: Value = serde_json::from_str(&lab.cli_ok(&["-o", "json", "status"])).unwrap();
    let address = web_addr(i).to_string();
    status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == vip)
        .flat_map(|v| v["backends"].as_array().unwrap())
        .filter(|b| {
            b["address"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{address}:")))
        })
        .map(|b| b["traffic"]["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn writes_replicate_reads_come_from_the_replica_and_a_client_reads_its_own_writes() {
    let _turn = one_at_a_time();
    let lab = stack_lab("db-repl");
    wait_role(&lab, 0, "primary", Duration::from_secs(20));
    wait_role(&lab, 1, "replica", Duration::from_secs(20));
    assert_eq!(agent(&lab, 0, "/primary").0, 200);
    assert_eq!(agent(&lab, 1, "/primary").0, 503);
    assert_eq!(agent(&lab, 1, "/replica").0, 200);
    assert_eq!(agent(&lab, 0, "/replica").0, 503);

    // A write lands on the primary, semi-synchronously, and reaches the replica.
    post(&lab, "replicated", None).expect("a post");
    let primary = status(&lab, 0);
    assert_eq!(primary["server"]["semi_sync"]["active"], true, "{primary}");
    assert_eq!(primary["server"]["semi_sync"]["clients"], 1, "{primary}");
    assert_eq!(primary["server"]["read_only"], false);
    wait_until(Duration::from_secs(10), "the post on the replica", || {
        sql(
            &lab,
            1,
            "SELECT COUNT(*) FROM foobar.posts WHERE text = 'replicated'",
        ) == "1"
    });
    assert_eq!(status(&lab, 1)["server"]["read_only"], true);

    // Reads go through the read VIP to the replica alone.
    let (to_replica, to_primary) = (
        vip_packets(&lab, "db-read", 1),
        vip_packets(&lab, "db-read", 0),
    );
    let fallbacks = app_counter(&lab, "foobar_app_db_read_fallbacks_total");
    for _ in 0..6 {
        let out = lab.site_curl(&[
            "-f",
            "-o",
            "/dev/null",
            &format!("https://{SITE}/api/posts"),
        ]);
        assert!(out.status.success());
    }
    assert!(
        vip_packets(&lab, "db-read", 1) > to_replica,
        "no read reached the replica"
    );
    assert_eq!(vip_packets(&lab, "db-read", 0), to_primary);
    assert_eq!(
        app_counter(&lab, "foobar_app_db_read_fallbacks_total"),
        fallbacks
    );

    // Read-your-writes: the replica held behind (a global read lock stops its SQL
    // thread, not its acknowledgements); a client's own post is still there for it,
    // on any node and connection, but not yet for others.
    let mut lock = lab
        .db_sql_command(1, "FLUSH TABLES WITH READ LOCK; SELECT SLEEP(4);")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("mariadb");
    std::thread::sleep(Duration::from_millis(300));
    let jar = lab.dir.join("cookies.txt");
    let id = post(&lab, "mine", Some(&jar)).expect("a post");
    for _ in 0..3 {
        assert_eq!(
            read(&lab, id, Some(&jar)),
            "200",
            "the writer misses its own write"
        );
    }
    assert_eq!(
        read(&lab, id, None),
        "404",
        "the replica was not behind: proves nothing"
    );
    assert!(
        app_counter(
            &lab,
            "foobar_app_db_read_fallbacks_total{reason=\"replica_behind\"}"
        ) >= 3.0
    );
    lock.wait().expect("the lock's session");
    wait_until(Duration::from_secs(10), "the replica catching up", || {
        read(&lab, id, None) == "200"
    });
    let metrics = agent(&lab, 0, "/metrics").1;
    for line in [
        "foobar_db_role{role=\"primary\"} 1",
        "foobar_db_semi_sync_active 1",
        "foobar_db_semi_sync_asynchronous 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(
        agent(&lab, 1, "/metrics")
            .1
            .contains("foobar_db_replication_running 1")
    );
}

#[test]
fn a_crashed_primary_loses_no_acknowledged_write_and_rejoins_as_a_replica() {
    let _turn = one_at_a_time();
    let lab = stack_lab("db-crash");
    wait_role(&lab, 0, "primary", Duration::from_secs(20));
    wait_role(&lab, 1, "replica", Duration::from_secs(20));

    // A writer through the whole site; server1 (web, application and database)
    // dies under it: MariaDB killed, the server cut off.
    let run = lab.crash_primary_under_writes(0, "w");
    let acknowledged = run.acknowledged();
    wait_role(&lab, 1, "primary", Duration::from_secs(10));
    let present = sql(
        &lab,
        1,
        "SELECT text FROM foobar.posts WHERE text LIKE 'w %'",
    );
    let present: std::collections::HashSet<&str> = present.lines().collect();
    let lost: Vec<&&str> = acknowledged
        .iter()
        .filter(|t| !present.contains(**t))
        .collect();
    eprintln!(
        "primary crash: {} writes, {} acknowledged, {} lost, write gap {:?}, promoted {:?} after the kill",
        run.writes.len(),
        acknowledged.len(),
        lost.len(),
        run.gap(),
        run.promoted,
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        run.gap().is_some(),
        "writes never resumed: {:?}",
        run.writes
    );
    let promoted = status(&lab, 1);
    assert_eq!(promoted["counters"]["promotions"], 1, "{promoted}");
    assert_eq!(promoted["server"]["read_only"], false);

    // Server1 comes back: its node restarted MariaDB read-only, and rejoins as a
    // replica of the new primary, with every acknowledged write.
    lab.reconnect_server(0);
    wait_role(&lab, 0, "replica", Duration::from_secs(30));
    let old = status(&lab, 0);
    assert_eq!(old["server"]["read_only"], true, "{old}");
    assert!(
        old["counters"]["mariadb_restarts"].as_u64() >= Some(1),
        "{old}"
    );
    wait_until(
        Duration::from_secs(20),
        "the old primary catching up",
        || {
            let rows = sql(
                &lab,
                0,
                "SELECT text FROM foobar.posts WHERE text LIKE 'w %'",
            );
            let rows: std::collections::HashSet<&str> = rows.lines().collect();
            acknowledged.iter().all(|t| rows.contains(t))
        },
    );
    wait_until(
        Duration::from_secs(10),
        "semi-sync with the new replica",
        || status(&lab, 1)["server"]["semi_sync"]["active"] == true,
    );
}

#[test]
fn an_asynchronous_primary_is_not_replaced_by_itself_and_its_diverged_data_is_refused() {
    let _turn = one_at_a_time();
    let mut lab = stack_lab("db-async");
    wait_role(&lab, 0, "primary", Duration::from_secs(20));
    wait_role(&lab, 1, "replica", Duration::from_secs(20));

    // The replica stops receiving: the next commit waits out semi-sync's timeout and
    // is acknowledged asynchronously. That state is visible and counted.
    sql(&lab, 1, "STOP SLAVE IO_THREAD");
    let asynchronous = post(&lab, "only-on-the-old-primary", None).expect("a post");
    wait_until(Duration::from_secs(5), "the fallback visible", || {
        let s = status(&lab, 0);
        s["server"]["semi_sync"]["active"] == false
            && s["server"]["semi_sync"]["enabled"] == true
            && s["server"]["semi_sync"]["fallbacks"].as_u64() >= Some(1)
    });
    let metrics = agent(&lab, 0, "/metrics").1;
    assert!(
        metrics.contains("foobar_db_semi_sync_asynchronous 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("foobar_db_semi_sync_fallbacks_total 0"),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_millis(600)); // the replica's next look at it

    // The primary goes now (its node stopped, the server cut off): the replica must
    // not promote itself. (Stopped cleanly: killed right after an asynchronous
    // commit, this MariaDB's crash recovery can refuse to start, "Missing FILE_DELETE
    // or FILE_MODIFY", which would leave nothing to refuse below.)
    lab.stop_db(0);
    lab.cut_server(0);
    wait_until(Duration::from_secs(15), "the promotion refused", || {
        !status(&lab, 1)["promotion_blocked"].is_null()
    });
    let refused = status(&lab, 1);
    assert_eq!(refused["role"], "replica", "{refused}");
    assert_eq!(refused["counters"]["promotions_refused"], 1, "{refused}");

    // Without --force, a promotion by hand is refused too; with it, it happens.
    let promote = |force: bool| {
        let mut command =
            lab.webs[1].command(&tests::process::bin(&lab.spec().bin_dir, "foobar-db"));
        command
            .args(["promote", "--config"])
            .arg(lab.db_config_path(1));
        if force {
            command.arg("--force");
        }
        command.output().expect("foobar-db promote")
    };
    let out = promote(false);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("asynchronous"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = promote(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_role(&lab, 1, "primary", Duration::from_secs(5));
    assert_eq!(
        sql(
            &lab,
            1,
            &format!("SELECT COUNT(*) FROM foobar.posts WHERE id = {asynchronous}")
        ),
        "0",
        "the write acknowledged asynchronously lives on the old primary only"
    );
    wait_until(Duration::from_secs(20), "writes on the new primary", || {
        post(&lab, "after", None).is_some()
    });

    // The old primary holds that transaction: it is refused, read-only, and says why.
    lab.reconnect_server(0);
    lab.start_db(0);
    wait_role(&lab, 0, "diverged", Duration::from_secs(30));
    let diverged = status(&lab, 0);
    let why = diverged["diverged"].as_str().unwrap_or_default();
    assert!(why.contains("0-1-") && why.contains("rebuilds"), "{why}");
    assert_eq!(diverged["server"]["read_only"], true);
    assert_eq!(agent(&lab, 0, "/replica").0, 503);
    assert_eq!(agent(&lab, 0, "/primary").0, 503);
}
