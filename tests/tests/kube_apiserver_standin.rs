//! The stand-in Kubernetes API server, checked on the wire with a raw HTTPS client (hyper over
//! rustls, never the kube crate): the daemon's Kubernetes datastore tests trust it to answer as
//! kube-apiserver does, so what it answers is pinned here — TLS and its CA, the bearer token,
//! get / patch / paginated lists, watches with their events, bookmarks and 410 Expired, faults,
//! and a stop and restart that keeps the objects. Each test runs its own server on a loopback
//! port; only the namespace test needs root.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_tests::kube_apiserver::{unrelated_ca_pem, ApiServer, Fault, ListKind, Options, SERVICE_ACCOUNT_USER};
use trellis_tests::{Netns, TempDir};

const USER_AGENT: &str = "trellis-standin-test/1";

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A server whose bookmarks come quickly, so the tests do not wait for them.
fn server() -> ApiServer {
    let options = Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    };
    ApiServer::start_with(None, loopback(), options)
}

fn tls_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a PEM certificate")).expect("a CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<TlsStream<TcpStream>> {
    TlsConnector::from(config).connect(name, tcp).await
}

/// A client as kube's would be: trusts one CA, sends one token (or none), HTTP/1.1 over TLS,
/// a new connection per request.
struct Client {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

impl Client {
    fn new(server: &ApiServer) -> Client {
        Client {
            addr: server.addr(),
            tls: tls_config(server.ca_pem(), &[b"http/1.1"]),
            token: Some(server.token().into()),
        }
    }

    fn with_token(mut self, token: Option<&str>) -> Client {
        self.token = token.map(str::to_string);
        self
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        self.handshake(tcp).await
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<SendRequest<Full<Bytes>>, String> {
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = tls_connect(tcp, self.tls.clone(), name)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn request(&self, method: &str, path: &str, content_type: &str, body: String) -> hyper::Request<Full<Bytes>> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("user-agent", USER_AGENT)
            .header("accept", "application/json");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        req.body(Full::new(Bytes::from(body))).unwrap()
    }

    async fn send(&self, req: hyper::Request<Full<Bytes>>) -> (u16, Value) {
        let mut conn = self.connect().await.unwrap();
        let resp = conn.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body))),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.request("GET", path, "", String::new())).await
    }

    async fn patch(&self, path: &str, content_type: &str, patch: Value) -> (u16, Value) {
        self.send(self.request("PATCH", path, content_type, patch.to_string()))
            .await
    }

    async fn merge(&self, path: &str, patch: Value) -> (u16, Value) {
        self.patch(path, "application/merge-patch+json", patch).await
    }

    async fn watch(&self, path: &str) -> Watch {
        let conn = self.connect().await.unwrap();
        self.watch_on(conn, path).await
    }

    async fn watch_on(&self, mut conn: SendRequest<Full<Bytes>>, path: &str) -> Watch {
        let resp = conn
            .send_request(self.request("GET", path, "", String::new()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "watch {path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        Watch {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

/// A watch response, read one event line at a time.
struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event; `Ok(None)` when the stream ended cleanly, `Err` when it broke off.
    async fn try_next(&mut self) -> Result<Option<Value>, String> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(serde_json::from_slice(&line).unwrap()));
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), self.body.frame())
                .await
                .expect("a watch event or the end within 5 s");
            match frame {
                None => {
                    assert!(self.buf.is_empty(), "stream ended mid-line");
                    return Ok(None);
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => self.buf.extend_from_slice(&frame.into_data().unwrap_or_default()),
            }
        }
    }

    async fn next(&mut self) -> Option<Value> {
        self.try_next().await.expect("the watch stream breaks off")
    }

    /// The next event that is not a BOOKMARK.
    async fn next_change(&mut self) -> Value {
        loop {
            let ev = self.next().await.expect("an event before the end");
            if ev["type"] != "BOOKMARK" {
                return ev;
            }
        }
    }
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion")
        .parse()
        .unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect()
}

