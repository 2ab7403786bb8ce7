//! The REST API over HTTP/1.1: authentication, the faults a test asked for, routing of
//! `/api/v1/RESOURCE[/NAME]`, and get, list, patch and watch as the real server answers them.

use super::log::{ListKind, RecordedRequest};
use super::status::ApiError;
use super::store::{watch_line, Read, Resource, RESOURCES};
use super::{Fault, Shared};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// A watch's length when the client gives no `timeoutSeconds` (the real server picks 30 to
/// 60 minutes at random).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub type ResponseBody = Either<Full<Bytes>, WatchBody>;

/// A watch response: newline-separated JSON events, as long as the watch lasts (sent with
/// chunked transfer encoding, its length being unknown).
pub struct WatchBody(mpsc::Receiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// What a request asks for, as far as it could be made out (for the log).
#[derive(Default)]
struct Call {
    verb: &'static str,
    resource: &'static str,
    list: Option<ListKind>,
    field_manager: Option<String>,
}

/// Answers one request and records it.
pub async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let user_agent = req
        .headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut call = Call::default();
    let response = respond(&shared, req, &mut call)
        .await
        .unwrap_or_else(|e| error_response(&e));
    let status = response.status().as_u16();
    if shared.options.verbose {
        eprintln!(
            "{method} {uri} -> {status} ({})",
            user_agent.as_deref().unwrap_or("no user agent")
        );
    }
    let r = RecordedRequest {
        method,
        uri,
        verb: call.verb,
        resource: call.resource,
        list: call.list,
        status,
        user_agent,
        field_manager: call.field_manager,
    };
    shared.log().record(r);
    Ok(response)
}

async fn respond(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    call: &mut Call,
) -> Result<Response<ResponseBody>, ApiError> {
    let query: HashMap<String, String> = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    call.field_manager = query.get("fieldManager").cloned();
    let target = route(req.uri().path());
    if let Some((res, name)) = &target {
        call.resource = res.plural;
        call.verb = verb(req.method(), name.is_some(), watch);
    }

    // Authentication first, as the real server; then, for the resources served, authorization
    // (which the faults stand in for).
    let expected = format!("Bearer {}", shared.token);
    if req
        .headers()
        .get(AUTHORIZATION)
        .is_none_or(|v| v.as_bytes() != expected.as_bytes())
    {
        return Err(ApiError::unauthorized());
    }
    let (res, name) = target.ok_or_else(ApiError::no_such_resource)?;
    let fault = *shared.fault();
    match fault {
        Fault::None => {}
        Fault::Forbidden => return Err(ApiError::forbidden(call.verb, res.plural, name.as_deref())),
        Fault::Status(code) => return Err(ApiError::from_code(code)),
    }

    match (req.method(), name) {
        (&Method::GET, Some(_)) if watch => Err(ApiError::bad_request(
            "the stand-in API server does not watch one object by its path; use fieldSelector=metadata.name=NAME",
        )),
        (&Method::GET, Some(name)) => {
            let obj = shared.store().get(res, &name).cloned();
            obj.map(|o| json_response(200, &o))
                .ok_or_else(|| ApiError::not_found(res.plural, &name))
        }
        (&Method::GET, None) if watch => start_watch(shared, res, &query),
        (&Method::GET, None) => list(shared, res, &query, call),
        (&Method::PATCH, Some(name)) => patch(shared, res, &name, &query, req).await,
        (method, _) => Err(ApiError::method_not_allowed(method.as_str(), res.plural)),
    }
}

/// What a path names: a resource, and one object of it (its store key: `NAME`, or
/// `NAMESPACE/NAME` for namespaced ones).
/// - `/api/v1/PLURAL[/NAME]` (core group; namespaced ones listed and watched across all
///   namespaces, as trellisd reads them);
/// - `/api/v1/namespaces/NS/PLURAL/NAME` (one namespaced object);
/// - `/apis/networking.k8s.io/v1/networkpolicies` and
///   `/apis/networking.k8s.io/v1/namespaces/NS/networkpolicies/NAME`.
///
/// Lists within one namespace (`/api/v1/namespaces/NS/pods`) are not served: nothing here
/// reads them, and a 404 says so rather than a wrong answer.
fn route(path: &str) -> Option<(&'static Resource, Option<String>)> {
    let (group, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("v1", rest)
    } else {
        (
            "networking.k8s.io/v1",
            path.strip_prefix("/apis/networking.k8s.io/v1/")?,
        )
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .copied()
            .find(|r| r.plural == plural && r.api_version == group)
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [plural] => Some((find(plural)?, None)),
        ["namespaces", ns, plural, name] if !ns.is_empty() && !name.is_empty() => {
            let res = find(plural).filter(|r| r.namespaced)?;
            Some((res, Some(format!("{ns}/{name}"))))
        }
        [plural, name] if !name.is_empty() => {
            let res = find(plural).filter(|r| !r.namespaced)?;
            Some((res, Some(name.to_string())))
        }
        _ => None,
    }
}

