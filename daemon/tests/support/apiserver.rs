//! A fake Kubernetes API server for the pod source's tests: just enough of `/api/v1/pods` for
//! kube-rs's watcher (paged lists with a node field selector, chunked watches resumed from a
//! resourceVersion, server-side watch timeouts), over plain HTTP/1.1 on std threads.
//!
//! Every change is kept, so a watch from any older resourceVersion replays everything after it:
//! no compaction, hence never 410 Gone. Watch streams carry no BOOKMARK events; kube asks for
//! them but resumes from the last object it saw just as well.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// How long the accept loop sleeps between polls: it must notice `Drop`, and the listener may
/// live in another network namespace, so connecting to it to wake a blocking accept is not an
/// option.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How long a quiet watch waits before checking whether its client hung up, so `watchers()`
/// drops when kube abandons a stream rather than at the next event.
const WATCH_POLL: Duration = Duration::from_millis(100);
/// `close_watches` waits this long for the streams to end; they end at their next wakeup.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The server; dropping it stops the accept loop and closes every connection.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on `listener` (bound by the caller, possibly inside a network namespace).
    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener
            .local_addr()
            .expect("the API server's listener has an address");
        listener
            .set_nonblocking(true)
            .expect("the API server's listener goes non-blocking");
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.accept_loop(&listener))
        };
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://ADDR:PORT` of the listener (so bind it to the address clients should dial).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stores `pod`: ADDED if its namespace/name is new, else MODIFIED. The server fills in
    /// `metadata.resourceVersion`, and `metadata.uid` unless the pod carries one.
    pub fn put_pod(&self, mut pod: Value) {
        let key = key_of(&pod);
        let mut state = self.shared.lock();
        let version = state.bump();
        let before = state.pods.get(&key).cloned();
        let uid = uid_of(&pod)
            .or_else(|| before.as_ref().and_then(uid_of))
            .unwrap_or_else(|| format!("00000000-0000-4000-8000-{version:012}"));
        pod["metadata"]["uid"] = uid.into();
        pod["metadata"]["resourceVersion"] = version.to_string().into();
        state.pods.insert(key, pod.clone());
        state.changes.push(Change {
            version,
            before,
            after: Some(pod),
        });
        self.shared.changed.notify_all();
    }

    /// Deletes a stored pod: DELETED with its last state, at the deletion's resourceVersion (kube
    /// resumes from it, so the old one would replay the deletion).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut state = self.shared.lock();
        let Some(mut pod) = state.pods.remove(&(namespace.to_owned(), name.to_owned())) else {
            drop(state);
            panic!("delete_pod: the API server has no pod {namespace}/{name}");
        };
        let version = state.bump();
        pod["metadata"]["resourceVersion"] = version.to_string().into();
        state.changes.push(Change {
            version,
            before: Some(pod),
            after: None,
        });
        self.shared.changed.notify_all();
    }

    /// Ends every open watch stream cleanly, as an API server's timeout does, and returns once
    /// they have ended. Watches opened afterwards stay open.
    pub fn close_watches(&self) {
        let mut state = self.shared.lock();
        state.epoch += 1;
        let epoch = state.epoch;
        self.shared.changed.notify_all();
        let deadline = Instant::now() + CLOSE_WAIT;
        while state.watch_epochs().any(|e| e < epoch) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(state);
                panic!("a watch stream was still open {CLOSE_WAIT:?} after close_watches");
            }
            state = self.shared.wait(state, left);
        }
    }

    /// Every request target seen ("/api/v1/pods?..."), in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The events posted so far (events.k8s.io/v1 Event objects).
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Watch streams open right now.
    pub fn watchers(&self) -> usize {
        self.shared.lock().watch_epochs().count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopped = true;
            for connection in state.connections.values() {
                // Wakes a handler blocked reading the next request; errors mean already closed.
                let _ = connection.stream.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        if let Some(accept) = self.accept.take() {
            // A handler's panic has already printed its message; a second one here would abort.
            let _ = accept.join();
        }
    }
}