fn assert_status(got: &(u16, Value), code: u16, reason: &str) {
    assert_eq!(got.0, code, "{}", got.1);
    assert_eq!(got.1["kind"], "Status");
    assert_eq!(got.1["status"], "Failure");
    assert_eq!(got.1["reason"], reason);
    assert_eq!(got.1["code"], code);
}

#[tokio::test]
async fn tls_with_its_own_ca_and_bearer_token() {
    let server = server();
    let client = Client::new(&server);
    assert_eq!(client.get("/api/v1/nodes").await.0, 200);

    // HTTP/1.1 chosen by ALPN even when the client would rather have h2; the certificate is
    // valid for the in-cluster names too.
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let config = tls_config(server.ca_pem(), &[b"h2", b"http/1.1"]);
    let name = ServerName::try_from("kubernetes.default.svc").unwrap();
    let tls = tls_connect(tcp, config, name)
        .await
        .expect("TLS by the in-cluster name");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // A client trusting another CA refuses the server.
    let wrong = Client {
        tls: tls_config(&unrelated_ca_pem(), &[b"http/1.1"]),
        ..Client::new(&server)
    };
    let err = wrong
        .connect()
        .await
        .expect_err("a handshake trusting the wrong CA fails");
    assert!(err.contains("UnknownIssuer"), "{err}");

    let (no, bad) = (
        Client::new(&server).with_token(None),
        Client::new(&server).with_token(Some("trellis-standin-x")),
    );
    for c in [no, bad] {
        let got = c.get("/api/v1/nodes").await;
        assert_status(&got, 401, "Unauthorized");
        assert_eq!(got.1["message"], "Unauthorized");
    }
    assert_eq!(server.count("GET", 401), 2);
    assert_eq!(server.count("GET", 200), 1);
    assert!(server.token().starts_with("trellis-standin-"));
}

