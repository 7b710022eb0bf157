//! Cluster mode: three gateway nodes on one PostgreSQL database — three `cardgate serve`
//! processes at their default log level, as three machines behind a load balancer would be.
//! Every guarantee of one node must hold across them, enforced by the database.
//!
//! Run when `CARDGATE_TEST_POSTGRES` names a server (`.ci/run` sets it); skipped, saying so,
//! when not.

use std::net::SocketAddr;

use cardgate::client::Client;
use cardgate_tests::harness::{
    Card, Options, Setup, class_a_bill, created_else_conflict, post, postgres_server, settle_until_final, unique_key,
};
use http::StatusCode;
use serde_json::{Value, json};

/// Three nodes of one cluster: one configuration, one database, three processes.
struct Cluster {
    setup: Setup,
    nodes: Vec<(SocketAddr, Node)>,
}

impl Cluster {
    /// `None` (and a line saying the test was skipped) without a PostgreSQL server.
    async fn start(test: &str) -> Option<Self> {
        Self::start_with(test, String::new()).await
    }

    /// With `extra` configuration.
    async fn start_with(test: &str, extra: String) -> Option<Self> {
        if postgres_server().is_none() {
            eprintln!("SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): cluster::{test}");
            return None;
        }
        let options = Options { engine: Some("postgres"), extra_toml: extra, ..Options::default() };
        // Each node binds a port of the system's choosing and says which in its log.
        let setup = Setup::create(&options, "127.0.0.1:0");
        let config = setup.dir.path().join("cardgate.toml");
        // Started together, as a cluster's nodes often are (the schema's migration is theirs to
        // agree on), then asked where they serve.
        let logs: Vec<_> = (0..3).map(|n| setup.dir.path().join(format!("node{n}.log"))).collect();
        let started: Vec<Node> = logs.iter().map(|log| Node::start(&config, log)).collect();
        let mut nodes = Vec::new();
        for (mut node, log) in started.into_iter().zip(&logs) {
            nodes.push((serving(&mut node, log).await, node));
        }
        // Probed as the hospital: the pharmacy's rate limit is the tests' to spend.
        for (port, _) in &nodes {
            until_up(&setup.client(*port, 0)).await;
        }
        Some(Self { setup, nodes })
    }