/// A Running pod as the API server returns it.
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ips: &[&str],
    annotations: &[(&str, &str)],
) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(key, value)| ((*key).to_owned(), Value::from(*value)))
        .collect();
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "namespace": namespace, "name": name, "annotations": annotations },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
        },
        "status": { "phase": "Running", "podIP": ips.first(), "podIPs": pod_ips },
    })
}

/// A pod's identity in the store: (namespace, name).
type Key = (String, String);

fn key_of(pod: &Value) -> Key {
    let field = |name: &str| {
        pod["metadata"][name]
            .as_str()
            .unwrap_or_else(|| panic!("a pod for the API server needs metadata.{name}: {pod}"))
            .to_owned()
    };
    (field("namespace"), field("name"))
}

fn uid_of(pod: &Value) -> Option<String> {
    pod["metadata"]["uid"].as_str().map(str::to_owned)
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled on every change, watch end and stop.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    pods: BTreeMap<Key, Value>,
    /// Every change ever, in resourceVersion order.
    changes: Vec<Change>,
    requests: Vec<String>,
    /// Event objects posted (events.k8s.io/v1), in order.
    events: Vec<Value>,
    connections: HashMap<u64, Connection>,
    next_connection: u64,
    /// Bumped by `close_watches`; a watch ends once the epoch it started in is over.
    epoch: u64,
    stopped: bool,
}

/// One put or delete. A watcher's event depends on whether it saw the pod before and after,
/// which also covers a pod moving on or off the watched node.
#[derive(Debug)]
struct Change {
    version: u64,
    before: Option<Value>,
    after: Option<Value>,
}

#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// The epoch of the watch being streamed on this connection, if one is.
    watch: Option<u64>,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn watch_epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.connections.values().filter_map(|c| c.watch)
    }

    fn changes_after(&self, version: u64) -> &[Change] {
        let start = self.changes.partition_point(|c| c.version <= version);
        &self.changes[start..]
    }

    /// The pods as they were at `version`, so every page of a list shows the same moment.
    fn pods_at(&self, version: u64) -> BTreeMap<Key, &Value> {
        let mut pods = BTreeMap::new();
        for change in self.changes.iter().take_while(|c| c.version <= version) {
            match (&change.before, &change.after) {
                (_, Some(pod)) => pods.insert(key_of(pod), pod),
                (Some(pod), None) => pods.remove(&key_of(pod)),
                (None, None) => unreachable!("a change has a pod before or after"),
            };
        }
        pods
    }

    fn watch_over(&self, epoch: u64, deadline: Option<Instant>) -> bool {
        self.stopped || self.epoch != epoch || deadline.is_some_and(|d| Instant::now() >= d)
    }
}