/// The verb as RBAC names it.
fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("POST", _) => "create",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "",
    }
}

fn list(
    shared: &Shared,
    res: &'static Resource,
    query: &HashMap<String, String>,
    call: &mut Call,
) -> Result<Response<ResponseBody>, ApiError> {
    let name = name_selector(query)?;
    let param = |key: &str| query.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let limit = match param("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
        None => 0,
    };
    if param("resourceVersionMatch") == Some("Exact") {
        return Err(ApiError::bad_request(
            "the stand-in API server does not serve resourceVersionMatch=Exact",
        ));
    }
    let (read, kind) = match (param("resourceVersion"), param("continue")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ))
        }
        (None, Some(token)) => (Read::Continue(token.to_string()), ListKind::Continue),
        (None, None) => (Read::Quorum, ListKind::Quorum),
        (Some(rv), None) => (Read::Cache(parse_rv(rv)?), ListKind::Cache),
    };
    call.list = Some(kind);
    let page = shared.store().list(res, read, limit, name.as_deref())?;
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(cont) = page.cont {
        meta["continue"] = json!(cont);
    }
    if let Some(n) = page.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let list = json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version, "metadata": meta, "items": page.items});
    Ok(json_response(200, &list))
}

fn start_watch(
    shared: &Arc<Shared>,
    res: &'static Resource,
    query: &HashMap<String, String>,
) -> Result<Response<ResponseBody>, ApiError> {
    let name = name_selector(query)?;
    let param = |key: &str| query.get(key).map(String::as_str).filter(|v| !v.is_empty());
    if param("sendInitialEvents") == Some("true") {
        return Err(ApiError::bad_request(
            "the stand-in API server does not serve sendInitialEvents (streaming lists)",
        ));
    }
    let from = param("resourceVersion").map(parse_rv).transpose()?.unwrap_or(0);
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let timeout = match param("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let (tx, rx) = mpsc::channel(16);
    let started = shared.store().watch(res, from, name.as_deref());
    match started {
        Ok(start) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                for line in start.first {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                stream(
                    &shared,
                    res,
                    start.id,
                    start.rx,
                    tx,
                    bookmarks.then_some(shared.options.bookmark_interval),
                    timeout,
                )
                .await;
            });
        }
        // A compacted resource version: the stream's only event is the error.
        Err(e) if e.code == 410 => {
            tx.try_send(watch_line("ERROR", &e.status()))
                .expect("an empty channel has room");
        }
        Err(e) => return Err(e),
    }
    Ok(Response::builder()
        .status(200)
        .header(CONTENT_TYPE, "application/json")
        .body(Either::Right(WatchBody(rx)))
        .expect("a valid response"))
}

/// Forwards a watch's events (and bookmarks) until it times out, the client goes away, or the
/// store ends it (a fault, a compaction).
async fn stream(
    shared: &Shared,
    res: &'static Resource,
    id: u64,
    mut events: mpsc::UnboundedReceiver<Bytes>,
    tx: mpsc::Sender<Bytes>,
    bookmarks: Option<Duration>,
    timeout: Duration,
) {
    let end = tokio::time::sleep(timeout);
    tokio::pin!(end);
    let period = bookmarks.unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = &mut end => return,
            _ = tx.closed() => return,
            // Queued behind the events sent so far, so it comes out in order.
            _ = tick.tick(), if bookmarks.is_some() => shared.store().bookmark(id, res),
            line = events.recv() => {
                let Some(line) = line else { return };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn patch(
    shared: &Shared,
    res: &'static Resource,
    name: &str,
    query: &HashMap<String, String>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    // A strategic merge patch is a merge patch for maps; its list merging by key and its
    // `$patch` directives are not emulated (lists are replaced whole).
    if !matches!(
        media_type,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    if query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad_request("the stand-in API server does not serve dryRun"));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    let patch: Value = serde_json::from_slice(&body.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "error decoding patch: the patch is not a JSON object",
        ));
    }
    let obj = shared.store().patch(res, name, &patch)?;
    Ok(json_response(200, &obj))
}

/// `fieldSelector=metadata.name=NAME` (kube's watcher of one object sends it); any other
/// field selector, and any label selector, is refused rather than ignored.
fn name_selector(query: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(
            "the stand-in API server does not serve labelSelector",
        ));
    }
    let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match sel
        .strip_prefix("metadata.name==")
        .or_else(|| sel.strip_prefix("metadata.name="))
    {
        Some(name) if !name.contains(',') => Ok(Some(name.to_string())),
        _ => Err(ApiError::bad_request(format!(
            "the stand-in API server only serves fieldSelector=metadata.name=NAME, not {sel:?}"
        ))),
    }
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion: {rv:?}")))
}

fn json_response(code: u16, v: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Either::Left(Full::new(Bytes::from(v.to_string()))))
        .expect("a valid response")
}

fn error_response(e: &ApiError) -> Response<ResponseBody> {
    let mut r = json_response(e.code, &e.status());
    if e.code == 429 {
        r.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    r
}