    /// A pharmacy till's client of node `n`.
    fn pharmacy(&self, n: usize) -> Client {
        self.setup.client(self.nodes[n % self.nodes.len()].0, 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_raced_on_three_nodes_settles_once() {
    let Some(cluster) = Cluster::start("one_token_raced_on_three_nodes_settles_once").await else { return };
    for round in 0..10 {
        let body = class_a_bill(&cluster.setup.token(&Card::beijing(), 120));
        let tasks: Vec<_> = (0..3)
            .map(|n| {
                let (client, body, key) = (cluster.pharmacy(n), body.clone(), unique_key("race"));
                tokio::spawn(async move { settle_until_final(&client, &key, &body).await.0 })
            })
            .collect();
        let created = created_else_conflict(tasks, "token_replayed", &format!("round {round}")).await;
        assert_eq!(created.len(), 1, "round {round}: the token settled {} times", created.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_on_two_nodes_at_once_is_one_settlement_with_one_answer() {
    let Some(cluster) =
        Cluster::start("one_idempotency_key_on_two_nodes_at_once_is_one_settlement_with_one_answer").await
    else {
        return;
    };
    for round in 0..5 {
        let (body, key) = (class_a_bill(&cluster.setup.token(&Card::beijing(), 120)), unique_key("twice"));
        let tasks: Vec<_> = (0..2)
            .map(|n| {
                let (client, body, key) = (cluster.pharmacy(n), body.clone(), key.clone());
                tokio::spawn(async move { settle_until_final(&client, &key, &body).await.0 })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            let reply = task.await.expect("task");
            assert_eq!(reply.status, StatusCode::CREATED, "round {round}: {}", reply.body);
            answers.push(reply.json());
        }
        // Later, on the third node: the same answer again.
        let later = settle_until_final(&cluster.pharmacy(2), &key, &body).await.0;
        assert_eq!(later.status, StatusCode::CREATED, "{}", later.body);
        answers.push(later.json());
        assert!(answers.iter().all(|a| *a == answers[0]), "round {round}: answers differ: {answers:?}");
        // One settlement: the receipt's id is known to every node.
        let id = answers[0]["settlement_id"].as_str().expect("id");
        for n in 0..3 {
            let reply = cardgate_tests::harness::get(&cluster.pharmacy(n), &format!("/v1/settlements/{id}")).await;
            assert_eq!(reply.status, StatusCode::OK, "node {n}: {}", reply.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_bills_of_one_card_over_three_nodes_take_what_they_take_one_by_one() {
    let Some(cluster) =
        Cluster::start("twenty_bills_of_one_card_over_three_nodes_take_what_they_take_one_by_one").await
    else {
        return;
    };
    for round in 0..2 {
        let card = Card::beijing();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (client, body, key) =
                    (cluster.pharmacy(i), class_a_bill(&cluster.setup.token(&card, 120)), unique_key("burst"));
                tokio::spawn(async move { settle_until_final(&client, &key, &body).await.0 })
            })
            .collect();
        let (mut fund, mut account) = (0, 0);
        for task in tasks {
            let reply = task.await.expect("task");
            assert_eq!(reply.status, StatusCode::CREATED, "round {round}: {}", reply.body);
            let receipt = reply.json();
            fund += receipt["fund_pay_fen"].as_i64().expect("fund");
            account += receipt["account_pay_fen"].as_i64().expect("account");
        }
        // Exactly what the same twenty bills take one after another (tests/concurrency.rs):
        // 4 x 200 yuan of deductible from the account, then 16 x (160 fund + 40 account).
        assert_eq!((fund, account), (256_000, 144_000), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_is_reversed_and_reconciled_from_any_node() {
    let Some(cluster) = Cluster::start("a_settlement_is_reversed_and_reconciled_from_any_node").await else { return };
    let card = Card::beijing();
    let receipt =
        settle_until_final(&cluster.pharmacy(0), &unique_key("rev"), &class_a_bill(&cluster.setup.token(&card, 120)))
            .await
            .0
            .json();
    let id = receipt["settlement_id"].as_str().expect("id");
    let reversal =
        post(&cluster.pharmacy(1), &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "returned" }))
            .await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
    // Reversed once: a second reversal on the third node answers the same reversal.
    let again =
        post(&cluster.pharmacy(2), &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "returned" }))
            .await;
    assert_eq!((again.status, again.json()), (StatusCode::OK, reversal.json()));
    let day = receipt["settled_at"].as_str().expect("settled_at");
    let date = cardgate::ledger::business_day(
        time::OffsetDateTime::parse(day, &time::format_description::well_known::Rfc3339)
            .expect("time")
            .unix_timestamp(),
    );
    for n in 0..3 {
        let reply =
            cardgate_tests::harness::get(&cluster.pharmacy(n), &format!("/v1/reconciliation?date={date}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let day = reply.json();
        assert_eq!((day["settled"]["count"].as_u64(), day["reversed"]["count"].as_u64()), (Some(1), Some(1)), "{day}");
        assert_eq!(day["net"]["total_fen"], 0, "{day}");
    }
}

/// What the proxy between the gateway and the database does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Passes bytes both ways.
    Up,
    /// Closes every connection and refuses new ones: the server stopped.
    Refused,
    /// Holds every connection open and passes nothing: a network that lost the server.
    Silent,
}

/// A TCP proxy in front of the database, to take it away and give it back.
struct Proxy {
    addr: SocketAddr,
    link: tokio::sync::watch::Sender<Link>,
}

impl Proxy {
    async fn start(server: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("address");
        let (link, watch) = tokio::sync::watch::channel(Link::Up);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (server, mut watch) = (server.clone(), watch.clone());
                tokio::spawn(async move {
                    let mode = *watch.borrow_and_update();
                    match mode {
                        Link::Refused => return,
                        Link::Silent => {
                            let _ = watch.wait_for(|l| *l != Link::Silent).await;
                            return;
                        }
                        Link::Up => {}
                    }
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&server).await else { return };
                    let changed = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => None,
                        link = watch.wait_for(|l| *l != Link::Up) => link.ok().map(|l| *l),
                    };
                    // Silent: keep both ends open, pass nothing, until the link changes.
                    if changed == Some(Link::Silent) {
                        let _ = watch.wait_for(|l| *l != Link::Silent).await;
                    }
                });
            }
        });
        Self { addr, link }
    }

    fn set(&self, link: Link) {
        let _ = self.link.send(link);
    }
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn server_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_goes_away_is_503_never_a_hang_and_nothing_acknowledged_is_lost() {
    let test = "a_database_that_goes_away_is_503_never_a_hang_and_nothing_acknowledged_is_lost";
    if postgres_server().is_none() {
        eprintln!("SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): cluster::{test}");
        return;
    }
    let setup = Setup::create(&Options { engine: Some("postgres"), ..Options::default() }, "127.0.0.1:0");
    let url = setup.database.as_ref().expect("database").url.clone();
    let Some(server) = server_of(&url) else {
        eprintln!("SKIPPED (CARDGATE_TEST_POSTGRES is not a postgres:// URL): cluster::{test}");
        return;
    };
    // The gateway reaches its database through the proxy, with short deadlines.
    let proxy = Proxy::start(server.clone()).await;
    let path = setup.dir.path().join("cardgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text
        .replace(&server, &proxy.addr.to_string())
        .replace("pool_size = 8", "pool_size = 8\nstatement_timeout_ms = 1000\nconnect_timeout_ms = 500");
    std::fs::write(&path, text).expect("config");
    let (addr, admin, _stop) = cardgate_tests::harness::serve_setup_with_admin(&setup).await;
    let client = setup.client(addr, 1);
    let card = Card::beijing();
    let first =
        post(&client, "/v1/settlements", Some(&unique_key("up")), &class_a_bill(&setup.token(&card, 120))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);

    for link in [Link::Refused, Link::Silent] {
        proxy.set(link);
        let started = std::time::Instant::now();
        let (token, key) = (setup.token(&card, 120), unique_key("down"));
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            post(&client, "/v1/settlements", Some(&key), &class_a_bill(&token)),
        )
        .await
        .unwrap_or_else(|_| panic!("{link:?}: the request hung"));
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{link:?}: {}", refused.body);
        assert_eq!(refused.json()["code"], "storage_unavailable", "{link:?}");
        assert_eq!(refused.retry_after.as_deref(), Some("1"), "{link:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{link:?}: {:?}", started.elapsed());
        let (status, ready) = cardgate_tests::harness::admin(admin, http::Method::GET, "/readyz").await;
        assert_eq!((status, &ready["ledger"]), (StatusCode::SERVICE_UNAVAILABLE, &json!(false)), "{link:?}: {ready}");
        // Back: the same request with the same key settles (nothing was half-written), and
        // readiness returns, without restarting the gateway.
        proxy.set(Link::Up);
        let again = settle_until_final(&client, &key, &class_a_bill(&token)).await.0;
        assert_eq!(again.status, StatusCode::CREATED, "{link:?}: {}", again.body);
        let (status, _) = cardgate_tests::harness::admin(admin, http::Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{link:?}");
    }

    // Traffic while the link drops and comes back: every acknowledged settlement is there,
    // once; every till's retries with its key end in one settlement.
    let tills: Vec<_> = (0..6)
        .map(|t| {
            let (client, tokens) =
                (client.clone(), (0..8).map(|_| setup.token(&Card::beijing(), 300)).collect::<Vec<_>>());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for (n, token) in tokens.into_iter().enumerate() {
                    let key = format!("till-{t}-{n}-{}", std::process::id());
                    let reply = settle_until_final(&client, &key, &class_a_bill(&token)).await.0;
                    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
                    acknowledged.push((key, reply.json()["settlement_id"].as_str().expect("id").to_owned()));
                }
                acknowledged
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        proxy.set(Link::Refused);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        proxy.set(Link::Up);
    }
    let mut ids = std::collections::BTreeSet::new();
    for till in tills {
        for (key, id) in till.await.expect("till") {
            let reply = cardgate_tests::harness::get(&client, &format!("/v1/settlements/{id}")).await;
            assert_eq!(reply.status, StatusCode::OK, "{key}: {}", reply.body);
            assert_eq!(reply.json()["state"], "settled", "{key}");
            assert!(ids.insert(id), "{key}: one settlement answered for two keys");
        }
    }
    assert_eq!(ids.len(), 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_institution_spread_over_three_nodes_gets_its_quota_once() {
    let test = "an_institution_spread_over_three_nodes_gets_its_quota_once";
    let Some(redis) = std::env::var("CARDGATE_TEST_REDIS").ok().filter(|u| !u.is_empty()) else {
        eprintln!("SKIPPED (set CARDGATE_TEST_REDIS=redis://127.0.0.1:6379 to run): cluster::{test}");
        return;
    };
    let prefix = format!("cardgate-cluster-test-{}", cardgate_tests::harness::now_nanos());
    let extra = format!(
        "\n[limits]\ninstitution = {{ per_minute = 1, burst = 5 }}\n\n[limits.shared]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}\"\n"
    );
    let Some(cluster) = Cluster::start_with(test, extra).await else { return };
    let (mut admitted, mut limited) = (0, 0);
    for i in 0..15 {
        let reply = cardgate_tests::harness::get(&cluster.pharmacy(i), "/v1/settlements?date=2020-01-01&limit=1").await;
        match reply.status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(reply.json()["code"], "rate_limited", "{}", reply.body);
                assert!(reply.retry_after.is_some(), "{}", reply.body);
                limited += 1;
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    // Each node alone would admit five: the three together admit five.
    assert_eq!((admitted, limited), (5, 10));
}

/// The real `cardgate` binary serving `config`, killed with SIGKILL when dropped.
struct Node(std::process::Child);

impl Node {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::File::create(log).expect("log");
        let child = std::process::Command::new(cardgate_tests::cardgate_binary())
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cardgate");
        Self(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address a node serves on, from its log's `cardgate serving` line. Nodes bind port 0:
/// a port found free beforehand may be taken by another socket (an outgoing connection of a
/// test running beside) before the node binds it, and the node would never come up.
async fn serving(node: &mut Node, log: &std::path::Path) -> SocketAddr {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(address) = text
            .lines()
            .find_map(|l| l.split_once("cardgate serving listen=").and_then(|(_, rest)| rest.split_whitespace().next()))
            .and_then(|a| a.parse().ok())
        {
            return address;
        }
        if let Ok(Some(status)) = node.0.try_wait() {
            panic!("the node exited ({status}) before it served; its log:\n{text}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the node did not serve; its log:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn until_up(client: &Client) {
    let started = std::time::Instant::now();
    while client.send(http::Method::GET, "/v1/settlements/ready", &[], None).await.is_err() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the node did not come up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_traffic_loses_nothing_and_a_survivor_completes_what_it_left() {
    let test = "a_node_killed_mid_traffic_loses_nothing_and_a_survivor_completes_what_it_left";
    if postgres_server().is_none() {
        eprintln!("SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): cluster::{test}");
        return;
    }
    // Region 12: a payer that is not effect-free (its intent is written before it is asked)
    // and takes 300 ms: a kill lands while settlements are pending on the first node.
    let extra = format!(
        "\n[plugins.effectful]\nlibrary = \"{}\"\nconfig = {{ fund_bp = 5000, delay_ms = 300 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"effectful\"]\n",
        cardgate_sdk::testing::build_cdylib("fixture-configurable").display()
    );
    let options = Options { engine: Some("postgres"), extra_toml: extra, ..Options::default() };
    let setup = Setup::create(&options, "127.0.0.1:0");
    // Three plugins of 2 s: a chain takes at most 16 s; the shortest lease allowed.
    let text = std::fs::read_to_string(setup.dir.path().join("cardgate.toml")).expect("config");
    let config = setup.dir.path().join("nodes.toml");
    std::fs::write(&config, text.replace("lease_secs = 30", "lease_secs = 17")).expect("config");
    let (a_log, b_log) = (setup.dir.path().join("a.log"), setup.dir.path().join("b.log"));
    let mut a = Node::start(&config, &a_log);
    let mut b = Node::start(&config, &b_log);
    let (first, second) = (serving(&mut a, &a_log).await, serving(&mut b, &b_log).await);
    let (to_a, to_b) = (setup.client(first, 1), setup.client(second, 1));
    until_up(&to_a).await;
    until_up(&to_b).await;

    let bills: Vec<(String, Value)> = (0..24)
        .map(|i| {
            (
                format!("failover-{i}-{}", std::process::id()),
                class_a_bill(&setup.token(&Card::in_region("120101"), 600)),
            )
        })
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(bills));
    let a_alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let tills: Vec<_> = (0..6)
        .map(|_| {
            let (queue, a_alive, to_a, to_b) = (queue.clone(), a_alive.clone(), to_a.clone(), to_b.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                loop {
                    let Some((key, body)) = queue.lock().expect("queue").pop() else { break };
                    let headers = [("idempotency-key", key.as_str())];
                    let text = body.to_string();
                    // The first node while it lives; after a failed send, the other (as a load
                    // balancer would), with the same key, until the answer is final.
                    let mut reply = None;
                    if a_alive.load(std::sync::atomic::Ordering::Relaxed) {
                        let sent = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            to_a.send(http::Method::POST, "/v1/settlements", &headers, Some(&text)),
                        )
                        .await;
                        reply = sent.ok().and_then(Result::ok);
                    }
                    let (started, mut waited) = (std::time::Instant::now(), false);
                    let reply = loop {
                        if let Some(reply) = reply.take() {
                            let in_progress =
                                reply.status == StatusCode::CONFLICT && reply.body.contains("request_in_progress");
                            waited |= in_progress;
                            if !in_progress && reply.status != StatusCode::SERVICE_UNAVAILABLE {
                                break reply;
                            }
                        }
                        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{key}: no final answer");
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        reply = to_b.send(http::Method::POST, "/v1/settlements", &headers, Some(&text)).await.ok();
                    };
                    assert_eq!(reply.status, StatusCode::CREATED, "{key}: {}", reply.body);
                    answered.push((key, reply.json()["settlement_id"].as_str().expect("id").to_owned(), waited));
                }
                answered
            })
        })
        .collect();
    // Kill the first node with settlements in flight on it.
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    a_alive.store(false, std::sync::atomic::Ordering::Relaxed);
    a.kill();
    let (mut ids, mut taken_over) = (std::collections::BTreeSet::new(), 0);
    for till in tills {
        for (key, id, waited) in till.await.expect("till") {
            taken_over += usize::from(waited);
            let reply = cardgate_tests::harness::get(&to_b, &format!("/v1/settlements/{id}")).await;
            assert_eq!((reply.status, reply.json()["state"].as_str()), (StatusCode::OK, Some("settled")), "{key}");
            assert!(ids.insert(id), "{key}: one settlement answered for two keys");
        }
    }
    assert_eq!(ids.len(), 24, "every bill settled once");
    // The kill left settlements pending on the dead node (their retries waited for its lease).
    assert!(taken_over >= 1, "no settlement was in flight on the killed node");
    // Nothing the dead node left stays pending: the survivor completed it (its sweep or a
    // retry, once the lease ran out).
    let date = cardgate::ledger::business_day(cardgate_tests::harness::now());
    let pending =
        cardgate_tests::harness::get(&to_b, &format!("/v1/settlements?date={date}&state=pending&limit=100")).await;
    assert_eq!(pending.json()["settlements"].as_array().map(Vec::len), Some(0), "{}", pending.body);
}