impl Shared {
    /// A panicking test thread may poison the lock; the data stays consistent (each update is
    /// made before anything can panic), and `Drop` must still get in.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(state, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn accept_loop(self: &Arc<Self>, listener: &TcpListener) {
        let mut handlers = Vec::new();
        while !self.lock().stopped {
            match listener.accept() {
                Ok((stream, _)) => {
                    let shared = Arc::clone(self);
                    handlers.push(thread::spawn(move || shared.serve_connection(stream)));
                }
                // Transient errors (a client that gave up, fd exhaustion) are retried too.
                Err(_) => thread::sleep(ACCEPT_POLL),
            }
            handlers.retain(|h: &JoinHandle<()>| !h.is_finished());
        }
        for handler in handlers {
            let _ = handler.join();
        }
    }

    fn serve_connection(&self, stream: TcpStream) {
        let Some(id) = self.register(&stream) else {
            return;
        };
        // An IO error means the client went away or the server is stopping: nothing to report.
        let _ = self.converse(id, stream);
        self.lock().connections.remove(&id);
    }

    /// Tracks the connection so `Drop` can close it; None once the server is stopping.
    fn register(&self, stream: &TcpStream) -> Option<u64> {
        stream.set_nonblocking(false).ok()?;
        // Watch events are small writes that must not wait for the previous one's ACK.
        stream.set_nodelay(true).ok()?;
        let stream = stream.try_clone().ok()?;
        let mut state = self.lock();
        if state.stopped {
            return None;
        }
        state.next_connection += 1;
        let id = state.next_connection;
        state.connections.insert(
            id,
            Connection {
                stream,
                watch: None,
            },
        );
        Some(id)
    }

    /// Answers requests on one keep-alive connection until the client closes it.
    fn converse(&self, id: u64, mut stream: TcpStream) -> io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        while let Some(request) = Request::read(&mut reader)? {
            self.lock().requests.push(request.target.clone());
            match self.reply(&request) {
                Ok(Reply::Json(body)) => write_json(&mut stream, 200, &body, request.close)?,
                Ok(Reply::Created(body)) => write_json(&mut stream, 201, &body, request.close)?,
                Ok(Reply::Watch(watch)) => self.stream_watch(id, &mut stream, &watch)?,
                Err(failure) => {
                    write_json(&mut stream, failure.code, &failure.status(), request.close)?;
                }
            }
            if request.close {
                break;
            }
        }
        Ok(())
    }

    fn reply(&self, request: &Request) -> Result<Reply, Failure> {
        let (path, query) = request
            .target
            .split_once('?')
            .unwrap_or((&request.target, ""));
        if request.method == "POST" && events_namespace(path).is_some() {
            return self.post_event(&request.body).map(Reply::Created);
        }
        let namespace = pods_namespace(path)?;
        if request.method != "GET" {
            return Err(Failure {
                code: 405,
                reason: "MethodNotAllowed",
                message: format!(
                    "the fake API server only serves GET, not {}",
                    request.method
                ),
            });
        }
        let query = Query::parse(query);
        let filter = Filter::new(namespace, &query)?;
        if matches!(query.get("watch"), Some("true" | "1")) {
            if query.get("sendInitialEvents") == Some("true") {
                return Err(Failure::bad_request("sendInitialEvents (streaming lists)"));
            }
            Ok(Reply::Watch(Watch {
                filter,
                from: query.number("resourceVersion")?.unwrap_or(0),
                timeout: query.number("timeoutSeconds")?.map(Duration::from_secs),
            }))
        } else {
            self.list(&filter, &query).map(Reply::Json)
        }
    }

    /// Stores a posted event and answers with it, as created.
    fn post_event(&self, body: &[u8]) -> Result<Value, Failure> {
        let mut event: Value = serde_json::from_slice(body).map_err(|e| Failure {
            code: 400,
            reason: "BadRequest",
            message: format!("the event is not JSON: {e}"),
        })?;
        let mut state = self.lock();
        let version = state.bump();
        event["metadata"]["resourceVersion"] = version.to_string().into();
        state.events.push(event.clone());
        Ok(event)
    }

    /// A PodList page. A continue token carries the list's resourceVersion and the last key
    /// returned, so later pages come from the same snapshot as the first.
    fn list(&self, filter: &Filter, query: &Query) -> Result<Value, Failure> {
        let state = self.lock();
        let (version, after) = match query.get("continue") {
            Some(token) => parse_continue(token)?,
            None => (state.version, None),
        };
        let limit = match query.number::<usize>("limit")? {
            Some(0) | None => usize::MAX,
            Some(limit) => limit,
        };
        let mut pods = state
            .pods_at(version)
            .into_iter()
            .filter(|(key, pod)| after.as_ref().is_none_or(|a| key > a) && filter.matches(pod));
        let items: Vec<(Key, &Value)> = pods.by_ref().take(limit).collect();
        let mut metadata = json!({ "resourceVersion": version.to_string() });
        if pods.next().is_some() {
            let ((namespace, name), _) =
                items.last().expect("a page before more pods is not empty");
            metadata["continue"] = format!("{version}/{namespace}/{name}").into();
        }
        let items: Vec<&Value> = items.into_iter().map(|(_, pod)| pod).collect();
        Ok(json!({ "kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items }))
    }

    /// Streams the events after `watch.from`, then new ones as they happen, until the timeout,
    /// `close_watches`, the client hanging up or the server stopping.
    fn stream_watch(&self, id: u64, stream: &mut TcpStream, watch: &Watch) -> io::Result<()> {
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        let epoch = self.open_watch(id);
        let streamed = self.stream_events(stream, watch, epoch);
        self.close_watch(id);
        streamed?;
        stream.write_all(b"0\r\n\r\n")
    }

    fn open_watch(&self, id: u64) -> u64 {
        let mut state = self.lock();
        let epoch = state.epoch;
        if let Some(connection) = state.connections.get_mut(&id) {
            connection.watch = Some(epoch);
        }
        epoch
    }

    fn close_watch(&self, id: u64) {
        if let Some(connection) = self.lock().connections.get_mut(&id) {
            connection.watch = None;
        }
        self.changed.notify_all();
    }

    fn stream_events(&self, stream: &mut TcpStream, watch: &Watch, epoch: u64) -> io::Result<()> {
        let deadline = watch.timeout.map(|t| Instant::now() + t);
        let mut seen = watch.from;
        while let Some((version, events)) = self.next_events(seen, &watch.filter, epoch, deadline) {
            seen = version;
            if events.is_empty() && peer_closed(stream) {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            for event in events {
                let line = format!("{event}\n");
                stream.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())?;
            }
        }
        Ok(())
    }

    /// The watch events after `seen` (waiting up to `WATCH_POLL` for some) and the version they
    /// reach; None once the watch must end.
    fn next_events(
        &self,
        seen: u64,
        filter: &Filter,
        epoch: u64,
        deadline: Option<Instant>,
    ) -> Option<(u64, Vec<Value>)> {
        let mut state = self.lock();
        if state.version <= seen && !state.watch_over(epoch, deadline) {
            let wait = deadline.map_or(WATCH_POLL, |d| {
                d.saturating_duration_since(Instant::now()).min(WATCH_POLL)
            });
            state = self.wait(state, wait);
        }
        if state.watch_over(epoch, deadline) {
            return None;
        }
        let changes = state.changes_after(seen);
        let events = changes.iter().filter_map(|c| filter.event(c)).collect();
        Some((seen.max(state.version), events))
    }
}

enum Reply {
    Json(Value),
    Created(Value),
    Watch(Watch),
}

struct Watch {
    filter: Filter,
    /// The resourceVersion the client has seen; it gets every change after it.
    from: u64,
    timeout: Option<Duration>,
}

/// The pods a request covers: its path's namespace and its `spec.nodeName` field selector.
struct Filter {
    namespace: Option<String>,
    node: Option<String>,
}

impl Filter {
    fn new(namespace: Option<&str>, query: &Query) -> Result<Self, Failure> {
        if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
            return Err(Failure::bad_request("labelSelector"));
        }
        let node = match query.get("fieldSelector").filter(|s| !s.is_empty()) {
            None => None,
            Some(selector) => Some(node_selector(selector).ok_or_else(|| {
                Failure::bad_request(&format!(
                    "fieldSelector={selector} (only spec.nodeName=NODE is)"
                ))
            })?),
        };
        Ok(Self {
            namespace: namespace.map(str::to_owned),
            node,
        })
    }

    fn matches(&self, pod: &Value) -> bool {
        let is = |wanted: Option<&str>, actual: &Value| {
            wanted.is_none_or(|w| actual.as_str().unwrap_or("") == w)
        };
        is(self.namespace.as_deref(), &pod["metadata"]["namespace"])
            && is(self.node.as_deref(), &pod["spec"]["nodeName"])
    }

    /// The event a watcher with this filter gets for `change`, if any.
    fn event(&self, change: &Change) -> Option<Value> {
        let saw = change.before.as_ref().is_some_and(|p| self.matches(p));
        let sees = change.after.as_ref().is_some_and(|p| self.matches(p));
        let kind = match (saw, sees) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        let object = change.after.as_ref().or(change.before.as_ref());
        Some(json!({ "type": kind, "object": object }))
    }
}

/// The node in `spec.nodeName=NODE` (or `==`), the one field selector the server supports.
fn node_selector(selector: &str) -> Option<String> {
    let node = selector.strip_prefix("spec.nodeName=")?;
    let node = node.strip_prefix('=').unwrap_or(node);
    (!node.contains([',', '=', '!'])).then(|| node.to_owned())
}

/// The namespace a pods path is scoped to (None: all of them); 404 for any other path.
/// `ns` of `/apis/events.k8s.io/v1/namespaces/{ns}/events`.
fn events_namespace(path: &str) -> Option<&str> {
    path.strip_prefix("/apis/events.k8s.io/v1/namespaces/")?
        .strip_suffix("/events")
}

fn pods_namespace(path: &str) -> Result<Option<&str>, Failure> {
    if path == "/api/v1/pods" {
        return Ok(None);
    }
    path.strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.strip_suffix("/pods"))
        .filter(|namespace| !namespace.is_empty() && !namespace.contains('/'))
        .map(Some)
        .ok_or_else(|| Failure {
            code: 404,
            reason: "NotFound",
            message: format!("the fake API server only serves pods, not {path}"),
        })
}