#[tokio::test]
async fn get_and_merge_patch_like_the_real_server() {
    let server = server();
    let created = server.create_node("n1", &["10.244.1.0/24", "fd00:1::/64"], Some("192.168.200.11"));
    let client = Client::new(&server);

    let (code, node) = client.get("/api/v1/nodes/n1").await;
    assert_eq!(code, 200);
    assert_eq!(node, created);
    assert_eq!(
        (node["kind"].as_str(), node["apiVersion"].as_str()),
        (Some("Node"), Some("v1"))
    );
    assert_eq!(node["spec"]["podCIDR"], "10.244.1.0/24");
    assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.1.0/24", "fd00:1::/64"]));
    assert_eq!(
        node["status"]["addresses"][0],
        json!({"type": "InternalIP", "address": "192.168.200.11"})
    );
    assert_eq!(node["metadata"]["uid"].as_str().map(str::len), Some(36));
    assert!(node["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(rv_of(&node), server.resource_version());

    let missing = client.get("/api/v1/nodes/nope").await;
    assert_status(&missing, 404, "NotFound");
    assert_eq!(missing.1["message"], "nodes \"nope\" not found");
    assert_eq!(missing.1["details"], json!({"name": "nope", "kind": "nodes"}));

    let path = "/api/v1/nodes/n1?fieldManager=trellisd";
    let (code, patched) = client
        .merge(path, json!({"metadata": {"annotations": {"a": "1", "b": "2"}}}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(patched["metadata"]["annotations"], json!({"a": "1", "b": "2"}));
    assert_eq!(rv_of(&patched), rv_of(&node) + 1);
    // null deletes a key; the same patch twice changes nothing the second time.
    let remove_a = json!({"metadata": {"annotations": {"a": null}}});
    let (_, once) = client.merge(path, remove_a.clone()).await;
    assert_eq!(once["metadata"]["annotations"], json!({"b": "2"}));
    let (_, twice) = client.merge(path, remove_a).await;
    assert_eq!(rv_of(&twice), rv_of(&once));
    assert_eq!(server.resource_version(), rv_of(&once));

    let smp = "application/strategic-merge-patch+json";
    let (code, labelled) = client
        .patch(path, smp, json!({"metadata": {"labels": {"x": "y"}}}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(labelled["metadata"]["labels"]["x"], "y");
    assert_eq!(labelled["metadata"]["labels"]["kubernetes.io/hostname"], "n1");

    let json_patch = client.patch(path, "application/json-patch+json", json!([])).await;
    assert_status(&json_patch, 415, "UnsupportedMediaType");
    let stale = client
        .merge(
            path,
            json!({"metadata": {"resourceVersion": "1", "labels": {"x": "z"}}}),
        )
        .await;
    assert_status(&stale, 409, "Conflict");
    assert_status(&client.merge("/api/v1/nodes/nope", json!({})).await, 404, "NotFound");
    assert_status(&client.get("/api/v1/services").await, 404, "NotFound");
    assert_status(
        &client
            .send(client.request("DELETE", "/api/v1/nodes/n1", "", String::new()))
            .await,
        405,
        "MethodNotAllowed",
    );

    let patches: Vec<_> = server.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 7);
    assert!(patches.iter().all(|r| r.verb == "patch" && r.resource == "nodes"));
    assert_eq!(patches[0].field_manager.as_deref(), Some("trellisd"));
    assert_eq!(patches[0].user_agent.as_deref(), Some(USER_AGENT));
    assert_eq!(server.count("PATCH", 200), 4);
}

#[tokio::test]
async fn lists_paginate_from_a_snapshot_unless_served_from_the_watch_cache() {
    let server = server();
    for i in 0..5 {
        server.create_node(&format!("n{i}"), &[&format!("10.244.{i}.0/24")], None);
    }
    let client = Client::new(&server);

    let (code, first) = client.get("/api/v1/nodes?limit=2").await;
    assert_eq!(code, 200);
    assert_eq!(
        (first["kind"].as_str(), first["apiVersion"].as_str()),
        (Some("NodeList"), Some("v1"))
    );
    assert_eq!(names(&first), ["n0", "n1"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    assert_eq!(rv, server.resource_version().to_string());

    // Changes between pages do not show: the pages come from the first page's snapshot.
    server.update_node("n2", |n| n["metadata"]["labels"]["late"] = json!("yes"));
    server.delete_node("n3");
    let cont = first["metadata"]["continue"].as_str().unwrap();
    let (_, second) = client.get(&format!("/api/v1/nodes?limit=2&continue={cont}")).await;
    assert_eq!(names(&second), ["n2", "n3"]);
    assert!(second["items"][0]["metadata"]["labels"].get("late").is_none());
    assert_eq!(second["metadata"]["resourceVersion"], rv);
    let cont = second["metadata"]["continue"].as_str().unwrap();
    let (_, third) = client.get(&format!("/api/v1/nodes?limit=2&continue={cont}")).await;
    assert_eq!(names(&third), ["n4"]);
    assert!(third["metadata"].get("continue").is_none());

    // resourceVersion=0: the watch cache, everything in one page, the limit ignored.
    let (_, cached) = client.get("/api/v1/nodes?limit=2&resourceVersion=0").await;
    assert_eq!(names(&cached), ["n0", "n1", "n2", "n4"]);
    assert!(cached["metadata"].get("continue").is_none());
    assert_eq!(
        cached["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );

    let (_, one) = client.get("/api/v1/nodes?fieldSelector=metadata.name%3Dn1").await;
    assert_eq!(names(&one), ["n1"]);
    assert_status(
        &client
            .get("/api/v1/nodes?fieldSelector=spec.unschedulable%3Dfalse")
            .await,
        400,
        "BadRequest",
    );
    assert_status(
        &client.get("/api/v1/nodes?labelSelector=a%3Db").await,
        400,
        "BadRequest",
    );
    assert_status(
        &client
            .get(&format!("/api/v1/nodes?continue={cont}&resourceVersion={rv}"))
            .await,
        400,
        "BadRequest",
    );
    let future = server.resource_version() + 10;
    assert_status(
        &client.get(&format!("/api/v1/nodes?resourceVersion={future}")).await,
        504,
        "Timeout",
    );

    // After a compaction a continue token is too old.
    let (_, page) = client.get("/api/v1/nodes?limit=1").await;
    server.expire_watches();
    let cont = page["metadata"]["continue"].as_str().unwrap();
    assert_status(
        &client.get(&format!("/api/v1/nodes?limit=1&continue={cont}")).await,
        410,
        "Expired",
    );

    assert_eq!(server.lists(ListKind::Quorum), 3);
    assert_eq!(server.lists(ListKind::Continue), 3);
    assert_eq!(server.lists(ListKind::Cache), 2);
}

#[tokio::test]
async fn watch_streams_changes_and_bookmarks_and_replays_from_a_resource_version() {
    let server = server();
    server.create_node("n1", &["10.244.1.0/24"], None);
    let from = server.resource_version();
    let client = Client::new(&server);

    let path = format!("/api/v1/nodes?watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=3");
    let mut watch = client.watch(&path).await;
    let mine =
        format!("/api/v1/nodes?watch=1&resourceVersion={from}&fieldSelector=metadata.name%3Dn1&timeoutSeconds=1");
    let mut only_n1 = client.watch(&mine).await;
    server.create_node("n2", &["10.244.2.0/24"], None);
    server.update_node("n2", |n| n["spec"]["unschedulable"] = json!(true));
    let deleted = server.delete_node("n2");
    server.update_node("n1", |n| n["metadata"]["labels"]["seen"] = json!("yes"));

    let mut got = Vec::new();
    for _ in 0..4 {
        let ev = watch.next_change().await;
        got.push((
            ev["type"].as_str().unwrap().to_string(),
            ev["object"]["metadata"]["name"].as_str().unwrap().to_string(),
        ));
        if ev["type"] == "DELETED" {
            assert_eq!(rv_of(&ev["object"]), rv_of(&deleted));
        }
    }
    assert_eq!(
        got,
        [
            ("ADDED", "n2"),
            ("MODIFIED", "n2"),
            ("DELETED", "n2"),
            ("MODIFIED", "n1")
        ]
        .map(|(a, b)| (a.into(), b.into()))
    );
    let bookmark = loop {
        let ev = watch.next().await.expect("a bookmark");
        if ev["type"] == "BOOKMARK" {
            break ev;
        }
    };
    assert_eq!(
        bookmark["object"],
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": server.resource_version().to_string()}})
    );

    // The field selector lets through n1's change only; no bookmarks were asked for; the
    // stream ends after its timeoutSeconds.
    assert_eq!(
        only_n1.next().await.unwrap()["object"]["metadata"]["labels"]["seen"],
        "yes"
    );
    assert_eq!(only_n1.next().await, None);

    // From the old resource version again: the retained events are replayed.
    let mut replay = client
        .watch(&format!(
            "/api/v1/nodes?watch=true&resourceVersion={from}&timeoutSeconds=1"
        ))
        .await;
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(replay.next().await.unwrap()["type"].as_str().unwrap().to_string());
    }
    assert_eq!(replayed, ["ADDED", "MODIFIED", "DELETED", "MODIFIED"]);

    // Without a resource version: the current objects as ADDED events first.
    let mut fresh = client.watch("/api/v1/nodes?watch=true&timeoutSeconds=1").await;
    let ev = fresh.next().await.unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("n1"))
    );
    assert_eq!(fresh.next().await, None);
    assert_eq!(server.requests().iter().filter(|r| r.verb == "watch").count(), 4);
}

#[tokio::test]
async fn too_old_resource_versions_get_410_expired() {
    let server = ApiServer::start_with(
        None,
        loopback(),
        Options {
            history: 3,
            ..Options::default()
        },
    );
    server.create_node("n0", &[], None);
    let old = server.resource_version();
    for i in 1..5 {
        server.create_node(&format!("n{i}"), &[], None);
    }
    let client = Client::new(&server);

    // Pushed out of the history: the stream is the one ERROR event, then ends.
    let mut watch = client
        .watch(&format!("/api/v1/nodes?watch=true&resourceVersion={old}"))
        .await;
    let ev = watch.next().await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["kind"], "Status");
    assert_eq!(
        (ev["object"]["code"].as_u64(), ev["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
    assert!(ev["object"]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("too old resource version: {old} (")));
    assert_eq!(watch.next().await, None);

    // Compaction ends the open watches with the same error, and their resource version is too
    // old afterwards; a new list gives one that can be watched from.
    let now = server.resource_version();
    let mut open = client
        .watch(&format!("/api/v1/nodes?watch=true&resourceVersion={now}"))
        .await;
    server.expire_watches();
    let ev = open.next().await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(
        ev["object"]["message"],
        format!("too old resource version: {now} ({})", server.resource_version())
    );
    assert_eq!(open.next().await, None);
    let mut again = client
        .watch(&format!("/api/v1/nodes?watch=true&resourceVersion={now}"))
        .await;
    assert_eq!(again.next().await.unwrap()["object"]["code"], 410);

    let (_, list) = client.get("/api/v1/nodes").await;
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = client
        .watch(&format!("/api/v1/nodes?watch=true&resourceVersion={rv}"))
        .await;
    server.create_node("n5", &[], None);
    assert_eq!(watch.next().await.unwrap()["type"], "ADDED");
}

#[tokio::test]
async fn faults_answer_every_request_and_end_watches() {
    let server = server();
    server.create_node("n1", &[], None);
    let client = Client::new(&server);
    let mut watch = client.watch("/api/v1/nodes?watch=true&resourceVersion=0").await;
    assert_eq!(watch.next().await.unwrap()["type"], "ADDED");
    assert_eq!(server.open_watches(), 1);

    server.set_fault(Fault::Forbidden);
    assert_eq!(watch.next().await, None);
    let list = client.get("/api/v1/nodes").await;
    assert_status(&list, 403, "Forbidden");
    assert_eq!(
        list.1["message"],
        format!(
            "nodes is forbidden: User \"{SERVICE_ACCOUNT_USER}\" cannot list resource \"nodes\" in API group \"\" at \
             the cluster scope"
        )
    );
    let get = client.get("/api/v1/nodes/n1").await;
    assert_status(&get, 403, "Forbidden");
    assert!(
        get.1["message"]
            .as_str()
            .unwrap()
            .starts_with("nodes \"n1\" is forbidden: User"),
        "{}",
        get.1
    );
    // Authentication comes first.
    assert_status(
        &Client::new(&server).with_token(None).get("/api/v1/nodes").await,
        401,
        "Unauthorized",
    );

    server.set_fault(Fault::Status(503));
    assert_status(&client.get("/api/v1/nodes/n1").await, 503, "ServiceUnavailable");
    server.set_fault(Fault::Status(500));
    assert_status(&client.merge("/api/v1/nodes/n1", json!({})).await, 500, "InternalError");
    server.set_fault(Fault::None);
    assert_eq!(client.get("/api/v1/nodes/n1").await.0, 200);
    assert_eq!(server.open_watches(), 0);
    assert_eq!(
        (
            server.count("GET", 403),
            server.count("GET", 503),
            server.count("PATCH", 500)
        ),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn stop_drops_connections_and_restart_keeps_objects_ca_and_token() {
    let server = server();
    server.create_node("n1", &["10.244.1.0/24"], None);
    let client = Client::new(&server);
    let mut watch = client.watch("/api/v1/nodes?watch=true&resourceVersion=0").await;
    assert_eq!(watch.next().await.unwrap()["type"], "ADDED");
    let mut idle = client.connect().await.unwrap();

    server.stop();
    assert!(watch.try_next().await.is_err(), "a killed server breaks the watch off");
    let err = TcpStream::connect(server.addr()).await.expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let (requests, connections) = (server.request_count(), server.connections());
    assert_eq!(connections, 2);
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.ready())
        .await
        .expect("no answer in 5 s");
    assert!(closed.is_err(), "the idle connection is closed too");

    server.restart();
    let (code, node) = client.get("/api/v1/nodes/n1").await;
    assert_eq!(code, 200);
    assert_eq!(node["spec"]["podCIDR"], "10.244.1.0/24");
    assert_eq!(
        (server.request_count(), server.connections()),
        (requests + 1, connections + 1)
    );
}

#[test]
fn client_files_point_at_the_server() {
    let server = ApiServer::start(None, loopback());
    let dir = TempDir::new("kubesa");
    server.write_kubeconfig(&dir.path().join("kubeconfig"));
    let kubeconfig = std::fs::read_to_string(dir.path().join("kubeconfig")).unwrap();
    let field = |text: &str, key: &str| {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"));
        line.trim().to_string()
    };
    assert_eq!(field(&kubeconfig, "server:"), server.url());
    assert_eq!(server.url(), format!("https://127.0.0.1:{}", server.addr().port()));
    assert_eq!(field(&kubeconfig, "token:"), server.token());
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(field(&kubeconfig, "certificate-authority-data:"))
        .unwrap();
    assert_eq!(String::from_utf8(ca).unwrap(), server.ca_pem());

    let other = unrelated_ca_pem();
    assert_ne!(other, server.ca_pem());
    server.write_kubeconfig_with_ca(&dir.path().join("wrong"), &other);
    let wrong = std::fs::read_to_string(dir.path().join("wrong")).unwrap();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(field(&wrong, "certificate-authority-data:"))
        .unwrap();
    assert_eq!(String::from_utf8(ca).unwrap(), other);

    server.write_incluster_files(dir.path());
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert_eq!(
        (read("token"), read("ca.crt"), read("namespace")),
        (server.token().into(), server.ca_pem().into(), "kube-system".into())
    );
}

/// A TCP connection made from inside `ns` (a socket stays in the namespace it was made in).
fn connect_in(ns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let file = std::fs::File::open(ns.path())?;
    let std_stream = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace file; only this thread moves.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpStream::connect(addr)
        })
        .join()
        .unwrap()
    })?;
    std_stream.set_nonblocking(true)?;
    TcpStream::from_std(std_stream)
}

#[tokio::test]
async fn listens_inside_a_network_namespace_also_after_restart() {
    trellis_tests::require_root();
    let ns = Netns::new("ksa");
    let server = ApiServer::start(Some(&ns), loopback());
    server.create_node("n1", &[], None);
    let client = Client::new(&server);
    for round in 0..2 {
        let conn = client.handshake(connect_in(&ns, server.addr()).unwrap()).await.unwrap();
        let mut watch = client.watch_on(conn, "/api/v1/nodes?watch=true&timeoutSeconds=1").await;
        assert_eq!(
            watch.next().await.unwrap()["object"]["metadata"]["name"],
            "n1",
            "round {round}"
        );
        // Not in this (the test's) namespace.
        assert!(TcpStream::connect(server.addr()).await.is_err());
        server.stop();
        server.restart();
    }
}

#[test]
fn the_binary_serves_the_nodes_it_was_given_until_sigterm() {
    let dir = TempDir::new("kubebin");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-kube-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.path())
        .args([
            "--node",
            "n1=10.244.1.0/24,fd00:1::/64@192.168.200.11",
            "--node",
            "n2=10.244.2.0/24",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(
        line.contains("stand-in") && line.contains("not a cluster") && line.contains("2 Node(s)"),
        "{line}"
    );

    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let kubeconfig = read("kubeconfig");
    let url = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap();
    assert!(line.contains(url), "{line}");
    let client = Client {
        addr: url.strip_prefix("https://").unwrap().parse().unwrap(),
        tls: tls_config(&read("ca.crt"), &[b"http/1.1"]),
        token: Some(read("token")),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, list) = rt.block_on(client.get("/api/v1/nodes"));
    assert_eq!(code, 200);
    assert_eq!(names(&list), ["n1", "n2"]);
    assert_eq!(
        list["items"][0]["spec"]["podCIDRs"],
        json!(["10.244.1.0/24", "fd00:1::/64"])
    );
    assert_eq!(list["items"][0]["status"]["addresses"][0]["address"], "192.168.200.11");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-kube-apiserver"))
        .args(["--node", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage:"));
}

/// Namespaces, Pods and NetworkPolicies (issue 14) as the real server serves them: namespaced
/// objects by their namespaced path, the cluster-wide lists and watches trellisd reads (in
/// namespace/name order, the group's apiVersion), and the events of every change.
#[tokio::test]
async fn namespaces_pods_and_network_policies_cluster_wide() {
    use trellis_tests::kube_apiserver::{NAMESPACES, NETWORK_POLICIES, PODS};
    let server = server();
    let client = Client::new(&server);
    server.create(&NAMESPACES, json!({"metadata": {"name": "x", "labels": {"ns": "x"}}}));
    for (ns, name) in [("y", "b"), ("x", "b"), ("x", "a")] {
        server.create(
            &PODS,
            json!({"metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
                   "spec": {"nodeName": "node1"}, "status": {"podIPs": [{"ip": "10.244.1.5"}]}}),
        );
    }
    let policy = server.create(
        &NETWORK_POLICIES,
        json!({"metadata": {"namespace": "x", "name": "deny"}, "spec": {"podSelector": {}}}),
    );
    assert_eq!(policy["apiVersion"], "networking.k8s.io/v1");

    let (code, pod) = client.get("/api/v1/namespaces/x/pods/a").await;
    assert_eq!(
        (code, pod["kind"].as_str(), pod["metadata"]["namespace"].as_str()),
        (200, Some("Pod"), Some("x"))
    );
    assert_status(&client.get("/api/v1/namespaces/z/pods/a").await, 404, "NotFound");
    assert_status(&client.get("/api/v1/namespaces/x/pods").await, 404, "NotFound");
    let (code, ns) = client.get("/api/v1/namespaces/x").await;
    assert_eq!((code, ns["kind"].as_str()), (200, Some("Namespace")));

    let (code, list) = client.get("/api/v1/pods?limit=2").await;
    assert_eq!((code, list["kind"].as_str()), (200, Some("PodList")));
    let keys: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(keys, ["x/a", "x/b"], "namespace/name order, paginated");
    let cont = list["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    let (_, rest) = client.get(&format!("/api/v1/pods?limit=2&continue={cont}")).await;
    assert_eq!(rest["items"][0]["metadata"]["namespace"], "y");

    let (code, policies) = client.get("/apis/networking.k8s.io/v1/networkpolicies").await;
    assert_eq!(
        (code, policies["kind"].as_str(), policies["apiVersion"].as_str()),
        (200, Some("NetworkPolicyList"), Some("networking.k8s.io/v1"))
    );
    assert_eq!(names(&policies), ["deny"]);
    let (code, one) = client
        .get("/apis/networking.k8s.io/v1/namespaces/x/networkpolicies/deny")
        .await;
    assert_eq!((code, one), (200, policy));

    let rv = server.resource_version();
    let mut watch = client
        .watch(&format!(
            "/apis/networking.k8s.io/v1/networkpolicies?watch=true&resourceVersion={rv}"
        ))
        .await;
    server.update(&NETWORK_POLICIES, "x/deny", |p| {
        p["spec"]["policyTypes"] = json!(["Ingress"])
    });
    server.delete(&NETWORK_POLICIES, "x/deny");
    let (modified, deleted) = (watch.next_change().await, watch.next_change().await);
    assert_eq!(
        (modified["type"].as_str(), deleted["type"].as_str()),
        (Some("MODIFIED"), Some("DELETED"))
    );
    assert_eq!(deleted["object"]["metadata"]["namespace"], "x");
}