fn parse_continue(token: &str) -> Result<(u64, Option<Key>), Failure> {
    let mut parts = token.splitn(3, '/');
    match (parts.next().map(str::parse), parts.next(), parts.next()) {
        (Some(Ok(version)), Some(namespace), Some(name)) => {
            Ok((version, Some((namespace.to_owned(), name.to_owned()))))
        }
        _ => Err(Failure::bad_request(&format!(
            "continue={token} (not one of its tokens)"
        ))),
    }
}

/// A request's query string, decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(key), decode(value))
            });
        Self(pairs.collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Failure> {
        self.get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| Failure::bad_request(&format!("{key}={value} (not a number)")))
            })
            .transpose()
    }
}

/// Percent-decoding as in `application/x-www-form-urlencoded`, which kube's queries are.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten();
        match (bytes[i], escaped.and_then(hex_byte)) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (byte, None) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digits = std::str::from_utf8(digits).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(digits, 16).ok()
}

/// An HTTP error as the API server reports it: a `Status` body.
struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn bad_request(what: &str) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: format!("the fake API server does not support {what}"),
        }
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// The parts of an HTTP/1.1 request the server looks at.
struct Request {
    method: String,
    target: String,
    close: bool,
    body: Vec<u8>,
}

impl Request {
    /// The next request on the connection; None when the client closed it.
    fn read(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Self>> {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let mut words = line.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (words.next(), words.next(), words.next())
        else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, line));
        };
        let mut request = Self {
            method: method.to_owned(),
            target: target.to_owned(),
            close: version == "HTTP/1.0",
            body: Vec::new(),
        };
        let length = request.read_headers(reader)?;
        reader
            .by_ref()
            .take(length)
            .read_to_end(&mut request.body)?;
        Ok(Some(request))
    }

    /// Reads the headers up to the blank line; returns the body's length.
    fn read_headers(&mut self, reader: &mut BufReader<TcpStream>) -> io::Result<u64> {
        let mut body = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let Some((name, value)) = line.split_once(':') else {
                return Ok(body);
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                self.close = true;
            } else if name.eq_ignore_ascii_case("content-length") {
                body = value
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
            }
        }
    }
}

fn write_json(stream: &mut TcpStream, code: u16, body: &Value, close: bool) -> io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if close {
        response.push_str("Connection: close\r\n");
    }
    response.push_str("\r\n");
    response.push_str(&body);
    stream.write_all(response.as_bytes())
}

/// Whether the client closed the connection: a client that drops a watch hangs up, and nothing
/// else arrives mid-response.
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let closed = match stream.peek(&mut [0]) {
        Ok(read) => read == 0,
        Err(err) => err.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || closed
}
